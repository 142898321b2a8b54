"""One trial of `heft tune`: an ordinary heft run of the config with the trial's sampled values, scored on
the dev split, reporting its dev accuracy after every epoch so that Optuna's pruner can stop it early.

The trial's config is the tuned config with each sampled value set through the CLI's override path,
`data.eval_split: dev` (every trial is scored on the rows carved from train, never on the split a
comparison reports) and `eval.every_epoch: true` (the points the pruner reads). Its run folder is
resumable: a trial retried after its worker died continues from the folder's latest checkpoint, and
first reports the evaluations the folder already holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from heft.config.schema import RunConfig
from heft.run.folder import RunFolder
from heft.run.records import EpochRecord
from heft.tune.space import SearchSpace, apply

logger = logging.getLogger(__name__)

# What every trial's config adds to the tuned one.
TRIAL_SETTINGS = {"data.eval_split": "dev", "eval.every_epoch": True}


@dataclass(frozen=True)
class Tuned:
    """What every worker of a study agrees on: the config to tune (with its own evaluation settings),
    the search space, and the study's total number of trials."""

    base: RunConfig
    space: SearchSpace
    trials: int

    def trial_config(self, values: dict[str, Any]) -> RunConfig:
        """The config a trial with these values trains and scores on the dev split."""
        return apply(self.base, values, **TRIAL_SETTINGS)

    def final_config(self, values: dict[str, Any]) -> RunConfig:
        """The config with these values and the tuned config's own evaluation: what best.yaml holds."""
        return apply(self.base, values)


class Reporter:
    """Reports each evaluation point of a run to its Optuna trial as step 1, 2, ... and raises
    optuna.TrialPruned when the pruner says the trial is behind (`prune=False`: report only)."""

    def __init__(self, trial: Any, prune: bool = True):
        self.trial, self.prune = trial, prune
        self.seen: list[tuple[int, float]] = []
        self.epochs: list[float] = []

    def __call__(self, point: EpochRecord) -> None:
        key = (point.stage, point.stage_epoch)
        if key in self.seen:
            return  # an epoch a resumed run evaluated again
        self.seen.append(key)
        self.epochs.append(point.epoch)
        self.trial.report(point.accuracy, len(self.seen))
        self.trial.set_user_attr("heft_epochs", self.epochs)  # step k is the evaluation after epoch epochs[k-1]
        if self.prune and self.trial.should_prune():
            import optuna

            raise optuna.TrialPruned(f"dev accuracy {point.accuracy:.2%} after epoch {point.epoch:g} is behind the "
                                     "other trials at that point")


def run_trial(trial: Any, tuned: Tuned, path: Path) -> float:
    """Sample the trial's values, train (or continue) its run in `path`; its final dev accuracy."""
    from heft.run.pipeline import train_run

    cfg = tuned.trial_config(tuned.space.sample(trial))
    folder = RunFolder(path)
    reporter = Reporter(trial, prune=not folder.is_finished())
    if folder.is_heft() and folder.read_config() == cfg:
        for point in folder.read_epochs():
            reporter(point)  # a retried trial: what its folder measured before its worker stopped
    metrics = train_run(cfg, path, resume=True, on_eval=reporter)
    return metrics.accuracy
