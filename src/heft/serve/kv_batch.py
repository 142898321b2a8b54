"""The running batch's keys/values cache: rows merged in, selected out, and padding columns trimmed.

Every request in the batch is one row of one cache. The rows are left-padded to a common width W; `Batch.mask`
(B, W) marks each row's real columns. A newly prefilled group joins by left-padding both caches to the wider one
and concatenating rows (`merge`); finished rows leave by `select_rows`, then `trim` drops the left columns that
are padding in every remaining row. This works only for caches of plain per-layer keys/values
(`why_not_mergeable` says why another cache does not qualify).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "merge", "select_rows", "trim", "why_not_mergeable"]


@dataclass
class Batch:
    """The running rows and their shared cache: `mask` (B, W) marks each row's real columns of the W cached ones."""

    jobs: list[Any]  # the engine's requests, one per row
    cache: Any
    mask: torch.Tensor


def why_not_mergeable(cache: Any) -> str | None:
    """None when `cache` holds plain per-layer keys/values whose rows can be padded, concatenated and selected;
    else why not (a sliding-window layer keeps only its last tokens, so a merge would misalign its columns)."""
    from transformers.cache_utils import DynamicLayer

    from heft.reuse.kv import why_not_regroupable

    why = why_not_regroupable(cache, 0)
    if why is not None:
        return why
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            return f"layer {i} holds a {type(layer).__name__} (a sliding window)"
    return None


def select_rows(cache: Any, idx: torch.Tensor) -> None:
    """Keep the batch rows `idx` of every layer's keys/values (in place)."""
    for layer in cache.layers:
        layer.batch_select_indices(idx)


def trim(cache: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Drop the left columns that are padding in every row."""
    first = int(mask.any(0).to(torch.long).argmax())
    if first == 0 or not hasattr(cache.layers[0], "keys"):
        return cache, mask
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
    return cache, mask[:, first:]


def _left_pad(x: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    extra = width - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def merge(old: Batch, new: Batch) -> Batch:
    """The running batch with `new`'s rows appended: both caches and masks left-padded to the wider one."""
    width = max(old.mask.shape[1], new.mask.shape[1])
    for a, b in zip(old.cache.layers, new.cache.layers):  # keys/values: (B, heads, W, head_dim)
        a.keys = torch.cat([_left_pad(a.keys, width, 2), _left_pad(b.keys, width, 2)])
        a.values = torch.cat([_left_pad(a.values, width, 2), _left_pad(b.values, width, 2)])
    mask = torch.cat([_left_pad(old.mask, width, 1), _left_pad(new.mask, width, 1)])
    return Batch(old.jobs + new.jobs, old.cache, mask)
