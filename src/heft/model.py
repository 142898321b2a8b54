"""Loading the base model and tokenizer, and finding its decoder layers on any architecture."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

# Where the decoder-layer list lives, per family (tried in order after unwrapping PEFT).
KNOWN_LAYER_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 2/3 (text), Phi-3
    "model.language_model.layers",  # Gemma 3 multimodal and other *ForConditionalGeneration
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "model.decoder.layers",  # OPT
    "gpt_neox.layers",  # Pythia, GPT-NeoX
    "transformer.blocks",  # MPT
)


def resolve_model_path(name_or_path: str) -> str:
    """An embedded alias -> its cached folder (fetched once); anything else is passed through."""
    from .assets import EMBEDDED_MODELS  # lazy: only the default model needs it

    if name_or_path in EMBEDDED_MODELS:
        return str(EMBEDDED_MODELS[name_or_path]())
    return name_or_path


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _random_model(path: str, cfg: ModelConfig, device: torch.device) -> nn.Module:
    """The architecture in `path`'s config.json with random weights, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    logger.info("model.init: random: building %s from its config with random weights", path)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch_dtype(cfg.dtype, device),
                                                trust_remote_code=cfg.trust_remote_code)


def load_model(cfg: ModelConfig, device: torch.device):
    """(model, tokenizer) with all base weights frozen, in eval mode semantics left to the caller."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    local = Path(path).exists()
    if not local and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ConfigError(f"model.name_or_path: {path!r} is not a folder on this machine; give a local model folder, "
                          "a hub id such as `meta-llama/Llama-2-7b-hf`, or the embedded alias `smollm2-135m`")
    kw: dict = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    if cfg.quantization == "4bit":
        kw["quantization_config"] = _four_bit_config(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        if cfg.init == "random":
            model = _random_model(path, cfg, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg.dtype, device), **kw)
    except OSError as e:
        hint = ("It has a config.json: set model.init: random to build it with random weights"
                if local and (Path(path) / "config.json").is_file() else "Offline? Point it at a local model folder.")
        raise ConfigError(f"model.name_or_path: cannot load {path!r} ({e}). {hint}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    if cfg.quantization == "none":
        model.to(device)  # a quantized model is placed by bitsandbytes and cannot be moved
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    fp32_output_head(model)
    return model, tokenizer


def fp32_output_head(model: nn.Module) -> None:
    """Compute the vocabulary head in fp32 even under bf16 autocast.

    bf16 logits are quantized to ~3 significant digits: on BoolQ that made ` yes` and ` no` tie on
    5-13% of rows and coarsened the loss. heft only computes logits at a few positions
    (`logits_to_keep`), so an fp32 head costs little. Parameters and names are unchanged.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or getattr(head, "_heft_fp32", False):
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return nn.functional.linear(x.float(), head.weight.float(), bias)

    head.forward = forward
    head._heft_fp32 = True


def _four_bit_config(device: torch.device):
    """NF4 weights with bf16 compute, as in QLoRA (Dettmers et al., 2023)."""
    if device.type != "cuda":
        raise ConfigError("model.quantization: 4bit (QLoRA through bitsandbytes) needs a CUDA GPU; this machine runs on "
                          f"{device.type}. Use model.quantization: none on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.quantization: 4bit needs the bitsandbytes package (`pip install bitsandbytes`)") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT wrapper (or the model itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _get_path(root: nn.Module, dotted: str) -> nn.Module | None:
    node = root
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def decoder_layers(model: nn.Module, layers_path: str | None = None) -> nn.ModuleList:
    """The ModuleList of decoder layers of a (possibly PEFT-wrapped) causal LM."""
    base = unwrap(model)
    if layers_path:
        found = _get_path(base, layers_path)
        if not isinstance(found, nn.ModuleList):
            raise ConfigError(f"model.layers_path: {layers_path!r} is not a list of layers on {type(base).__name__} "
                              f"(found {type(found).__name__})")
        return found
    for path in KNOWN_LAYER_PATHS:
        found = _get_path(base, path)
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return found
    # Unknown family: accept the one ModuleList of identical blocks whose length is the configured depth.
    depth = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    candidates = [
        m for m in base.modules()
        if isinstance(m, nn.ModuleList) and len(m) == depth and len({type(c) for c in m}) == 1
    ]
    if depth and len(candidates) == 1:
        return candidates[0]
    lists = [name for name, m in base.named_modules() if isinstance(m, nn.ModuleList)][:6]
    raise ConfigError(
        f"model: cannot find the decoder layers of {type(base).__name__}. Set model.layers_path to the dotted "
        f"path of its list of decoder layers; ModuleLists found: {lists or 'none'}"
    )


def hidden_size(model: nn.Module) -> int:
    cfg = unwrap(model).config
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return int(unwrap(model).get_input_embeddings().weight.shape[1])
