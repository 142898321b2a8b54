"""Frozen-prefix reuse in ReFT training: the tokens before the first edited one run once, without gradients.

A ReFT stage that edits only the last prompt positions (`reft.positions.first: 0`) of a model that is frozen
everywhere but the interventions (the base weights, earlier LoRA merged or frozen) cannot change the keys and
values of any token before the first edited one: attention is causal and the edits come later. So for each row

    prefix = prompt[: len(prompt) - n_edited]        run once, no gradients, its keys/values kept
    suffix = the edited prompt tokens + the answer   forward and backward every step, after the prefix's cache

The loss, the gradients and so the trained adapters equal the full path's (every token forward and backward)
within floating-point rounding (tests/test_prefix.py); only the suffix (~`positions.last` + answer tokens, against
~150-250 prompt tokens in BoolQ) runs forward and backward.

Modes (`frozen_prefix` in the run config): `cache` keeps each row's prefix keys/values across epochs, up to
`prefix_cache_gb` (rows past the budget are recomputed, without gradients, whenever they come up); `recompute`
keeps nothing (each step runs its rows' prefixes without gradients, still cheaper than a full backward); `off`
is the full path. The cache lives for one stage in memory, built from that stage's rows and frozen model, so it
can never be read against other data, tokenizer, length or merged weights.

The full path is taken, with the reason in the log, where the reuse would not be exact or cannot run: edits on
the first positions, trained weights below the edits (LoRA or joint stages), active dropout in the frozen model
(its prefix would be drawn once instead of every step), FSDP (every forward is a collective), and keys/values
caches that cannot be regrouped by row (static, quantized, sliding windows shorter than the rows).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from heft.train import sharding
from heft.reuse.kv import cache_field, regroupable, split_rows, stack_rows
from heft.methods.reft import ReftModel
from heft.train.runtime import Runtime
from heft.data.tokens import Encoded, prompt_batch, train_batch

logger = logging.getLogger(__name__)


def active_dropout(model: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> str | None:
    """The first dropout that is active in training mode in `model` (a module, except those whose id() is in
    `skip`, or the config's attention dropout that attention functions apply), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and id(m) not in skip:
            return f"{name} (p={m.p})"
    config = getattr(model, "config", None)
    p = getattr(config, "attention_dropout", 0.0) if config is not None else 0.0
    if isinstance(p, (int, float)) and p > 0:
        return f"config.attention_dropout={p}"
    return None


def why_not(model: nn.Module, trainable: list[tuple[str, nn.Parameter]]) -> str | None:
    """Why a stage training `trainable` on `model` (accelerate-prepared or not) cannot reuse frozen prefixes; None
    when it can."""
    inner = getattr(model, "module", model)
    if not isinstance(inner, ReftModel):
        return "no ReFT interventions on the model"
    if inner.cfg.positions.first > 0:
        return (f"reft.positions.first is {inner.cfg.positions.first}: the first prompt tokens are edited, so every "
                "later token depends on training (set positions.first: 0 to edit only the last ones)")
    mine = {id(p) for p in inner.interventions.parameters()}
    below = [n for n, p in trainable if id(p) not in mine]
    if below:
        return f"weights below the interventions train too ({below[0]}, ...)"
    if sharding.is_sharded(model):
        return "the model is sharded with FSDP (every forward pass is a collective)"
    dropout = active_dropout(inner.model)
    if dropout is not None:
        return f"dropout is active in the frozen model ({dropout}); a cached prefix would draw it once"
    return None


class RowStore(dict):
    """Per-row tensors (row index -> tensor) kept within a byte budget; past it, rows are not kept (their owner
    recomputes them when they come up), which the log says once."""

    def __init__(self, budget_gb: float, desc: str, what: str):
        super().__init__()
        self.budget, self.desc, self.what = int(budget_gb * 1e9), desc, what
        self.bytes = 0
        self.full = False  # the budget was reached

    def keep(self, fresh: dict[int, torch.Tensor]) -> None:
        for i, t in fresh.items():
            if i in self:
                continue
            size = t.numel() * t.element_size()
            if self.bytes + size > self.budget:
                if not self.full:
                    logger.info("%s: the %s reached prefix_cache_gb (%g GB) after %d rows; the other rows' are "
                                "recomputed (without gradients) when they come up", self.desc, self.what,
                                self.budget / 1e9, len(self))
                    self.full = True
                continue
            self[i] = t
            self.bytes += size


class FrozenPrefix:
    """Builds a ReFT stage's training batches from frozen prefixes (kept or recomputed) and trained suffixes."""

    def __init__(self, model: nn.Module, rows: list[Encoded], pad_id: int, rt: Runtime, *, keep: bool,
                 budget_gb: float, desc: str):
        inner = getattr(model, "module", model)
        assert isinstance(inner, ReftModel)
        self.plain = inner.model  # the frozen model underneath; its hooks edit nothing outside ReftModel.forward
        self.rows, self.pad_id, self.rt, self.desc = rows, pad_id, rt, desc
        self.keep = keep
        self.field = cache_field()
        last = inner.cfg.positions.last
        self.split, self.edited = [], []  # per row: tokens before the first edited one (or the last prompt token)
        for r in rows:
            plen = len(r.prompt_for(r.label))
            self.edited.append(max(0, min(last, plen - r.content_start)))
            self.split.append(min(plen - self.edited[-1], plen - 1))  # the last prompt token predicts the answer
        self.longest = max(len(r.prompt_for(r.label)) + len(r.answers[r.label]) for r in rows)
        self.store = RowStore(budget_gb, desc, "prefix cache")
        self.failed: str | None = None  # set when the model's cache turned out not to be regroupable

    def describe(self) -> str:
        prefix, total = sum(self.split), sum(len(r.prompt_for(r.label)) + len(r.answers[r.label]) for r in self.rows)
        how = (f"kept across epochs (up to {self.store.budget / 1e9:g} GB)" if self.keep
               else "recomputed each step (frozen_prefix: recompute)")
        return (f"{100 * prefix / max(1, total):.0f}% of the training tokens come before the first edited position "
                f"and run without gradients, their keys/values {how}")

    def _prefix_pass(self, idx: list[int]) -> dict[int, torch.Tensor] | None:
        """The keys/values of rows `idx`'s prefixes, one tensor per row; None when they cannot be regrouped."""
        batch = {k: v.to(self.rt.device) for k, v in
                 prompt_batch([self.rows[i].prompt_for(self.rows[i].label)[:self.split[i]] for i in idx], self.pad_id).items()}
        with torch.no_grad(), self.rt.autocast():
            out = self.plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], use_cache=True, logits_to_keep=1)
        past = getattr(out, self.field, None)
        parts = split_rows(past, batch["attention_mask"]) if regroupable(past, self.longest) else None
        return dict(zip(idx, parts)) if parts is not None else None

    def batch(self, idx: list[int]) -> tuple[dict[str, Any], torch.Tensor, int] | None:
        """(model kwargs, targets, logits kept) for rows `idx`: the edited tokens and the answer after the prefixes'
        cache; None when this model's cache cannot be regrouped (the caller then takes the full path)."""
        need = [i for i in idx if self.split[i] > 0 and i not in self.store]
        fresh = self._prefix_pass(need) if need else {}
        if fresh is None:
            self.failed = "this model's keys/values cache cannot be regrouped by row"
            return None
        if self.keep:
            self.store.keep(fresh)
        items = []
        for i in idx:  # the suffix's edited tokens are its last `edited` prompt tokens (none: nothing to edit)
            prompt = self.rows[i].prompt_for(self.rows[i].label)[self.split[i]:]
            items.append(Encoded(prompt, self.rows[i].answers, self.rows[i].label, False,
                                 content_start=len(prompt) - self.edited[i]))
        sb = {k: v.to(self.rt.device, non_blocking=True) for k, v in train_batch(items, self.pad_id).items()}
        keep = int(sb.pop("logits_to_keep"))
        kwargs: dict[str, Any] = dict(input_ids=sb["input_ids"], prompt_start=sb["prompt_start"],
                                      prompt_len=sb["prompt_len"], logits_to_keep=keep)
        kvs = [self.store.get(i, fresh.get(i)) for i in idx]
        if any(kv is not None for kv in kvs):
            empty = next(kv for kv in kvs if kv is not None)[:, :, :, :0]
            past, mask = stack_rows([kv if kv is not None else empty for kv in kvs], self.plain.config)
            offset = mask.sum(1, keepdim=True)  # (B, 1) prefix tokens of each row
            kwargs.update(attention_mask=torch.cat([mask, sb["attention_mask"]], 1),
                          position_ids=sb["position_ids"] + offset, use_cache=True, **{self.field: past})
        else:  # every row is edited from its first token: nothing to reuse
            kwargs.update(attention_mask=sb["attention_mask"], position_ids=sb["position_ids"], use_cache=False)
        return kwargs, sb["targets"], keep
