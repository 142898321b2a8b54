"""`heft run` and `heft compare`: every strategy of a suite, trained and evaluated, then one report.

`heft compare` trains each strategy under each seed (`OUT/seed-S/NAME`, strategies without training
once in `OUT/seedless/NAME`), evaluated after every epoch; `heft run` is its one-seed case with run
folders directly in `OUT/NAME` and `summary.json` besides the report (see heft.run.folder).

A run folder that already holds a finished run of the same config and the same data rows is reused,
and an unfinished one of the same config is resumed, so an interrupted study continues where it
stopped and a finished one only rebuilds its report; a run whose data changed since is refused.
Identical stage prefixes are trained once (heft.reuse.stage_cache). The study's expected duration is
logged from the speeds it measures (heft.study.forecast).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from heft import __version__
from heft.study import report as reports
from heft.config.schema import DataConfig, RunConfig
from heft.data.rows import load_splits
from heft.errors import ConfigError
from heft.run.pipeline import train_run
from heft.run.folder import Output, StudyFolder
from heft.run.records import DataFingerprint
from heft.study.forecast import Forecast, PlannedRun, passes
from heft.training.runtime import is_main_process
from heft.reuse.stage_cache import StageCache
from heft.config.suite import read_suite, select

logger = logging.getLogger(__name__)


def train_strategies(study: StudyFolder, configs: dict[str, RunConfig], seed: int, forecast: Forecast | None = None) -> None:
    """Train and evaluate each strategy (all of one seed), reusing finished folders and shared prefixes."""
    cache = StageCache(study.stage_cache_dir, configs)
    for name in cache.order(configs):
        cfg, run = configs[name], study.run(name, configs[name], seed)
        same = run.is_heft() and run.read_config() == cfg  # compared as configs: fields added since take defaults
        if run.is_finished():
            if not same:
                raise ConfigError(f"{run.path} holds a finished run of a different config; use a new --out or --overwrite")
            logger.info("%s: reusing the finished run in %s", name, run.path)
            continue
        if run.path.exists() and not same:
            shutil.rmtree(run.path)  # an unfinished run of another config (an edited suite): redone from scratch
        if forecast is not None:
            forecast.start(str(run.path))
        train_run(cfg, run.path, resume=same, cache=cache, name=name, pace=forecast.pace if forecast is not None else None)
        if forecast is not None:
            forecast.done(str(run.path))


def _plan(study: StudyFolder, batches: list[tuple[int, dict[str, RunConfig]]], data: dict[str, DataFingerprint],
          flat: bool) -> Forecast:
    """The runs `train_strategies` will train for each (seed, configs) batch, with the stages each one trains itself
    (not finished before, not planned to come from the stage cache). A finished run it would reuse must have
    trained on the rows `data` gives each strategy now: checked here, before anything trains."""
    runs = []
    for seed, configs in batches:
        cache = StageCache(study.stage_cache_dir, configs)
        taken = cache.planned_starts(configs)
        for name in cache.order(configs):
            cfg, run = configs[name], study.run(name, configs[name], seed)
            same = run.is_heft() and run.read_config() == cfg
            if same and run.is_finished():
                run.require_same_data(data[name], cfg.data, "reuse")
                continue
            todo = [i for i, st in enumerate(cfg.stages) if i >= taken[name] and not (same and run.read_stage(i, st))]
            runs.append(PlannedRun(
                str(run.path), name if flat or not cfg.stages else f"{name} seed {seed}",
                tuple((cfg.stages[i].method, cfg.stages[i].epochs) for i in todo), data[name].train_rows,
                data[name].eval_rows, passes([cfg.stages[i].epochs for i in todo], len(cfg.stages) - 1 in todo, cfg.eval.every_epoch),
                f"{cfg.data!r} {dataclasses.replace(cfg.eval, every_epoch=False)!r}"))
    return Forecast(runs, ("strategy", "strategies") if flat else ("run", "runs"))


def run_study(path: Path, out: Path, overrides: list[tuple[str, str]], *, seeds: list[int] | None,
              only: list[str] | None = None, overwrite: bool = False, tensorboard: bool = False,
              targets: list[float] | None = None, final_only: bool = False,
              tuning: dict[str, reports.Tuning] | None = None) -> reports.Report | dict[str, Any]:
    """Train (or reuse) every strategy of the suite at `path` for every seed, then write the report.

    With seeds, every strategy is evaluated after every epoch too, unless `final_only` (long runs: one evaluation
    each, no accuracy-vs-epoch table). `seeds=None` is `heft run`: each strategy once with its configured seed, run
    folders in `out/NAME`, evaluation at the end only (unless the suite asks for more), plus summary.json. Returns
    the report (typed, as report.json holds it) on the main process, {} on the others. `tuning`: how `heft compare
    --tune` chose the suite's configs, stated in the report."""
    if seeds is not None and not seeds:
        raise ConfigError("--seeds: give at least one seed (3 or more for an interval over seeds)")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: duplicates in {seeds}")
    configs = select(read_suite(path, overrides), only)
    if seeds is not None:
        configs = {n: dataclasses.replace(c, tensorboard=tensorboard or c.tensorboard, eval=dataclasses.replace(
                       c.eval, every_epoch=c.eval.every_epoch or not final_only)) for n, c in configs.items()}
    flat = seeds is None
    continuing = not overwrite and StudyFolder(out, flat).is_heft()
    output = Output.open(out, overwrite=overwrite, continuing=continuing, folder=lambda p: StudyFolder(p, flat),
                         what="study folder", main=is_main_process())
    try:
        read: list[tuple[DataConfig, DataFingerprint]] = []
        for c in configs.values():
            if not any(d == c.data for d, _ in read):
                splits = load_splits(c.data)  # every data row checked before the first write
                read.append((c.data, DataFingerprint.of(splits.train, splits.eval)))
        data = {n: next(f for d, f in read if d == c.data) for n, c in configs.items()}
        study = StudyFolder(output.work, flat)
        used = seeds if seeds is not None else [next(iter(configs.values())).seed]
        if flat:
            batches = [(used[0], configs)]
        else:  # strategies without training once: scoring is deterministic, one evaluation serves every seed
            seedless = {n: c for n, c in configs.items() if not c.stages}
            batches = ([(used[0], seedless)] if seedless else []) + [
                (seed, {n: dataclasses.replace(c, seed=seed) for n, c in configs.items() if c.stages}) for seed in seeds]
        forecast = _plan(study, batches, data, flat)  # finished runs' data checked before the first write, too
        if is_main_process():
            output.begin()
            study.write_asked({"command": "run" if flat else "compare", "suite": str(path),
                               "overrides": [list(o) for o in overrides], "seeds": used, "strategies": list(configs),
                               "heft_version": __version__})
        for seed, batch in batches:
            if not flat and any(c.stages for c in batch.values()):
                logger.info("seed %d: %s", seed, ", ".join(batch))
            train_strategies(study, batch, seed, forecast if is_main_process() else None)
        if not is_main_process():
            return {}  # the report is read from the run folders and written by the main process alone
        if tuning:  # the report links each tune report from where report.md lies
            tuning = {n: dataclasses.replace(t, tune_folder=os.path.relpath(t.tune_folder, out)) for n, t in tuning.items()}
        report = reports.build_report(study, configs, used, targets or [], tuning)
        study.write_report(report, reports.report_markdown(report))
        if flat:
            study.write_summary(reports.summary_view(report), reports.summary_markdown(report))
        output.finish()
        return report
    finally:
        output.close()
