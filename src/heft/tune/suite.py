"""`heft compare --tune N`: every trained strategy of a suite tuned on the dev split with the same N trials, each
at its own fixed budget, then compared as usual through the suite of their best configs.

Each strategy is searched in the space its suite entry declares under `search:` (as in `heft tune`), else in its
default space (heft.tune.space.default_space: each stage's learning rate, the rank of each method it trains), as the study `PREFIX-NAME`, in `TUNE_OUT/NAME/` (an ordinary tune folder with
its trials, report, plots and best.yaml). Every strategy's study is created or joined, and every check made,
before the first trial of any of them. Then `TUNE_OUT/suite.yaml` holds the best config of each strategy (the
untrained ones as they were), with the search space, the trials and the best dev accuracy as comments, and
`TUNE_OUT/tuning.md` the same as a table; `heft compare` trains that suite under the seeds and reports on the
evaluated split, its report stating how each strategy was tuned (heft.study.report_records.Tuning).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import yaml

from heft.config.load import to_dict
from heft.config.schema import RunConfig
from heft.config.suite import read_suite, select, suite_searches
from heft.errors import ConfigError, HeftError
from heft.run import atomic
from heft.study.report import tuning_table
from heft.study.report_records import Tuning
from heft.tune.objective import Tuned
from heft.tune.space import default_space, parse, yaml_text
from heft.tune.study import check_settings, open_study

logger = logging.getLogger(__name__)


class SuiteTuneFolder:
    """The layout of `--tune-out`: one tune folder per trained strategy, the tuned suite and its summary."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def strategy(self, name: str) -> Path:
        return self.path / name

    @property
    def suite_path(self) -> Path:
        return self.path / "suite.yaml"

    @property
    def summary_path(self) -> Path:
        return self.path / "tuning.md"


def tune_suite(suite: Path, overrides: Sequence[tuple[str, str]], only: list[str] | None, out: Path, trials: int, *,
               storage: str | None = None, prefix: str = "", seed: int = 0, heartbeat: float = 60.0,
               pruner: Any = "median") -> tuple[Path, dict[str, Tuning]]:
    """Tune every trained strategy of the suite (overrides applied, `only` selected) with `trials` trials each;
    write the suite of their best configs; return its path and how each strategy was tuned."""
    check_settings(trials, heartbeat)
    configs = select(read_suite(suite, list(overrides)), only)
    searches = suite_searches(suite, list(overrides))
    folder = SuiteTuneFolder(out)
    spaces = {}
    for name, cfg in configs.items():
        if searches[name] is not None and not cfg.stages:
            raise ConfigError(f"strategies.{name}.search: {name} trains nothing (stages: []), so there is nothing to "
                              "tune; remove its `search:`")
        if cfg.stages:
            try:
                spaces[name] = parse(searches[name], cfg) if searches[name] is not None else default_space(cfg)
            except ConfigError as e:
                raise ConfigError(f"strategies.{name}: {e}") from None
    opened = {name: open_study(Tuned(cfg, spaces[name], trials), folder.strategy(name), f"{prefix}{name}", storage,
                               pruner) for name, cfg in configs.items() if cfg.stages}
    reports = {}
    for name, study in opened.items():
        logger.info("tuning %s: %d trials on the dev split (%s)", name, trials, folder.strategy(name))
        reports[name] = study.work(seed, heartbeat)
    best: dict[str, RunConfig] = {}
    for name, cfg in configs.items():
        report = reports.get(name)
        if report is None:
            best[name] = cfg  # nothing to tune: the base model is scored as it is
        elif report["best"] is None:
            raise HeftError(f"{name}: none of its {trials} trials completed (all pruned or failed), so it has no best "
                            f"config; see {folder.strategy(name) / 'tune.md'}")
        else:
            best[name] = opened[name].tuned.final_config(report["best"]["values"])
    tuning = {name: Tuning(trials=trials, complete=r["counts"]["complete"], pruned=r["counts"]["pruned"],
                           failed=r["counts"]["failed"], searched=r["space"], best_trial=r["best"]["number"],
                           best_dev_accuracy=r["best"]["value"], best_values=r["best"]["values"],
                           tune_folder=str(folder.strategy(name))) for name, r in reports.items()}
    atomic.write_text(folder.suite_path, _suite_text(best, reports, trials, suite))
    atomic.write_text(folder.summary_path, "\n".join([f"# Tuning on the dev split: {trials} trials per strategy", ""]
                                                      + tuning_table({n: dataclasses.replace(t, tune_folder=n)
                                                                      for n, t in tuning.items()})) + "\n")
    return folder.suite_path, tuning


def _suite_text(best: dict[str, RunConfig], reports: dict[str, dict], trials: int, source: Path) -> str:
    """A suite YAML of whole configs (`common: {}`), each tuned strategy's search and result stated above it."""
    lines = [f"# The strategies of {source}, each tuned on the dev split with the same {trials} trials at its own",
             "# budget (heft compare --tune); the best config of each, ready for heft compare or heft train.",
             "common: {}", "strategies:"]
    for name, cfg in best.items():
        report = reports.get(name)
        if report is not None:
            b, c = report["best"], report["counts"]
            space = "; ".join(f"{k} {next(iter(v))} {yaml_text(next(iter(v.values())))}" for k, v in report["space"].items())
            lines += [f"  # {name}: searched {space}",
                      f"  #   {c['complete']} complete, {c['pruned']} pruned, {c['failed']} failed; best: trial {b['number']}, "
                      f"dev accuracy {b['value']:.2%}"]
        body = {k: v for k, v in to_dict(cfg).items() if k != "strategy"}
        text = yaml.safe_dump({name: body}, sort_keys=False)
        lines += ["  " + line for line in text.splitlines()]
    return "\n".join(lines) + "\n"
