"""Train an identical stage prefix once: the stage cache of a study folder.

With a constant learning-rate schedule, the first E epochs of an E'-epoch stage are exactly an
E-epoch stage (same seed, same data order, same updates): so HEFT's first stage, one epoch of LoRA,
is LoRA-only's state after its first epoch. More generally, two strategies whose first k stages
are identical share them, and the state at the end of a whole stage is a prefix whatever the
schedule.

The cache is keyed by everything a stage prefix's result depends on: model, data settings, LoRA and
ReFT settings, seed, precision, batching, the number of processes, whether a ReFT stage reuses the
frozen prefix, the prefix's stages (their folder names aside, the last one cut at the epoch
reached: `prefix_key`). An entry also records the fingerprint of the training rows it was trained on,
and serves only runs on the same rows: an edited data file never finds a prefix trained on the old
rows (nor does an entry written before heft recorded it), and the entry is trained again and
replaced. It stores only what another strategy of the same study will start from (`wanted`), so
nothing is saved for nobody. An entry holds the prefix's stage files (adapters), their records,
training logs and per-epoch evaluations, so the run that starts from it is as complete as if it had
trained those stages itself.

`StageCache` plans the study (which prefixes are wanted, which strategy trains first); `RunCache` is
the cache as one run sees it: the stages it takes (`take`) and the prefixes it stores (`store`).

    stage-cache/KEY/entry.json          source, stage records, training rows' fingerprint, evaluation signature
    stage-cache/KEY/stage-J/            stage J's adapter files (as in a run folder's stage folder)
    stage-cache/KEY/stage-J/train_log.jsonl
    stage-cache/KEY/epochs.jsonl        the prefix's per-epoch evaluations (reused only for the same evaluation setup)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from heft.config.load import to_dict
from heft.config.schema import RunConfig, StageConfig
from heft.run import atomic
from heft.run.folder import RunFolder
from heft.run.records import DataFingerprint, EpochRecord, StageRecord
from heft.training.cost import RunTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedStage:
    """One stage of a cached prefix: where its files are, what it cost, where it came from."""

    files: Path
    record: StageRecord
    train_log: list[dict[str, Any]]


@dataclass(frozen=True)
class Start:
    """Finished stages a run starts from instead of training them, and their evaluations (if the
    evaluation setup is the same as the run's)."""

    stages: list[CachedStage]
    evals: list[EpochRecord]
    source: str


def prefix_key(cfg: RunConfig, count: int, epochs: float) -> str:
    """Hash of what stages[:count] of `cfg` compute, the last stage cut at `epochs`."""
    stages = [dataclasses.replace(s, name=None) for s in cfg.stages[:count]]
    stages[-1] = dataclasses.replace(stages[-1], epochs=float(epochs))
    data = dataclasses.replace(cfg.data, eval_size=None, eval_split="validation", eval_path=None)
    uses_lora = any(s.trains_lora for s in stages)
    uses_reft = any(s.trains_reft for s in stages)
    what = {
        "model": to_dict(cfg.model), "data": to_dict(data), "lora": to_dict(cfg.lora) if uses_lora else None,
        "reft": to_dict(cfg.reft) if uses_reft else None, "seed": cfg.seed, "precision": cfg.precision,
        "length_bucketing": cfg.length_bucketing, "stages": [to_dict(s) for s in stages],
        "processes": int(os.environ.get("WORLD_SIZE", "1")),
        # a stage trained over reused frozen tokens or layers rounds differently from the full path (the same within
        # float tolerance, not bit for bit), and `cache` from `recompute` (kept layer streams come from fixed groups)
        "prefix_reuse": cfg.frozen_prefix if uses_reft or (uses_lora and cfg.lora.layers != "all") else None,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def eval_signature(cfg: RunConfig, data: DataFingerprint) -> str:
    """What a per-epoch evaluation depends on besides the weights: the settings and the evaluation rows."""
    what = {"data": to_dict(cfg.data), "eval": to_dict(dataclasses.replace(cfg.eval, every_epoch=True)),
            "eval_rows": data.eval}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:20]


def starts(cfg: RunConfig) -> list[tuple[int, str]]:
    """(number of stages, key) of every prefix of whole stages `cfg` could start from, longest first."""
    return [(k, prefix_key(cfg, k, cfg.stages[k - 1].epochs)) for k in range(len(cfg.stages), 0, -1)]


def produces(cfg: RunConfig) -> set[str]:
    """Keys of the prefixes a run of `cfg` passes through: each whole stage, and each whole epoch inside a
    constant-schedule stage (where the state equals a shorter stage's end)."""
    keys = set()
    for k, stage in enumerate(cfg.stages, start=1):
        keys.add(prefix_key(cfg, k, stage.epochs))
        if stage.scheduler == "constant":
            keys.update(prefix_key(cfg, k, e) for e in range(1, int(stage.epochs - 1e-9) + 1) if e < stage.epochs)
    return keys


class StageCache:
    """The cache of one study folder, planned for the study's configs (strategy name -> config)."""

    def __init__(self, folder: Path, configs: dict[str, RunConfig]):
        self.folder = folder
        wanted: set[str] = set()
        for name, cfg in configs.items():
            others = set().union(*[produces(c) for n, c in configs.items() if n != name]) if len(configs) > 1 else set()
            wanted.update(key for _, key in starts(cfg) if key in others)
        self.wanted = wanted

    def order(self, configs: dict[str, RunConfig]) -> list[str]:
        """Training order: strategies that produce a prefix others start from come first (suite order otherwise)."""
        gives = {n: len((produces(c) & self.wanted) - {k for _, k in starts(c)}) for n, c in configs.items()}
        return sorted(configs, key=lambda n: -gives[n])

    def planned_starts(self, configs: dict[str, RunConfig]) -> dict[str, int]:
        """For each strategy, how many of its first stages it will take from the cache, trained in `order`."""
        ready: set[str] = set()
        planned = {}
        for name in self.order(configs):
            planned[name] = next((count for count, key in starts(configs[name]) if key in ready), 0)
            ready |= produces(configs[name]) & self.wanted
        return planned

    def for_run(self, cfg: RunConfig, name: str, data: DataFingerprint) -> "RunCache":
        """The cache as the run of strategy `name` sees it, training on the rows `data` fingerprints."""
        return RunCache(self, cfg, name, data)

    def read_entry(self, key: str, data: DataFingerprint) -> dict[str, Any] | None:
        """entry.json of prefix `key`, if it is stored and was trained on the training rows of `data`."""
        path = self.folder / key / "entry.json"
        raw = atomic.read_json(path) if path.is_file() else None
        return raw if raw is not None and raw.get("train_rows") == data.train else None


class RunCache:
    """The stage cache as one run of a study sees it: the finished stages it starts from (`start`, `take`) and
    the prefixes it stores for the study's other strategies (`wants`, `store`)."""

    def __init__(self, cache: StageCache, cfg: RunConfig, name: str, data: DataFingerprint):
        self.cache, self.cfg, self.name, self.data = cache, cfg, name, data
        self.start = self._longest_start()

    def _longest_start(self) -> Start | None:
        """The longest cached prefix of whole stages of the config, if any."""
        for _, key in starts(self.cfg):
            raw, entry = self.cache.read_entry(key, self.data), self.cache.folder / key
            if raw is None:
                continue
            stages = [CachedStage(entry / f"stage-{j}", StageRecord.from_json(r), atomic.read_jsonl(entry / f"stage-{j}" / "train_log.jsonl"))
                      for j, r in enumerate(raw["stages"])]
            evals = ([EpochRecord.from_json(e) for e in atomic.read_jsonl(entry / "epochs.jsonl")]
                     if raw["eval_signature"] == eval_signature(self.cfg, self.data) else [])
            return Start(stages, evals, raw["source"])
        return None

    def has(self, i: int) -> bool:
        """Stage i is taken from the cache, not trained."""
        return self.start is not None and i < len(self.start.stages)

    def files(self, i: int) -> Path:
        """The cached stage i's adapter files, to apply to the model."""
        assert self.start is not None
        return self.start.stages[i].files

    def take(self, i: int, stage: StageConfig, run: RunFolder, tracker: RunTracker, main: bool) -> StageRecord:
        """Write cached stage i into `run` as if it had trained there: files, log, record, and (with per-epoch
        evaluation) the source's evaluations of it, which are this run's too (same weights, same setup)."""
        assert self.start is not None
        start, cached = self.start, self.start.stages[i]
        record = StageRecord.from_json({**cached.record.to_json(), "reused_from": start.source, "peak_memory": None})
        last = i == len(self.cfg.stages) - 1
        if main:
            copy_stage_files(cached.files, run.stage_dir(i, stage))
            run.write_train_log(i, stage, cached.train_log)
            tracker.log_steps(cached.train_log)
            if self.cfg.eval.every_epoch:
                for rec in start.evals:
                    if rec.stage == i and not (last and rec.stage_epoch >= record.epochs):  # the final one is the run's own
                        tracker.copy(rec, start.source)
            run.write_stage(i, stage, record)
        logger.info("stage %d (%s): taken from %s", i, stage.method, start.source)
        return record

    def wants(self, count: int, epochs: float) -> bool:
        """Another strategy starts from the first `count` stages (the last one at `epochs`), not stored yet."""
        key = prefix_key(self.cfg, count, epochs)
        return key in self.cache.wanted and self.cache.read_entry(key, self.data) is None

    def store(self, i: int, epoch: float, run: RunFolder, records: list[StageRecord], steps: int,
              write_last: Callable[[Path], None]) -> None:
        """Save stages 0..i, stage i at `epoch` after `steps` optimizer steps: copies of the earlier stages' files
        from `run`, stage i's files (written by `write_last` into the folder it is given), the stages' records,
        logs and the evaluations up to that point."""
        stages, stage = self.cfg.stages, self.cfg.stages[i]
        whole = epoch == stage.epochs
        source = f"{self.name} (epoch {epoch:g} snapshot)" if not whole and i == 0 else \
            f"{self.name} (stages 0-{i}{'' if whole else f', epoch {epoch:g} snapshot'})"
        logs = [run.read_train_log(j, stages[j]) for j in range(i)] + [run.read_train_log(i, stage, steps)]
        evals = [r for r in run.read_epochs() if r.stage < i or (r.stage == i and r.stage_epoch <= epoch)]
        with atomic.atomic_dir(self.cache.folder / prefix_key(self.cfg, i + 1, epoch)) as tmp:
            for j in range(i):
                copy_stage_files(run.stage_dir(j, stages[j]), tmp / f"stage-{j}")
            write_last(tmp / f"stage-{i}")
            for j, log in enumerate(logs):
                atomic.write_jsonl(tmp / f"stage-{j}" / "train_log.jsonl", log)
            atomic.write_jsonl(tmp / "epochs.jsonl", [e.to_json() for e in evals])
            atomic.write_json(tmp / "entry.json", {"source": source, "stages": [r.to_json() for r in records],
                                                   "train_rows": self.data.train,
                                                   "eval_signature": eval_signature(self.cfg, self.data)})
        logger.info("stage cache: stored %s for other strategies", source)


def copy_stage_files(src: Path, dest: Path) -> None:
    """A stage folder's adapter files (LoRA `adapter/`, ReFT files), not its logs, checkpoints or records."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in ("checkpoints", "stage.json", "train_log.jsonl") or p.name.startswith("."):
            continue
        if p.is_dir():
            shutil.copytree(p, dest / p.name)
        else:
            shutil.copy2(p, dest / p.name)

