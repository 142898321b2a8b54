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

`RunTracker` keeps a run's per-stage accounting (tokens, FLOPs, seconds, peak memory) in its folder.
"""

from __future__ import annotations

import logging
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


def backward_fraction(lowest_layer: int, num_layers: int) -> float:
    """Share of the decoder layers gradients traverse when the lowest adapted layer is `lowest_layer`."""
    if num_layers <= 0:
        return 1.0
    return (num_layers - lowest_layer) / num_layers


def train_flops(tokens: int, n_params: int, fraction: float) -> float:
    """Estimated FLOPs of training on `tokens` tokens (see the module docstring)."""
    return float(tokens) * (2.0 + 2.0 * fraction) * n_params


logger = logging.getLogger(__name__)


class RunTracker:
    """One run's cumulative training cost across stages, its per-epoch evaluations and TensorBoard events.

    `n_params`: the base model's non-embedding parameters; `num_layers`: its depth (0: unknown);
    `reft_layers`: the layers ReFT edits (gradients flow down to the lowest of them)."""

    def __init__(self, run: RunFolder, cfg: RunConfig, n_params: int, num_layers: int, reft_layers: list[int] | None,
                 main: bool):
        self.run, self.cfg, self.n_params, self.num_layers, self.main = run, cfg, n_params, num_layers, main
        self.reft_lowest = min(reft_layers) if reft_layers else None
        self.epochs, self.tokens, self.seconds, self.flops_done, self.steps = 0.0, 0, 0.0, 0.0, 0
        self.writer = None
        if cfg.tensorboard and main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package; pip install 'heft[tensorboard]' "
                                  "or set tensorboard: false") from None
            self.writer = SummaryWriter(str(run.tensorboard_dir))

    def stage_flops(self, stage: StageConfig, tokens: int) -> float:
        """Estimated training FLOPs: LoRA adapts every layer, so gradients flow through all of them; a ReFT
        stage's backward stops at its lowest edited layer."""
        fraction = 1.0
        if stage.method == "reft" and self.num_layers and self.reft_lowest is not None:
            fraction = backward_fraction(self.reft_lowest, self.num_layers)
        return train_flops(tokens, self.n_params, fraction)

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
            flops=self.flops_done + (self.stage_flops(stage, tokens) if stage is not None else 0.0),
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
