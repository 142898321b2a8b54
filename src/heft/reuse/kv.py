"""Keys/values caches of Hugging Face models, as heft reuses them: the forward argument's name, whether a cache can
be cut into rows and regrouped, and a cache rebuilt from rows kept separately.

Two users: multiple-choice scoring (`heft.evaluation.choices`: a context's keys and values, repeated for each of its choices)
and ReFT training (`heft.reuse.token_prefix`: the keys and values of the frozen tokens before the first edited one, kept
per row across epochs and regrouped into each batch). `why_not_regroupable` says, in words, why a cache cannot be.
"""

from __future__ import annotations

from typing import Any

import torch


def cache_field() -> str:
    """The forward argument and output field that hold the keys/values cache: `cache` in recent transformers 5.x,
    `past_key_values` in earlier ones (still accepted there, with a deprecation warning)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def regroupable(past: Any, longest: int) -> bool:
    """Whether `past` is a keys/values cache whose batch rows can be repeated or regrouped (`why_not_regroupable`)."""
    return why_not_regroupable(past, longest) is None


def why_not_regroupable(past: Any, longest: int) -> str | None:
    """None when `past` is a keys/values cache whose batch rows can be repeated or regrouped, with every layer
    holding its keys and values, and that keeps every position of a sequence of `longest` tokens; else why not
    (a sliding-window layer shorter than that would drop some)."""
    from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

    if not isinstance(past, Cache) or not getattr(past, "layers", None):
        return f"the model returns {type(past).__name__}, not a cache of per-layer keys/values"
    for i, layer in enumerate(past.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):  # subclasses too
            return f"layer {i} holds a {type(layer).__name__} (quantized, static, linear-attention or indexed)"
        if getattr(layer, "keys", None) is None or getattr(layer, "values", None) is None:
            return f"layer {i} holds no keys/values of its own (it shares another layer's, or never ran)"
        if getattr(layer, "is_sliding", False) and longest >= layer.sliding_window - 1:
            return (f"layer {i} attends through a sliding window of {layer.sliding_window} tokens, which would drop "
                    f"positions of the longest row ({longest} tokens)")
    return None


def split_rows(past: Any, mask: torch.Tensor) -> list[torch.Tensor] | None:
    """Each row's keys and values from a left-padded pass, `(layers, 2, heads, tokens, head_dim)` with only its real
    tokens; None when the layers' shapes differ (then rows cannot be stacked into one tensor)."""
    shapes = {(layer.keys.shape[1], layer.keys.shape[3], layer.values.shape[3]) for layer in past.layers}
    if len(shapes) != 1 or len({layer.keys.dtype for layer in past.layers}) != 1:
        return None
    width = mask.shape[1]
    return [torch.stack([torch.stack([layer.keys[b, :, width - n:], layer.values[b, :, width - n:]])
                         for layer in past.layers])  # one copy per row, of its real tokens only
            for b, n in enumerate(mask.sum(1).tolist())]


def stack_rows(rows: list[torch.Tensor], config: Any) -> tuple[Any, torch.Tensor]:
    """A cache holding `rows` (from `split_rows`) left-padded to the longest, and its attention mask (B, P)."""
    from transformers.cache_utils import DynamicCache

    width = max(r.shape[3] for r in rows)
    layers, _, heads, _, dim = rows[0].shape
    kv = rows[0].new_zeros((layers, 2, len(rows), heads, width, dim))
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        n = r.shape[3]
        if n:
            kv[:, :, b, :, width - n:] = r
            mask[b, width - n:] = 1
    return DynamicCache(ddp_cache_data=[(kv[i, 0], kv[i, 1]) for i in range(layers)], config=config), mask
