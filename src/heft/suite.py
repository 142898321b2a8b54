"""`heft run`: several strategies under one shared setup, trained one after another, one table.

A suite YAML has a `common:` section (any RunConfig field but `stages`) and `strategies:`, a
mapping from a strategy name to its list of stages (`[]` is the base model, evaluated as is), or
to a mapping with `stages:` plus sections that override `common` for that strategy alone
(e.g. `reft: {init: random}`).
Overrides `--section.field value` change `common`; `--strategies.NAME.I.field value` changes a stage.

Identical stage prefixes are trained once: with a constant learning-rate schedule, the first
E epochs of an E'-epoch LoRA stage are exactly an E-epoch LoRA stage (same seed, same data order),
so HEFT's LoRA stage is taken from LoRA-only's epoch-E snapshot and the report says so. A strategy
folder that already holds a finished run of the same config is reused, so re-running resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

from . import io
from .config import RunConfig, StageConfig, apply_override, from_dict, load, read_yaml, stage_dir_name
from .errors import ConfigError
from .pipeline import Reuse, train_run
from .tracking import read_epochs
from .train import StageResult

logger = logging.getLogger(__name__)


def default_suite_path() -> Path:
    return Path(__file__).parent / "suites" / "default.yaml"


def read_suite(path: Path, overrides: list[tuple[str, str]]) -> dict[str, RunConfig]:
    """Strategy name -> resolved RunConfig."""
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    raw = read_yaml(path.read_text()) or {}
    unknown = set(raw) - {"common", "strategies"}
    if unknown or not isinstance(raw.get("strategies"), dict):
        raise ConfigError(f"{path}: a suite has `common:` and `strategies:` (name -> list of stages); found {sorted(raw)}")
    common, strategies = raw.get("common") or {}, raw["strategies"]
    for key, value in overrides:
        if key.startswith("strategies."):
            apply_override(raw, key, value)
        else:
            apply_override(common, key, value)
    out = {}
    for name, spec in strategies.items():
        body = copy.deepcopy(common)
        own = spec if isinstance(spec, dict) else {"stages": spec}
        _deep_merge(body, own)
        body.update(strategy=name, stages=own.get("stages") or [])
        try:
            out[name] = from_dict(body)
        except ConfigError as e:
            raise ConfigError(f"strategy {name!r}: {e}") from None
    return out


def _deep_merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def _lora_setup(cfg: RunConfig) -> tuple:
    """Everything a LoRA stage's result depends on, besides the stage itself."""
    return (cfg.model, dataclasses.replace(cfg.data, eval_size=None, eval_split="validation"), cfg.lora, cfg.seed,
            cfg.precision, cfg.length_bucketing)


def _same_except_epochs(a: StageConfig, b: StageConfig) -> bool:
    return dataclasses.replace(a, epochs=0, name=None) == dataclasses.replace(b, epochs=0, name=None)


def find_prefix(cfg: RunConfig, done: dict[str, tuple[RunConfig, Path]]) -> dict[int, Reuse]:
    """Stage 0 of `cfg` as an epoch snapshot of an already-trained strategy, when provably identical."""
    if not cfg.stages or cfg.stages[0].method != "lora":
        return {}
    mine = cfg.stages[0]
    if mine.scheduler != "constant" or mine.epochs != int(mine.epochs):
        return {}
    for name, (other, folder) in done.items():
        if not other.stages or other.stages[0].method != "lora":
            continue
        theirs = other.stages[0]
        if _lora_setup(other) == _lora_setup(cfg) and _same_except_epochs(mine, theirs) and theirs.epochs > mine.epochs:
            snap = folder / "stages" / stage_dir_name(0, theirs) / f"epoch-{int(mine.epochs)}"
            if (snap / "adapter").is_dir():  # only written where an epoch ends on an optimizer step
                p = io.read_json(snap / "progress.json")
                result = StageResult(p["optimizer_steps"], float(mine.epochs), p["train_seconds"], p["tokens"], p["loss"])
                evals = [r for r in read_epochs(folder) if r["stage"] == 0 and r["stage_epoch"] <= mine.epochs]
                return {0: Reuse(snap / "adapter", result, f"{name} (epoch {int(mine.epochs)} snapshot)", evals)}
    return {}


def train_strategies(configs: dict[str, RunConfig], out: Path) -> dict[str, dict[str, Any]]:
    """Train and evaluate each strategy into `out/NAME` (reusing finished folders and shared prefixes)."""
    out.mkdir(parents=True, exist_ok=True)
    # Strategies whose first stage others can reuse are trained first.
    order = sorted(configs, key=lambda n: -(configs[n].stages[0].epochs if configs[n].stages and configs[n].stages[0].method == "lora" else 0))
    done: dict[str, tuple[RunConfig, Path]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name in order:
        cfg, folder = configs[name], out / name
        if (folder / "metrics.json").is_file():
            if load(folder / "config.yaml") != cfg:  # compared as configs: fields added since then take defaults
                raise ConfigError(f"{folder} holds a finished run of a different config; use a new --out or --overwrite")
            logger.info("%s: reusing the finished run in %s", name, folder)
            results[name] = io.read_json(folder / "metrics.json")
        else:
            if folder.exists():
                shutil.rmtree(folder)  # an unfinished strategy folder (interrupted run) is redone from scratch
            reuse = find_prefix(cfg, done)
            logger.info("%s: training %d stage(s)%s", name, len(cfg.stages),
                        f", stage 0 reused from {reuse[0].source}" if reuse else "")
            results[name] = train_run(cfg, folder, reuse=reuse, snapshot_epochs=True)
        done[name] = (cfg, folder)
    return {n: results[n] for n in configs}


def select(configs: dict[str, RunConfig], only: list[str] | None) -> dict[str, RunConfig]:
    if not only:
        return configs
    missing = [n for n in only if n not in configs]
    if missing:
        raise ConfigError(f"--only: unknown strategies {missing}; this suite has {list(configs)}")
    return {n: c for n, c in configs.items() if n in only}


def run_suite(path: Path, out: Path, overrides: list[tuple[str, str]], *, overwrite: bool = False,
              only: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate each strategy into `out/NAME`, then write `out/summary.json` and `summary.md`."""
    configs = select(read_suite(path, overrides), only)
    if overwrite and out.exists():
        shutil.rmtree(out)
    results = train_strategies(configs, out)
    first = next(iter(results.values()))
    summary = {
        "majority_baseline": first["majority_baseline"],
        "majority_label": "yes" if first["majority_label"] else "no",
        "eval_split": first["eval_split"],
        "strategies": {n: {k: r[k] for k in ("accuracy", "ci95", "n", "trainable_params", "train_seconds", "epochs")}
                       for n, r in results.items()},
        "shared_stages": {n: s["reused_from"] for n, r in results.items() for s in r["stages"] if "reused_from" in s},
    }
    io.write_json(out / "summary.json", summary)
    io.write_text(out / "summary.md", summary_markdown(summary))
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [f"BoolQ ({summary['eval_split']}) accuracy; majority baseline ({summary['majority_label']}) "
             f"{summary['majority_baseline']:.2%}", "",
             "| strategy | accuracy | 95% CI | n | trainable params | epochs | train s |", "|---|---|---|---|---|---|---|"]
    for n, r in summary["strategies"].items():
        lines.append(f"| {n} | {r['accuracy']:.2%} | {r['ci95'][0]:.2%} - {r['ci95'][1]:.2%} | {r['n']} | "
                     f"{r['trainable_params']:,} | {r['epochs']:g} | {r['train_seconds']:.0f} |")
    for n, src in summary["shared_stages"].items():
        lines.append(f"\n{n}: first stage reused from {src} (identical stage, constant LR schedule).")
    return "\n".join(lines) + "\n"
