"""What the HTTP layer (heft.serve.app) and the batching engine (heft.serve.engine) exchange.

The HTTP layer turns an OpenAI request into `GenerationRequest`s (token ids, already through the run's prompt
format), submits each to the engine, and reads back `TokenEvent`s then one `Finished` per request.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationRequest:
    prompt_ids: list[int]            # the whole prompt as the model sees it (special tokens included)
    content_start: int = 0           # where ReFT's first positions start (first_from: content); 0 for a plain prompt
    max_new_tokens: int = 16         # >= 0; 0: only score the prompt (echo + logprobs)
    temperature: float = 0.0         # 0: greedy
    top_p: float = 1.0
    seed: int | None = None          # sampling: the same seed gives the same tokens, whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # the text ends before the first of these (finish_reason "stop")
    logprobs: int | None = None      # per generated token: its log-probability and the top-N alternatives
    echo: bool = False               # also the prompt tokens' log-probabilities (the first token has none)


@dataclass
class TokenLogprob:
    token: str                       # the token's text
    token_id: int
    logprob: float | None            # log p(token | what precedes), from the model's raw distribution; None: first prompt token
    top: dict[str, float] | None     # the top-N tokens' texts and log-probabilities at that position (None: not asked)


@dataclass
class TokenEvent:
    """One generated token, eos included (every token the model chose, so logprobs list them all). `text` is the new
    text it makes visible: "" while a stop string or an unfinished UTF-8 character is held back, and for the eos
    token only what was held back; the concatenation of every event's `text` is the final text."""
    token_id: int
    text: str
    logprob: TokenLogprob | None = None  # set when the request asked for logprobs


@dataclass
class Finished:
    finish_reason: str               # "stop" (eos or a stop string), "length", "cancelled", "error"
    text: str                        # the whole generated text (stop string excluded)
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[TokenLogprob] | None = None  # echo + logprobs: one per prompt token
    error: str | None = None         # finish_reason "error": what went wrong


class QueueFull(Exception):
    """The engine's waiting queue is at its bound: the HTTP layer answers 429."""


class EngineClosed(Exception):
    """The engine is shutting down (or has stopped) and takes no new requests: the HTTP layer answers 503."""
