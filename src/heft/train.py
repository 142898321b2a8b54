"""The training loop: plain PyTorch, with accelerate for devices and mixed precision.

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

from . import checkpoint, sharding
from .config import StageConfig
from .data import BucketBatches, Encoded, train_batch
from .errors import HeftError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageResult:
    optimizer_steps: int
    epochs: float
    train_seconds: float
    tokens: int
    final_loss: float | None


def use_bf16(precision: str, device: torch.device) -> bool:
    """bf16 autocast where it pays: any recent GPU, or a CPU with native bf16 (AVX512-BF16 / AMX)."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast(accelerator: Any) -> Any:
    """bf16 autocast when the run asked for it. heft keeps accelerate itself at mixed_precision="no"
    (accelerate's precision is process-wide state that cannot change between runs in one process)."""
    bf16 = getattr(accelerator, "heft_bf16", None)
    if bf16 is None:
        return accelerator.autocast()
    return torch.autocast(device_type=accelerator.device.type, dtype=torch.bfloat16, enabled=bf16)


def model_forward(model: nn.Module, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits (B, keep, V) of the last `keep` positions; ReFT models also get the prompt positions."""
    kwargs: dict[str, Any] = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                                  logits_to_keep=keep, use_cache=False)
    inner = getattr(model, "module", model)  # DDP wraps the model in `.module`
    if hasattr(inner, "interventions"):
        kwargs.update(prompt_start=batch["prompt_start"], prompt_len=batch["prompt_len"])
    return model(input_ids=batch["input_ids"], **kwargs).logits


def answer_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over answer tokens (mean, or sum); logits (B, K, V) vs targets (B, K-1)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)


def shard(idx: list[int], rank: int, world: int) -> list[int]:
    """This process's rows of a global batch (strided); a process left with none repeats one row."""
    mine = idx[rank::world]
    return mine if mine else [idx[rank % len(idx)]]


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run got further)."""
    if path.is_file():
        lines = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    lines.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by the crash
        from .io import write_text

        write_text(path, "".join(ln + "\n" for ln in lines))


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


def train_stage(
    model: nn.Module,
    trainable: list[tuple[str, nn.Parameter]],
    no_decay: set[str],
    rows: list[Encoded],
    stage: StageConfig,
    *,
    accelerator: Any,
    pad_id: int,
    seed: int,
    bucketing: bool,
    log_path: Path,
    log_every: int = 10,
    on_epoch_end: Callable[[int, "StageResult"], None] | None = None,
    desc: str = "train",
    checkpoint_dir: Path | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    on_log: Callable[[list[dict[str, Any]]], None] | None = None,
) -> StageResult:
    """Train `trainable` (everything else frozen) on `rows` for `stage.epochs` epochs.

    With `checkpoint_dir`, a checkpoint is written every `checkpoint_every` optimizer steps (0: never
    mid-epoch) and at each epoch end; `resume` continues from the latest one, bit-identically on CPU.
    `on_log` receives the per-step records as they are written (main process only), e.g. for TensorBoard.
    """
    if not rows:
        raise HeftError("training data is empty: no rows to train on (check data.train_size and the data files)")
    reset_peak_memory(accelerator.device)
    world, rank = accelerator.num_processes, accelerator.process_index
    # Global batches of batch_size rows per process: the same run on 1 or N processes sees the same data.
    batches = BucketBatches([len(r.prompt) + len(r.answers[r.label]) for r in rows], stage.batch_size * world, seed, bucketing)
    total_micro = max(1, round(stage.epochs * len(batches)))
    total_steps = math.ceil(total_micro / stage.grad_accum)
    optimizer = torch.optim.AdamW(param_groups(trainable, stage.weight_decay, no_decay), lr=stage.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage, total_steps))
    names = {id(p): n for n, p in model.named_parameters()}
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP2 shards the model in place, swapping its parameters for sharded ones the optimizer now updates
    trainable = sharding.rebind(trainable, names, accelerator.unwrap_model(model))
    if sharding.is_sharded(model):
        logger.info("%s: FSDP shards the model over %d processes; this one holds %.1f%% of its parameters",
                    desc, world, 100 * sharding.local_share(model))
    params = [p for _, p in trainable]
    model.train()
    torch.manual_seed(seed)  # dropout masks depend only on the seed
    done = checkpoint.Progress()
    ckpt = checkpoint.latest(checkpoint_dir) if (resume and checkpoint_dir is not None) else None
    if ckpt is not None:
        done = checkpoint.restore(ckpt, trainable, optimizer, scheduler)
        logger.info("%s: resuming from %s (optimizer step %d)", desc, ckpt, done.step)
        if accelerator.is_main_process:
            _truncate_log(log_path, done.step)
    start, tokens, step = time.perf_counter() - done.seconds, done.tokens, done.step
    last_loss: float | None = done.last_loss
    pending: list[dict[str, Any]] = []  # per-step records whose loss/grad-norm tensors are not read yet
    micro_losses: list[torch.Tensor] = []
    device = accelerator.device
    bar = tqdm(total=total_micro, desc=desc, unit="batch", disable=not accelerator.is_main_process, mininterval=2.0)
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def flush(log: Any) -> None:
        """Read the buffered tensors in one host sync, check them, write one JSON line per step."""
        nonlocal last_loss
        if not pending:
            return
        values = accelerator.reduce(torch.stack([torch.stack([r["loss"], r["grad_norm"]]) for r in pending]), "mean").tolist()
        for r, (loss_v, norm_v) in zip(pending, values):
            if not (math.isfinite(loss_v) and math.isfinite(norm_v)):
                what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                raise HeftError(f"{desc}: non-finite {what} ({loss_v if what == 'loss' else norm_v}) at optimizer step "
                                f"{r['step']}; lower the learning rate (stage lr) or use precision: fp32")
            r.update(loss=round(loss_v, 6), grad_norm=round(norm_v, 6))
            if accelerator.is_main_process:
                log.write(json.dumps(r) + "\n")
        log.flush()
        if on_log is not None and accelerator.is_main_process:
            on_log(pending)
        last_loss = values[-1][0]
        bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{tokens / (time.perf_counter() - start):.0f}")
        pending.clear()

    saved_at = [done.step]

    def save_checkpoint(micro_done: int, log: Any) -> None:
        if checkpoint_dir is None or saved_at[0] == step:
            return
        saved_at[0] = step
        flush(log)  # on every process (it reduces across them); never checkpoint past a non-finite loss
        snap = checkpoint.snapshot(trainable, optimizer)  # on every process too: gathers shards and generator states
        if accelerator.is_main_process:
            checkpoint.save(checkpoint_dir, snap, scheduler,
                            checkpoint.Progress(step, micro_done, tokens, time.perf_counter() - start, last_loss, world))

    bar.update(done.micro)
    with (log_path.open("a") if accelerator.is_main_process else open(os.devnull, "w")) as log:
        prev_epoch = None
        for micro, (epoch, idx) in enumerate(batches.iterate(total_micro)):
            if micro < done.micro:
                prev_epoch = epoch
                continue  # already trained before the restart; the order is a pure function of (seed, epoch)
            if prev_epoch is not None and epoch != prev_epoch and micro % stage.grad_accum == 0 and micro > done.micro:
                # Only where the epoch ends on an optimizer step: then the state equals a shorter run's end.
                flush(log)
                if on_epoch_end is not None:
                    on_epoch_end(prev_epoch + 1, StageResult(step, prev_epoch + 1, time.perf_counter() - start, tokens, last_loss))
                save_checkpoint(micro, log)
            prev_epoch = epoch
            shards = [shard(idx, r, world) for r in range(world)]
            # Sum over this process's answer tokens / all processes' answer tokens, times world: DDP's mean
            # of the gradients is then exactly the gradient of the global batch's mean loss.
            global_answer_tokens = sum(len(rows[i].answers[rows[i].label]) for part in shards for i in part)
            cpu_batch = train_batch([rows[i] for i in shards[rank]], pad_id)
            keep = int(cpu_batch.pop("logits_to_keep"))
            tokens += sum(len(rows[i].prompt) + len(rows[i].answers[rows[i].label]) for i in idx)
            batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
            boundary = (micro + 1) % stage.grad_accum == 0 or micro + 1 == total_micro
            with contextlib.nullcontext() if boundary else accelerator.no_sync(model):
                with autocast(accelerator):
                    loss_sum = answer_loss(model_forward(model, batch, keep), batch["targets"], reduction="sum")
                    loss = loss_sum * (world / global_answer_tokens)
                accelerator.backward(loss / stage.grad_accum)
            micro_losses.append(loss.detach())
            if boundary:
                norm = accelerator.clip_grad_norm_(params, stage.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pending.append({"step": step, "epoch": round((micro + 1) / len(batches), 4),
                                "loss": torch.stack(micro_losses).mean().float(), "grad_norm": sharding.full(norm).float(),
                                "lr": scheduler.get_last_lr()[0], "tokens": tokens,
                                "seconds": round(time.perf_counter() - start, 2)})
                micro_losses = []
                if step % log_every == 0:
                    flush(log)
                if checkpoint_every and step % checkpoint_every == 0 and micro + 1 < total_micro:
                    save_checkpoint(micro + 1, log)
            bar.update(1)
        flush(log)
    bar.close()
    model.eval()
    return StageResult(step, total_micro / len(batches), time.perf_counter() - start, tokens, last_loss)
