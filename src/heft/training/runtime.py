"""Where a run executes: the accelerate `Accelerator`, heft's precision, the forward helper, and the one
main-process check. Training and evaluation both take a `Runtime`; neither imports the other.

heft keeps accelerate itself at `mixed_precision="no"` and applies bf16 autocast on its own
(`Runtime.autocast`): accelerate's precision is process-wide state that cannot change between two
runs in one process (a `heft run` suite trains several), while heft's is a field of each Runtime.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from heft.training import sharding
from heft.errors import ConfigError

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True on the process that writes files and prints results: rank 0 under torchrun / accelerate launch
    (both set RANK), and the only process otherwise. Usable before any Accelerator exists."""
    return int(os.environ.get("RANK", "0")) == 0


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


@dataclass
class Runtime:
    """An accelerator (or None: one plain process on `device`) and whether forward passes run in bf16."""

    device: torch.device
    bf16: bool = False
    accelerator: Any = None

    @property
    def main(self) -> bool:
        return is_main_process()

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    def autocast(self) -> Any:
        """bf16 autocast when the run asked for it, else nothing."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def wait(self) -> None:
        """Every process reaches this point before any goes on (a no-op in one process)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every process's `items`, concatenated (in one process: `items`)."""
        if self.num_processes == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    @property
    def distributed(self) -> str:
        """accelerate's name for the engine: NO, MULTI_CPU / MULTI_GPU (DDP), FSDP, ..."""
        return self.accelerator.distributed_type.value if self.accelerator is not None else "NO"


def make_runtime(precision: str) -> Runtime:
    """The Runtime for this process: accelerate's Accelerator (DDP / FSDP2 under a launcher)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise ConfigError("DeepSpeed is not supported: its ZeRO optimizer replaces the adapter parameters with flat "
                          "partitions and runs its own gradient accumulation, which heft's exact checkpoints and "
                          "global-batch arithmetic do not follow; launch with configs/accelerate/fsdp.yaml to shard "
                          "the model (for adapters, the frozen weights are what needs sharding) or configs/accelerate/ddp.yaml")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    acc = Accelerator(mixed_precision="no", cpu=device.type == "cpu")
    if acc.distributed_type == DistributedType.FSDP and not acc.is_fsdp2:
        raise ConfigError("FSDP version 1 is not supported: heft shards with FSDP2 (per-parameter DTensors); set "
                          "fsdp_config.fsdp_version: 2 in the accelerate config (see configs/accelerate/fsdp.yaml)")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        logger.warning("the accelerate config asks for FSDP, but accelerate runs %s on %s (it shards with FSDP on GPUs "
                       "only): training is data parallel, with the whole model on every process",
                       acc.distributed_type.value, device.type)
    return Runtime(acc.device, use_bf16(precision, acc.device), acc)


def model_forward(model: nn.Module, batch: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
    """Logits (B, keep, V) of the last `keep` positions; ReFT models also get the prompt positions."""
    kwargs: dict[str, Any] = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                                  logits_to_keep=keep, use_cache=False)
    inner = getattr(model, "module", model)  # DDP wraps the model in `.module`
    if hasattr(inner, "interventions"):
        kwargs.update(prompt_start=batch["prompt_start"], prompt_len=batch["prompt_len"])
    return model(input_ids=batch["input_ids"], **kwargs).logits


def share_rows(order: list[int], model: nn.Module, rt: Runtime) -> tuple[list[int], int]:
    """This process's rows (every num_processes-th of `order`) and how many of them are its own.

    Under FSDP every forward pass is a collective, so every process must run the same number: the
    shorter shares are padded with a row another process scores, whose result is dropped."""
    world = rt.num_processes
    mine = order[rt.process_index::world]
    real = len(mine)
    if world > 1 and sharding.is_sharded(model) and order:
        mine = mine + [order[0]] * (-(-len(order) // world) - real)
    return mine, real


def gather_rows(out: list[dict[str, Any] | None], rt: Runtime) -> list[dict[str, Any]]:
    """Merge every process's share of the rows; each row is scored by exactly one process."""
    for i, pred in rt.gather_objects([(i, p) for i, p in enumerate(out) if p is not None]):
        out[i] = pred
    assert all(p is not None for p in out), "a row was scored by no process"
    return out  # type: ignore[return-value]
