"""OpenAI's wire format as `heft serve` speaks it: the request bodies (pydantic models of OpenAI's fields), errors
in OpenAI's shape, and the pieces of a response (log-probabilities, usage, server-sent events).

Errors have OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, raised anywhere in the HTTP layer as
`ApiError` and answered by the app's exception handler. Fields OpenAI has and heft does not use are accepted and
ignored, except the ones that would change the answer (the app refuses those with a 400).
"""

from __future__ import annotations

import json
from typing import Any

from heft.errors import ConfigError

try:
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
except ImportError:  # pragma: no cover - the extra is installed wherever the tests run
    raise ConfigError("heft serve needs FastAPI and uvicorn, an optional extra: pip install 'heft[serve]'") from None

from heft.serve.types import Finished, TokenLogprob

__all__ = ["MAX_LOGPROBS", "MAX_TOP_LOGPROBS", "ApiError", "ChatBody", "ChatMessage", "CompletionBody", "SamplingBody",
           "StreamOptions",
           "chat_logprobs", "completion_logprobs", "error_body", "finished_error", "message_text", "sse",
           "timeout_error", "token_usage"]

MAX_LOGPROBS = 5       # completions: logprobs 0..5, as OpenAI
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs 0..20, as OpenAI


class ApiError(Exception):
    """An error answered in OpenAI's shape: `status`, a message that says what to change, and the parameter."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.kind, self.param, self.code))


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------- request bodies (OpenAI's fields)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingBody(BaseModel):
    """Fields shared by both endpoints. Fields OpenAI has and heft does not use are accepted and ignored
    (`extra="allow"`), except the ones that would change the answer (penalties, logit_bias, n > 1): those are 400."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(SamplingBody):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


def message_text(m: ChatMessage, k: int) -> str:
    if isinstance(m.content, str):
        return m.content
    if m.content is None:
        return ""
    parts = []
    for part in m.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{k}].content: only text parts ({{type: text, text: ...}}) are supported, got "
                           f"{part.get('type')!r}", f"messages[{k}].content")
        parts.append(part["text"])
    return "".join(parts)


# ----------------------------------------------------------------------------- errors from the engine


def timeout_error() -> ApiError:
    return ApiError(504, "the request took longer than the server's --timeout and was cancelled", None, "timeout",
                    "timeout_error")


def finished_error(fin: Finished) -> ApiError | None:
    if fin.finish_reason == "error":
        return ApiError(500, f"the engine failed on this request: {fin.error}", None, "engine_error", "server_error")
    if fin.finish_reason == "cancelled":
        return ApiError(503, "the request was cancelled by the server (shutting down)", None, "cancelled",
                        "server_error")
    return None


# ----------------------------------------------------------------------------- response pieces


def completion_logprobs(tokens: list[TokenLogprob], start_offset: int) -> dict[str, Any]:
    """OpenAI's completions logprobs: parallel lists; text_offset counts characters from the choice's text."""
    offsets, at = [], start_offset
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens], "text_offset": offsets}


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, lp: float | None) -> dict[str, Any]:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(t.token, t.logprob),
                         "top_logprobs": [entry(k, v) for k, v in (t.top or {}).items()]} for t in tokens],
            "refusal": None}


def token_usage(finished: list[Finished]) -> dict[str, int]:
    p = sum(f.prompt_tokens for f in finished)
    c = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"
