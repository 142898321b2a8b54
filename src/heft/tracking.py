"""Per-run bookkeeping across stages: cumulative tokens, time and estimated FLOPs, per-epoch
evaluations (`OUT/epochs.jsonl`), and TensorBoard events.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import flops
from .config import RunConfig, StageConfig
from .data import Example
from .errors import ConfigError
from .evaluate import accuracy
from .model import decoder_layers, hidden_size
from .reft import check_fits
from .train import StageResult

if TYPE_CHECKING:
    from .pipeline import Session

logger = logging.getLogger(__name__)


def read_epochs(out: Path) -> list[dict[str, Any]]:
    """`OUT/epochs.jsonl`, one record per (stage, epoch): a resumed run may have written one twice (the last wins)."""
    path = out / "epochs.jsonl"
    if not path.is_file():
        return []
    by_key: dict[tuple[int, float], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            by_key[(r["stage"], r["stage_epoch"])] = r
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by a crash
    return sorted(by_key.values(), key=lambda r: (r["stage"], r["stage_epoch"]))


class Tracker:
    """One run's cumulative training cost across stages, its per-epoch evaluations and TensorBoard events."""

    def __init__(self, s: "Session", cfg: RunConfig, out: Path, eval_rows: list[Example]):
        self.s, self.cfg, self.out, self.eval_rows = s, cfg, out, eval_rows
        self.n_params = flops.non_embedding_params(s.model)  # the base model, before any adapter
        try:
            self.num_layers = len(decoder_layers(s.model, cfg.model.layers_path))
        except ConfigError:
            self.num_layers = 0
        self.epochs, self.tokens, self.seconds, self.flops_done, self.steps = 0.0, 0, 0.0, 0.0, 0
        self.writer = None
        if cfg.tensorboard and s.main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package; pip install 'heft[tensorboard]' "
                                  "or set tensorboard: false") from None
            self.writer = SummaryWriter(str(out / "tensorboard"))

    def fraction(self, stage: StageConfig) -> float:
        """Share of the layers gradients flow through: LoRA adapts every layer, ReFT from its lowest layer up."""
        if stage.method != "reft" or self.num_layers == 0:
            return 1.0
        lowest = min(check_fits(self.cfg.reft, self.num_layers, hidden_size(self.s.model)))
        return flops.backward_fraction(lowest, self.num_layers)

    def stage_flops(self, stage: StageConfig, tokens: int) -> float:
        return flops.train_flops(tokens, self.n_params, self.fraction(stage))

    def log_steps(self, records: list[dict[str, Any]]) -> None:
        if self.writer is None:
            return
        for r in records:
            step = self.steps + r["step"]
            for key in ("loss", "lr", "grad_norm"):
                self.writer.add_scalar(f"train/{key}", r[key], step)
        self.writer.flush()

    def record(self, i: int, stage: StageConfig | None, stage_epoch: float, r: StageResult | None,
               acc: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Append one evaluation point (cumulative over the run's stages) to epochs.jsonl."""
        tokens = r.tokens if r is not None else 0
        rec = {"stage": i, "method": stage.method if stage is not None else None, "stage_epoch": stage_epoch,
               "epoch": round(self.epochs + stage_epoch, 6), "optimizer_steps": self.steps + (r.optimizer_steps if r else 0),
               "tokens": self.tokens + tokens, "train_seconds": round(self.seconds + (r.train_seconds if r else 0.0), 2),
               "flops": self.flops_done + (self.stage_flops(stage, tokens) if stage is not None else 0.0),
               "accuracy": acc["accuracy"], "correct": acc["correct"], "n": acc["n"], **extra}
        if self.s.main:
            with (self.out / "epochs.jsonl").open("a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.writer is not None:
                self.writer.add_scalar("eval/accuracy", rec["accuracy"], rec["optimizer_steps"])
                self.writer.flush()
        return rec

    def evaluate(self, i: int, stage: StageConfig, stage_epoch: float, r: StageResult) -> dict[str, Any]:
        """Evaluate the model as it is now (mid-stage: adapters not merged yet) and record the point."""
        was_training = self.s.top.training
        rec = self.record(i, stage, stage_epoch, r, accuracy(self.s.evaluate(self.eval_rows)))
        self.s.top.train(was_training)
        logger.info("%s after stage %d epoch %g: accuracy %.2f%%", self.cfg.label(), i, stage_epoch, 100 * rec["accuracy"])
        return rec

    def finish_stage(self, info: dict[str, Any]) -> None:
        self.epochs += info["epochs"]
        self.tokens += info["tokens"]
        self.seconds += info["train_seconds"]
        self.flops_done += info["flops"]
        self.steps += info["optimizer_steps"]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
