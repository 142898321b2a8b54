"""The typed records a run writes to disk, each written and read back by the same code.

    StageProgress   what training a stage (or the first epochs of it) produced
    StageRecord     `stages/NN-*/stage.json`: a finished stage (progress, cost, where it came from)
    EpochRecord     one line of `epochs.jsonl`: accuracy after an epoch, with the run's cumulative cost
    Metrics         `metrics.json`: the run's final accuracy, baselines and cost
    DataFingerprint `meta.json`'s `data_fingerprint`: the rows the run trained on and was evaluated on

Optional fields that are None are left out of the JSON, so files keep the schema they always had;
reading tolerates fields a newer heft added (ignored) and optional ones an older heft did not write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence, TypeVar

T = TypeVar("T", bound="Record")


class Record:
    """JSON round trip for a flat dataclass (nested Record lists handled by the subclass)."""

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls: type[T], raw: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in raw.items() if k in names})


def optional(default: Any = None) -> Any:
    """A field written only when it is not None."""
    return field(default=default, metadata={"omit_none": True})


@dataclass(frozen=True)
class StageProgress(Record):
    optimizer_steps: int
    epochs: float
    train_seconds: float
    tokens: int
    final_loss: float | None


@dataclass(frozen=True)
class StageRecord(Record):
    index: int
    method: str
    trainable_params: int
    optimizer_steps: int
    epochs: float
    train_seconds: float
    tokens: int
    final_loss: float | None
    flops: float
    reused_from: str | None = optional()
    """The strategy (and epoch) whose identical stage prefix this stage was taken from, not trained here."""
    peak_memory: dict[str, Any] | None = optional()
    clipped_steps: float | None = optional()
    """Share of optimizer steps whose gradient norm was clipped (above the stage's max_grad_norm)."""

    def to_json(self) -> dict[str, Any]:
        # the key order stage.json always had
        order = ("index", "method", "trainable_params", "reused_from", "peak_memory", "optimizer_steps", "epochs",
                 "train_seconds", "tokens", "final_loss", "flops", "clipped_steps")
        raw = super().to_json()
        return {k: raw[k] for k in order if k in raw}

    @property
    def progress(self) -> StageProgress:
        return StageProgress(self.optimizer_steps, self.epochs, self.train_seconds, self.tokens, self.final_loss)


@dataclass(frozen=True)
class EpochRecord(Record):
    stage: int
    method: str | None
    stage_epoch: float
    epoch: float
    optimizer_steps: int
    tokens: int
    train_seconds: float
    flops: float
    accuracy: float
    correct: int
    n: int
    reused_from: str | None = optional()


@dataclass(frozen=True)
class Metrics(Record):
    strategy: str
    accuracy: float
    ci95: list[float]
    n: int
    correct: int
    eval_split: str
    majority_label: bool | int | dict[str, int | None]
    """BoolQ: the training majority answer; general tasks: per task, the most frequent gold choice in training."""
    majority_baseline: float
    trainable_params: int
    train_seconds: float
    epochs: float
    train_tokens: int
    train_flops: float
    train_rows: int
    stages: list[StageRecord]
    tasks: dict[str, dict[str, Any]] | None = optional()
    """General tasks: per task, accuracy (lm-eval's acc), acc_norm where the task reports it, n, interval,
    chance and majority baselines, unparseable answers (generation), and whether the numbers are comparable
    to published ones."""
    macro_accuracy: float | None = optional()
    """General tasks: the mean of the per-task accuracies."""

    def to_json(self) -> dict[str, Any]:
        raw = super().to_json()
        raw["stages"] = [s.to_json() for s in self.stages]
        return raw

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> "Metrics":
        raw = {**raw, "stages": [StageRecord.from_json(s) for s in raw.get("stages", [])]}
        raw.setdefault("train_tokens", 0)  # folders written before heft recorded cost
        raw.setdefault("train_flops", 0.0)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class DataFingerprint(Record):
    """The rows a run trained on and was evaluated on, as read and split (after data.dev_size, train_size and
    eval_size): a hash of each list's rows in order, and its length. It tells a changed data file apart even
    when the file's name, the config and the row count stay the same."""

    train: str
    train_rows: int
    eval: str
    eval_rows: int

    @classmethod
    def of(cls, train: Sequence[Any], evaluation: Sequence[Any]) -> "DataFingerprint":
        """From the rows (heft.data.rows.Example) of the training and the evaluation split."""
        return cls(_rows_hash(train), len(train), _rows_hash(evaluation), len(evaluation))

    def differences(self, now: "DataFingerprint") -> dict[str, str]:
        """The splits whose rows differ from `now`'s ("train", "eval"), each with what changed in words: the row
        counts (`400 then, 300 now`), or the same count with other content."""
        out = {}
        for part in ("train", "eval"):
            then_n, now_n = getattr(self, f"{part}_rows"), getattr(now, f"{part}_rows")
            if getattr(self, part) != getattr(now, part):
                out[part] = f"{then_n} then, {now_n} now" if then_n != now_n else f"{now_n} then and now, with other content"
        return out


def _rows_hash(rows: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for row in rows:
        # A field at its default value is left out, so a field a newer heft adds to the row type keeps the
        # fingerprints of folders written before it; `source` (where a row was read) is not content (compare=False).
        content = {f.name: getattr(row, f.name) for f in dataclasses.fields(row)
                   if f.compare and getattr(row, f.name) != f.default}
        h.update(json.dumps(content, sort_keys=True).encode() + b"\n")
    return h.hexdigest()[:20]
