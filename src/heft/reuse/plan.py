"""Which path a training stage runs, chosen once before its first step, with the reason for each path not taken.

    token prefix   ReFT edits only the last prompt positions of an otherwise frozen model: the tokens before the
                   first edited one run once, without gradients (heft.reuse.token_prefix)
    layer prefix   every trained weight sits in decoder layer k or above: layers 0..k-1 run once per row and are
                   bypassed after (heft.reuse.layer_prefix)
    full path      every token and layer, forward and backward

`plan` tries them in that order and returns a `Plan`; the loop then makes one call per step, `Plan.step(idx)`,
whatever was chosen, and nothing is switched mid-run. A path is not taken for one of two kinds of reason, logged
differently. The stage's shape does not fit it (ReFT edits the first positions; LoRA adapts layer 0): the usual
case, at DEBUG. Or it fits but would not be exact here: FSDP, compiled layers, dropout that training would draw,
a keys/values cache that cannot be regrouped by row, the layer prefix's check on the stage's first batch: at INFO,
since the run was shaped for a speed it does not get. The chosen path is one INFO line.

Dropout is found two ways: dropout modules and the config's dropout fields, and a probe that runs the part of the
model a path would run once twice in training mode, on the stage's first batch, and compares (OPT applies
`config.dropout` as a function, not a module, and only a pass in training mode shows it).

`Plan.cost` is what the chosen path runs per token (heft.training.cost), for the run's FLOPs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from heft.data.tokens import Encoded, prompt_batch, train_batch
from heft.methods.reft import ReftModel
from heft.reuse.kept import Step, full_step
from heft.reuse.layer_prefix import FrozenLayers, lowest_layer, reach
from heft.reuse.token_prefix import FrozenPrefix, why_not
from heft.training import sharding
from heft.training.cost import StageCost, depth, stage_cost
from heft.training.runtime import Runtime

logger = logging.getLogger(__name__)

# Config fields through which Hugging Face models apply dropout (as modules or as functions)
DROPOUT_FIELDS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "resid_pdrop", "embd_pdrop",
                  "attn_pdrop", "hidden_dropout_prob", "attention_probs_dropout_prob")


def declared_dropout(model: nn.Module, skip: set[int] | frozenset[int] = frozenset()) -> str | None:
    """The first dropout `model` declares that is active in training mode: a dropout module (except those whose id()
    is in `skip`) or a config dropout field above 0; None when there is none."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and id(m) not in skip:
            return f"{name} (p={m.p})"
    config = getattr(model, "config", None)
    for field in DROPOUT_FIELDS:
        p = getattr(config, field, None)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return f"config.{field}={p}"
    return None


def differs_in_training(model: nn.Module, rt: Runtime, run: Callable[[], list[torch.Tensor]]) -> bool:
    """Whether two calls of `run` (passes of `model`, without gradients) give different outputs in training mode:
    dropout however the model applies it. The random stream is left as it was."""
    was = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[rt.device] if rt.device.type == "cuda" else []), torch.no_grad():
            a, b = run(), run()
    finally:
        model.train(was)
    return any(float((x.float() - y.float()).abs().max()) > 1e-4 * (1.0 + float(x.float().abs().max()))
               for x, y in zip(a, b))


class FullPath:
    """Every token and layer, forward and backward."""

    def __init__(self, rows: list[Encoded], pad_id: int, rt: Runtime):
        self.rows, self.pad_id, self.rt = rows, pad_id, rt

    def step(self, idx: list[int]) -> Step:
        return full_step(self.rows, idx, self.pad_id, self.rt.device)


@dataclass
class Plan:
    """The path a stage runs (`name`: full path, token prefix or layer prefix), and its cost per token."""
    name: str
    path: Union[FullPath, FrozenPrefix, FrozenLayers]
    cost: StageCost

    def step(self, idx: list[int]) -> Step:
        """Rows `idx` (this process's share of a batch) as the chosen path runs them."""
        return self.path.step(idx)


def plan(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], rows: list[Encoded], *, pad_id: int,
         rt: Runtime, mode: str, budget_gb: float, layers_path: str | None, desc: str, first: list[int]) -> Plan:
    """The path a stage training `trainable` (everything else frozen) on `rows` takes; `mode`: the run's
    `frozen_prefix` (`cache` | `recompute` | `off`), `budget_gb` its `prefix_cache_gb`; `first`: the stage's first
    batch, on which the checks run (the same on every process, and after a resume)."""
    inner = getattr(model, "module", model)
    plain = inner.model if isinstance(inner, ReftModel) else inner
    r, layers, _ = reach(model, trainable, layers_path)
    shape = depth(plain, layers)
    tokens = sum(len(row.prompt) + len(row.answers[row.label]) for row in rows)  # an epoch's, as the loop counts
    keep = mode == "cache"
    if mode == "off":
        return _chosen(desc, "full path, every token and layer forward and backward (frozen_prefix: off)",
                       Plan("full path", FullPath(rows, pad_id, rt), stage_cost(shape, r, tokens)))
    why = why_not(model, trainable)
    if why is None:
        prefix = FrozenPrefix(model, rows, pad_id, rt, keep=keep, budget_gb=budget_gb, desc=desc)
        why = _token_prefix_blocked(model, plain, prefix, rt, first)
        if why is None:
            cost = stage_cost(shape, r, tokens, prefix_share=prefix.prefix_share(),
                              kept=prefix.store.kept_share() if keep else 0.0)
            return _chosen(desc, prefix.describe(), Plan("token prefix", prefix, cost))
        logger.info("%s: token prefix not taken: %s", desc, why)
    else:
        logger.debug("%s: token prefix not taken: %s", desc, why)
    k, why = lowest_layer(model, trainable, layers_path)
    if why is None:
        frozen = FrozenLayers(model, k, rows, pad_id, rt, keep=keep, budget_gb=budget_gb, desc=desc,
                              layers_path=layers_path)
        why = _layer_prefix_blocked(model, frozen, rt, first)
        if why is None:
            cost = stage_cost(shape, r, tokens, bypassed=k, kept=frozen.store.kept_share() if keep else 0.0)
            return _chosen(desc, frozen.describe(), Plan("layer prefix", frozen, cost))
        logger.info("%s: layer prefix not taken: %s", desc, why)
    else:
        logger.debug("%s: layer prefix not taken: %s", desc, why)
    return _chosen(desc, "full path, every token and layer forward and backward",
                   Plan("full path", FullPath(rows, pad_id, rt), stage_cost(shape, r, tokens)))


def _chosen(desc: str, line: str, chosen: Plan) -> Plan:
    logger.info("%s: %s", desc, line)
    return chosen


def _token_prefix_blocked(model: nn.Module, plain: nn.Module, prefix: FrozenPrefix, rt: Runtime,
                          first: list[int]) -> str | None:
    """Why the token prefix, which fits the stage's shape, would not be exact here; None when it would."""
    if sharding.is_sharded(model):
        return "the model is sharded with FSDP (every forward pass is a collective)"
    dropout = declared_dropout(plain)
    if dropout is None:
        prompts = prompt_batch([prefix.rows[i].prompt_for(prefix.rows[i].label) for i in first], prefix.pad_id)
        batch = {name: t.to(rt.device) for name, t in prompts.items()}

        def run() -> list[torch.Tensor]:
            with rt.autocast():
                return [plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], use_cache=False, logits_to_keep=1).logits]

        if differs_in_training(plain, rt, run):
            dropout = "two passes in training mode differ: dropout applied as a function, not a module"
    if dropout is not None:
        return f"dropout is active in the frozen model ({dropout}); a kept prefix would draw it once"
    return prefix.check(first)


def _layer_prefix_blocked(model: nn.Module, frozen: FrozenLayers, rt: Runtime, first: list[int]) -> str | None:
    """Why the layer prefix, which fits the stage's shape, would not be exact here; None when it would."""
    if sharding.is_sharded(model):
        return "the model is sharded with FSDP (every forward pass is a collective)"
    if any(getattr(layer, "_compiled_call_impl", None) is not None for layer in frozen.layers):
        return "the decoder layers are compiled (model.compile: true), so they cannot be bypassed"
    k = frozen.k
    dropout = declared_dropout(frozen.plain, skip={id(m) for layer in frozen.layers[k:] for m in layer.modules()})
    if dropout is None and differs_in_training(frozen.plain, rt, lambda: list(frozen.capture(first).values())):
        dropout = "two passes in training mode differ: dropout applied as a function, not a module"
    if dropout is not None:
        return f"dropout is active below layer {k} ({dropout}); a kept stream would draw it once"
    batch = {name: t.to(rt.device) for name, t in train_batch([frozen.rows[i] for i in first], frozen.pad_id).items()}
    return frozen.check(first, batch, int(batch.pop("logits_to_keep")))
