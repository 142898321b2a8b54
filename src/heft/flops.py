"""Training compute, estimated from what a stage runs (not measured).

Per training token, a frozen model's forward pass costs about 2 N multiply-adds-times-two (N: the
parameters outside the embedding table), and the backward pass about 2 N times the fraction f of
the layers that gradients must flow through to reach the lowest adapted layer (activation
gradients only: the base weights are frozen, so their weight gradients, another 2 N of full
fine-tuning, are never computed). The adapters' own arithmetic, and the vocabulary head at the few
positions where the loss needs logits, are small next to that and left out:

    flops per token ~= (2 + 2 f) N          (full fine-tuning would be ~6 N)

LoRA on every decoder layer and ReFT on every layer both have f = 1; ReFT on the top half of the
layers has f ~= 0.5.
"""

from __future__ import annotations

from torch import nn


def non_embedding_params(model: nn.Module) -> int:
    """Parameters of the base model outside its input embedding table (adapters excluded)."""
    from .model import unwrap

    base = unwrap(model)
    emb = base.get_input_embeddings().weight
    seen, total = set(), 0
    for name, p in base.named_parameters():
        if id(p) in seen or p is emb or "lora_" in name:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def backward_fraction(lowest_layer: int, num_layers: int) -> float:
    """Share of the decoder layers gradients traverse when the lowest adapted layer is `lowest_layer`."""
    if num_layers <= 0:
        return 1.0
    return (num_layers - lowest_layer) / num_layers


def train_flops(tokens: int, n_params: int, fraction: float) -> float:
    """Estimated FLOPs of training on `tokens` tokens (see the module docstring)."""
    return float(tokens) * (2.0 + 2.0 * fraction) * n_params
