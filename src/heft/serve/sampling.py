"""One row's next token and its log-probabilities: each request's own random stream, the tokens that end a
generation, sampling (greedy at temperature 0, else temperature + top-p), and the `TokenLogprob`s a request that
asked for logprobs gets (generated tokens, and with echo the prompt's).

Log-probabilities come from the fp32 log_softmax of the model's raw logits, before temperature and top-p.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from heft.serve.types import GenerationRequest, TokenLogprob

__all__ = ["TokenLogprobs", "eos_ids", "request_generator", "sample"]


def request_generator(req: GenerationRequest, device: torch.device) -> torch.Generator | None:
    """The request's own random stream (sampling only): seeded by `req.seed`, else from the clock."""
    if req.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(req.seed if req.seed is not None else time.time_ns() % (2**63))
    return g


def eos_ids(tokenizer: Any, model: Any) -> frozenset[int]:
    """The tokens that end a generation: the tokenizer's eos and the generation config's (an int or a list)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def sample(logits: torch.Tensor, req: GenerationRequest, generator: torch.Generator | None) -> int:
    """One token from `logits` (V,): argmax at temperature 0, else from the top-p nucleus of softmax(logits / T)."""
    if req.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / req.temperature, -1)
    if req.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= req.top_p  # the mass before a token already reaches top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        return int(order[torch.multinomial(sorted_p, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


class TokenLogprobs:
    """Log-probabilities as `TokenLogprob`s, each token named by its text (decoded once per token id)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}  # token id -> its text

    def token(self, logp: torch.Tensor, token: int, n: int) -> TokenLogprob:
        """`token`'s log-probability under `logp` (V,) (fp32 log_softmax of the raw logits) and the top `n`."""
        values, ids = logp.topk(min(n, logp.shape[-1]))
        return TokenLogprob(self.text(token), token, float(logp[token]), self._top(values.tolist(), ids.tolist()))

    def _top(self, values: list[float], ids: list[int]) -> dict[str, float]:
        top: dict[str, float] = {}
        for v, i in zip(values, ids):
            top.setdefault(self.text(i), v)  # two ids with one text: the likelier one's
        return top

    def prompt(self, req: GenerationRequest, logits: torch.Tensor) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it, from this row's prefill logits (T, V)
        (ReFT edits included); the first token has none. Top-N alternatives when the request asked for logprobs."""
        ids = req.prompt_ids
        logp = torch.log_softmax(logits[:-1].float(), -1)  # (T - 1, V): position t predicts token t + 1
        target = torch.tensor(ids[1:], device=logp.device)
        chosen = logp.gather(1, target[:, None])[:, 0].tolist()
        tops: list[dict[str, float] | None] = [None] * len(chosen)
        if req.logprobs is not None:
            values, top_ids = logp.topk(min(req.logprobs, logp.shape[-1]), dim=-1)
            tops = [self._top(v, i) for v, i in zip(values.tolist(), top_ids.tolist())]
        return [TokenLogprob(self.text(ids[0]), ids[0], None, None)] + [
            TokenLogprob(self.text(t), t, lp, top) for t, lp, top in zip(ids[1:], chosen, tops)]

    def text(self, token: int) -> str:
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token])
        return text
