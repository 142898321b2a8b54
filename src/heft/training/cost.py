"""Training compute, estimated from what a stage runs (not measured).

A pass of one token through a weight matrix costs a multiply-add per parameter (2 FLOPs). Per training token:

    forward    2 N          N: the base model's parameters outside its input embedding table
    backward   2 G          G: the parameters gradients flow through, from the top down to the lowest layer whose
                               computation training changes (a LoRA-adapted layer, or the layer above ReFT's lowest
                               edit); activation gradients only, as the base weights are frozen (full fine-tuning
                               would add another 2 N of weight gradients)

so the full path costs (2 N + 2 G) per token: 4 N with LoRA on every layer. The speed paths of heft.reuse change
what runs (`stage_cost`):

    layer prefix   the k decoder layers below the lowest adapted one (B parameters) run once per kept row, in the
                   first epoch, and are bypassed after: 2 (N - B) + 2 G per token and step, plus 2 B per kept token
                   once; rows past prefix_cache_gb (and `recompute`) run them every step, without gradients
    token prefix   the tokens before the first edited position (a share p of the tokens) run once, without
                   gradients: 2 (N + G) per suffix token and step, plus 2 N per kept prefix token once (every step
                   for rows past the budget, and with `recompute`)

What is left out, being small next to that: the adapters' own arithmetic, attention's token-by-token products,
the vocabulary head at the few positions where the loss needs logits, and the one batch each speed path checks
before the stage. "Once" is the first epoch: a stage is estimated as one process runs it (under data parallelism
every process keeps the rows it trains, so a row may be computed once per process).

`RunTracker` keeps a run's per-stage accounting (tokens, FLOPs, seconds, peak memory) in its folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from heft.config.schema import RunConfig, StageConfig
from heft.errors import ConfigError
from heft.run.records import EpochRecord, StageProgress, StageRecord
from heft.run.folder import RunFolder


def non_embedding_params(model: nn.Module) -> int:
    """Parameters of the base model outside its input embedding table (adapters excluded)."""
    from heft.methods.model import unwrap

    base = unwrap(model)
    emb = base.get_input_embeddings().weight
    seen, total = set(), 0
    for name, p in base.named_parameters():
        if id(p) in seen or p is emb or "lora_" in name:
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@dataclass(frozen=True)
class Depth:
    """Where a model's parameters are: `total` outside the input embedding table (N), `layers` in each decoder
    layer (adapters excluded)."""
    total: int
    layers: tuple[int, ...] = ()

    def below(self, k: int) -> int:
        """Parameters of decoder layers 0..k-1."""
        return sum(self.layers[:k])


def depth(model: nn.Module, layers: list[nn.Module] | None) -> Depth:
    """The Depth of `model` (maybe wrapped) whose decoder layers are `layers` (None: not found)."""
    per_layer = tuple(sum(p.numel() for n, p in layer.named_parameters() if "lora_" not in n) for layer in layers or ())
    return Depth(non_embedding_params(model), per_layer)


@dataclass(frozen=True)
class StageCost:
    """A stage's parameters per training token: `per_token` in every step (forward and backward), `first_epoch`
    once per row (kept values, computed in the first epoch); `epoch_tokens`: the tokens of one epoch."""
    per_token: float
    first_epoch: float
    epoch_tokens: int

    def flops(self, tokens: int) -> float:
        """Estimated FLOPs of the stage's first `tokens` training tokens."""
        return 2.0 * (self.per_token * tokens + self.first_epoch * min(tokens, self.epoch_tokens))


def stage_cost(d: Depth, reach: int, epoch_tokens: int, *, bypassed: int = 0, prefix_share: float = 0.0,
               kept: float = 0.0) -> StageCost:
    """The cost of a stage whose backward reaches down to decoder layer `reach` (0: every layer), with `bypassed`
    lower layers (layer prefix) or a `prefix_share` of the tokens run without gradients (token prefix), of which
    a share `kept` is computed once instead of every step (see the module docstring)."""
    n = float(d.total)
    g = n - d.below(reach)
    if prefix_share:
        return StageCost((1 - prefix_share) * (n + g) + prefix_share * (1 - kept) * n, prefix_share * kept * n,
                         epoch_tokens)
    b = float(d.below(bypassed))
    return StageCost(n - kept * b + g, kept * b, epoch_tokens)


def backward_fraction(lowest_layer: int, num_layers: int) -> float:
    """Share of the decoder layers gradients traverse when the lowest adapted layer is `lowest_layer`."""
    if num_layers <= 0:
        return 1.0
    return (num_layers - lowest_layer) / num_layers


def train_flops(tokens: int, n_params: int, fraction: float) -> float:
    """Estimated FLOPs of training on `tokens` tokens on the full path, the backward through a `fraction` of the
    layers, each layer taken as an equal share of the parameters."""
    return float(tokens) * (2.0 + 2.0 * fraction) * n_params


logger = logging.getLogger(__name__)


class RunTracker:
    """One run's cumulative training cost across stages, its per-epoch evaluations and TensorBoard events.

    A stage's FLOPs come from the cost its training loop planned (`set_stage_cost`, reported through
    `train_stage(on_cost=...)`); a stage finished before a restart has its own record. Without either, a stage is
    estimated on the full path from the config: `n_params`, the base model's non-embedding parameters;
    `num_layers`, its depth (0: unknown); `reft_layers`, the layers ReFT edits."""

    def __init__(self, run: RunFolder, cfg: RunConfig, n_params: int, num_layers: int, reft_layers: list[int] | None,
                 main: bool):
        self.run, self.cfg, self.n_params, self.num_layers, self.main = run, cfg, n_params, num_layers, main
        self.reft_lowest = min(reft_layers) if reft_layers else None
        self.epochs, self.tokens, self.seconds, self.flops_done, self.steps = 0.0, 0, 0.0, 0.0, 0
        self.costs: dict[int, StageCost] = {}
        self.current: StageCost | None = None  # the stage being trained
        self.writer = None
        if cfg.tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package; pip install 'heft[tensorboard]' "
                                  "or set tensorboard: false") from None
            self.writer = SummaryWriter(str(run.tensorboard_dir))

    def set_stage_cost(self, i: int, cost: StageCost) -> None:
        """What stage i runs, as its training loop planned it (heft.reuse.plan); it is the stage being trained."""
        self.costs[i] = self.current = cost

    def stage_flops(self, stage: StageConfig, tokens: int) -> float:
        """Estimated FLOPs of the stage being trained, after its first `tokens` training tokens."""
        return self.current.flops(tokens) if self.current is not None else self._full_path(stage, tokens)

    def _flops_of(self, i: int, stage: StageConfig, tokens: int) -> float:
        if i in self.costs:
            return self.costs[i].flops(tokens)
        done = self.run.read_stage(i, stage)  # finished before a restart: the record its own run wrote
        if done is not None and done.tokens == tokens:
            return done.flops
        return self._full_path(stage, tokens)

    def _full_path(self, stage: StageConfig, tokens: int) -> float:
        """The full path, from the config alone: the backward reaches the lowest LoRA layer, or the layer above
        ReFT's lowest edit; every decoder layer taken as an equal share of the parameters."""
        reach = self.num_layers
        if stage.trains_lora:
            layers = self.cfg.lora.layers
            reach = min(reach, 0 if layers == "all" else min(layers))
        if stage.trains_reft and self.reft_lowest is not None:
            reach = min(reach, self.reft_lowest + 1)
        return train_flops(tokens, self.n_params, backward_fraction(reach, self.num_layers) if self.num_layers else 1.0)

    def log_steps(self, records: list[dict[str, Any]]) -> None:
        if self.writer is None:
            return
        for r in records:
            step = self.steps + r["step"]
            for key in ("loss", "lr", "grad_norm"):
                self.writer.add_scalar(f"train/{key}", r[key], step)
        self.writer.flush()

    def record(self, i: int, stage: StageConfig | None, stage_epoch: float, p: StageProgress | None,
               acc: dict[str, Any]) -> EpochRecord:
        """Write one evaluation point, with the run's cost up to it (earlier stages + this one so far)."""
        tokens = p.tokens if p is not None else 0
        rec = EpochRecord(
            stage=i, method=stage.method if stage is not None else None, stage_epoch=stage_epoch,
            epoch=round(self.epochs + stage_epoch, 6), optimizer_steps=self.steps + (p.optimizer_steps if p else 0),
            tokens=self.tokens + tokens, train_seconds=round(self.seconds + (p.train_seconds if p else 0.0), 2),
            flops=self.flops_done + (self._flops_of(i, stage, tokens) if stage is not None else 0.0),
            accuracy=acc["accuracy"], correct=acc["correct"], n=acc["n"])
        self._write(rec)
        return rec

    def copy(self, rec: EpochRecord, source: str) -> None:
        """Write another run's point for an identical stage prefix (its cumulative cost is this run's too)."""
        self._write(EpochRecord.from_json({**rec.to_json(), "reused_from": source}))

    def _write(self, rec: EpochRecord) -> None:
        if not self.main:
            return
        self.run.append_epoch(rec)
        if self.writer is not None:
            self.writer.add_scalar("eval/accuracy", rec.accuracy, rec.optimizer_steps)
            self.writer.flush()

    def finish_stage(self, r: StageRecord) -> None:
        self.epochs += r.epochs
        self.tokens += r.tokens
        self.seconds += r.train_seconds
        self.flops_done += r.flops
        self.steps += r.optimizer_steps
        self.current = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
