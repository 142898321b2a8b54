"""`heft compare --tune N`: every trained strategy of a suite tuned on the dev split with the same N trials, each
at its own fixed budget, then compared as usual through the suite of their best configs.

Each strategy is searched in its default space (heft.tune.space.default_space: each stage's learning rate, the
rank of each method it trains), as the study `PREFIX-NAME`, in `TUNE_OUT/NAME/` (an ordinary tune folder with
its trials, report, plots and best.yaml). Every strategy's study is created or joined, and every check made,
before the first trial of any of them. Then `TUNE_OUT/suite.yaml` holds the best config of each strategy (the
untrained ones as they were), with the search space, the trials and the best dev accuracy as comments, and
`TUNE_OUT/tuning.md` the same as a table; `heft compare` trains that suite under the seeds and reports on the
evaluated split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import yaml

from heft.config.load import to_dict
from heft.config.schema import RunConfig
from heft.config.suite import read_suite, select
from heft.errors import HeftError
from heft.run import atomic
from heft.tune.objective import Tuned
from heft.tune.space import default_space, yaml_text
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
               pruner: Any = "median") -> Path:
    """Tune every trained strategy of the suite (overrides applied, `only` selected) with `trials` trials each;
    write the suite of their best configs and return its path."""
    check_settings(trials, heartbeat)
    configs = select(read_suite(suite, list(overrides)), only)
    folder = SuiteTuneFolder(out)
    opened = {name: open_study(Tuned(cfg, default_space(cfg), trials), folder.strategy(name), f"{prefix}{name}",
                               storage, pruner)
              for name, cfg in configs.items() if cfg.stages}
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
    atomic.write_text(folder.suite_path, _suite_text(best, reports, trials, suite))
    atomic.write_text(folder.summary_path, summary_markdown(reports, trials, folder))
    return folder.suite_path


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


def summary_markdown(reports: dict[str, dict], trials: int, folder: SuiteTuneFolder) -> str:
    """tuning.md: per strategy, the search space, the trials it got, the best dev accuracy and values."""
    lines = [f"# Tuning on the dev split: {trials} trials per strategy", "",
             "| strategy | searched | complete / pruned / failed | best dev accuracy | best values | trials |",
             "|---|---|---|---|---|---|"]
    for name, r in reports.items():
        c, b = r["counts"], r["best"]
        searched = ", ".join(f"`{k}` {next(iter(v))} {yaml_text(next(iter(v.values())))}" for k, v in r["space"].items())
        values = ", ".join(f"`{k}` = {v:.3g}" if isinstance(v, float) else f"`{k}` = {yaml_text(v)}"
                           for k, v in b["values"].items())
        lines.append(f"| {name} | {searched} | {c['complete']} / {c['pruned']} / {c['failed']} | {b['value']:.2%} | "
                     f"{values} | [{name}/tune.md]({name}/tune.md) |")
    return "\n".join(lines) + "\n"
