"""`heft tune`: an Optuna study over a run config's fields, scored on the dev split, run by any number of workers.

A worker (one `heft tune` process) reads top to bottom:

    check     the config and its `search:` space, the data rows, the --out folder, the storage, and the study
              (created here, or joined: same config, space and --trials): every problem before any trial runs
    trials    until the study has none left: retire the trials of workers that stopped, take the next waiting
              trial, run it (heft.tune.objective) in OUT/trial-K, tell Optuna its dev accuracy (or pruned, failed)
    report    once no trial is waiting or running: tune.md, tune.json, best.yaml, plots (heft.tune.report)

Exactly N trials: the worker that creates a study enqueues N waiting trials, and workers only ever take
waiting ones (Optuna's storage lets one worker win each), so more workers never run more trials. A
worker that stops mid-trial (killed, or its machine lost) leaves a running trial: the next worker to
look marks it failed and enqueues a retry with the same values, which continues the same run folder
from its latest checkpoint. A worker on this machine is checked by its process (immediately); one on
another machine by the heartbeat it writes to the trial every `heartbeat` seconds (after 5 missed ones).
A failed trial (a config the sampled values make invalid, a diverging run) counts as tried and is not retried.
Every worker stays until the study is done, so any of them can retry a trial whose worker stopped.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from heft.config.load import apply_override, from_dict, read_config_file, to_dict
from heft.errors import ConfigError, HeftError
from heft.run.folder import check_out_path
from heft.run.lock import _alive, _start_ticks
from heft.tune.folder import TuneFolder
from heft.tune.objective import Tuned, run_trial
from heft.tune.space import default_space, parse
from heft.tune.storage import describe, open_storage

logger = logging.getLogger(__name__)

MISSED_HEARTBEATS = 5  # a worker on another machine is taken as stopped after this many heartbeats are missed
SETUP_WAIT_S = 60.0  # how long a joining worker waits for the creating worker to finish setting the study up


def tune(config: Path, out: Path, trials: int, *, overrides: Sequence[tuple[str, str]] = (), storage: str | None = None,
         study_name: str | None = None, seed: int = 0, heartbeat: float = 60.0, pruner: Any = "median") -> dict[str, Any]:
    """Run trials of the study until it has none left, then write the tune report; the report (tune.json's content).

    `storage`: `journal:PATH` or a database URL shared by the study's workers (default: OUT/optuna.journal);
    `study_name` (default: the config file's stem) names the study in it; `seed` seeds the sampler (a study run by
    one worker samples the same values every time); `pruner`: `median`, `none`, or an Optuna pruner."""
    check_settings(trials, heartbeat)
    tuned = read_tuned(Path(config), overrides, trials)
    study = open_study(tuned, Path(out), study_name or Path(config).stem, storage, pruner)
    return study.work(seed, heartbeat)


def check_settings(trials: int, heartbeat: float) -> None:
    """The worker's own settings, and Optuna installed."""
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("heft tune needs Optuna, an optional extra: pip install 'heft[tune]'") from None
    if trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {trials}")
    if heartbeat <= 0:
        raise ConfigError(f"--heartbeat: must be positive seconds, got {heartbeat}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("heft tune runs one process per worker: start more workers with the same --storage instead "
                          "of torchrun / accelerate launch")


@dataclass
class OpenStudy:
    """A study this worker has created or joined, with its tune folder: every check passed, no trial run yet."""

    tuned: Tuned
    study: Any
    storage: Any
    where: str
    folder: TuneFolder

    def work(self, seed: int, heartbeat: float) -> dict[str, Any]:
        """Run trials until the study has none waiting or running; write the report and return it."""
        from heft.tune.report import write_report

        Worker(self.study, self.storage, self.tuned, self.folder, seed, heartbeat).run()
        return write_report(self.study, self.tuned, self.folder, self.where)


def open_study(tuned: Tuned, out: Path, name: str, storage: str | None, pruner: Any) -> OpenStudy:
    """Check the data rows, the tune folder and the storage; create the study `name` or join it (same config, space and
    size); bind the folder to it. Every refusal is a ConfigError, raised before any trial runs."""
    _check_rows(tuned)
    check_out_path(out)
    folder = TuneFolder(out)
    spec = storage or f"journal:{folder.journal_path}"
    folder.check(name)
    if storage is None:
        out.mkdir(parents=True, exist_ok=True)
    store = open_storage(spec)
    study = join_study(store, name, tuned, _pruner(pruner, tuned.trials))
    folder.bind(name, describe(spec))
    return OpenStudy(tuned, study, store, describe(spec), folder)


def read_tuned(path: Path, overrides: Sequence[tuple[str, str]], trials: int) -> Tuned:
    """The config to tune (overrides applied, `search:` taken out) and its search space (default: `default_space`)."""
    raw = read_config_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a run config (a mapping with `stages:` and `search:`), got {raw!r}")
    for dotted, text in overrides:
        apply_override(raw, dotted, text)  # `--search.stages.0.lr '{log_uniform: [...]}'` edits the space too
    search = raw.pop("search", None)
    base = from_dict(raw)
    if base.data.dev_size < 1:
        raise ConfigError("data.dev_size: tuning scores every trial on the dev split; set data.dev_size >= 1 (e.g. 200)")
    space = parse(search, base) if search is not None else default_space(base)
    return Tuned(base, space, trials)


def _check_rows(tuned: Tuned) -> None:
    """Every data row readable, and a dev split to score on, before the study is touched."""
    from heft.data.rows import load_splits

    splits = load_splits(tuned.trial_config({}).data)
    if not splits.eval:
        raise ConfigError("data.dev_size: the dev split is empty; raise data.dev_size")


def _pruner(pruner: Any, trials: int) -> Any:
    import optuna

    if pruner == "none":
        return optuna.pruners.NopPruner()
    if pruner == "median":  # a trial below the median of the others at the same epoch stops; the first few run whole
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials(trials), n_warmup_steps=0)
    if isinstance(pruner, str):
        raise ConfigError(f"--pruner: must be median or none, got {pruner!r}")
    return pruner


def startup_trials(trials: int) -> int:
    """Trials sampled at random (and never pruned) before TPE and the pruner use the others: a third, 2 to 10."""
    return min(10, max(2, trials // 3))


# ----------------------------------------------------------------------------- the study


def join_study(storage: Any, name: str, tuned: Tuned, pruner: Any) -> Any:
    """Create the study with its N waiting trials, or join it if its config, space and size are these."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # heft logs each trial itself
    mine = {"heft_config": to_dict(tuned.base), "heft_space": tuned.space.to_json(), "heft_trials": tuned.trials}
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, pruner=pruner)
        _check_joined(study, name, mine)
        return study
    for key, value in mine.items():
        study.set_user_attr(key, value)
    for _ in range(tuned.trials):
        study.enqueue_trial({})  # the values are sampled when a worker takes the trial
    study.set_user_attr("heft_ready", True)
    logger.info("study %r created with %d trials", name, tuned.trials)
    return study


def _check_joined(study: Any, name: str, mine: dict[str, Any]) -> None:
    deadline = time.monotonic() + SETUP_WAIT_S
    while "heft_ready" not in study.user_attrs:
        if "heft_space" not in study.user_attrs and study.get_trials(deepcopy=False):
            raise ConfigError(f"--study-name: study {name!r} exists and was not created by heft tune; choose another name")
        if time.monotonic() > deadline:
            raise ConfigError(f"--study-name: study {name!r} was left half set up (the worker creating it stopped); delete "
                              f"it (optuna delete-study --study-name {name} --storage URL) or choose another name")
        time.sleep(0.5)
    held = study.user_attrs
    if held["heft_space"] != mine["heft_space"]:
        raise ConfigError(f"--study-name: study {name!r} exists with another search space ({_flat(held['heft_space'])}); "
                          "use the same `search:`, or another --study-name")
    if held["heft_config"] != mine["heft_config"]:
        differ = sorted(set(_paths(held["heft_config"], mine["heft_config"])))
        raise ConfigError(f"--study-name: study {name!r} exists with another config (differs in {', '.join(differ)}); use "
                          "the same config and overrides, or another --study-name")
    if held["heft_trials"] != mine["heft_trials"]:
        raise ConfigError(f"--trials: study {name!r} has {held['heft_trials']} trials in all; pass --trials "
                          f"{held['heft_trials']}, or another --study-name")


def _flat(space: dict[str, Any]) -> str:
    return "; ".join(f"{k}: {next(iter(v))} {next(iter(v.values()))}" for k, v in space.items())


def _paths(a: Any, b: Any, where: str = "") -> list[str]:
    """The dotted paths where two plain configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [p for k in a.keys() | b.keys() for p in _paths(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _paths(x, y, f"{where}.{i}")]
    return [] if a == b else [where or "the config"]


# ----------------------------------------------------------------------------- the worker


class Worker:
    """Takes the study's waiting trials one at a time until none is waiting or running."""

    def __init__(self, study: Any, storage: Any, tuned: Tuned, folder: TuneFolder, seed: int, heartbeat: float):
        self.study, self.storage, self.tuned, self.folder = study, storage, tuned, folder
        self.seed, self.heartbeat = seed, heartbeat
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "ticks": _start_ticks(os.getpid()),
                   "heartbeat": heartbeat}

    def run(self) -> None:
        waiting_logged = False
        while True:
            self.retire_stopped()
            taken = self.take()
            if taken is not None:
                self.run_one(*taken)
                waiting_logged = False
                continue
            busy = self.study.get_trials(deepcopy=False, states=(_state().RUNNING, _state().WAITING))
            if not busy:
                return
            if not waiting_logged:
                logger.info("no trial left to take; waiting for %d trial(s) running on other workers", len(busy))
                waiting_logged = True
            time.sleep(min(self.heartbeat, 5.0))

    def take(self) -> tuple[int, Any] | None:
        """A waiting trial, now running here: (its storage id, its frozen state); None if none is waiting."""
        import optuna

        for frozen in self.study.get_trials(deepcopy=False, states=(_state().WAITING,)):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, frozen.number)
            try:
                if self.storage.set_trial_state_values(trial_id, _state().RUNNING):
                    return trial_id, frozen
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker took and finished it meanwhile
        return None

    def run_one(self, trial_id: int, frozen: Any) -> None:
        import optuna
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # a sampler per trial, seeded by the trial's number: one worker samples the same values each time,
            # and workers sharing a study never draw the same random start
            self.study.sampler = optuna.samplers.TPESampler(seed=(self.seed * 1_000_003 + frozen.number) % 2**32,
                                                            n_startup_trials=startup_trials(self.tuned.trials))
        trial = optuna.trial.Trial(self.study, trial_id)
        run = frozen.user_attrs.get("heft_run", f"trial-{frozen.number}")
        trial.set_user_attr("heft_worker", self.me)
        trial.set_user_attr("heft_run", run)
        retry = frozen.user_attrs.get("heft_retry_of")
        logger.info("trial %d%s: %s", frozen.number, f" (retry of trial {retry})" if retry is not None else "",
                    self.folder.trial(run))
        try:
            with _Heartbeat(trial, self.heartbeat):
                value = run_trial(trial, self.tuned, self.folder.trial(run))
        except optuna.TrialPruned as e:
            self.study.tell(trial, state=_state().PRUNED, skip_if_finished=True)
            logger.info("trial %d pruned: %s", frozen.number, e)
        except optuna.exceptions.UpdateFinishedTrialError:
            logger.warning("trial %d was marked failed by another worker (it saw no heartbeat from this one); its retry "
                           "continues it", frozen.number)
        except (HeftError, torch.OutOfMemoryError) as e:
            self._fail(trial, frozen.number, str(e))
        except (KeyboardInterrupt, SystemExit) as e:  # stopped (Ctrl-C): a retry continues the run folder later
            self.retire(self.study.get_trials(deepcopy=False)[frozen.number], f"its worker stopped ({type(e).__name__})")
            raise
        except Exception as e:  # a bug: recorded, and shown with its traceback
            self._fail(trial, frozen.number, f"{type(e).__name__}: {e}")
            raise
        else:
            self.study.tell(trial, value, skip_if_finished=True)
            logger.info("trial %d: dev accuracy %.2f%% (best %.2f%%, trial %d)", frozen.number, 100 * value,
                        100 * self.study.best_value, self.study.best_trial.number)
        finally:
            gc.collect()  # the trial's model and optimizer go before the next trial loads its own

    def _fail(self, trial: Any, number: int, reason: str) -> None:
        """A trial its values cannot run (refused config, diverging loss): tried, recorded with the reason, not retried."""
        import optuna

        try:
            trial.set_user_attr("heft_error", reason)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # another worker took this one's trial as stopped and retried it
        self.study.tell(trial, state=_state().FAIL, skip_if_finished=True)
        logger.warning("trial %d failed: %s", number, reason)

    def retire_stopped(self) -> None:
        """Mark failed, and retry, the running trials whose worker stopped."""
        now = time.time()
        for frozen in self.study.get_trials(deepcopy=False, states=(_state().RUNNING,)):
            reason = self.stopped(frozen, now)
            if reason is not None:
                self.retire(frozen, reason)

    def stopped(self, frozen: Any, now: float) -> str | None:
        """Why the worker of a running trial is taken as stopped, or None while it runs."""
        worker = frozen.user_attrs.get("heft_worker")
        if worker is not None and worker.get("host") == self.me["host"]:
            if worker.get("pid") == self.me["pid"] or _alive(worker["pid"], worker.get("ticks")):
                return None
            return f"its worker (PID {worker['pid']} on {worker['host']}) stopped"
        last = frozen.user_attrs.get("heft_heartbeat")
        if last is None:  # taken, but stopped before it first wrote anything: judged from the trial's start
            last = frozen.datetime_start.timestamp() if frozen.datetime_start is not None else now
        silent = now - last
        if silent <= MISSED_HEARTBEATS * (worker or {}).get("heartbeat", self.heartbeat):  # that worker's own interval
            return None
        who = f"PID {worker['pid']} on {worker['host']}" if worker else "unknown"
        return f"no heartbeat from its worker ({who}) for {silent:.0f} s"

    def retire(self, frozen: Any, reason: str) -> None:
        """Mark a running trial failed and enqueue its retry (same values, same run folder); only the worker whose
        mark lands first enqueues it."""
        import optuna

        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, frozen.number)
        run = frozen.user_attrs.get("heft_run", f"trial-{frozen.number}")
        try:
            self.storage.set_trial_user_attr(trial_id, "heft_error", f"{reason}; retried, continuing {run}")
            self.storage.set_trial_state_values(trial_id, _state().FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # finished meanwhile, or another worker retired it first
        self.study.enqueue_trial(frozen.params, user_attrs={"heft_retry_of": frozen.number, "heft_run": run})
        logger.warning("trial %d: %s; retried as a new trial that continues %s", frozen.number, reason, run)


class _Heartbeat:
    """Writes the time to the trial every `interval` seconds while it runs, so workers elsewhere see it alive."""

    def __init__(self, trial: Any, interval: float):
        self.trial, self.interval = trial, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="heft-tune-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            try:
                self.trial.set_user_attr("heft_heartbeat", time.time())
            except Exception:  # the trial was finished (by this worker or marked by another): nothing left to signal
                return
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "_Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _state() -> Any:
    from optuna.trial import TrialState

    return TrialState
