"""Training checkpoints: everything needed to continue a stage exactly where it stopped.

A checkpoint is a folder `stages/NN-x/checkpoints/step-000120/` holding
    trainable.safetensors   the stage's trainable tensors, by name (whole, also under FSDP)
    optimizer.pt            AdamW state (whole tensors and numbers only: loaded with weights_only=True)
    rng.safetensors         torch CPU (and CUDA) generator states of every process, `rank{r}.cpu`,
                            `rank{r}.cuda{i}`: under data parallelism each process draws its own dropout
                            masks, so each one's stream is restored for an exact resume
    state.json              optimizer step, micro-batches done, tokens, seconds, scheduler state
It is written under a temporary name and renamed into place, then `checkpoints/latest` (a one-line
file, replaced atomically) is pointed at it, and only then are older checkpoints deleted: a crash at
any moment leaves a complete latest checkpoint. Holding whole tensors, a checkpoint written by N
processes (DDP or FSDP) resumes on any number of processes; only the dropout streams are per process.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from heft.run import atomic
from heft.training import sharding
from heft.errors import CheckpointError

logger = logging.getLogger(__name__)

LATEST = "latest"


@dataclass
class Progress:
    step: int = 0
    micro: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_loss: float | None = None
    processes: int | None = None
    """How many processes trained: a stage's global batch is batch_size x processes (None: not recorded)."""
    clipped: int = 0
    """Optimizer steps so far whose gradient norm was above max_grad_norm (clipped)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world() -> int:
    return dist.get_world_size() if _distributed() else 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _local_rng() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return states


def rng_states() -> dict[str, torch.Tensor]:
    """The generator states of every process, keyed `rank{r}.cpu` / `rank{r}.cuda{i}`.

    Under torch.distributed this is a collective: every process must call it (then only the main
    one passes the result to `save`).
    """
    if not _distributed():
        return {f"rank0.{k}": v for k, v in _local_rng().items()}
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, _local_rng())
    return {f"rank{r}.{k}": v.cpu() for r, states in enumerate(everyone) for k, v in states.items()}


@dataclass
class Snapshot:
    """What a checkpoint holds besides progress: whole tensors, so it resumes on any number of processes."""

    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]


def snapshot(trainable: list[tuple[str, nn.Parameter]], optimizer: Any) -> Snapshot:
    """Gather a checkpoint's content: a collective under torch.distributed (every process calls it, then
    only the main one passes the result to `save`). Sharded (FSDP) tensors and optimizer state are made whole."""
    if {id(p) for g in optimizer.param_groups for p in g["params"]} != {id(p) for _, p in trainable}:
        raise CheckpointError("the optimizer does not update this stage's listed parameters (they were replaced, e.g. "
                              "by FSDP's sharded copies, after the list was taken); take the list from the prepared "
                              "model (heft.training.sharding.rebind)")
    return Snapshot(sharding.full_cpu(dict(trainable)), sharding.optimizer_state_full(optimizer), rng_states())


def save(folder: Path, snap: Snapshot, scheduler: Any, progress: Progress, keep: int = 1) -> Path:
    """Write checkpoint `folder/step-NNNNNN` atomically, point `latest` at it, prune older ones."""
    name = f"step-{progress.step:06d}"
    final = folder / name
    with atomic.atomic_dir(final) as tmp:
        save_file(snap.tensors, str(tmp / "trainable.safetensors"))
        torch.save(snap.optimizer, tmp / "optimizer.pt")
        save_file(snap.rng, str(tmp / "rng.safetensors"))
        atomic.write_json(tmp / "state.json", {**asdict(progress), "scheduler": scheduler.state_dict()})
    atomic.write_text(folder / LATEST, name + "\n")
    done = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name != name)
    for old in done[: max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The checkpoint `latest` points at, or None when there is none."""
    pointer = folder / LATEST
    if not pointer.is_file():
        return None
    target = folder / pointer.read_text().strip()
    if not (target / "state.json").is_file():
        raise CheckpointError(f"{pointer}: points at {target.name}, which is missing or incomplete")
    return target


def restore(ckpt: Path, trainable: list[tuple[str, nn.Parameter]], optimizer: Any, scheduler: Any) -> Progress:
    """Load a checkpoint into live objects; returns where training stopped."""
    try:
        tensors = load_file(str(ckpt / "trainable.safetensors"))
        opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = load_file(str(ckpt / "rng.safetensors"))
        state = json.loads((ckpt / "state.json").read_text())
    except Exception as e:  # safetensors, torch and json each raise their own types for a damaged file
        raise CheckpointError(f"{ckpt}: cannot read the checkpoint ({type(e).__name__}: {e}); it is corrupt or truncated") from None
    saved_by = state.get("processes")
    if saved_by is not None and saved_by != _world():
        raise CheckpointError(f"{ckpt}: written by {saved_by} process(es), but this run has {_world()}; a stage's global "
                              f"batch is batch_size x processes, so resume it with {saved_by} process(es) (any engine: "
                              "the checkpoint holds whole tensors, DDP and FSDP can resume each other's)")
    names = {n for n, _ in trainable}
    if set(tensors) != names:
        raise CheckpointError(f"{ckpt}: its tensors do not match this stage's trainable parameters "
                              f"(missing {sorted(names - set(tensors))[:3]}, unexpected {sorted(set(tensors) - names)[:3]})")
    for n, p in trainable:
        if tensors[n].shape != p.shape:
            raise CheckpointError(f"{ckpt}: {n} has shape {tuple(tensors[n].shape)}, expected {tuple(p.shape)}")
        sharding.assign(p, tensors[n])
    sharding.load_optimizer_state(optimizer, opt_state)
    scheduler.load_state_dict(state.pop("scheduler"))
    _restore_rng(ckpt, rng)
    known = {f for f in Progress.__dataclass_fields__}
    return Progress(**{k: v for k, v in state.items() if k in known})


def _restore_rng(ckpt: Path, rng: dict[str, torch.Tensor]) -> None:
    """Set this process's generators from its own saved states (`rank{r}.*`)."""
    rank = _rank()
    by_rank: dict[int, dict[str, torch.Tensor]] = {}
    for key, state in rng.items():
        # checkpoints written before per-process states held one process's `cpu` / `cudaN` keys
        r, kind = key.split(".", 1) if "." in key else ("rank0", key)
        by_rank.setdefault(int(r.removeprefix("rank")), {})[kind] = state
    if 0 not in by_rank:
        raise CheckpointError(f"{ckpt}: rng.safetensors holds no generator state of process 0; the checkpoint is damaged")
    mine = by_rank.get(rank)
    if mine is None:
        logger.warning("%s: holds the random state of %d process(es), not of process %d; it continues with process 0's "
                       "(dropout masks will differ from an uninterrupted run)", ckpt, len(by_rank), rank)
        mine = by_rank[0]
    torch.set_rng_state(mine["cpu"])
    if torch.cuda.is_available():
        torch.cuda.set_rng_state_all([mine[f"cuda{i}"] for i in range(torch.cuda.device_count()) if f"cuda{i}" in mine])
