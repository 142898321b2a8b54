"""Frozen-prefix reuse in ReFT training: the tokens before the first edited one run once, without gradients.

A ReFT stage that edits only the last prompt positions (`reft.positions.first: 0`) of a model that is frozen
everywhere but the interventions (the base weights, earlier LoRA merged or frozen) cannot change the keys and
values of any token before the first edited one: attention is causal and the edits come later. So for each row

    prefix = prompt[: len(prompt) - n_edited]        run once, no gradients, its keys/values kept
    suffix = the edited prompt tokens + the answer   forward and backward every step, after the prefix's cache

The loss, the gradients and so the trained adapters equal the full path's (every token forward and backward)
within floating-point rounding (tests/reuse/test_token_prefix.py); only the suffix (~`positions.last` + answer
tokens, against ~150-250 prompt tokens in BoolQ) runs forward and backward.

Modes (`frozen_prefix` in the run config): `cache` keeps the prefix keys/values of the rows that fit in
`prefix_cache_gb` across epochs, computed in fixed groups of rows (heft.reuse.kept), so a resumed run reads the same
numbers as an uninterrupted one; the other rows' are computed, without gradients, in each batch that holds them.
`recompute` keeps nothing (each step runs its rows' prefixes without gradients, still cheaper than a full
backward); `off` is the full path. Prefixes run in eval mode, drawing no random numbers. The cache lives for one
stage in memory, built from that stage's rows and frozen model, so it can never be read against other data,
tokenizer, length or merged weights.

`why_not` says whether the shape of a stage allows it: edits on the last positions only, nothing but the
interventions trained. Whether it is taken is heft.reuse.plan's choice: not under FSDP (every forward is a
collective), with dropout in the frozen model (its prefix would be drawn once instead of every step), or with a
keys/values cache that cannot be regrouped by row (`check`: static, quantized, sliding windows shorter than the rows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from heft.data.tokens import Encoded, prompt_batch, train_batch
from heft.methods.reft import ReftModel
from heft.reuse.kept import RowStore, Step, frozen_pass, groups
from heft.reuse.kv import cache_field, split_rows, stack_rows, why_not_regroupable
from heft.training.runtime import Runtime


def why_not(model: nn.Module, trainable: list[tuple[str, nn.Parameter]]) -> str | None:
    """Why the shape of a stage training `trainable` on `model` (accelerate-prepared or not) rules out reusing
    frozen prefixes; None when it allows it."""
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
    return None


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
        self.lengths = [len(r.prompt_for(r.label)) + len(r.answers[r.label]) for r in rows]
        self.longest = max(self.lengths)
        self.groups = groups(self.split)  # rows with a prefix, by prefix length
        self.group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        self.store = RowStore(budget_gb, desc, "prefix cache", self.groups, self.split)

    def prefix_share(self) -> float:
        """Share of the training tokens before the first edited position."""
        return sum(self.split) / max(1, sum(self.lengths))

    def describe(self) -> str:
        how = (f"kept across epochs (up to {self.store.budget / 1e9:g} GB)" if self.keep
               else "recomputed each step (frozen_prefix: recompute)")
        return (f"{100 * self.prefix_share():.0f}% of the training tokens come before the first edited position "
                f"and run without gradients, their keys/values {how}")

    def _pass(self, idx: list[int]) -> tuple[Any, torch.Tensor]:
        """The keys/values cache of rows `idx`'s prefixes, left-padded, and its attention mask."""
        batch = {k: v.to(self.rt.device) for k, v in
                 prompt_batch([self.rows[i].prompt_for(self.rows[i].label)[:self.split[i]] for i in idx], self.pad_id).items()}
        with frozen_pass(self.plain), self.rt.autocast():
            out = self.plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"], use_cache=True, logits_to_keep=1)
        return getattr(out, self.field, None), batch["attention_mask"]

    def check(self, idx: list[int]) -> str | None:
        """Why this model's keys/values cannot be regrouped by row, from a pass of rows `idx`'s prefixes; None when
        they can (the cache's kind and shapes are the same for every batch of the stage)."""
        idx = [i for i in idx if self.split[i] > 0] or [i for i in range(len(self.rows)) if self.split[i] > 0]
        if not idx:
            return None  # every row is edited from its first token: nothing is ever reused
        past, mask = self._pass(idx)
        why = why_not_regroupable(past, self.longest)
        parts = split_rows(past, mask) if why is None else None
        if why is None and parts is None:
            why = "its layers' keys/values differ in shape or type, so one row's cannot be stacked"
        if why is not None:
            return f"this model's keys/values cache cannot be regrouped by row: {why}"
        if self.keep:  # the kept rows follow from a token's size, the same in every pass
            self.store.decide(parts[0].numel() * parts[0].element_size() // self.split[idx[0]])
        return None

    def _prefixes(self, idx: list[int]) -> dict[int, torch.Tensor]:
        past, mask = self._pass(idx)
        parts = split_rows(past, mask) if why_not_regroupable(past, self.longest) is None else None
        if parts is None:  # `check` said otherwise on the stage's first batch: the same model gives the same cache
            raise RuntimeError(f"{self.desc}: the keys/values cache of a prefix pass cannot be regrouped by row")
        return dict(zip(idx, parts))

    def _fill(self, g: int) -> None:
        """Run group g's prefixes, fix the kept rows if this is the first group run, and keep the group's kept rows."""
        fresh = self._prefixes(self.groups[g])
        i, some = next(iter(fresh.items()))
        self.store.decide(some.numel() * some.element_size() // self.split[i])
        self.store.keep(fresh)

    def batch(self, idx: list[int]) -> tuple[dict[str, Any], torch.Tensor, int]:
        """(model kwargs, targets, logits kept) for rows `idx`: the edited tokens and the answer after the prefixes'
        cache (kept rows' from the store, the others' computed now, in this batch)."""
        if self.keep and self.store.kept is None and self.groups:
            self._fill(0)
        kept = (self.store.kept or frozenset()) if self.keep else frozenset()
        for g in dict.fromkeys(self.group_of[i] for i in idx if i in kept and i not in self.store):
            self._fill(g)
        need = [i for i in idx if self.split[i] > 0 and i not in kept]
        fresh = self._prefixes(need) if need else {}
        items = []
        for i in idx:  # the suffix's edited tokens are its last `edited` prompt tokens (none: nothing to edit)
            prompt = self.rows[i].prompt_for(self.rows[i].label)[self.split[i]:]
            items.append(Encoded(prompt, self.rows[i].answers, self.rows[i].label, False,
                                 content_start=len(prompt) - self.edited[i]))
        sb = {k: v.to(self.rt.device, non_blocking=True) for k, v in train_batch(items, self.pad_id).items()}
        keep = int(sb.pop("logits_to_keep"))
        kwargs: dict[str, Any] = dict(input_ids=sb["input_ids"], prompt_start=sb["prompt_start"],
                                      prompt_len=sb["prompt_len"], logits_to_keep=keep)
        kvs = [self.store[i] if i in kept else fresh.get(i) for i in idx]
        if any(kv is not None for kv in kvs):
            empty = next(kv for kv in kvs if kv is not None)[:, :, :, :0]
            past, mask = stack_rows([kv if kv is not None else empty for kv in kvs], self.plain.config)
            offset = mask.sum(1, keepdim=True)  # (B, 1) prefix tokens of each row
            kwargs.update(attention_mask=torch.cat([mask, sb["attention_mask"]], 1),
                          position_ids=sb["position_ids"] + offset, use_cache=True, **{self.field: past})
        else:  # every row is edited from its first token: nothing to reuse
            kwargs.update(attention_mask=sb["attention_mask"], position_ids=sb["position_ids"], use_cache=False)
        return kwargs, sb["targets"], keep

    def step(self, idx: list[int]) -> Step:
        """Rows `idx` as one training micro-batch: the suffixes, forward and backward, after their prefixes' cache."""
        kwargs, targets, _ = self.batch(idx)
        return Step(lambda model: model(**kwargs).logits, targets)
