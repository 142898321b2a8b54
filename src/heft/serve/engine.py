"""Continuous batching for a finished run: requests join and leave one running batch between decode steps, and ReFT
edits each request's own prompt positions.

One engine thread owns the model. Each turn of its loop:

1. admit waiting requests up to `max_concurrent` running ones;
2. prefill the newly admitted ones together: one left-padded pass through the ReFT wrapper, with each row's own
   `prompt_start`/`prompt_len` (heft.data.tokens.prompt_batch, `content_start` honoured), so every request's first
   and last prompt positions are edited exactly as `heft.generate` edits them; the last position's logits give each
   request its first token;
3. merge their keys/values into the running batch's cache (heft.serve.kv_batch): both left-padded to a common
   width, the attention mask marking the padding, position ids counted over real tokens only;
4. one decode step for the whole running batch through the base model. No ReFT context is set there, so generated
   tokens are never edited (as in training and `heft.generate`: ReFT edits the prompt pass only);
5. sample each row (heft.serve.sampling: greedy at temperature 0, else temperature + top-p with the request's own
   `torch.Generator`, so a seed gives the same tokens whatever else is batched), emit `TokenEvent`s with the text
   that is safe to send (heft.serve.text), and drop finished or cancelled rows from the cache, then the left
   columns that are padding in every remaining row.

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`): it runs every step as
one flattened sequence of all requests' tokens (paged attention over `cumulative_seqlens`) and splits long prompts
across steps (chunked prefill). ReFT's hooks edit positions of a (batch, tokens, hidden) layer output given per row;
in the flattened layout a request's prompt may be cut across steps and its positions shift with whatever else is in
the step, so the hooks would need a rewrite against transformers' internal batch layout. A plain cache, rows merged
and dropped between steps, keeps the hooks and `ReftModel.forward` as they are.

A model whose cache cannot be merged row by row (sliding-window or non-dynamic cache layers) is served one request
at a time, with the reason logged once, rather than with wrong outputs.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from heft.data.tokens import prompt_batch
from heft.serve.kv_batch import Batch, merge, select_rows, trim, why_not_mergeable
from heft.serve.sampling import TokenLogprobs, eos_ids, request_generator, sample
from heft.serve.text import first_stop, safe_end
from heft.serve.types import (
    EngineClosed,
    Finished,
    GenerationRequest,
    QueueFull,
    TokenEvent,
    TokenLogprob,
)

logger = logging.getLogger(__name__)

__all__ = ["Engine", "RequestHandle"]

OnEvent = Callable[[TokenEvent | Finished], None]

ECHO_LOGITS = 2**28
"""Most logits (rows x tokens x vocabulary, 1 GiB in fp32) one prefill pass may return for echo requests; more
echo requests are prefilled in several passes."""


class RequestHandle:
    """A submitted request: `cancel()` takes it out of the batch at the next step (its `Finished` says "cancelled")."""

    def __init__(self, rid: int, engine: Engine):
        self.id = rid
        self._engine = engine
        self.cancelled = False

    def cancel(self) -> None:
        """Thread-safe; a request that already finished is left as it is."""
        self.cancelled = True
        self._engine._wake()


@dataclass
class _Job:
    """A request as the engine thread tracks it, waiting or running."""

    req: GenerationRequest
    on_event: OnEvent
    handle: RequestHandle
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)  # generated tokens, eos included
    sent: str = ""  # the text the TokenEvents have carried so far
    next_id: int | None = None  # the last sampled token, not yet in the cache
    prompt_logprobs: list[TokenLogprob] | None = None
    done: bool = False


class Engine:
    """Decodes many requests of one loaded run together (see the module docstring)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_concurrent: int = 16, max_queue: int = 64):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent: must be >= 1, got {max_concurrent}")
        if max_queue < 0:
            raise ValueError(f"max_queue: must be >= 0, got {max_queue}")
        from heft.reuse.kv import cache_field

        self.model, self.tokenizer = model, tokenizer
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self._reft = model.reft  # None: a run without ReFT
        self._base = model.session.model  # decode steps: the same weights, no ReFT context
        self._rt = model.session.rt
        self._cache_field = cache_field()
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._eos = eos_ids(tokenizer, self._base)
        self._solo: str | None = None  # why this model's cache cannot be merged (then one request at a time)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._batch: Batch | None = None
        self._ids = itertools.count()
        self._closing = False
        self._drain = True
        self._thread: threading.Thread | None = None
        # finished requests by reason (added under the lock), tokens, steps (there from the start: `stats` iterates
        # over the keys on another thread while the engine counts)
        self._counts: collections.Counter[str] = collections.Counter(tokens=0, steps=0)
        self._logprobs = TokenLogprobs(tokenizer)

    # ------------------------------------------------------------------ API (any thread)

    def start(self) -> None:
        """Start the background decode thread (once)."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("Engine.start: the engine thread is already started")
            if self._closing:
                raise EngineClosed("the engine was shut down before it started")
            self._thread = threading.Thread(target=self._loop, name="heft-engine", daemon=True)
            self._thread.start()

    def submit(self, req: GenerationRequest, on_event: OnEvent) -> RequestHandle:
        """Queue `req`; `on_event` gets its TokenEvents then one Finished, on the engine thread."""
        _check(req)
        with self._cond:
            if self._closing:
                raise EngineClosed("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already wait (max_queue={self.max_queue}); retry later")
            handle = RequestHandle(next(self._ids), self)
            self._waiting.append(_Job(req, on_event, handle, request_generator(req, self._rt.device)))
            self._cond.notify_all()
        return handle

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; with `drain`, finish every admitted and queued one first (else cancel them); then
        stop the engine thread (waiting at most `timeout` seconds for it)."""
        with self._cond:
            self._closing = True
            self._drain = self._drain and drain
            self._cond.notify_all()
            thread = self._thread
        if thread is None:  # never started: nothing will run what waits
            self._cancel_waiting()
            return
        thread.join(timeout)
        if thread.is_alive():
            logger.warning("heft serve: the engine thread still runs after %.1f s of shutdown", timeout or 0.0)

    def stats(self) -> dict[str, Any]:
        """Running and waiting requests, the limits, finished requests by reason, tokens generated."""
        with self._cond:
            batch = self._batch
            return {"running": len(batch.jobs) if batch is not None else 0, "waiting": len(self._waiting),
                    "max_concurrent": self.max_concurrent, "max_queue": self.max_queue,
                    "finished": {k[9:]: v for k, v in self._counts.items() if k.startswith("finished_")},
                    "generated_tokens": self._counts["tokens"], "steps": self._counts["steps"],
                    "batching": "one request at a time: " + self._solo if self._solo else "continuous",
                    "closing": self._closing}

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._batch is not None or self._waiting or self._closing):
                    self._cond.wait(timeout=1.0)
                abort = self._closing and not self._drain
                if self._closing and self._batch is None and not self._waiting and not abort:
                    return
                cancelled = [j for j in self._waiting if j.handle.cancelled]
                for j in cancelled:
                    self._waiting.remove(j)
                admitted = [] if abort else self._admit()
            for j in cancelled:
                self._finish(j, "cancelled")
            if abort:
                self._cancel_all()
                return
            try:
                self._turn(admitted)
            except Exception as e:  # noqa: BLE001  the thread must outlive any one step
                jobs = admitted + (self._batch.jobs if self._batch is not None else [])
                self._set_batch(None)
                self._fail(jobs, e)

    def _admit(self) -> list[_Job]:
        """Waiting requests that join now (called under the lock): up to `max_concurrent` rows, or only into an
        empty batch, one, when the cache cannot be merged."""
        running = len(self._batch.jobs) if self._batch is not None else 0
        room = self.max_concurrent - running
        if self._solo:
            room = 1 if running == 0 else 0
        out = []
        while self._waiting and len(out) < room:
            out.append(self._waiting.popleft())
        return out

    def _turn(self, admitted: list[_Job]) -> None:
        """Drop cancelled rows, prefill `admitted` into the batch, then one decode step; an error fails only the
        requests it touched and leaves the thread running."""
        self._drop(lambda j: j.handle.cancelled, "cancelled")
        admitted = [j for j in admitted if not (j.handle.cancelled and self._finish(j, "cancelled"))]
        if admitted:
            self._prefill(admitted)  # fails the requests it cannot run, never raises
        if self._batch is not None:
            try:
                self._decode()
            except Exception as e:  # noqa: BLE001  the cache is in an unknown state: fail the batch, go on
                jobs = self._batch.jobs
                self._set_batch(None)
                self._fail(jobs, e)

    def _prefill(self, jobs: list[_Job]) -> None:
        """Prefill `jobs`: those without echo in one pass (only their last logits are kept), those with echo in
        passes whose full (rows, tokens, vocabulary) logits stay within `ECHO_LOGITS`."""
        plain = [j for j in jobs if not j.req.echo]
        groups = [plain] if plain else []
        group: list[_Job] = []
        vocab = self._base.config.get_text_config().vocab_size
        for j in (j for j in jobs if j.req.echo):
            longest = max([len(j.req.prompt_ids)] + [len(g.req.prompt_ids) for g in group])
            if group and (len(group) + 1) * longest * vocab > ECHO_LOGITS:
                groups.append(group)
                group = []
            group.append(j)
        groups += [group] if group else []
        for n, g in enumerate(groups):
            if self._solo and self._batch is not None:  # found out in this turn: the rest waits for an empty batch
                with self._cond:
                    self._waiting.extendleft(reversed([j for rest in groups[n:] for j in rest]))
                return
            try:
                self._prefill_group(g)
            except Exception as e:  # noqa: BLE001  a bad request (a token id past the vocabulary) fails alone
                if len(g) == 1 or any(j.out_ids for j in g):
                    self._fail(g, e)
                    continue
                logger.warning("heft serve: a prefill of %d requests failed (%s); prefilling them one by one", len(g), e)
                for j in g:
                    try:
                        self._prefill_group([j])
                    except Exception as e1:  # noqa: BLE001
                        self._fail([j], e1)

    def _fail(self, jobs: list[_Job], e: Exception) -> None:
        """End `jobs` with finish_reason "error" (the ones not yet finished), logging why."""
        logger.error("heft serve: %d requests failed: %s: %s", len(jobs), type(e).__name__, e, exc_info=e)
        for j in jobs:
            if not j.done:
                self._finish(j, "error", error=f"{type(e).__name__}: {e}")

    @torch.no_grad()
    def _prefill_group(self, jobs: list[_Job]) -> None:
        """One left-padded pass over `jobs`' prompts (ReFT on each row's own positions); their first tokens; their
        cache rows merged into the running batch."""
        reqs = [j.req for j in jobs]
        batch = {k: v.to(self._rt.device) for k, v in prompt_batch(
            [r.prompt_ids for r in reqs], self._pad_id, [r.content_start for r in reqs]).items()}
        kwargs = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"], "use_cache": True}
        if not any(r.echo for r in reqs):
            kwargs["logits_to_keep"] = 1  # only the last position's logits: the first token
        with self._rt.autocast():
            if self._reft is not None:
                out = self._reft(batch["input_ids"], batch["prompt_start"], batch["prompt_len"], **kwargs)
            else:
                out = self._base(input_ids=batch["input_ids"], **kwargs)
        logits = out.logits  # (B, T or 1, V)
        cache, mask = getattr(out, self._cache_field), batch["attention_mask"]
        for b, j in enumerate(jobs):
            if j.req.echo:
                j.prompt_logprobs = self._logprobs.prompt(j.req, logits[b, -len(j.req.prompt_ids):])
        if self._solo is None and (why := why_not_mergeable(cache)) is not None:
            self._solo = why
            logger.warning("heft serve: this model's keys/values cache cannot be merged across requests (%s); "
                           "serving one request at a time", why)
        keep = [b for b, j in enumerate(jobs) if not self._first_token(j, logits[b, -1].float())]
        if not keep:
            return
        if len(keep) < len(jobs):
            idx = torch.tensor(keep, device=mask.device)
            select_rows(cache, idx)
            mask = mask.index_select(0, idx)
        new = Batch([jobs[b] for b in keep], *self._trim(cache, mask))
        self._set_batch(new if self._batch is None else merge(self._batch, new))

    def _trim(self, cache: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """`kv_batch.trim`, except for a cache that cannot be merged (a sliding window's keys are not one per column)."""
        return (cache, mask) if self._solo else trim(cache, mask)

    def _first_token(self, job: _Job, logits: torch.Tensor) -> bool:
        """Sample `job`'s first token from the prompt's last logits; True when `job` is already finished."""
        if job.req.max_new_tokens == 0:  # scoring only (echo + logprobs)
            return self._finish(job, "length")
        return self._take(job, logits)

    @torch.no_grad()
    def _decode(self) -> None:
        """One step for every running row: feed its last token, sample the next."""
        batch = self._batch
        assert batch is not None and batch.jobs
        device = batch.mask.device
        ids = torch.tensor([[j.next_id] for j in batch.jobs], device=device)  # (B, 1)
        positions = batch.mask.sum(1, keepdim=True)  # (B, 1): the new token follows each row's real tokens
        mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)  # (B, W + 1)
        with self._rt.autocast():
            out = self._base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1, **{self._cache_field: batch.cache})
        batch.cache, batch.mask = getattr(out, self._cache_field), mask
        logits = out.logits[:, -1].float()  # (B, V)
        self._counts["steps"] += 1
        for b, j in enumerate(batch.jobs):
            if not j.done:
                self._take(j, logits[b])
        self._drop(lambda j: j.done, None)

    # ------------------------------------------------------------------ one row's tokens

    def _take(self, job: _Job, logits: torch.Tensor) -> bool:
        """Sample `job`'s next token from `logits` (V,), emit its event, and finish `job` on eos, a stop string or
        its token budget; True when it finished."""
        req = job.req
        token = sample(logits, req, job.generator)
        job.out_ids.append(token)
        self._counts["tokens"] += 1
        logprob = None
        if req.logprobs is not None:
            logprob = self._logprobs.token(torch.log_softmax(logits, -1), token, req.logprobs)
        if token in self._eos:  # no text of its own (even an eos that is a plain word in the generation config);
            # its event carries what was held back for a stop string that never came
            full = self.tokenizer.decode(job.out_ids[:-1], skip_special_tokens=True)
            self._emit(job, TokenEvent(token, full[len(job.sent):], logprob), upto=len(full), full=full)
            return self._finish(job, "stop")
        full = self.tokenizer.decode(job.out_ids, skip_special_tokens=True)
        stop_at = first_stop(full, req.stop, len(job.sent))
        if stop_at is not None:
            self._emit(job, TokenEvent(token, full[len(job.sent):stop_at], logprob), upto=stop_at, full=full)
            return self._finish(job, "stop")
        last = len(job.out_ids) >= req.max_new_tokens
        visible = len(full) if last else safe_end(full, req.stop)
        self._emit(job, TokenEvent(token, full[len(job.sent):visible] if visible > len(job.sent) else "", logprob),
                   upto=visible, full=full)
        if last:
            return self._finish(job, "length")
        job.next_id = token
        return False

    def _emit(self, job: _Job, event: TokenEvent, upto: int, full: str) -> None:
        if not full.startswith(job.sent):  # a tokenizer whose text of a prefix is no prefix of the whole text
            event.text = ""
        elif upto > len(job.sent):
            job.sent = full[:upto]
        self._send(job, event)

    # ------------------------------------------------------------------ finishing

    def _finish(self, job: _Job, reason: str, error: str | None = None) -> bool:
        """Send `job`'s one Finished (its text: what its events carried); True, for use in conditions."""
        if job.done:
            return True
        job.done = True
        with self._cond:
            self._counts["finished_" + reason] += 1
        self._send(job, Finished(reason, job.sent, len(job.req.prompt_ids), len(job.out_ids), job.prompt_logprobs, error),
                   final=True)
        return True

    def _send(self, job: _Job, event: TokenEvent | Finished, final: bool = False) -> None:
        """Call the request's callback; one that raises cancels its request (the engine goes on)."""
        try:
            job.on_event(event)
        except Exception:  # a broken client must not stop the others
            logger.exception("heft serve: the event callback of request %d raised; cancelling it", job.handle.id)
            job.handle.cancelled = True
            if not final and not job.done:
                job.done = True
                with self._cond:
                    self._counts["finished_cancelled"] += 1

    def _drop(self, leaves: Callable[[_Job], bool], reason: str | None) -> None:
        """Take the rows for which `leaves` holds out of the running batch (finishing them with `reason` if set)."""
        batch = self._batch
        if batch is None:
            return
        gone = [b for b, j in enumerate(batch.jobs) if leaves(j) or j.done]
        if not gone:
            return
        for b in gone:
            if reason is not None:
                self._finish(batch.jobs[b], reason)
        keep = [b for b in range(len(batch.jobs)) if b not in set(gone)]
        if not keep:
            self._set_batch(None)
            return
        idx = torch.tensor(keep, device=batch.mask.device)
        select_rows(batch.cache, idx)
        cache, mask = self._trim(batch.cache, batch.mask.index_select(0, idx))
        self._set_batch(Batch([batch.jobs[b] for b in keep], cache, mask))

    def _set_batch(self, batch: Batch | None) -> None:
        with self._cond:
            self._batch = batch

    def _cancel_waiting(self) -> None:
        with self._cond:
            jobs = list(self._waiting)
            self._waiting.clear()
        for j in jobs:
            self._finish(j, "cancelled")

    def _cancel_all(self) -> None:
        """shutdown(drain=False): every running and waiting request ends "cancelled"."""
        self._drop(lambda j: True, "cancelled")
        self._cancel_waiting()


# ---------------------------------------------------------------------- requests


def _check(req: GenerationRequest) -> None:
    """Reject a request the engine cannot run, naming the field and the fix."""
    errors = []
    if not req.prompt_ids:
        errors.append("prompt_ids: empty; a request needs at least one prompt token")
    if not 0 <= req.content_start < max(len(req.prompt_ids), 1):
        errors.append(f"content_start: {req.content_start} is outside the prompt of {len(req.prompt_ids)} tokens")
    if req.max_new_tokens < 0:
        errors.append(f"max_new_tokens: must be >= 0, got {req.max_new_tokens}")
    if req.temperature < 0:
        errors.append(f"temperature: must be >= 0 (0: greedy), got {req.temperature}")
    if not 0 < req.top_p <= 1:
        errors.append(f"top_p: must be in (0, 1], got {req.top_p}")
    if req.logprobs is not None and req.logprobs < 0:
        errors.append(f"logprobs: must be >= 0, got {req.logprobs}")
    if any(not s for s in req.stop):
        errors.append("stop: an empty stop string would end every request at once; drop it")
    if errors:
        raise ValueError("; ".join(errors))
