"""The coarse, weight-space stage: LoRA through Hugging Face PEFT.

LoRA (Hu et al., 2021, arXiv 2106.09685) learns W + (alpha / r) B A for chosen linear layers, with
A: (r, in) and B: (out, r), B starting at zero. heft delegates the layers to PEFT (rsLoRA and DoRA
included), saves the adapter in PEFT's own format (`adapter_config.json` +
`adapter_model.safetensors`, loadable by `peft.PeftModel.from_pretrained`), and afterwards either
merges it into the weights or keeps it as a frozen adapter for the next stage.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from heft.run import atomic
from heft.training import sharding
from heft.config.schema import LoraConfig
from heft.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT calls a transformers API deprecated in v5 (`is_gradient_checkpointing`): not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def peft_config(cfg: LoraConfig, targets: str | list[str] | None = None):
    from peft import LoraConfig as PeftLoraConfig

    if targets is None:
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
        use_rslora=cfg.use_rslora, use_dora=cfg.use_dora, task_type="CAUSAL_LM", bias="none",
    )


def layer_targets(model: nn.Module, cfg: LoraConfig, layers_path: str | None = None) -> list[str]:
    """The full names of the linear layers `lora.layers` adapts: inside those decoder layers, matching
    `lora.target_modules` (`all-linear`, or names matched as PEFT matches them: the name or its last parts). PEFT's
    own `layers_to_transform` refuses `all-linear`, so heft names the modules itself."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    from heft.methods.model import check_layer_ids, decoder_layers

    layers = decoder_layers(model, layers_path)
    ids = check_layer_ids("lora.layers", list(cfg.layers), len(layers))
    if isinstance(cfg.target_modules, str) and cfg.target_modules != "all-linear":
        raise ConfigError(f"lora.layers: cannot be combined with the pattern lora.target_modules={cfg.target_modules!r}; "
                          "list the module names (e.g. [q_proj, v_proj]) or use `all-linear`")
    wanted = None if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    full = {id(m): n for n, m in model.named_modules()}
    names = [full[id(m)] for i in ids for sub, m in layers[i].named_modules()
             if isinstance(m, (nn.Linear, Conv1D))
             and (wanted is None or any(sub == t or sub.endswith("." + t) for t in wanted))]
    if not names:
        raise ConfigError(f"lora.layers: no linear layer named {wanted} in decoder layers {ids}")
    return names


def attach(model: nn.Module, cfg: LoraConfig, layers_path: str | None = None) -> nn.Module:
    """Wrap `model` with a fresh, trainable LoRA adapter (PEFT `PeftModel`), on `lora.layers` only if set."""
    from peft import get_peft_model

    targets = None if cfg.layers == "all" else layer_targets(model, cfg, layers_path)
    try:
        with _quiet_peft():
            return get_peft_model(model, peft_config(cfg, targets))
    except ValueError as e:  # PEFT says which target modules it could not find
        raise ConfigError(f"lora.target_modules: {e}. Use `all-linear` or names of linear layers in this model") from None


def trainable(peft_model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter's parameters: what PEFT left trainable when it attached the adapter to the frozen model."""
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def adapter_tensors(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable adapter's entries of the model's state dict, whole (a collective when FSDP has sharded
    the model), for `save(..., tensors=)`: PEFT's `save_pretrained` selects and renames them itself."""
    sharding.reshard(peft_model)
    names = {n for n, _ in trainable(peft_model)}
    return sharding.full_cpu({k: v for k, v in peft_model.state_dict().items() if k in names})


def save(peft_model: nn.Module, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Save only the adapter, in PEFT's format, atomically (a crash leaves the old folder or the new one).

    Under FSDP every process calls `adapter_tensors` and passes its result here on the main process.
    """
    with atomic.atomic_dir(folder) as tmp:
        if tensors is None:
            peft_model.save_pretrained(str(tmp))
        else:
            peft_model.save_pretrained(str(tmp), state_dict=tensors)


def load(model: nn.Module, folder: Path, merge: bool) -> nn.Module:
    """Put a saved adapter on `model`: merged into the weights, or as a frozen PEFT adapter."""
    from peft import PeftModel

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; {folder} does not hold a LoRA adapter")
    try:
        with _quiet_peft():
            wrapped = PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except Exception as e:  # PEFT/safetensors raise many types for mismatched or corrupt files
        raise CheckpointError(f"{folder}: cannot load the LoRA adapter onto this base model ({type(e).__name__}: {e})") from None
    if merge:
        return wrapped.merge_and_unload()
    wrapped.requires_grad_(False)
    return wrapped


def finish(peft_model: nn.Module, merge: bool) -> nn.Module:
    """After training a LoRA stage: merge it (returns the plain model) or freeze it in place."""
    if merge:
        return peft_model.merge_and_unload()
    peft_model.requires_grad_(False)
    return peft_model
