"""A study's expected duration, from the speeds this machine shows while the study runs.

A run's time is estimated as

    sum over the stages it trains of  epochs x training rows x seconds per training row (of the stage's method)
    + evaluation passes x seconds per pass (of its data and evaluation settings)

Seconds per training row come from a stage's first logged steps (and are refined by every later group
of steps); seconds per pass from the last evaluation of the same rows (heft.run.pipeline's `pace`).
Until a method is measured, it is assumed as fast per row as the mean of the methods measured so far;
until an evaluation setup is measured, a pass is assumed to take half a training row's time per
evaluated row (a forward pass without the backward: 2N of the (2 + 2f)N FLOPs per token, heft.training.cost).
Stages taken from the stage cache or finished before a restart cost nothing; a finished run nothing.

The study's expectation is logged once the first training speed is measured, and each run's own (with
what is left of the study) when it starts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlannedRun:
    """One run of a study that is still to do, as far as its duration goes."""

    key: str
    """Its run folder."""
    label: str
    """For the log: the strategy's name (and seed)."""
    stages: tuple[tuple[str, float], ...]
    """(method, epochs) of each stage it trains itself."""
    train_rows: int
    eval_rows: int
    passes: int
    """Evaluation passes: one at the end, or (eval.every_epoch) one per epoch it trains."""
    setup: str
    """Its data and evaluation settings: runs that share them share one pass's time."""

    def describe(self) -> str:
        if not self.stages:
            return "evaluation only"
        training = ", ".join(f"{method} {epochs:g} epoch{'s' if epochs != 1 else ''}" for method, epochs in self.stages)
        return f"training {training} on {self.train_rows} rows; {self.passes} evaluation pass{'es' if self.passes > 1 else ''}"


def passes(stage_epochs: list[float], trains_last: bool, every_epoch: bool) -> int:
    """Evaluation passes of a run that trains stages of `stage_epochs` epochs (`trains_last`: the run's last stage
    among them): with eval.every_epoch one per (begun) epoch, the last one being the final evaluation."""
    if not every_epoch:
        return 1
    return sum(math.ceil(e - 1e-9) for e in stage_epochs) + (0 if trains_last else 1)


class Forecast:
    """The expected duration of the runs of a study still to do (`runs`, in training order). `pace` is the callback
    train_run reports its speeds to; `start` and `done` frame each run."""

    def __init__(self, runs: list[PlannedRun], unit: tuple[str, str] = ("strategy", "strategies")):
        self.runs = {r.key: r for r in runs}
        self.left = [r.key for r in runs]
        self.unit = unit  # what the log counts, singular and plural
        self.train_speed: dict[str, float] = {}  # method -> seconds per training row
        self.eval_speed: dict[str, float] = {}  # setup -> seconds per evaluation pass
        self.current: PlannedRun | None = None
        self.began = 0.0
        self.announced = False

    # ------------------------------------------------------------------ the estimate
    def _mean_row_seconds(self) -> float | None:
        return sum(self.train_speed.values()) / len(self.train_speed) if self.train_speed else None

    def row_seconds(self, method: str) -> float | None:
        """Seconds per training row of a stage of `method`: measured, or assumed (the module docstring)."""
        return self.train_speed[method] if method in self.train_speed else self._mean_row_seconds()

    def pass_seconds(self, run: PlannedRun) -> float | None:
        """Seconds per evaluation pass of the run's setup: measured, or assumed (the module docstring)."""
        if run.setup in self.eval_speed:
            return self.eval_speed[run.setup]
        row = self._mean_row_seconds()
        return None if row is None else 0.5 * row * run.eval_rows

    def seconds(self, run: PlannedRun) -> float | None:
        """The run's expected seconds, or None while no speed it depends on can be estimated."""
        rows = [self.row_seconds(method) for method, _ in run.stages]
        evaluation = self.pass_seconds(run)
        if evaluation is None or any(r is None for r in rows):
            return None
        return sum(epochs * run.train_rows * r for (_, epochs), r in zip(run.stages, rows)) + run.passes * evaluation

    def seconds_left(self) -> float | None:
        """The rest of the study: what the current run has left, and every later one."""
        total = 0.0
        for key in self.left:
            own = self.seconds(self.runs[key])
            if own is None:
                return None
            if self.current is not None and key == self.current.key:
                own = max(0.0, own - (time.perf_counter() - self.began))
            total += own
        return total

    def not_measured(self) -> list[str]:
        """Speeds the estimate assumes, because the runs left need them and they are not measured yet."""
        runs = [self.runs[k] for k in self.left]
        methods = sorted({m for r in runs for m, _ in r.stages if m not in self.train_speed})
        return methods + (["evaluation"] if any(r.setup not in self.eval_speed for r in runs) else [])

    # ------------------------------------------------------------------ the study's events
    def start(self, key: str) -> None:
        """A run begins: log its expected time and the study's, if a speed is known yet."""
        run = self.current = self.runs[key]
        self.began = time.perf_counter()
        own, rest = self.seconds(run), self.seconds_left()
        if own is None or rest is None:
            logger.info("%s: %s; the expected time follows once a speed is measured", run.label, run.describe())
            return
        logger.info("%s: expected %s (%s); %s left for the whole suite (%s)%s", run.label, duration(own),
                    run.describe(), duration(rest), self._count(), self._assumed())

    def done(self, key: str) -> None:
        self.left.remove(key)
        self.current = None

    def pace(self, what: str, seconds: float) -> None:
        """A speed train_run measured: (method, seconds per training row) or ("evaluation", seconds per pass)."""
        if what == "evaluation":
            if self.current is not None:
                self.eval_speed[self.current.setup] = seconds
            return
        self.train_speed[what] = seconds
        if not self.announced:
            self.announced = True
            rest = self.seconds_left()
            if rest is not None:
                logger.info("expected: %s for the whole suite (%s left)%s", duration(rest), self._count(), self._assumed())

    def _count(self) -> str:
        return f"{len(self.left)} {self.unit[len(self.left) != 1]}"

    def _assumed(self) -> str:
        missing = self.not_measured()
        return f"; not measured yet, so assumed: {', '.join(missing)}" if missing else ""


def duration(seconds: float) -> str:
    """`about 12 min`, in words a log reader takes in at a glance."""
    if seconds < 60:
        return "under a minute"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"
