"""The on-disk layout of a run folder and of a study folder, owned here and nowhere else.

Run folder (`heft train`, and each strategy x seed of `heft run` / `heft compare`):

    OUT/config.yaml            resolved configuration
    OUT/meta.json              heft/torch/transformers versions, base model id and fingerprint, device, precision,
                               the fingerprint of the rows trained on and evaluated on (`data_fingerprint`)
    OUT/stages/00-lora/adapter/{adapter_config.json, adapter_model.safetensors}   PEFT format
    OUT/stages/01-reft/{reft_config.json, reft.safetensors}
    OUT/stages/NN-*/{stage.json, train_log.jsonl}
    OUT/stages/NN-*/checkpoints/   while the stage trains (removed when it finishes, unless keep_checkpoints)
    OUT/metrics.json           accuracy, 95% interval, n, majority baseline, trainable params, time, FLOPs
    OUT/epochs.jsonl           with eval.every_epoch: accuracy after every epoch (cumulative tokens, time, FLOPs)
    OUT/tensorboard/           with tensorboard: true: loss, learning rate, accuracy
    OUT/predictions.jsonl      one line per evaluation row: idx, label, pred, p_yes (or text)

A run is finished when metrics.json exists; every other file is written before it.

Study folder (`heft run`: one seed, `OUT/NAME/`; `heft compare`: `OUT/seed-S/NAME/`, and
`OUT/seedless/NAME/` for strategies without training):

    OUT/study.json             what was asked: command, suite, overrides, seeds, strategies
    OUT/stage-cache/KEY/       finished stage prefixes other strategies start from (heft.reuse.stage_cache)
    OUT/report.md, report.json the comparison; OUT/plots/*.png with matplotlib
    OUT/summary.json, summary.md   (`heft run`) the one-seed view of the report

Writing into a folder goes through `Output`: the lock (heft.run.lock), the checks on the path before
anything is written, and, with --overwrite, a swap at the very end.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from heft.run import atomic
from heft.config.schema import DataConfig, RunConfig, StageConfig
from heft.config.load import dump_yaml, load
from heft.errors import CheckpointError, ConfigError
from heft.run.lock import FolderLock
from heft.run.records import DataFingerprint, EpochRecord, Metrics, StageRecord
from heft.study.report_records import Report

logger = logging.getLogger(__name__)


def stage_dir_name(index: int, stage: StageConfig) -> str:
    """Folder name of a stage inside a run folder, e.g. `00-lora` (heft.config.schema refuses two stages sharing one)."""
    return stage.name or f"{index:02d}-{stage.method}"


class RunFolder:
    """Paths, readers and writers of one run folder."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------ paths
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def meta_path(self) -> Path:
        return self.path / "meta.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.json"

    @property
    def predictions_path(self) -> Path:
        return self.path / "predictions.jsonl"

    @property
    def epochs_path(self) -> Path:
        return self.path / "epochs.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / "tensorboard"

    def stage_dir(self, i: int, stage: StageConfig) -> Path:
        """The stage's own folder: its adapter files (see `adapter_dir` for LoRA), stage.json and log."""
        return self.path / "stages" / stage_dir_name(i, stage)

    def adapter_dir(self, i: int, stage: StageConfig) -> Path:
        return self.stage_dir(i, stage) / "adapter"

    def checkpoints_dir(self, i: int, stage: StageConfig) -> Path:
        return self.stage_dir(i, stage) / "checkpoints"

    def train_log_path(self, i: int, stage: StageConfig) -> Path:
        return self.stage_dir(i, stage) / "train_log.jsonl"

    # ------------------------------------------------------------------ state
    def is_heft(self) -> bool:
        """Written by heft: it holds heft's config.yaml (and meta.json)."""
        return self.config_path.is_file()

    def is_finished(self) -> bool:
        return self.metrics_path.is_file()

    def describe(self) -> str:
        """What the folder holds, for messages."""
        if self.is_finished():
            return "a finished run"
        return "an unfinished run" if self.is_heft() else "files not written by heft"

    def require_finished(self) -> None:
        """For eval/predict/load: a finished run, or an error that says what to do."""
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such run folder")
        if not self.is_heft():
            raise CheckpointError(f"{self.path}: not a heft run folder (no config.yaml)")
        if not self.is_finished():
            raise CheckpointError(f"{self.path}: the run is unfinished (no metrics.json; it was stopped or is still "
                                  f"running); `heft train --out {self.path} --resume` finishes it")

    # ------------------------------------------------------------------ config and meta
    def read_config(self) -> RunConfig:
        return load(self.config_path)

    def write_config(self, cfg: RunConfig) -> None:
        atomic.write_text(self.config_path, dump_yaml(cfg))

    def read_meta(self) -> dict[str, Any]:
        return atomic.read_json(self.meta_path) if self.meta_path.is_file() else {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        atomic.write_json(self.meta_path, meta)

    def read_data_fingerprint(self) -> DataFingerprint | None:
        """The rows the run trained on and was evaluated on; None for a folder written before heft recorded them."""
        raw = self.read_meta().get("data_fingerprint")
        return DataFingerprint.from_json(raw) if raw is not None else None

    def require_same_data(self, now: DataFingerprint, data: DataConfig, doing: str) -> None:
        """Refuse to go on with this run (`doing`: "resume", "reuse") when the rows `data` gives now differ from
        the ones it trained on or was evaluated on: a resume would mix the two, a reuse would report the old
        ones. A folder without a recorded fingerprint goes on, with a warning."""
        then = self.read_data_fingerprint()
        if then is None:
            logger.warning("%s: written before heft recorded the fingerprint of its data, so its rows cannot be "
                           "checked against %s; going on as if they were the same (pass --overwrite if the data "
                           "changed)", self.path, _data_source(data, "train"))
            return
        differ = then.differences(now)
        if differ:
            what = "; ".join(f"the {'training' if part == 'train' else 'evaluation'} rows of {_data_source(data, part)} "
                             f"differ from the run's ({why})" for part, why in differ.items())
            raise ConfigError(f"{self.path}: the data changed since this run was trained: {what}. heft does not {doing} "
                              "a run on changed data; pass --overwrite to train it afresh, or choose a new --out")

    # ------------------------------------------------------------------ stages
    def read_stage(self, i: int, stage: StageConfig) -> StageRecord | None:
        """The finished stage's record, or None while it is not finished."""
        path = self.stage_dir(i, stage) / "stage.json"
        return StageRecord.from_json(atomic.read_json(path)) if path.is_file() else None

    def write_stage(self, i: int, stage: StageConfig, record: StageRecord) -> None:
        """Marks the stage finished: written after its adapter files."""
        atomic.write_json(self.stage_dir(i, stage) / "stage.json", record.to_json())

    def read_train_log(self, i: int, stage: StageConfig, upto_step: int | None = None) -> list[dict[str, Any]]:
        rows = atomic.read_jsonl(self.train_log_path(i, stage))
        return [r for r in rows if upto_step is None or r.get("step", 0) <= upto_step]

    def write_train_log(self, i: int, stage: StageConfig, records: list[dict[str, Any]]) -> None:
        atomic.write_jsonl(self.train_log_path(i, stage), records)

    # ------------------------------------------------------------------ evaluations
    def append_epoch(self, record: EpochRecord) -> None:
        atomic.append_jsonl(self.epochs_path, [record.to_json()])

    def read_epochs(self) -> list[EpochRecord]:
        """One record per (stage, epoch); a resumed run may have written one twice (the last wins)."""
        by_key: dict[tuple[int, float], EpochRecord] = {}
        for raw in atomic.read_jsonl(self.epochs_path):
            try:
                r = EpochRecord.from_json(raw)
            except TypeError:
                continue  # a record from an incompatible version
            by_key[(r.stage, r.stage_epoch)] = r
        return sorted(by_key.values(), key=lambda r: (r.stage, r.stage_epoch))

    def write_predictions(self, preds: list[dict[str, Any]]) -> None:
        atomic.write_jsonl(self.predictions_path, preds)

    def read_predictions(self) -> list[dict[str, Any]]:
        return atomic.read_jsonl(self.predictions_path)

    def write_metrics(self, metrics: Metrics) -> None:
        """Marks the run finished: the last file a run writes."""
        atomic.write_json(self.metrics_path, metrics.to_json())

    def read_metrics(self) -> Metrics:
        return Metrics.from_json(atomic.read_json(self.metrics_path))

    # ------------------------------------------------------------------ finishing
    def tidy(self, keep_checkpoints: bool) -> None:
        """Remove what a finished run no longer needs: temporary files of interrupted atomic writes and,
        unless asked to keep them, the stages' checkpoints."""
        if not self.path.is_dir():
            return
        for p in sorted(self.path.rglob(".*.tmp"), key=lambda p: -len(p.parts)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if not keep_checkpoints:
            for ckpt in self.path.glob("stages/*/checkpoints"):
                shutil.rmtree(ckpt, ignore_errors=True)


def _data_source(data: DataConfig, part: str) -> str:
    """Where a split's rows are read from, in the words of the config."""
    if data.source == "local":
        path = data.train_path if part == "train" or data.eval_split == "dev" else data.eval_path
        return f"data.{'train' if part == 'train' or data.eval_split == 'dev' else 'eval'}_path ({path})"
    return {"boolq": "heft's bundled BoolQ (data.source: boolq)", "hub": "the Hugging Face hub (data.source: hub)",
            "builtin": "the built-in tasks (data.tasks)"}[data.source]


class StudyFolder:
    """Paths, readers and writers of a `heft run` / `heft compare` folder."""

    def __init__(self, path: Path, flat: bool):
        self.path = Path(path)
        self.flat = flat  # heft run: one seed, run folders directly under OUT

    def run(self, name: str, cfg: RunConfig, seed: int) -> RunFolder:
        if self.flat:
            return RunFolder(self.path / name)
        return RunFolder(self.path / "seedless" / name if not cfg.stages else self.path / f"seed-{seed}" / name)

    @property
    def asked_path(self) -> Path:
        return self.path / "study.json"

    @property
    def stage_cache_dir(self) -> Path:
        return self.path / "stage-cache"

    @property
    def plots_dir(self) -> Path:
        return self.path / "plots"

    def is_heft(self) -> bool:
        return any((self.path / f).is_file() for f in ("study.json", "compare.json", "summary.json"))

    def describe(self) -> str:
        return "a heft study" if self.is_heft() else "files not written by heft"

    def write_asked(self, asked: dict[str, Any]) -> None:
        atomic.write_json(self.asked_path, asked)

    def write_report(self, report: Report, markdown: str) -> None:
        atomic.write_json(self.path / "report.json", report.to_json())
        atomic.write_text(self.path / "report.md", markdown)

    def read_report(self) -> Report:
        return Report.from_json(atomic.read_json(self.path / "report.json"))

    def write_summary(self, summary: dict[str, Any], markdown: str) -> None:
        atomic.write_json(self.path / "summary.json", summary)
        atomic.write_text(self.path / "summary.md", markdown)


# ---------------------------------------------------------------------------- writing safely


def check_out_path(out: Path) -> None:
    """`out` can become a folder heft writes: not a file, and its nearest existing parent writable."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file, not a folder; choose a folder path")
    parent = out if out.exists() else next((p for p in out.parents if p.exists()), Path("/"))
    if not parent.is_dir():
        raise ConfigError(f"--out: {parent} is a file, so {out} cannot be created under it; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK) or not os.access(out.parent if out.parent.exists() else parent, os.W_OK):
        raise ConfigError(f"--out: cannot write {out}: {parent} is not writable by this user; choose another --out")


@dataclass
class Output:
    """A folder heft is about to write: `final` is where it ends up, `work` where it is written now
    (a hidden folder next to `final` when --overwrite replaces an old one, swapped in by `finish`)."""

    final: Path
    work: Path
    replacing: bool
    lock: FolderLock | None

    @staticmethod
    def open(out: Path, *, overwrite: bool, continuing: bool, folder: Callable[[Path], Any], what: str,
             main: bool = True) -> "Output":
        """Lock `out` (main process only), then check it, read-only. `continuing`: the caller will continue
        the heft folder in it (a resume, or a study that reuses finished runs); `folder(path)` is its RunFolder
        or StudyFolder. Raises before any write."""
        out = Path(out)
        check_out_path(out)
        lock = FolderLock(out, what).acquire() if main else None
        try:
            # a process killed inside its first atomic write leaves only that write's temporary file: nothing yet
            non_empty = out.is_dir() and any(not atomic.is_partial(p) for p in out.iterdir())
            if non_empty and not continuing:
                if not overwrite:
                    raise ConfigError(f"--out: {out} is not empty (it holds {folder(out).describe()}); pass --resume to "
                                      "continue a run in it, --overwrite to replace it, or choose a new folder")
                if not folder(out).is_heft():
                    raise ConfigError(f"--overwrite: {out} holds files heft did not write (no heft {what} there); heft "
                                      "replaces only its own folders: remove it yourself or choose another --out")
                return Output(out, out.parent / f".{out.name}.heft-new", True, lock)
            return Output(out, out, False, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise

    def begin(self) -> None:
        """The first write: create the folder (aside when replacing; a stale aside folder of an interrupted
        replacement is ours, since we hold the lock, and is cleared)."""
        if self.replacing and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        for stale in filter(atomic.is_partial, self.work.iterdir()):  # a killed writer's, since we hold the lock
            stale.unlink()

    def finish(self) -> None:
        """Swap the new folder in: the old one is moved away last, then deleted."""
        if self.replacing:
            old = self.final.parent / f".{self.final.name}.heft-old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.final, old)
            os.replace(self.work, self.final)
            shutil.rmtree(old, ignore_errors=True)
            self.work = self.final
            self.replacing = False

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
