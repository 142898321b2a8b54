"""The HTTP layer (heft.serve.app) in-process, over a scripted engine: OpenAI's response and error shapes, the
limits, 429 / 503 / 504, streaming chunks, echo + logprobs layout, chat through a template, and `heft serve`'s
flag checks. The real engine behind a real server is in test_openai_client.py.

The scripted engine answers prompt ids [..., t] with the tokens t+1, t+2, ... (mod the vocabulary), each with
log-probability -(k+1)/10, so a test knows every token, text and number the API must return."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

import heft
from heft.errors import ConfigError
from heft.serve.app import ServeSettings, create_app
from heft.serve.types import (
    EngineClosed,
    Finished,
    GenerationRequest,
    QueueFull,
    TokenEvent,
    TokenLogprob,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class _Handle:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


class ScriptedEngine:
    """The engine API with scripted answers (see the module docstring); `mode`: "ok", "full" (QueueFull),
    "closed" (EngineClosed), "hang" (never answers until cancelled)."""

    def __init__(self, tokenizer: Any, vocab: int, mode: str = "ok"):
        self.tok, self.vocab, self.mode = tokenizer, vocab, mode
        self.requests: list[GenerationRequest] = []
        self.handles: list[_Handle] = []

    def stats(self) -> dict:
        return {"running": 0, "waiting": 0}

    def submit(self, req: GenerationRequest, on_event: Callable[[Any], None]) -> _Handle:
        if self.mode == "full":
            raise QueueFull
        if self.mode == "closed":
            raise EngineClosed
        self.requests.append(req)
        h = _Handle()
        self.handles.append(h)
        threading.Thread(target=self._answer, args=(req, on_event, h), daemon=True).start()
        return h

    def _lp(self, token_id: int, lp: float | None, n: int | None) -> TokenLogprob:
        text = self.tok.convert_ids_to_tokens(token_id)
        return TokenLogprob(text, token_id, lp, None if n is None else {text: lp if lp is not None else 0.0})

    def _answer(self, req: GenerationRequest, on_event: Callable[[Any], None], h: _Handle) -> None:
        if self.mode == "hang":
            h.cancelled.wait(30)
            on_event(Finished("cancelled", "", len(req.prompt_ids), 0))
            return
        ids = [(req.prompt_ids[-1] + k + 1) % self.vocab for k in range(req.max_new_tokens)]
        for k, t in enumerate(ids):
            lp = self._lp(t, -(k + 1) / 10, req.logprobs) if req.logprobs is not None else None
            on_event(TokenEvent(t, (" " if k else "") + self.tok.convert_ids_to_tokens(t), lp))
        prompt_lps = None
        if req.echo:
            prompt_lps = [self._lp(t, None if k == 0 else -1.0, None if k == 0 else req.logprobs)
                          for k, t in enumerate(req.prompt_ids)]
        on_event(Finished("length", " ".join(self.tok.convert_ids_to_tokens(t) for t in ids), len(req.prompt_ids),
                          len(ids), prompt_lps))


@pytest.fixture(scope="module")
def loaded(lora_run):
    return heft.load(lora_run)


def _client(loaded, mode: str = "ok", **settings: Any) -> tuple[TestClient, ScriptedEngine]:
    model, tok = loaded
    engine = ScriptedEngine(tok, int(model.config.vocab_size), mode)
    s = {"model_name": "tiny", "context_length": 512, "max_prompt_tokens": 512, "max_new_tokens": 64,
         "timeout": 30.0, **settings}
    return TestClient(create_app(model, tok, engine, ServeSettings(**s))), engine


def _error(r: Any, status: int, param: str | None, words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and words in err["message"], err
    return err


def test_health_and_models(loaded):
    client, _ = _client(loaded)
    assert client.get("/health").json()["status"] == "ok"
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny"]


def test_text_prompt_goes_through_the_run_prompt_format(loaded):
    """A text prompt reaches the engine as the run's own encoding; a list of token-id lists as they are."""
    model, tok = loaded
    client, engine = _client(loaded)
    text = "Cats are small animals .\nQuestion: do cats sleep during the day?\nAnswer:"
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": text, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    enc = model.encode(text, None, "t")
    assert engine.requests[0].prompt_ids == list(enc.prompt)
    assert engine.requests[0].content_start == enc.content_start
    assert engine.requests[0].max_new_tokens == 3 and engine.requests[0].temperature == 0
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    last = enc.prompt[-1]
    expect = " ".join(tok.convert_ids_to_tokens(last + k + 1) for k in range(3))
    assert body["choices"] == [{"index": 0, "text": expect, "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": len(enc.prompt), "completion_tokens": 3,
                             "total_tokens": len(enc.prompt) + 3}

    r = client.post("/v1/completions", json={"prompt": [[5, 6], [7, 8, 9]], "max_tokens": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert [q.prompt_ids for q in engine.requests[1:]] == [[5, 6], [7, 8, 9]]
    assert [q.content_start for q in engine.requests[1:]] == [0, 0]
    r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 1})
    assert engine.requests[-1].prompt_ids == [5, 6, 7] and len(r.json()["choices"]) == 1


def test_echo_logprobs_layout(loaded):
    """echo + logprobs: prompt tokens first (the first with null logprob and null top), then the generated ones;
    text_offset counts characters of the returned text."""
    client, engine = _client(loaded)
    r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert engine.requests[0].echo and engine.requests[0].logprobs == 1
    assert lp["token_logprobs"] == [None, -1.0, -1.0, -0.1, -0.2]
    assert lp["top_logprobs"][0] is None and all(isinstance(t, dict) for t in lp["top_logprobs"][1:])
    assert len(lp["tokens"]) == 5 and lp["text_offset"][0] == 0
    assert all(b - a == len(t) for a, b, t in zip(lp["text_offset"], lp["text_offset"][1:], lp["tokens"]))
    # max_tokens 0 with echo: the prompt's scores only
    r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.json()["choices"][0]["logprobs"]["token_logprobs"] == [None, -1.0, -1.0]


def test_streaming_concatenates_to_the_answer(loaded):
    client, _ = _client(loaded)
    ask = {"prompt": ["Cats are small animals", "do bees make honey"], "max_tokens": 4}
    whole = client.post("/v1/completions", json=ask).json()
    with client.stream("POST", "/v1/completions", json={**ask, "stream": True,
                                                        "stream_options": {"include_usage": True}}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    texts, reasons = ["", ""], [None, None]
    for c in chunks[:-1]:
        for ch in c["choices"]:
            texts[ch["index"]] += ch["text"]
            reasons[ch["index"]] = ch["finish_reason"] or reasons[ch["index"]]
    assert texts == [c["text"] for c in whole["choices"]] and reasons == ["length", "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_chat_through_the_template(loaded):
    """A run trained on plain prompts answers chat through its tokenizer's template; with none, 400 says so."""
    from helpers import CHAT_TEMPLATE

    _, tok = loaded
    client, engine = _client(loaded)
    msgs = [{"role": "user", "content": "do bees make honey"}]
    _error(client.post("/v1/chat/completions", json={"messages": msgs}), 400, "messages", "no chat template")
    tok.chat_template = CHAT_TEMPLATE
    try:
        r = client.post("/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": 3, "logprobs": True,
                                                      "top_logprobs": 1})
        assert r.status_code == 200, r.text
        assert engine.requests[-1].prompt_ids == tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                                         tokenize=True, return_dict=False)
        body = r.json()
        assert body["object"] == "chat.completion"
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
        assert [c["logprob"] for c in choice["logprobs"]["content"]] == [-0.1, -0.2, -0.3]
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": msgs, "max_tokens": 3, "stream": True}) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln and ln != "data: [DONE]"]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == choice["message"]["content"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        # no max_tokens: the server's limit, within the context
        client.post("/v1/chat/completions", json={"messages": msgs})
        assert engine.requests[-1].max_new_tokens == 64
    finally:
        tok.chat_template = None


@pytest.mark.parametrize("body, param, words", [
    ({"model": "gpt-4", "prompt": "do bees make honey"}, "model", "'gpt-4' is not served here"),
    ({"prompt": "do bees make honey", "max_tokens": -1}, "max_tokens", "between 0 and 64"),
    ({"prompt": "do bees make honey", "max_tokens": 65}, "max_tokens", "between 0 and 64"),
    ({"prompt": "do bees make honey", "n": 2}, "n", "n must be 1"),
    ({"prompt": "do bees make honey", "logprobs": 6}, "logprobs", "between 0 and 5"),
    ({"prompt": "do bees make honey", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"prompt": [1, 2, 99999]}, "prompt", "token id 99999 is outside the vocabulary"),
    ({"prompt": []}, "prompt", "must not be empty"),
    ({"prompt": 5}, "prompt", "invalid request"),
    ({"prompt": "x", "temperature": "hot"}, "temperature", "invalid request"),
    ({"max_tokens": 3}, "prompt", "Field required"),
])
def test_bad_completion_requests_get_400(loaded, body, param, words):
    client, engine = _client(loaded)
    _error(client.post("/v1/completions", json=body), 400, param, words)
    assert engine.requests == []  # nothing reached the engine
    assert client.post("/v1/completions", json={"prompt": [5], "max_tokens": 1}).status_code == 200  # still serving


def test_malformed_json_and_limits(loaded):
    client, _ = _client(loaded, max_prompt_tokens=4, context_length=8)
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "invalid request" in r.json()["error"]["message"]
    _error(client.post("/v1/completions", json={"prompt": [1, 2, 3, 4, 5]}), 400, "prompt",
           "has 5 tokens, more than the 4")
    _error(client.post("/v1/completions", json={"prompt": "Cats are small animals that often sleep"}), 400, "prompt",
           "more than the 4")
    _error(client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 6}), 400, "max_tokens",
           "exceed the model's context of 8 tokens; lower max_tokens to at most 5")
    _error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                     "top_logprobs": 2}), 400, "top_logprobs", "needs logprobs")


@pytest.mark.parametrize("mode, status, code", [("full", 429, "queue_full"), ("closed", 503, "shutting_down")])
def test_engine_refusals(loaded, mode, status, code):
    client, _ = _client(loaded, mode)
    r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == status and r.json()["error"]["code"] == code


def test_timeout_cancels_the_engine_request(loaded):
    client, engine = _client(loaded, "hang", timeout=0.5)
    t0 = time.monotonic()
    r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    assert time.monotonic() - t0 < 5 and engine.handles[0].cancelled.is_set()
    with client.stream("POST", "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "stream": True}) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert json.loads(lines[-1][6:])["error"]["code"] == "timeout" and engine.handles[1].cancelled.is_set()


def test_closing_answers_503(loaded):
    client, engine = _client(loaded)
    client.app.state.closing = True
    r = client.post("/v1/completions", json={"prompt": [5, 6]})
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down" and engine.requests == []


def test_serve_flags_are_checked_together(tmp_path):
    from heft.cli import build_parser
    from heft.serve.server import serve_command

    args = build_parser().parse_args(["serve", str(tmp_path), "--port", "70000", "--max-concurrent", "0",
                                      "--timeout", "0"])
    with pytest.raises(ConfigError) as e:
        serve_command(args)
    assert str(e.value) == ("heft serve: --port 70000: give 0 (a free port) to 65535; --max-concurrent 0: give at "
                            "least 1; --timeout 0.0: give a positive number of seconds")
