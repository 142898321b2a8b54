"""A run is a list of stages. Each stage trains LoRA, ReFT, or both (`joint`) on top of what the
earlier stages left (their LoRA merged or frozen, their ReFT frozen), and writes its own folder.

Run folder layout (everything needed to reload, nothing else):

    OUT/config.yaml            resolved configuration
    OUT/meta.json              heft/torch/transformers versions, base model id, device, precision
    OUT/stages/00-lora/adapter/{adapter_config.json, adapter_model.safetensors}   PEFT format
    OUT/stages/01-reft/{reft_config.json, reft.safetensors}
    OUT/stages/NN-*/{stage.json, train_log.jsonl}
    OUT/metrics.json           accuracy, 95% interval, n, majority baseline, trainable params, time, FLOPs
    OUT/epochs.jsonl           with eval.every_epoch: accuracy after every epoch (cumulative tokens, time, FLOPs)
    OUT/tensorboard/           with tensorboard: true: loss, learning rate, accuracy
    OUT/predictions.jsonl      one line per evaluation row: idx, label, pred, p_yes
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__, flops, io, lora, sharding
from .config import RunConfig, StageConfig, dump_yaml, load, stage_dir_name
from .data import Encoder, Example, load_splits, majority_label
from .errors import CheckpointError, ConfigError
from .evaluate import accuracy, generate, score
from .model import decoder_layers, hidden_size, load_model
from .reft import ReftModel, check_fits, no_decay_names
from .tracking import Tracker
from .train import StageResult, peak_memory, train_stage, use_bf16

logger = logging.getLogger(__name__)


@dataclass
class Reuse:
    """Take a stage's LoRA adapter from another run instead of training it (an identical stage prefix)."""

    adapter_dir: Path
    result: StageResult
    source: str
    evals: list[dict[str, Any]] = field(default_factory=list)
    """The source run's per-epoch evaluations of this prefix (copied into this run's epochs.jsonl)."""


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("DeepSpeed is not supported: its ZeRO optimizer replaces the adapter parameters with flat "
                          "partitions and runs its own gradient accumulation, which heft's exact checkpoints and "
                          "global-batch arithmetic do not follow; launch with configs/accelerate/fsdp.yaml to shard "
                          "the model (for adapters, the frozen weights are what needs sharding) or configs/accelerate/ddp.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ConfigError("FSDP version 1 is not supported: heft shards with FSDP2 (per-parameter DTensors); set "
                          "fsdp_config.fsdp_version: 2 in the accelerate config (see configs/accelerate/fsdp.yaml)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        logger.warning("the accelerate config asks for FSDP, but accelerate runs %s on %s (it shards with FSDP on GPUs "
                       "only): training is data parallel, with the whole model on every process",
                       acc.distributed_type.value, device.type)
    acc.heft_bf16 = use_bf16(cfg.precision, device)  # applied by heft.train.autocast
    return acc


def model_shape(model: nn.Module) -> dict[str, int]:
    """What adapters depend on: vocabulary, hidden size, depth."""
    from .model import unwrap

    try:
        depth = len(decoder_layers(model, None))
    except ConfigError:  # an architecture heft cannot map without model.layers_path: depth unchecked
        depth = 0
    return {"vocab_size": int(unwrap(model).get_input_embeddings().weight.shape[0]), "hidden_size": hidden_size(model),
            "num_layers": depth}


def _meta(cfg: RunConfig, accelerator: Any, model_path: str, model: nn.Module) -> dict[str, Any]:
    import peft
    import transformers

    return {
        "model_shape": model_shape(model), "num_processes": accelerator.num_processes,
        "distributed": accelerator.distributed_type.value,  # NO, MULTI_GPU (DDP, also on CPU), FSDP, ...
        "heft_version": __version__, "base_model": cfg.model.name_or_path, "base_model_resolved": model_path,
        "non_embedding_params": flops.non_embedding_params(model),
        "strategy": cfg.label(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "device": str(accelerator.device), "mixed_precision": "bf16" if accelerator.heft_bf16 else "no",
        "python": platform.python_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def count(params: list[tuple[str, nn.Parameter]]) -> int:
    return sum(p.numel() for _, p in params)


def check_trainable(model: nn.Module, expected: list[tuple[str, nn.Parameter]], stage: str) -> None:
    """Internal invariant: exactly the adapter parameters of this stage require gradients."""
    live = {id(p) for p in model.parameters() if p.requires_grad}
    want = {id(p) for _, p in expected}
    assert live == want, f"{stage}: trainable set differs from the adapter set ({len(live)} vs {len(want)} tensors)"


class Session:
    """The base model with the adapters of finished stages applied, plus what evaluation needs."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = load_model(cfg.model, self.accelerator.device)
        self.model_path = getattr(self.model, "name_or_path", cfg.model.name_or_path)
        self.main = self.accelerator.is_main_process
        self.reft: ReftModel | None = None

    def replace_model(self, model: nn.Module) -> None:
        """Swap the (maybe PEFT-wrapped or merged) model, keeping a ReFT wrapper pointed at it."""
        self.model = model
        if self.reft is not None:
            self.reft.model = model

    @property
    def top(self) -> nn.Module:
        """What forward passes go through: the ReFT wrapper if any, else the (maybe PEFT) model."""
        return self.reft if self.reft is not None else self.model

    def add_reft(self) -> ReftModel:
        if self.reft is not None:
            raise ConfigError("stages: only one stage may train ReFT interventions")
        torch.manual_seed(self.cfg.seed + 1)  # interventions' init does not depend on earlier stages
        layers = decoder_layers(self.model, self.cfg.model.layers_path)
        self.reft = ReftModel(self.model, self.cfg.reft, layers, hidden_size(self.model)).to(self.accelerator.device)
        return self.reft

    def encoder(self, stage: StageConfig | None = None) -> Encoder:
        length = stage.max_length if stage is not None and stage.max_length else self.cfg.data.max_length
        return Encoder(self.tokenizer, self.cfg.data.prompt_format, length)

    def evaluate(self, rows: list[Example]) -> list[dict[str, Any]]:
        enc = self.encoder()
        encoded = [enc.encode(r) for r in rows]
        e = self.cfg.eval
        if e.method == "generate":
            words = ("no", "yes") if self.cfg.data.prompt_format == "passage" else ("false", "true")
            preds = generate(self.top, encoded, self.tokenizer, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                             answer_words=words, accelerator=self.accelerator)
        else:
            preds = score(self.top, encoded, batch_size=e.batch_size, pad_id=self.tokenizer.pad_token_id,
                          accelerator=self.accelerator)
        for p, r, x in zip(preds, rows, encoded):
            p["idx"] = r.idx
            p["truncated"] = x.truncated
        return preds


def _stage_params(s: Session, method: str) -> list[tuple[str, nn.Parameter]]:
    named: list[tuple[str, nn.Parameter]] = []
    if method in ("lora", "joint"):
        named += [(f"lora.{n}", p) for n, p in s.model.named_parameters() if "lora_" in n]
    if method in ("reft", "joint"):
        assert s.reft is not None
        named += [(f"reft.{n}", p) for n, p in s.reft.interventions.named_parameters()]
    return named


def _copy_train_log(source: Path, dest: Path, steps: int) -> list[dict[str, Any]]:
    """The reused prefix's per-step log lines (steps 1..`steps`), so this run folder is complete on its own."""
    import json

    lines = source.read_text().splitlines() if source.is_file() else []
    records = [r for r in (json.loads(x) for x in lines if x.strip()) if r["step"] <= steps]
    io.write_jsonl(dest, records)
    return records


def _train_stage(s: Session, cfg: RunConfig, i: int, stage: StageConfig, folder: Path, train_rows: list[Example],
                 reuse: Reuse | None, snapshot_epochs: bool, resuming: bool, tracker: Tracker) -> dict[str, Any]:
    """Train (or take from `reuse`) one stage, save its adapters, leave them frozen on the session."""
    folder.mkdir(parents=True, exist_ok=True)
    if stage.method in ("lora", "joint"):
        s.replace_model(lora.attach(s.model, cfg.lora))
    if stage.method in ("reft", "joint"):
        s.add_reft()
    named = _stage_params(s, stage.method)
    check_trainable(s.top, named, stage_dir_name(i, stage))
    info: dict[str, Any] = {"index": i, "method": stage.method, "trainable_params": count(named)}
    if reuse is not None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(s.model, load_file(str(reuse.adapter_dir / lora.ADAPTER_WEIGHTS)))
        result, info["reused_from"] = reuse.result, reuse.source
        if s.main:
            tracker.log_steps(_copy_train_log(reuse.adapter_dir.parent.parent / "train_log.jsonl", folder / "train_log.jsonl",
                                              result.optimizer_steps))
        logger.info("stage %d (%s): reused from %s", i, stage.method, reuse.source)
    else:
        enc = s.encoder(stage)
        rows = [enc.encode(x) for x in train_rows]

        def epoch_end(epoch: int, r: StageResult) -> None:
            if cfg.eval.every_epoch and epoch < stage.epochs:
                tracker.evaluate(i, stage, epoch, r)
            if snapshot_epochs and stage.method == "lora" and epoch < stage.epochs:
                tensors = lora.adapter_tensors(s.model)  # every process: a collective under FSDP
                if not s.main:
                    return
                lora.save(s.model, folder / f"epoch-{epoch}" / "adapter", tensors)
                io.write_json(folder / f"epoch-{epoch}" / "progress.json",
                              {"epoch": epoch, "optimizer_steps": r.optimizer_steps, "train_seconds": r.train_seconds,
                               "tokens": r.tokens, "loss": r.final_loss})

        no_decay = {f"reft.{n}" for n in no_decay_names(s.reft.interventions)} if s.reft is not None else set()
        no_decay |= {n for n, _ in named if n.endswith("bias")}
        result = train_stage(s.top, named, no_decay, rows, stage, accelerator=s.accelerator,
                             pad_id=s.tokenizer.pad_token_id, seed=cfg.seed + i, bucketing=cfg.length_bucketing,
                             log_path=folder / "train_log.jsonl", log_every=cfg.log_every, on_epoch_end=epoch_end,
                             desc=f"{cfg.label()} stage {i} ({stage.method})", checkpoint_dir=folder / "checkpoints",
                             checkpoint_every=cfg.checkpoint_every, resume=resuming, on_log=tracker.log_steps)
        info["peak_memory"] = peak_memory(s.accelerator.device)
    # Every process gathers the whole tensors (a collective under FSDP; R itself becomes the stored tensor,
    # see LoReFT.consolidate), then only the main process writes.
    lora_tensors = lora.adapter_tensors(s.model) if stage.method in ("lora", "joint") else None
    reft_tensors = s.reft.tensors() if stage.method in ("reft", "joint") else None
    if s.main:
        if lora_tensors is not None:
            lora.save(s.model, folder / "adapter", lora_tensors)
        if reft_tensors is not None:
            s.reft.save(folder, reft_tensors)
    if stage.method in ("lora", "joint"):
        # A sharded model cannot be merged in place; the next stage starts from the saved adapter (train_run)
        s.replace_model(lora.finish(s.model, cfg.lora.merge and not sharding.is_sharded(s.model)))
    info.update(optimizer_steps=result.optimizer_steps, epochs=result.epochs, train_seconds=round(result.train_seconds, 2),
                tokens=result.tokens, final_loss=result.final_loss, flops=tracker.stage_flops(stage, result.tokens))
    if s.main:
        io.write_json(folder / "stage.json", info)  # the stage counts as finished from here on
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    s.accelerator.wait_for_everyone()
    return info


def _apply_finished_stage(s: Session, cfg: RunConfig, stage: StageConfig, sdir: Path) -> None:
    """Put a finished stage's saved adapters on the session's model, as training left them."""
    if stage.method in ("lora", "joint"):
        s.replace_model(lora.load(s.model, sdir / "adapter", merge=cfg.lora.merge))
    if stage.method in ("reft", "joint"):
        s.add_reft().load_weights(sdir)


def _prepare_out(cfg: RunConfig, out: Path, overwrite: bool, resume: bool) -> bool:
    """Check the output folder before any work; True when continuing a run already in it."""
    has_run = (out / "config.yaml").is_file()
    if resume and has_run:
        if load(out / "config.yaml") != cfg:
            raise ConfigError(f"--resume: {out} holds a run with a different config; resume it with its own "
                              f"config ({out / 'config.yaml'}), or use --overwrite or a new --out")
        return True
    if out.exists() and any(out.iterdir()) and not overwrite:
        what = "a finished run" if (out / "metrics.json").is_file() else ("an unfinished run" if has_run else "files")
        raise ConfigError(f"--out: {out} is not empty (it holds {what}); pass --resume to continue the run in it, "
                          "--overwrite to replace it, or choose a new folder")
    return False


def train_run(cfg: RunConfig, out: Path, *, overwrite: bool = False, resume: bool = False,
              reuse: dict[int, Reuse] | None = None, snapshot_epochs: bool = False) -> dict[str, Any]:
    """Train every stage of `cfg`, evaluate, and write the run folder `out`. Returns metrics.json's content.

    With `resume`, a run folder of the same config continues: finished stages are loaded, the
    interrupted one continues from its latest checkpoint, a finished run is returned as it is.
    """
    reuse = reuse or {}
    resuming = _prepare_out(cfg, out, overwrite, resume)
    if resuming and (out / "metrics.json").is_file():
        logger.info("%s: the run is already finished", out)
        return io.read_json(out / "metrics.json")
    splits = load_splits(cfg.data)  # bad data stops the run before anything is written
    s = Session(cfg)
    if any(st.method in ("reft", "joint") for st in cfg.stages):  # so does a ReFT setup that cannot fit the model
        check_fits(cfg.reft, len(decoder_layers(s.model, cfg.model.layers_path)), hidden_size(s.model))
    if not resuming and s.main:
        if overwrite and out.exists():  # _prepare_out refused a non-empty folder without --overwrite
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        io.write_text(out / "config.yaml", dump_yaml(cfg))
        io.write_json(out / "meta.json", _meta(cfg, s.accelerator, s.model_path, s.model))
    s.accelerator.wait_for_everyone()
    tracker = Tracker(s, cfg, out, splits.eval)
    every = cfg.eval.every_epoch
    total_params, stage_info = 0, []
    for i, stage in enumerate(cfg.stages):
        folder = out / "stages" / stage_dir_name(i, stage)
        if resuming and (folder / "stage.json").is_file():
            _apply_finished_stage(s, cfg, stage, folder)
            info = io.read_json(folder / "stage.json")
            info.setdefault("flops", tracker.stage_flops(stage, info["tokens"]))  # folders written before heft recorded it
            logger.info("stage %d (%s): finished before the restart, loaded from %s", i, stage.method, folder)
        else:
            reuse_i = reuse.get(i)
            info = _train_stage(s, cfg, i, stage, folder, splits.train, reuse_i, snapshot_epochs, resuming, tracker)
            last = i == len(cfg.stages) - 1
            if every and reuse_i is not None:  # the source run evaluated these epochs already: same weights
                for rec in reuse_i.evals:
                    if last and rec["stage_epoch"] >= info["epochs"]:
                        continue  # the final evaluation below is this run's own
                    tracker.record(i, stage, rec["stage_epoch"], _result_at(rec), rec, reused_from=reuse_i.source)
            if every and not last and not any(r["stage_epoch"] >= info["epochs"] for r in (reuse_i.evals if reuse_i else [])):
                tracker.evaluate(i, stage, info["epochs"], _result_of(info))
        s.top.requires_grad_(False)
        if sharding.is_sharded(s.top) and i < len(cfg.stages) - 1:
            s = tracker.s = None  # type: ignore[assignment]  # free the sharded model before loading a fresh one
            gc.collect()
            s = tracker.s = _reload_session(cfg, out, i)
        stage_info.append(info)
        total_params += info["trainable_params"]
        if i < len(cfg.stages) - 1:
            tracker.finish_stage(info)
    preds = s.evaluate(splits.eval)
    if s.main:
        io.write_jsonl(out / "predictions.jsonl", preds)
    acc = accuracy(preds)
    if cfg.stages:
        if every:
            tracker.record(len(cfg.stages) - 1, cfg.stages[-1], stage_info[-1]["epochs"], _result_of(stage_info[-1]), acc)
        tracker.finish_stage(stage_info[-1])
    elif every:
        tracker.record(0, None, 0.0, None, acc)  # the untrained model: the curves' epoch-0 point
    tracker.close()
    majority = majority_label(splits.train) if splits.train else True
    metrics = {
        "strategy": cfg.label(), **acc, "eval_split": cfg.data.eval_split,
        "majority_label": majority, "majority_baseline": sum(r.label == majority for r in splits.eval) / len(splits.eval),
        "trainable_params": total_params, "train_seconds": round(tracker.seconds, 2), "epochs": round(tracker.epochs, 6),
        "train_tokens": tracker.tokens, "train_flops": tracker.flops_done, "train_rows": len(splits.train), "stages": stage_info,
    }
    if s.main:
        io.write_json(out / "metrics.json", metrics)
    s.accelerator.wait_for_everyone()
    return metrics


def _reload_session(cfg: RunConfig, out: Path, last: int) -> Session:
    """The base model with stages 0..`last` loaded from their saved adapters, not sharded yet.

    FSDP shards a model in place when a stage's training prepares it, and a sharded model cannot take
    the next stage's adapters and be sharded again; so under FSDP each stage starts from a fresh copy
    of the base model, with the finished stages applied as they were saved (merged if lora.merge)."""
    s = Session(cfg)
    _apply_saved_stages(s, cfg, out, last + 1)
    return s


def _apply_saved_stages(s: Session, cfg: RunConfig, out: Path, count: int) -> None:
    """Put the first `count` stages' saved adapters of run folder `out` on the session, frozen."""
    for i, stage in enumerate(cfg.stages[:count]):
        _apply_finished_stage(s, cfg, stage, out / "stages" / stage_dir_name(i, stage))
    s.top.requires_grad_(False)


def _result_of(info: dict[str, Any]) -> StageResult:
    return StageResult(info["optimizer_steps"], info["epochs"], info["train_seconds"], info["tokens"], info.get("final_loss"))


def _result_at(rec: dict[str, Any]) -> StageResult:
    """A stage-0 evaluation point of another run as the stage's progress at that point."""
    return StageResult(rec["optimizer_steps"], rec["stage_epoch"], rec["train_seconds"], rec["tokens"], None)


def load_run(folder: Path) -> tuple[Session, RunConfig]:
    """Rebuild the trained model of a run folder: base model, then each stage's adapters in order."""
    if not (folder / "config.yaml").is_file():
        raise CheckpointError(f"{folder}: not a heft run folder (no config.yaml)")
    cfg = load(folder / "config.yaml")
    s = Session(cfg)
    saved = io.read_json(folder / "meta.json").get("model_shape") if (folder / "meta.json").is_file() else None
    if saved is not None:
        mine = model_shape(s.model)
        wrong = {k: (v, mine[k]) for k, v in saved.items() if mine.get(k) != v}
        if wrong:
            raise CheckpointError(f"{folder}: trained on a base model with {', '.join(f'{k}={a}' for k, (a, _) in wrong.items())}, "
                                  f"but {cfg.model.name_or_path} has {', '.join(f'{k}={b}' for k, (_, b) in wrong.items())}; "
                                  "point model.name_or_path in its config.yaml at the original base model")
    _apply_saved_stages(s, cfg, folder, len(cfg.stages))
    return s, cfg


def eval_run(folder: Path) -> dict[str, Any]:
    """Re-evaluate a finished run and compare with its saved predictions."""
    s, cfg = load_run(folder)
    splits = load_splits(cfg.data, with_train=False)
    preds = s.evaluate(splits.eval)
    result = {**accuracy(preds), "eval_split": cfg.data.eval_split}
    saved_path = folder / "predictions.jsonl"
    if saved_path.is_file():
        import json

        saved = [json.loads(line) for line in saved_path.read_text().splitlines()]
        same = sum(1 for a, b in zip(preds, saved) if a["pred"] == b["pred"]) if len(saved) == len(preds) else 0
        result["matches_saved_predictions"] = same == len(preds)
        result["max_abs_p_yes_diff"] = max((abs(a["p_yes"] - b["p_yes"]) for a, b in zip(preds, saved) if "p_yes" in a), default=0.0)
    return result
