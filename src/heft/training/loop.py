"""The training loop: plain PyTorch, with accelerate for devices and data parallelism.

`train_stage` trains one stage's parameters, everything else frozen:

    setup        global batches, AdamW + schedule, accelerate's prepare (`_Setup`)
    resume       continue from the stage's latest checkpoint, bit-identically on CPU (`_resume`)
    reuse        the path the stage runs, chosen once: full, token prefix or layer prefix (heft.reuse.plan)
    step         one micro-batch forward/backward, an optimizer step at grad_accum boundaries (`_micro_step`)
    logging      per-step records read from the device in one sync every `log_every` steps (`StepLog`)
    checkpoints  at epoch ends and every `checkpoint_every` steps (`Checkpointer`)

The loss is the cross-entropy of the answer tokens only, and logits are computed only at the last
`max_answer_len + 1` positions of the left-padded batch (`logits_to_keep`): the vocabulary head over
every position would otherwise be a large share of each step on a small model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from heft.training import checkpoint
from heft.run import atomic
from heft.training import sharding
from heft.config.schema import StageConfig
from heft.data.tokens import BucketBatches, Encoded
from heft.errors import HeftError
from heft.reuse import plan as reuse
from heft.training.cost import StageCost
from heft.run.records import StageProgress
from heft.training.runtime import Runtime

logger = logging.getLogger(__name__)


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over answer tokens (mean, or sum); logits (B, K, V) vs targets (B, K-1)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)


def shard(idx: list[int], rank: int, world: int) -> list[int]:
    """This process's rows of a global batch (strided); a process left with none repeats one row."""
    mine = idx[rank::world]
    return mine if mine else [idx[rank % len(idx)]]


def lr_lambda(stage: StageConfig, total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < stage.warmup_steps:
            return (step + 1) / (stage.warmup_steps + 1)
        if stage.scheduler == "constant":
            return 1.0
        progress = (step - stage.warmup_steps) / max(1, total_steps - stage.warmup_steps)
        if stage.scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def reset_peak_memory(device: torch.device) -> None:
    """Start counting this process's peak memory afresh (CUDA; on Linux also the peak RSS, through clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set size
    except OSError:
        pass  # not Linux, or not permitted: peak_memory then reports the peak since the process started


def peak_memory(device: torch.device) -> dict[str, Any]:
    """This process's peak memory since `reset_peak_memory`: CUDA's most allocated, else the peak RSS."""
    if device.type == "cuda":
        return {"what": "cuda max allocated", "gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3)}
    try:
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
        return {"what": "peak RSS during the stage", "gb": round(int(hwm.split()[1]) * 1024 / 1e9, 3)}
    except (OSError, StopIteration):
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"what": "peak RSS since the process started", "gb": round(rss / 1e9, 3)}


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float, no_decay: set[str]) -> list[dict]:
    decay = [p for n, p in named if n not in no_decay]
    rest = [p for n, p in named if n in no_decay]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]


# ----------------------------------------------------------------------------- logging


class StepLog:
    """Per-step records (`train_log.jsonl`), buffered on the device and read in one host sync.

    Every process buffers and reduces (the reduction is a collective); only the main process writes.
    Non-finite losses or gradient norms stop the stage here, naming the step."""

    def __init__(self, path: Path, rt: Runtime, desc: str, every: int = 10,
                 on_log: Callable[[list[dict[str, Any]]], None] | None = None):
        self.path, self.rt, self.desc, self.every, self.on_log = path, rt, desc, every, on_log
        self.pending: list[dict[str, Any]] = []  # records whose loss/grad-norm tensors are not read yet
        self.last_loss: float | None = None
        self.clipped = 0
        self.max_norm = math.inf
        self.file: Any = None

    def open(self, resume_step: int) -> None:
        if self.rt.main:
            self._truncate(resume_step)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a")
        else:
            self.file = open(os.devnull, "w")

    def _truncate(self, step: int) -> None:
        """Drop lines written after the checkpoint we resume from (the killed run got further)."""
        if self.path.is_file():
            atomic.write_jsonl(self.path, [r for r in atomic.read_jsonl(self.path) if r.get("step", math.inf) <= step])

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(record)
        if record["step"] % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        values = self.rt.accelerator.reduce(
            torch.stack([torch.stack([r["loss"], r["grad_norm"]]) for r in self.pending]), "mean").tolist()
        for r, (loss_v, norm_v) in zip(self.pending, values):
            if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                raise HeftError(f"{self.desc}: non-finite {what} ({loss_v if what == 'loss' else norm_v}) at optimizer "
                                f"step {r['step']}; lower the learning rate (stage lr) or use precision: fp32")
            r.update(loss=round(loss_v, 6), grad_norm=round(norm_v, 6))
            self.clipped += norm_v > self.max_norm
            self.file.write(json.dumps(r) + "\n")
        self.file.flush()
        if self.on_log is not None and self.rt.main:
            self.on_log(self.pending)
        self.last_loss = values[-1][0]
        self.pending = []

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# ----------------------------------------------------------------------------- setup and checkpoints


@dataclass
class _Setup:
    model: nn.Module
    trainable: list[tuple[str, nn.Parameter]]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    batches: BucketBatches
    total_micro: int
    plan: reuse.Plan | None = None


def _setup(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], no_decay: set[str], rows: list[Encoded],
           stage: StageConfig, rt: Runtime, seed: int, bucketing: bool, desc: str) -> _Setup:
    """Global batches of batch_size rows per process (the same run on 1 or N processes sees the same data),
    AdamW with its schedule, and accelerate's preparation of model and optimizer."""
    world = rt.num_processes
    batches = BucketBatches([len(r.prompt) + len(r.answers[r.label]) for r in rows], stage.batch_size * world, seed, bucketing)
    total_micro = max(1, round(stage.epochs * len(batches)))
    total_steps = math.ceil(total_micro / stage.grad_accum)
    # foreach: one multi-tensor kernel per update op instead of a Python loop over every small tensor (ReFT: 3 per
    # intervention); the same arithmetic
    optimizer = torch.optim.AdamW(param_groups(trainable, stage.weight_decay, no_decay), lr=stage.lr, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage, total_steps))
    names = {id(p): n for n, p in model.named_parameters()}
    model, optimizer = rt.accelerator.prepare(model, optimizer)
    # FSDP2 shards the model in place, swapping its parameters for sharded ones the optimizer now updates
    trainable = sharding.rebind(trainable, names, rt.accelerator.unwrap_model(model))
    if sharding.is_sharded(model):
        logger.info("%s: FSDP shards the model over %d processes; this one holds %.1f%% of its parameters",
                    desc, world, 100 * sharding.local_share(model))
    return _Setup(model, trainable, optimizer, scheduler, batches, total_micro)


def _resume(checkpoints: Path | None, st: _Setup, desc: str) -> checkpoint.Progress:
    """Where the stage stopped: its latest checkpoint restored into the live objects (RNG included), or the start."""
    ckpt = checkpoint.latest(checkpoints) if checkpoints is not None else None
    if ckpt is None:
        return checkpoint.Progress()
    done = checkpoint.restore(ckpt, st.trainable, st.optimizer, st.scheduler)
    logger.info("%s: resuming from %s (optimizer step %d)", desc, ckpt, done.step)
    return done


class Checkpointer:
    """Writes a stage's checkpoints (every process gathers, the main process writes), at most once per step."""

    def __init__(self, folder: Path | None, every: int, rt: Runtime, st: _Setup, saved_at: int):
        self.folder, self.every, self.rt, self.st, self.saved_at = folder, every, rt, st, saved_at

    def save(self, progress: checkpoint.Progress, log: StepLog) -> None:
        if self.folder is None or self.saved_at == progress.step:
            return
        self.saved_at = progress.step
        log.flush()  # on every process (it reduces across them); never checkpoint past a non-finite loss
        progress.last_loss, progress.clipped = log.last_loss, log.clipped
        snap = checkpoint.snapshot(self.st.trainable, self.st.optimizer)  # every process: gathers shards and RNG states
        if self.rt.main:
            checkpoint.save(self.folder, snap, self.st.scheduler, progress)


# ----------------------------------------------------------------------------- the loop


def _micro_step(st: _Setup, rows: list[Encoded], idx: list[int], rt: Runtime, grad_accum: int,
                boundary: bool) -> tuple[torch.Tensor, int]:
    """Forward and backward of this process's share of one global batch; (loss, tokens of the whole batch)."""
    world, rank = rt.num_processes, rt.process_index
    shards = [shard(idx, r, world) for r in range(world)]
    # Sum over this process's answer tokens / all processes' answer tokens, times world: DDP's mean
    # of the gradients is then exactly the gradient of the global batch's mean loss.
    global_answer_tokens = sum(len(rows[i].answers[rows[i].label]) for part in shards for i in part)
    tokens = sum(len(rows[i].prompt) + len(rows[i].answers[rows[i].label]) for i in idx)
    step = st.plan.step(shards[rank])  # the batch as the stage's path runs it (heft.reuse.plan)
    with contextlib.nullcontext() if boundary else rt.accelerator.no_sync(st.model), step.hold:
        with rt.autocast():
            loss_sum = answer_loss(step.forward(st.model), step.targets, reduction="sum")
            loss = loss_sum * (world / global_answer_tokens)
        rt.accelerator.backward(loss / grad_accum)
    return loss.detach(), tokens


def train_stage(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], no_decay: set[str], rows: list[Encoded],
                stage: StageConfig, *, rt: Runtime, pad_id: int, seed: int, bucketing: bool, log: StepLog,
                checkpoints: Path | None = None, checkpoint_every: int = 0,
                on_epoch_end: Callable[[int, StageProgress], None] | None = None,
                frozen_prefix: str = "cache", prefix_cache_gb: float = 4.0, layers_path: str | None = None,
                on_cost: Callable[[StageCost], None] | None = None) -> StageProgress:
    """Train `trainable` (everything else frozen) on `rows` for `stage.epochs` epochs.

    With `checkpoints`, a checkpoint is written every `checkpoint_every` optimizer steps (0: never
    mid-epoch) and at each epoch end, and training continues from the latest one found there.
    `on_epoch_end(epoch, progress)` runs after each whole epoch that ends on an optimizer step (then
    the state equals a shorter run's end), except the last. `frozen_prefix` (`cache` | `recompute` | `off`) and
    `prefix_cache_gb`: whether a ReFT stage that edits only the last prompt positions runs the tokens before them
    without gradients (heft.reuse.token_prefix), and whether any other stage runs the frozen layers below its lowest
    adapted one once per row (heft.reuse.layer_prefix; `layers_path` finds the decoder layers); heft.reuse.plan
    chooses once. `on_cost(cost)` hears what the chosen path runs per token (heft.training.cost), before the first step.
    """
    if not rows:
        raise HeftError("training data is empty: no rows to train on (check data.train_size and the data files)")
    reset_peak_memory(rt.device)
    desc = log.desc
    st = _setup(model, trainable, no_decay, rows, stage, rt, seed, bucketing, desc)
    params = [p for _, p in st.trainable]
    st.model.train()
    st.plan = reuse.plan(st.model, st.trainable, rows, pad_id=pad_id, rt=rt, mode=frozen_prefix,
                         budget_gb=prefix_cache_gb, layers_path=layers_path, desc=desc, first=st.batches.epoch(0)[0])
    if on_cost is not None:
        on_cost(st.plan.cost)
    torch.manual_seed(seed)  # dropout masks depend only on the seed
    done = _resume(checkpoints, st, desc)
    log.max_norm, log.last_loss, log.clipped = stage.max_grad_norm, done.last_loss, done.clipped
    log.open(done.step)  # a log line past the checkpoint (or any, without one) is redone
    ckpt = Checkpointer(checkpoints, checkpoint_every, rt, st, done.step)
    start, tokens, step = time.perf_counter() - done.seconds, done.tokens, done.step
    world = rt.num_processes

    def progress(micro: int) -> checkpoint.Progress:
        return checkpoint.Progress(step, micro, tokens, time.perf_counter() - start, log.last_loss, world, log.clipped)

    bar = tqdm(total=st.total_micro, desc=desc, unit="batch", disable=not rt.main, mininterval=2.0)
    bar.update(done.micro)
    micro_losses: list[torch.Tensor] = []
    try:
        prev_epoch = None
        for micro, (epoch, idx) in enumerate(st.batches.iterate(st.total_micro)):
            if micro < done.micro:
                prev_epoch = epoch
                continue  # already trained before the restart; the order is a pure function of (seed, epoch)
            if prev_epoch is not None and epoch != prev_epoch and micro % stage.grad_accum == 0 and micro > done.micro:
                log.flush()
                if on_epoch_end is not None:
                    on_epoch_end(prev_epoch + 1, StageProgress(step, prev_epoch + 1, time.perf_counter() - start, tokens,
                                                               log.last_loss))
                ckpt.save(progress(micro), log)
            prev_epoch = epoch
            boundary = (micro + 1) % stage.grad_accum == 0 or micro + 1 == st.total_micro
            loss, batch_tokens = _micro_step(st, rows, idx, rt, stage.grad_accum, boundary)
            tokens += batch_tokens
            micro_losses.append(loss)
            if boundary:
                norm = rt.accelerator.clip_grad_norm_(params, stage.max_grad_norm)
                st.optimizer.step()
                st.scheduler.step()
                st.optimizer.zero_grad(set_to_none=True)
                step += 1
                log.add({"step": step, "epoch": round((micro + 1) / len(st.batches), 4),
                         "loss": torch.stack(micro_losses).mean().float(), "grad_norm": sharding.full(norm).float(),
                         "lr": st.scheduler.get_last_lr()[0], "tokens": tokens,
                         "seconds": round(time.perf_counter() - start, 2)})
                micro_losses = []
                if checkpoint_every and step % checkpoint_every == 0 and micro + 1 < st.total_micro:
                    ckpt.save(progress(micro + 1), log)
                if log.last_loss is not None:
                    bar.set_postfix(loss=f"{log.last_loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}",
                                    refresh=False)
            bar.update(1)
        log.flush()
    finally:
        log.close()
        bar.close()
    st.model.eval()
    return StageProgress(step, st.total_micro / len(st.batches), time.perf_counter() - start, tokens, log.last_loss)
