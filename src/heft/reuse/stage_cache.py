"""Train an identical stage prefix once: the stage cache of a study folder.

With a constant learning-rate schedule, the first E epochs of an E'-epoch stage are exactly an
E-epoch stage (same seed, same data order, same updates): so HEFT's first stage, one epoch of LoRA,
is LoRA-only's state after its first epoch. More generally, two strategies whose first k stages
are identical share them, and the state at the end of a whole stage is a prefix whatever the
schedule.

The cache is keyed by everything a stage prefix's result depends on: model, training data, LoRA and
ReFT settings, seed, precision, batching, the number of processes, whether a ReFT stage reuses the
frozen prefix, and the prefix's stages (their folder names aside, the last one cut at the epoch
reached). It stores only what another strategy of the same study will start from (`wanted`), so
nothing is saved for nobody. An entry holds the prefix's stage files (adapters), their records,
training logs and per-epoch evaluations, so the run that starts from it is as complete as if it had
trained those stages itself.

    stage-cache/KEY/entry.json          source, stage records, evaluation signature
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

from heft.run import atomic
from heft.config.schema import RunConfig
from heft.config.load import to_dict
from heft.run.records import EpochRecord, StageRecord

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


def eval_signature(cfg: RunConfig) -> str:
    """What a per-epoch evaluation depends on besides the weights."""
    what = {"data": to_dict(cfg.data), "eval": to_dict(dataclasses.replace(cfg.eval, every_epoch=True))}
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

    def wants(self, cfg: RunConfig, count: int, epochs: float) -> bool:
        key = prefix_key(cfg, count, epochs)
        return key in self.wanted and not (self.folder / key / "entry.json").is_file()

    def store(self, cfg: RunConfig, source: str, count: int, epochs: float, earlier: list[Path],
              write_last: Callable[[Path], None], records: list[StageRecord], logs: list[list[dict[str, Any]]],
              evals: list[EpochRecord]) -> None:
        """Save a prefix: copies of its earlier stages' files (`earlier`: their stage folders), the last stage's
        files (written into the folder given to `write_last`), their records, logs and evaluations."""
        key = prefix_key(cfg, count, epochs)
        with atomic.atomic_dir(self.folder / key) as tmp:
            for j, files in enumerate(earlier):
                copy_stage_files(files, tmp / f"stage-{j}")
            write_last(tmp / f"stage-{count - 1}")
            for j, log in enumerate(logs):
                atomic.write_jsonl(tmp / f"stage-{j}" / "train_log.jsonl", log)
            atomic.write_jsonl(tmp / "epochs.jsonl", [e.to_json() for e in evals])
            atomic.write_json(tmp / "entry.json", {"source": source, "stages": [r.to_json() for r in records],
                                               "eval_signature": eval_signature(cfg)})
        logger.info("stage cache: stored %s for other strategies", source)

    def start_for(self, cfg: RunConfig) -> Start | None:
        """The longest cached prefix of whole stages of `cfg`, if any."""
        for count, key in starts(cfg):
            entry = self.folder / key
            if not (entry / "entry.json").is_file():
                continue
            raw = atomic.read_json(entry / "entry.json")
            stages = [CachedStage(entry / f"stage-{j}", StageRecord.from_json(r), atomic.read_jsonl(entry / f"stage-{j}" / "train_log.jsonl"))
                      for j, r in enumerate(raw["stages"])]
            evals = ([EpochRecord.from_json(e) for e in atomic.read_jsonl(entry / "epochs.jsonl")]
                     if raw["eval_signature"] == eval_signature(cfg) else [])
            return Start(stages, evals, raw["source"])
        return None


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

