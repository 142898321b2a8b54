"""Full tensors from sharded ones: what heft needs to save, consolidate and resume under FSDP.

Under FSDP2 (`accelerate launch` with `configs/accelerate/fsdp.yaml`), accelerate's `prepare` shards
the model in place: every parameter is replaced by a `DTensor` holding 1/N of it on each process.
heft's files (PEFT adapters, `reft.safetensors`, checkpoints) always hold full tensors, so they load
on any number of processes, with or without FSDP. Reading a full tensor from a sharded one is a
collective: every process calls these functions on the same tensors in the same order, and then only
the main process writes. Without FSDP every function here is a plain pass-through.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

try:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support: nothing can be sharded
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def is_sharded(model: nn.Module) -> bool:
    """True when FSDP has sharded (part of) `model`: its forward passes are then collectives."""
    return FSDPModule is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model: nn.Module) -> None:
    """Put every FSDP unit of `model` back into its sharded state, so its registered parameters are
    the sharded `DTensor`s the optimizer updates (the root unit stays gathered after a forward pass)."""
    if FSDPModule is None:
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


@contextlib.contextmanager
def root_gathered(model: nn.Module) -> Iterator[None]:
    """Keep the root FSDP unit's parameters gathered, for calls that bypass its forward (e.g. `generate`
    on the wrapped model), whose pre-forward hook would gather them; the child units gather their own."""
    root = model if FSDPModule is not None and isinstance(model, FSDPModule) else None
    if root is None:
        yield
        return
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


def local_share(model: nn.Module) -> float:
    """The fraction of `model`'s parameter elements this process holds (1.0 unless sharded)."""
    total = held = 0
    for p in model.parameters():
        total += p.numel()
        held += p.to_local().numel() if is_dtensor(p) else p.numel()
    return held / max(1, total)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one), detached."""
    return t.full_tensor().detach() if is_dtensor(t) else t.detach()


def full_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: whole tensor on CPU, contiguous}; a collective when any tensor is sharded."""
    return {k: full(v).cpu().contiguous() for k, v in tensors.items()}


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into `param`, sharded or not (every process passes the same value)."""
    if is_dtensor(param):
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    param.copy_(value)


def rebind(trainable: list[tuple[str, nn.Parameter]], names: dict[int, str], model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable list pointed at `model`'s current parameters after `accelerator.prepare`.

    `names` maps id(parameter) -> its name in `model`, taken before `prepare`; FSDP2 keeps the names
    but swaps the parameter objects, DDP keeps both.
    """
    live = dict(model.named_parameters())
    return [(label, live[names[id(p)]]) for label, p in trainable]


def optimizer_state_full(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` with every sharded state tensor made whole (a collective under FSDP)."""
    sd = optimizer.state_dict()
    for key in sorted(sd["state"]):  # the same order on every process
        sd["state"][key] = {k: full(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in sd["state"][key].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a state written by `optimizer_state_full`, re-sharding state tensors like their parameters."""
    optimizer.load_state_dict(sd)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not is_dtensor(p) or p not in optimizer.state:
                continue
            state = optimizer.state[p]
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and not is_dtensor(v) and v.shape == p.shape:
                    state[k] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
