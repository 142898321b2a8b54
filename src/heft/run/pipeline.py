"""One run: a list of stages, each training LoRA, ReFT, or both (`joint`) on top of what the earlier
stages left (their LoRA merged or frozen, their ReFT frozen), then the final evaluation.

`train_run` reads top to bottom like a recipe:

    check     the --out folder (locked), every data row (a resumed run: the same rows as before), the model,
              the ReFT setup: before any write
    set up    the folder: config.yaml, meta.json (with the base model's and the data's fingerprints)
    stages    each one: finished before a restart (resume) | taken from the study's stage cache | trained
    evaluate  predictions.jsonl, metrics.json (which marks the run finished)

The model with its adapters is heft.run.session's; the run folder's layout belongs to heft.run.folder, the
records written to it to heft.run.records; what a study's runs share to heft.reuse.stage_cache.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from heft import __version__
from heft.training import cost
from heft.methods import lora
from heft.training import sharding
from heft.config.schema import RunConfig, StageConfig
from heft.data.rows import Example, load_splits
from heft.errors import CheckpointError, ConfigError
from heft.evaluation.evaluate import accuracy, baselines
from heft.training.loop import StepLog, peak_memory, train_stage
from heft.methods.model import fingerprint, fingerprint_differences
from heft.run.records import DataFingerprint, EpochRecord, Metrics, StageProgress, StageRecord
from heft.methods.reft import no_decay_names
from heft.run.folder import Output, RunFolder
from heft.run.session import Session, model_shape
from heft.training.runtime import is_main_process
from heft.reuse.stage_cache import RunCache, StageCache, copy_stage_files
from heft.data.tokens import Encoded, PromptFormat, encode_all
from heft.training.cost import RunTracker

logger = logging.getLogger(__name__)


def _meta(cfg: RunConfig, s: Session, data: DataFingerprint) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "model_shape": model_shape(s.model), "num_processes": s.rt.num_processes, "distributed": s.rt.distributed,
        "heft_version": __version__, "base_model": cfg.model.name_or_path, "base_model_resolved": s.model_path,
        "base_model_fingerprint": fingerprint(s.model, s.tokenizer),
        "non_embedding_params": cost.non_embedding_params(s.model),
        "strategy": cfg.label(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "device": str(s.rt.device), "mixed_precision": "bf16" if s.rt.bf16 else "no",
        "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data_fingerprint": data.to_json(),
    }


def _check_rows(s: Session, cfg: RunConfig, train: list[Example], evaluation: list[Example]
                ) -> tuple[list[Encoded], dict[int, list[Encoded]]]:
    """Every row fits its token budget (a row that cannot stops the run here, naming its file and line):
    the encoded evaluation rows, and the encoded training rows for each max_length the stages use."""
    lengths = {st.max_length or cfg.data.max_length for st in cfg.stages}
    return s.encode_eval(evaluation), {n: encode_all(s.encoder(n), train, "train") for n in sorted(lengths)}


def _stage_params(s: Session, stage: StageConfig) -> tuple[list[tuple[str, nn.Parameter]], set[str]]:
    """Attach the stage's new adapters; (their trainable parameters, names exempt from weight decay)."""
    named: list[tuple[str, nn.Parameter]] = []
    if stage.trains_lora:
        s.replace_model(lora.attach(s.model, s.cfg.lora, s.cfg.model.layers_path))
        named += [(f"lora.{n}", p) for n, p in lora.trainable(s.model)]
    if stage.trains_reft:
        s.add_reft()
        named += [(f"reft.{n}", p) for n, p in s.reft.interventions.named_parameters()]
    no_decay = {f"reft.{n}" for n in no_decay_names(s.reft.interventions)} if stage.trains_reft else set()
    no_decay |= {n for n, _ in named if n.endswith("bias")}
    live = {id(p) for p in s.top.parameters() if p.requires_grad}  # invariant: exactly the adapters train
    assert live == {id(p) for _, p in named}, f"trainable set differs from the adapter set ({len(live)} vs {len(named)} tensors)"
    return named, no_decay


def _stage_tensors(s: Session, stage: StageConfig) -> tuple[dict | None, dict | None]:
    """The stage's adapter tensors, whole: on every process (a collective under FSDP), before the main one saves."""
    return (lora.adapter_tensors(s.model) if stage.trains_lora else None, s.reft.tensors() if stage.trains_reft else None)


def _save_stage_files(s: Session, folder: Path, tensors: tuple[dict | None, dict | None]) -> None:
    lora_tensors, reft_tensors = tensors
    if lora_tensors is not None:
        lora.save(s.model, folder / "adapter", lora_tensors)
    if reft_tensors is not None:
        s.reft.save(folder, reft_tensors)


# ----------------------------------------------------------------------------- the stages


Pace = Callable[[str, float], None]
"""Told the speeds a run measures, for a study's expected duration: (a stage's method, seconds per training row)
after each logged group of steps, and ("evaluation", seconds) after each evaluation pass."""


class _Stages:
    """Runs a config's stages on a Session, writing each one's files into the run folder."""

    def __init__(self, s: Session, cfg: RunConfig, run: RunFolder, tracker: RunTracker, evaluation: list[Example],
                 eval_rows: list[Encoded], train_rows: dict[int, list[Encoded]], cache: RunCache | None,
                 pace: Pace | None, on_eval: Callable[[EpochRecord], None] | None = None):
        self.s, self.cfg, self.run, self.tracker, self.evaluation = s, cfg, run, tracker, evaluation
        self.eval_rows, self.train_rows, self.cache, self.pace = eval_rows, train_rows, cache, pace
        self.records: list[StageRecord] = []
        self.on_eval = on_eval

    def run_all(self, name: str, continuing: bool) -> None:
        """Every stage in order, each one finished before a restart (loaded), taken from the stage cache, or trained;
        then frozen, evaluated (eval.every_epoch), and its cost added to the run's."""
        cfg, run = self.cfg, self.run
        finished = [run.read_stage(i, stage) if continuing else None for i, stage in enumerate(cfg.stages)]
        logger.info("%s: %s", name, self._plan([r is not None for r in finished]))
        for i, stage in enumerate(cfg.stages):
            last = i == len(cfg.stages) - 1
            record = finished[i]
            if record is not None:
                self.s.apply_stage(stage, run.stage_dir(i, stage))
                logger.info("stage %d (%s): finished before the restart, loaded from %s", i, stage.method, run.stage_dir(i, stage))
            elif self.cache is not None and self.cache.has(i):
                self.s.apply_stage(stage, self.cache.files(i))
                record = self.cache.take(i, stage, run, self.tracker, self.s.rt.main)
            else:
                record = self.train(i, stage)
            self.s.top.requires_grad_(False)
            if cfg.eval.every_epoch and not last and not any(r.stage == i and r.stage_epoch >= record.epochs
                                                             for r in run.read_epochs()):
                self.evaluate_now(i, stage, record.epochs, record.progress)
            if sharding.is_sharded(self.s.top) and not last:
                self.s = None  # type: ignore[assignment]  # free the sharded model before loading a fresh one
                gc.collect()
                self.s = _fresh_session(cfg, run, i + 1)
            self.records.append(record)
            if not last:
                self.tracker.finish_stage(record)

    def _plan(self, finished: list[bool]) -> str:
        """Where each stage comes from, in one line: trained here, taken from the stage cache, or loaded."""
        where: dict[str, list[str]] = {}
        for i, stage in enumerate(self.cfg.stages):
            fate = "finished before the restart" if finished[i] else f"taken from the stage cache ({self.cache.start.source})" \
                if self.cache is not None and self.cache.has(i) else "to train"  # type: ignore[union-attr]
            where.setdefault(fate, []).append(f"{i} ({stage.method})")
        return "; ".join(f"stage{'s' if len(ids) > 1 else ''} {', '.join(ids)} {fate}" for fate, ids in where.items()) \
            or "no stages to train: evaluation only"

    def evaluate(self) -> list[dict[str, Any]]:
        """The model's predictions on the evaluation rows, now (timed for the study's expected duration)."""
        began = time.perf_counter()
        preds = self.s.evaluate(self.evaluation, self.eval_rows)
        if self.pace is not None:
            self.pace("evaluation", time.perf_counter() - began)
        return preds

    def evaluate_now(self, i: int, stage: StageConfig | None, stage_epoch: float, progress: StageProgress | None) -> dict:
        """Evaluate the model as it is now (mid-stage: adapters not merged yet) and record the point."""
        was_training = self.s.top.training
        acc = accuracy(self.evaluate())
        self.s.top.train(was_training)
        point = self.tracker.record(i, stage, stage_epoch, progress, acc)
        logger.info("%s after stage %d epoch %g: accuracy %.2f%%", self.cfg.label(), i, stage_epoch, 100 * acc["accuracy"])
        if self.on_eval is not None:
            self.on_eval(point)  # may raise to stop the run here (a pruned tuning trial); the folder stays resumable
        return acc

    def train(self, i: int, stage: StageConfig) -> StageRecord:
        """Train stage i, save its adapters, leave them frozen (LoRA merged if lora.merge) on the session."""
        s, cfg, run = self.s, self.cfg, self.run
        named, no_decay = _stage_params(s, stage)
        n_params = sum(p.numel() for _, p in named)

        def epoch_end(epoch: int, progress: StageProgress) -> None:
            if cfg.eval.every_epoch:
                self.evaluate_now(i, stage, epoch, progress)
            self.snapshot(i, stage, epoch, n_params, progress)

        def logged(steps: list[dict[str, Any]]) -> None:
            self.tracker.log_steps(steps)
            if self.pace is not None and steps:  # cumulative seconds over the rows of the steps taken so far
                rows = steps[-1]["step"] * stage.batch_size * stage.grad_accum * s.rt.num_processes
                self.pace(stage.method, steps[-1]["seconds"] / rows)

        log = StepLog(run.train_log_path(i, stage), s.rt, f"{cfg.label()} stage {i} ({stage.method})", cfg.log_every, logged)
        progress = train_stage(s.top, named, no_decay, self.train_rows[stage.max_length or cfg.data.max_length], stage,
                               rt=s.rt, pad_id=s.tokenizer.pad_token_id, seed=cfg.seed + i, bucketing=cfg.length_bucketing,
                               log=log, checkpoints=run.checkpoints_dir(i, stage), checkpoint_every=cfg.checkpoint_every,
                               on_epoch_end=epoch_end, frozen_prefix=cfg.frozen_prefix,
                               prefix_cache_gb=cfg.prefix_cache_gb, layers_path=cfg.model.layers_path,
                               on_cost=lambda cost: self.tracker.set_stage_cost(i, cost))
        record = self._record(i, stage, n_params, progress, peak_memory(s.rt.device),
                              log.clipped / progress.optimizer_steps if progress.optimizer_steps else 0.0)
        tensors = _stage_tensors(s, stage)
        if s.rt.main:
            _save_stage_files(s, run.stage_dir(i, stage), tensors)
        if stage.trains_lora:
            # A sharded model cannot be merged in place; the next stage starts from the saved adapter (train_run)
            s.replace_model(lora.finish(s.model, cfg.lora.merge and not sharding.is_sharded(s.model)))
        if s.rt.main:
            run.write_stage(i, stage, record)  # the stage counts as finished from here on
        s.rt.wait()
        self.snapshot(i, stage, stage.epochs, n_params, progress, files=run.stage_dir(i, stage), record=record)
        return record

    def _record(self, i: int, stage: StageConfig, n_params: int, p: StageProgress, memory: dict | None = None,
                clipped: float | None = None) -> StageRecord:
        return StageRecord(index=i, method=stage.method, trainable_params=n_params, optimizer_steps=p.optimizer_steps,
                           epochs=p.epochs, train_seconds=round(p.train_seconds, 2), tokens=p.tokens, final_loss=p.final_loss,
                           flops=self.tracker.stage_flops(stage, p.tokens), peak_memory=memory,
                           clipped_steps=None if clipped is None else round(clipped, 4))

    def snapshot(self, i: int, stage: StageConfig, epoch: float, n_params: int, progress: StageProgress,
                 files: Path | None = None, record: StageRecord | None = None) -> None:
        """Give stages 0..i (stage i at `epoch`; `files`: its saved folder, if whole) to the study's stage cache
        if another strategy starts from them."""
        if self.cache is None or not self.cache.wants(i + 1, epoch):
            return
        tensors = _stage_tensors(self.s, stage) if files is None else (None, None)  # every process: a collective
        if not self.s.rt.main:
            return

        def write_last(dest: Path) -> None:
            if files is not None:
                copy_stage_files(files, dest)
            else:
                _save_stage_files(self.s, dest, tensors)

        record = record or self._record(i, stage, n_params, progress)
        self.cache.store(i, epoch, self.run, self.records + [record], progress.optimizer_steps, write_last)

    def final(self, train: list[Example]) -> tuple[list[dict[str, Any]], Metrics]:
        """The final evaluation's predictions, and the run's metrics: accuracy, baselines, cost."""
        cfg, tracker, records = self.cfg, self.tracker, self.records
        preds = self.evaluate()
        acc = accuracy(preds)
        if records:
            if cfg.eval.every_epoch:
                tracker.record(len(records) - 1, cfg.stages[-1], records[-1].epochs, records[-1].progress, acc)
            tracker.finish_stage(records[-1])
        elif cfg.eval.every_epoch:
            tracker.record(0, None, 0.0, None, acc)  # the untrained model: the curves' epoch-0 point
        tracker.close()
        majority, baseline, per_task = baselines(cfg.data, train, self.evaluation, preds)
        return preds, Metrics(
            strategy=cfg.label(), accuracy=acc["accuracy"], ci95=acc["ci95"], n=acc["n"], correct=acc["correct"],
            eval_split=cfg.data.eval_split, majority_label=majority, majority_baseline=baseline,
            tasks=per_task, macro_accuracy=(sum(t["accuracy"] for t in per_task.values()) / len(per_task)) if per_task else None,
            trainable_params=sum(r.trainable_params for r in records), train_seconds=round(tracker.seconds, 2),
            epochs=round(tracker.epochs, 6), train_tokens=tracker.tokens, train_flops=tracker.flops_done,
            train_rows=len(train), stages=records)


def train_run(cfg: RunConfig, out: Path, *, overwrite: bool = False, resume: bool = False,
              cache: StageCache | None = None, name: str | None = None, pace: Pace | None = None,
              on_eval: Callable[[EpochRecord], None] | None = None) -> Metrics:
    """Train every stage of `cfg`, evaluate, and write the run folder `out`.

    With `resume`, a run folder of the same config and the same data rows continues: finished stages are
    loaded, the interrupted one continues from its latest checkpoint, a finished run is returned as it is.
    `cache`: the study's stage cache, which the run (strategy `name`) takes finished stages from and stores
    the stage prefixes other strategies start from; `pace`: told the speeds the run measures; `on_eval`: told each
    evaluation point during training (eval.every_epoch), and may raise to stop the run there (a pruned tuning trial).
    """
    name = name or cfg.label()
    folder = RunFolder(out)
    continuing = resume and folder.is_heft()
    output = Output.open(out, overwrite=overwrite, continuing=continuing, folder=RunFolder,
                         what="run folder", main=is_main_process())
    try:
        # ---- check everything before the first write
        if continuing and folder.read_config() != cfg:
            raise ConfigError(f"--resume: {out} holds a run with a different config; resume it with its own config "
                              f"({folder.config_path}), or use --overwrite or a new --out")
        splits = load_splits(cfg.data)
        data = DataFingerprint.of(splits.train, splits.eval)
        if continuing:
            folder.require_same_data(data, cfg.data, "resume")
            if folder.is_finished():
                logger.info("%s: the run is already finished", out)
                return folder.read_metrics()
        s = Session(cfg)
        eval_rows, train_rows = _check_rows(s, cfg, splits.train, splits.eval)
        run = RunFolder(output.work)
        # ---- set up the folder
        if s.rt.main and not continuing:
            output.begin()
            run.write_config(cfg)
            prompt = PromptFormat.of_rows(cfg.data.format, splits.train + splits.dev + splits.eval)  # for predict & co
            run.write_meta({**_meta(cfg, s, data), "prompt": prompt.to_json()})
        s.rt.wait()
        tracker = RunTracker(run, cfg, cost.non_embedding_params(s.model), s.num_layers, s.reft_layers, s.rt.main)
        stages = _Stages(s, cfg, run, tracker, splits.eval, eval_rows, train_rows,
                         cache.for_run(cfg, name, data) if cache is not None else None, pace, on_eval)
        # ---- the stages
        stages.run_all(name, continuing)
        # ---- evaluate
        preds, metrics = stages.final(splits.train)
        if stages.s.rt.main:
            run.write_predictions(preds)
            run.write_metrics(metrics)
            run.tidy(cfg.keep_checkpoints)
            output.finish()
        stages.s.rt.wait()
        return metrics
    finally:
        output.close()


def _fresh_session(cfg: RunConfig, run: RunFolder, count: int) -> Session:
    """The base model with stages 0..count-1 loaded from their saved adapters, not sharded yet.

    FSDP shards a model in place when a stage's training prepares it, and a sharded model cannot take
    the next stage's adapters and be sharded again; so under FSDP each stage starts from a fresh copy
    of the base model, with the finished stages applied as they were saved (merged if lora.merge)."""
    s = Session(cfg)
    for i, stage in enumerate(cfg.stages[:count]):
        s.apply_stage(stage, run.stage_dir(i, stage))
    return s


# ----------------------------------------------------------------------------- reloading a finished run


def load_run(path: Path, allow_other_base: bool = False, merge_lora: bool = False) -> tuple[Session, RunConfig]:
    """Rebuild the trained model of a finished run folder: base model, then each stage's adapters in order.

    The base model must be the one the run was trained on (shape, and the fingerprint of its config,
    weights and tokenizer recorded in meta.json); `allow_other_base` accepts another one of the same shape.
    `merge_lora`: merge every LoRA stage into the weights, also those the run kept as adapters (lora.merge: false),
    as `heft export` writes them; the returned config is the run's own."""
    folder = RunFolder(path)
    folder.require_finished()
    cfg = folder.read_config()
    s = Session(dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, merge=True)) if merge_lora else cfg)
    meta = folder.read_meta()
    saved = meta.get("model_shape")
    if saved is not None:
        mine = model_shape(s.model)
        wrong = {k: (v, mine[k]) for k, v in saved.items() if mine.get(k) != v}
        if wrong:
            raise CheckpointError(f"{path}: trained on a base model with {', '.join(f'{k}={a}' for k, (a, _) in wrong.items())}, "
                                  f"but {cfg.model.name_or_path} has {', '.join(f'{k}={b}' for k, (_, b) in wrong.items())}; "
                                  "point model.name_or_path in its config.yaml at the original base model")
    if "base_model_fingerprint" in meta and not allow_other_base:
        differ = fingerprint_differences(meta["base_model_fingerprint"], fingerprint(s.model, s.tokenizer))
        if differ:
            raise CheckpointError(
                f"{path}: the base model differs from the one this run was trained on ({', '.join(differ)} differ): "
                f"trained on {meta.get('base_model_resolved', meta.get('base_model'))!r}, now loading "
                f"{s.model_path!r}; point model.name_or_path in {folder.config_path} at the original base model, "
                "or pass --allow-other-base to apply the adapters to this one anyway")
    elif "base_model_fingerprint" not in meta:
        logger.warning("%s: written before heft recorded the base model's fingerprint; the base model is checked by shape only", path)
    for i, stage in enumerate(cfg.stages):
        s.apply_stage(stage, folder.stage_dir(i, stage))
    return s, cfg


def eval_run(path: Path, allow_other_base: bool = False) -> dict[str, Any]:
    """Re-evaluate a finished run and compare with its saved predictions."""
    s, cfg = load_run(path, allow_other_base)
    splits = load_splits(cfg.data, with_train=False)
    preds = s.evaluate(splits.eval)
    result = {**accuracy(preds), "eval_split": cfg.data.eval_split}
    saved = RunFolder(path).read_predictions()
    if saved:
        same = sum(1 for a, b in zip(preds, saved) if a["pred"] == b["pred"]) if len(saved) == len(preds) else 0
        result["matches_saved_predictions"] = same == len(preds)
        result["max_abs_p_yes_diff"] = max((abs(a["p_yes"] - b["p_yes"]) for a, b in zip(preds, saved) if "p_yes" in a), default=0.0)
    return result
