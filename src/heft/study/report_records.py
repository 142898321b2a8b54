"""The typed records of a study's report.json, each written and read back by the same code.

    Report             report.json: the whole comparison
    StrategySummary    one strategy's final accuracy over seeds, its verdict against the majority, its cost
    TaskSummary        (general tasks) one task's accuracy over seeds with its baselines
    Pair               a paired comparison A - B: the bootstrap over rows, McNemar's test per seed
    EpochPoint         seed-mean accuracy after one cumulative epoch
    Target             the first epoch at which a strategy reached a target accuracy
    SharedStages       stages a strategy took from another one instead of training them
    ReftNorms          the learned ReFT edit's size per layer and position group
    Tuning             (heft compare --tune) how a strategy's config was chosen on the dev split

The JSON keeps the keys and order report.json has always had. Fields marked `optional()` are left out
when None; the others are written as null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from heft.run.records import Record, optional

MAJORITY = "majority"
"""The `b` of a Pair that compares a strategy with always answering the training majority."""


def _plain(value: Any) -> Any:
    """JSON data for a value that may hold records (in lists or dict values)."""
    if isinstance(value, Record):
        return value.to_json()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class NestedRecord(Record):
    """A Record whose fields may hold records; each subclass reads its own nested fields back."""

    def to_json(self) -> dict[str, Any]:
        return {k: _plain(v) for k, v in super().to_json().items()}


@dataclass(frozen=True)
class TaskSummary(Record):
    accuracy_per_seed: list[float]
    mean: float
    std: float | None
    ci95: list[float] | None
    n: int
    chance: float
    majority_baseline: float
    comparable: bool | None
    note: str | None
    acc_norm: float | None = optional()
    unparseable: float | None = optional()
    """Generation tasks: the share of answers that could not be parsed, mean over seeds."""


@dataclass(frozen=True)
class StrategySummary(NestedRecord):
    budget: str
    accuracy_per_seed: dict[str, float]
    """Seed (as text, a JSON key) -> final accuracy."""
    mean: float
    std: float | None
    """None with one seed; 0 when every seed scored the same."""
    ci95: list[float] | None
    """Student's t interval of the mean over seeds, as computed (it can reach below 0 or above 1 with few
    seeds); None with fewer than two distinct accuracies, where no interval can be estimated."""
    single_run_ci95: list[float] | None
    """One seed: the Wilson interval of that run."""
    above_majority: bool | None
    """The paired bootstrap interval of this strategy - majority (its Pair with b = `majority`) lies above 0;
    None for a strategy that has no such pair (no training)."""
    trainable_params: int
    epochs: float
    train_tokens: float
    train_seconds: float
    train_flops: float
    tasks: dict[str, TaskSummary] | None = optional()
    macro_per_seed: list[float] | None = optional()
    macro: float | None = optional()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> StrategySummary:
        tasks = raw.get("tasks")
        return super().from_json({**raw, "tasks": None if tasks is None else
                                  {t: TaskSummary.from_json(v) for t, v in tasks.items()}})


@dataclass(frozen=True)
class Bootstrap(Record):
    diff: float
    ci95: list[float]
    p: float


@dataclass(frozen=True)
class McNemar(Record):
    a_only: int
    b_only: int
    p: float


@dataclass(frozen=True)
class Pair(NestedRecord):
    a: str
    b: str
    """Another strategy, or MAJORITY."""
    bootstrap: Bootstrap
    """A - B, averaged over seeds, resampling rows."""
    mcnemar: dict[str, McNemar]
    """Seed (as text) -> McNemar's exact test on that seed's predictions."""
    by_task: dict[str, Bootstrap] | None = optional()
    """Several tasks: the bootstrap on each task's rows."""

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Pair:
        by_task = raw.get("by_task")
        return super().from_json({**raw, "bootstrap": Bootstrap.from_json(raw["bootstrap"]),
                                  "mcnemar": {s: McNemar.from_json(m) for s, m in raw["mcnemar"].items()},
                                  "by_task": None if by_task is None else
                                  {t: Bootstrap.from_json(b) for t, b in by_task.items()}})


@dataclass(frozen=True)
class EpochPoint(Record):
    epoch: float
    accuracy_per_seed: list[float]
    mean: float
    std: float | None
    ci95: list[float] | None
    flops: float
    train_seconds: float
    stage: int
    method: str | None


@dataclass(frozen=True)
class Target(Record):
    strategy: str
    target: str
    """What the target is: another strategy's final accuracy, or a --target value."""
    target_accuracy: float
    epoch: float | None
    """None: not reached within the strategy's budget."""
    flops: float | None
    budget_epochs: float


@dataclass(frozen=True)
class SharedStages(Record):
    sources: list[str]
    """Where the stages came from (JSON key `from`)."""
    seconds_not_retrained: float

    def to_json(self) -> dict[str, Any]:
        return {"from": self.sources, "seconds_not_retrained": self.seconds_not_retrained}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> SharedStages:
        return cls(sources=raw["from"], seconds_not_retrained=raw["seconds_not_retrained"])


@dataclass(frozen=True)
class EditNorm(Record):
    layer: int
    group: str
    gain: float
    offset: float


@dataclass(frozen=True)
class ReftNorms(NestedRecord):
    kind: str
    init: str
    per_layer: list[EditNorm]

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ReftNorms:
        return super().from_json({**raw, "per_layer": [EditNorm.from_json(r) for r in raw["per_layer"]]})


@dataclass(frozen=True)
class Tuning(Record):
    trials: int
    """The study's size: every tuned strategy gets the same."""
    complete: int
    pruned: int
    failed: int
    searched: dict[str, dict[str, Any]]
    """Dotted path -> {distribution: arguments}, as `search:` declares it."""
    best_trial: int
    best_dev_accuracy: float
    best_values: dict[str, Any]
    tune_folder: str
    """The strategy's tune folder (trials, tune.md, plots), as given to heft compare."""


@dataclass(frozen=True)
class Report(NestedRecord):
    seeds: list[int]
    n: int
    eval_split: str
    model: str
    train_rows: int
    majority_label: str | dict[str, Any]
    """BoolQ: "yes" or "no"; general tasks: per task, the most frequent gold choice in training."""
    majority_baseline: float
    strategies: dict[str, StrategySummary]
    pairs: list[Pair]
    epochs: dict[str, list[EpochPoint]]
    targets: list[Target]
    shared_stages: dict[str, SharedStages]
    reft_edit_norms: dict[str, ReftNorms]
    run_folders: dict[str, dict[str, str]]
    """Strategy -> seed (as text) -> run folder, relative to the study folder."""
    plots: dict[str, str] | str
    """Plot kind -> PNG path relative to the study folder, or why no plot was drawn."""
    tuning: dict[str, Tuning] | None = optional()
    """heft compare --tune: per tuned strategy, its search on the dev split."""

    @property
    def many_tasks(self) -> bool:
        return next(iter(self.strategies.values())).tasks is not None

    def majority_pair(self, name: str) -> Pair | None:
        return next((p for p in self.pairs if p.a == name and p.b == MAJORITY), None)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Report:
        return super().from_json({
            **raw,
            "strategies": {n: StrategySummary.from_json(s) for n, s in raw["strategies"].items()},
            "pairs": [Pair.from_json(p) for p in raw["pairs"]],
            "epochs": {n: [EpochPoint.from_json(p) for p in curve] for n, curve in raw["epochs"].items()},
            "targets": [Target.from_json(t) for t in raw["targets"]],
            "shared_stages": {n: SharedStages.from_json(s) for n, s in raw["shared_stages"].items()},
            "reft_edit_norms": {n: ReftNorms.from_json(r) for n, r in raw["reft_edit_norms"].items()},
            "tuning": None if raw.get("tuning") is None else {n: Tuning.from_json(t) for n, t in raw["tuning"].items()},
        })
