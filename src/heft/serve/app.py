"""The OpenAI-compatible HTTP API of `heft serve`: `GET /health`, `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions`, over the continuous-batching engine (heft.serve.engine). This module holds the app:
its settings, the prompts it builds, its routes and their streamed answers; OpenAI's request bodies, error shape
and response pieces are heft.serve.openai_api, the engine requests of one HTTP request heft.serve.engine_calls.

Each prompt becomes one `GenerationRequest` with the ids the run's own evaluation would give it: a text prompt goes
through the run's prompt format (`HeftModel.encode`: a chat run renders it as the user's turn), chat messages
through the tokenizer's chat template (with the run's system message on a chat run), and token-id prompts are
taken as they are (ReFT's first positions start at their first token).

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a request heft cannot
answer as asked (unknown model, max_tokens out of range, a prompt longer than --max-prompt-tokens or the context,
n > 1, logprobs out of range, malformed JSON or wrong types), 429 when the engine's queue is full, 503 once the
server is shutting down, 504 after --timeout (the engine request is cancelled). A streaming client that goes away
has its engine requests cancelled, which frees their batch slots.

Scoring through this API with ReFT (`echo` + `logprobs`, as lm-evaluation-harness's `local-completions` does):
a text API receives context and continuation as one prompt, so ReFT's *last* positions fall on the last tokens
of the continuation instead of the context's. heft's own scoring (`heft eval`, `heft lm-eval`) edits the context
only. With `reft.positions.last: 0` (first positions only) the two agree exactly; with last > 0 the scores
through the API differ from heft's own, and accuracies measured that way are not the run's.

FastAPI is the `serve` extra: importing this module without it raises one line that says how to install it.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from heft.errors import ConfigError, HeftError

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
except ImportError:  # pragma: no cover - the extra is installed wherever the tests run
    raise ConfigError("heft serve needs FastAPI and uvicorn, an optional extra: pip install 'heft[serve]'") from None

from heft.serve.engine_calls import Submitted, collect, stream_events
from heft.serve.openai_api import (
    MAX_LOGPROBS,
    MAX_TOP_LOGPROBS,
    ApiError,
    ChatBody,
    CompletionBody,
    SamplingBody,
    chat_logprobs,
    completion_logprobs,
    error_body,
    finished_error,
    message_text,
    sse,
    token_usage,
)
from heft.serve.types import Finished, GenerationRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeSettings:
    """What the HTTP layer needs besides the model and the engine (from `heft serve`'s flags)."""

    model_name: str          # the one model id /v1/models lists and requests may name
    context_length: int      # the model's positions: prompt + max_tokens must fit
    max_prompt_tokens: int   # longest prompt accepted (<= context_length)
    max_new_tokens: int      # largest max_tokens accepted
    timeout: float           # seconds a request may take, queue included


# ----------------------------------------------------------------------------- prompts -> engine requests


@dataclass
class _Prompt:
    ids: list[int]
    content_start: int
    echo_text: str   # what `echo` puts in front of the answer


class Prompts:
    """Turns request prompts into engine prompts, as the run's own evaluation builds them, within the limits."""

    def __init__(self, model: Any, tokenizer: Any, settings: ServeSettings):
        self.model, self.tok, self.settings = model, tokenizer, settings
        self.vocab = int(model.config.vocab_size)

    def _encoder(self) -> Any:
        # the run's encoder with the server's prompt budget: a longer prompt comes back `truncated` (its first
        # tokens cut), which the server refuses rather than answering a prompt the client did not send
        return self.model.session.encoder(self.settings.max_prompt_tokens)

    def _fits(self, n: int | None, where: str) -> None:
        """`n` prompt tokens (None: more than the budget) are accepted."""
        if n is None or n > self.settings.max_prompt_tokens:
            has = "more" if n is None else f"{n} tokens, more"
            raise ApiError(400, f"{where}: the prompt has {has} than the {self.settings.max_prompt_tokens} this server "
                           "accepts (--max-prompt-tokens, at most the model's context); shorten it",
                           "prompt", "context_length_exceeded")
        if n == 0:
            raise ApiError(400, f"{where}: the prompt is empty; give at least one token", "prompt")

    def text(self, text: str, where: str) -> _Prompt:
        from heft.data.tokens import encode_request

        enc = self._run_encode(lambda: encode_request(self._encoder(), self.model.prompt, text, None, where), "prompt")
        self._fits(None if enc.truncated else len(enc.prompt), where)
        return _Prompt(list(enc.prompt), enc.content_start, text)

    def ids(self, ids: Sequence[int], where: str) -> _Prompt:
        self._fits(len(ids), where)
        bad = next((t for t in ids if not 0 <= t < self.vocab), None)
        if bad is not None:
            raise ApiError(400, f"{where}: token id {bad} is outside the vocabulary (0..{self.vocab - 1})", "prompt")
        return _Prompt(list(ids), 0, self.tok.decode(list(ids)))

    def chat(self, messages: list[dict[str, str]], where: str) -> _Prompt:
        """A chat run: its prompt format (system message, content start). Another run: its tokenizer's chat
        template as it is (ReFT's first positions from the user's content when the run set first_from: content)."""
        from heft.data.tokens import encode_request

        if self.model.prompt.chat:
            enc = self._run_encode(lambda: encode_request(self._encoder(), self.model.prompt, messages, None, where),
                                   "messages")
            if enc.truncated:
                self._fits(None, where)
            ids, start = list(enc.prompt), enc.content_start
        else:
            if getattr(self.tok, "chat_template", None) is None:
                raise ApiError(400, f"{where}: this run's tokenizer has no chat template, so heft cannot build a chat "
                               "prompt; use /v1/completions with the prompt as text", "messages")
            turns = [(m["role"], m["content"]) for m in messages]
            _, ids, start = self._run_encode(lambda: self._encoder().chat_prompt(turns, where), "messages")
        self._fits(len(ids), where)
        return _Prompt(ids, start, "")

    @staticmethod
    def _run_encode(fn: Any, param: str) -> Any:
        try:
            return fn()
        except HeftError as e:  # the run's encoder names what is wrong with the request
            raise ApiError(400, str(e), param) from None

    def max_tokens(self, asked: int | None, prompt_len: int, param: str) -> int:
        s = self.settings
        room = s.context_length - prompt_len
        if asked is None:  # chat without max_tokens: as much as the context and the server allow
            return max(0, min(s.max_new_tokens, room))
        if asked < 0 or asked > s.max_new_tokens:
            raise ApiError(400, f"{param} must be between 0 and {s.max_new_tokens} (--max-new-tokens), got {asked}",
                           param)
        if asked > room:
            raise ApiError(400, f"the prompt ({prompt_len} tokens) and {param}={asked} exceed the model's context of "
                           f"{s.context_length} tokens; lower {param} to at most {max(0, room)}", param,
                           "context_length_exceeded")
        return asked


def _check_common(body: SamplingBody, settings: ServeSettings) -> list[str]:
    """The checks both endpoints make; returns the stop strings."""
    if body.model is not None and body.model != settings.model_name:
        raise ApiError(400, f"model {body.model!r} is not served here; this server has "
                       f"{settings.model_name!r}", "model", "model_not_found")
    if body.n != 1:
        raise ApiError(400, f"n must be 1 (heft serve returns one choice per prompt), got {body.n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise ApiError(400, f"{name} is not supported by heft serve; leave it at 0", name)
    if body.logit_bias:
        raise ApiError(400, "logit_bias is not supported by heft serve; leave it out", "logit_bias")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise ApiError(400, "stop strings must be non-empty", "stop")
    return stop

# ----------------------------------------------------------------------------- the app


def create_app(model: Any, tokenizer: Any, engine: Any, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving `model` (a `heft.load` HeftModel) through `engine` (started by the caller).
    `app.state.closing = True` makes every new request a 503 (the server sets it on SIGTERM)."""
    app = FastAPI(title="heft serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.closing = False
    prompts = Prompts(model, tokenizer, settings)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        loc = first.get("loc", ())
        param = str(loc[1]) if len(loc) > 1 else None  # the body's field (loc[0] is "body")
        message = "; ".join(f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                            for err in errors[:5])
        return ApiError(400, f"invalid request: {message}", param).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception) -> JSONResponse:  # a bug in heft: still OpenAI's shape
        logger.exception("heft serve: unexpected error")
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error",
                        "server_error").response()

    app.add_middleware(_RefuseWhileClosing, state=app.state)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "heft", "max_model_len": settings.context_length}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        stop = _check_common(body, settings)
        if body.best_of not in (None, 1):
            raise ApiError(400, f"best_of must be 1, got {body.best_of}", "best_of")
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be between 0 and {MAX_LOGPROBS}, got {body.logprobs}", "logprobs")
        if body.stream and body.echo and body.logprobs is not None:
            raise ApiError(400, "echo with logprobs is answered without streaming only; set stream: false", "stream")
        raw = body.prompt
        if isinstance(raw, str):
            items: list[str | list[int]] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            items = [list(raw)]  # type: ignore[arg-type]
        else:
            items = list(raw)  # type: ignore[arg-type]
        if not items:
            raise ApiError(400, "prompt must not be empty", "prompt")
        built = [prompts.text(p, f"prompt[{i}]") if isinstance(p, str) else prompts.ids(p, f"prompt[{i}]")
                 for i, p in enumerate(items)]
        reqs = [GenerationRequest(prompt_ids=p.ids, content_start=p.content_start,
                                  max_new_tokens=prompts.max_tokens(body.max_tokens if body.max_tokens is not None
                                                                    else 16, len(p.ids), "max_tokens"),
                                  temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                                  logprobs=body.logprobs, echo=body.echo and body.logprobs is not None)
                for p in built]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": settings.model_name}
        deadline = time.monotonic() + settings.timeout
        sub = Submitted(engine)
        sub.submit(reqs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EngineStream(_stream_completion(sub, head, built, body.echo, include_usage, deadline), sub)
        events, finished = await collect(sub, len(reqs), request, deadline)
        choices = []
        for i, (p, evs, fin) in enumerate(zip(built, events, finished)):
            err = finished_error(fin)
            if err is not None:
                raise err
            lead = p.echo_text if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                toks = [e.logprob for e in evs if e.logprob is not None]
                if body.echo:
                    prompt_lps = list(fin.prompt_logprobs or [])
                    logprobs = completion_logprobs(prompt_lps + toks, 0)
                else:
                    logprobs = completion_logprobs(toks, 0)
            choices.append({"index": i, "text": lead + fin.text, "logprobs": logprobs,
                            "finish_reason": fin.finish_reason})
        return {**head, "choices": choices, "usage": token_usage(finished)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request) -> Any:
        stop = _check_common(body, settings)
        if body.top_logprobs is not None:
            if not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {body.top_logprobs}",
                               "top_logprobs")
        if not body.messages:
            raise ApiError(400, "messages must not be empty", "messages")
        messages = [{"role": m.role, "content": message_text(m, k)} for k, m in enumerate(body.messages)]
        p = prompts.chat(messages, "messages")
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        req = GenerationRequest(prompt_ids=p.ids, content_start=p.content_start,
                                max_new_tokens=prompts.max_tokens(asked, len(p.ids), param),
                                temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                                logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        deadline = time.monotonic() + settings.timeout
        sub = Submitted(engine)
        sub.submit([req])
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _EngineStream(_stream_chat(sub, head, body.logprobs, include_usage, deadline), sub)
        events, finished = await collect(sub, 1, request, deadline)
        fin = finished[0]
        err = finished_error(fin)
        if err is not None:
            raise err
        logprobs = chat_logprobs([e.logprob for e in events[0] if e.logprob is not None]) if body.logprobs else None
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": fin.text, "refusal": None},
                             "logprobs": logprobs, "finish_reason": fin.finish_reason}],
                "usage": token_usage(finished)}

    return app


class _EngineStream(StreamingResponse):
    """Server-sent events from engine requests. However the response ends (finished, the client gone, the server
    stopping), the engine requests still open are cancelled, so a client that leaves frees its batch slots."""

    def __init__(self, content: AsyncIterator[str], sub: Submitted):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.sub = sub

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if self.sub.open:
                self.sub.cancel()


class _RefuseWhileClosing:
    """ASGI middleware: 503 for every new HTTP request once `state.closing` is set (a plain ASGI layer, so a
    streaming response and its client's disconnect pass through untouched)."""

    def __init__(self, app: Any, state: Any):
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.state.closing:
            response = ApiError(503, "the server is shutting down; retry on another instance", None, "shutting_down",
                                "server_error").response()
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

async def _stream_completion(sub: Submitted, head: dict[str, Any], built: list[_Prompt], echo: bool,
                             include_usage: bool, deadline: float) -> AsyncIterator[str]:
    finished: list[Finished] = []
    usage = {"usage": None} if include_usage else {}

    def chunk(i: int, text: str, logprobs: Any = None, reason: str | None = None) -> str:
        return sse({**head, "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}],
                     **usage})
    try:
        if echo:
            for i, p in enumerate(built):
                yield chunk(i, p.echo_text)
        offsets = [0] * len(built)
        async for i, ev in stream_events(sub, deadline):
            if isinstance(ev, Finished):
                finished.append(ev)
                err = finished_error(ev)
                if err is not None:
                    yield sse(error_body(err.message, err.kind, err.param, err.code))
                    return
                yield chunk(i, "", None, ev.finish_reason)
            elif ev.text or ev.logprob is not None:
                lp = completion_logprobs([ev.logprob], offsets[i]) if ev.logprob is not None else None
                offsets[i] += len(ev.text)
                yield chunk(i, ev.text, lp)
    except ApiError as e:
        yield sse(error_body(e.message, e.kind, e.param, e.code))
        return
    if include_usage:
        yield sse({**head, "choices": [], "usage": token_usage(finished)})
    yield "data: [DONE]\n\n"


async def _stream_chat(sub: Submitted, head: dict[str, Any], logprobs: bool, include_usage: bool,
                       deadline: float) -> AsyncIterator[str]:
    finished: list[Finished] = []
    usage = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], lp: Any = None, reason: str | None = None) -> str:
        return sse({**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}], **usage})
    try:
        yield chunk({"role": "assistant", "content": ""})
        async for _, ev in stream_events(sub, deadline):
            if isinstance(ev, Finished):
                finished.append(ev)
                err = finished_error(ev)
                if err is not None:
                    yield sse(error_body(err.message, err.kind, err.param, err.code))
                    return
                yield chunk({}, None, ev.finish_reason)
            elif ev.text or (logprobs and ev.logprob is not None):
                lp = chat_logprobs([ev.logprob]) if logprobs and ev.logprob is not None else None
                yield chunk({"content": ev.text}, lp)
    except ApiError as e:
        yield sse(error_body(e.message, e.kind, e.param, e.code))
        return
    if include_usage:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": token_usage(finished)})
    yield "data: [DONE]\n\n"


__all__ = ["ApiError", "Prompts", "ServeSettings", "create_app"]
