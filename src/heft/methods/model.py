"""Loading the base model and tokenizer, and finding its decoder layers on any architecture."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from heft.config.schema import ModelConfig
from heft.errors import ConfigError

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
    from heft.data.assets import EMBEDDED_MODELS  # lazy: only the default model needs it

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
    """(model, tokenizer) with all base weights frozen, in eval mode semantics left to the caller.

    A local `.gguf` file (or a folder holding one and no config.json) is dequantized once into
    heft's cache and loaded from there. Whatever transformers cannot load becomes one ConfigError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(cfg.name_or_path)
    local = Path(path).expanduser().exists()
    if not local and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ConfigError(f"model.name_or_path: {path!r} is not a folder on this machine; give a local model folder, "
                          "a hub id such as `meta-llama/Llama-2-7b-hf`, or an embedded alias (`smollm2-135m`, `gemma3-270m`)")
    if local:
        path = str(_local_model_folder(Path(path).expanduser(), cfg))
    kw: dict = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.name_or_path: cannot load the tokenizer of {path!r} ({_first_line(e)}). "
                          + _load_hint(e, path, local, tokenizer=True)) from None
    if cfg.quantization == "4bit":
        kw["quantization_config"] = _four_bit_config(device)
    try:
        if cfg.init == "random":
            model = _random_model(path, cfg, device)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(cfg.dtype, device), **kw)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model.name_or_path: cannot load {path!r} ({_first_line(e)}). "
                          + _load_hint(e, path, local, tokenizer=False)) from None
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
    if cfg.compile:
        compile_layers(model, cfg.layers_path)
    return model, tokenizer


def compile_layers(model: nn.Module, layers_path: str | None = None) -> None:
    """`torch.compile` every decoder layer in place, with dynamic shapes (batches differ in length). Lazy: each
    layer compiles on its first call, so adapters attached or merged later are traced as they are then (a change
    after that recompiles). Hooks on a layer (ReFT's) run inside its compiled call."""
    for layer in decoder_layers(model, layers_path):
        layer.compile(dynamic=True)


_FOLDER_FILES = ("config.json, tokenizer files (tokenizer.json, or tokenizer.model with tokenizer_config.json) and "
                 "weights (*.safetensors or pytorch_model.bin)")


def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0].strip()


def _load_hint(e: BaseException, path: str, local: bool, tokenizer: bool) -> str:
    """The fix to suggest after transformers failed to load `path`."""
    if "trust_remote_code" in str(e):
        return ("It ships its own Python code: set model.trust_remote_code: true only if you trust the code in "
                f"{path!r}")
    if not local:
        return "Offline? Point it at a local model folder."
    if not tokenizer and isinstance(e, OSError) and (Path(path) / "config.json").is_file():
        return ("It has a config.json: add its weights (*.safetensors), or set model.init: random to build it with "
                "random weights")
    return f"A Hugging Face model folder holds {_FOLDER_FILES}."


def _local_model_folder(path: Path, cfg: ModelConfig) -> Path:
    """The Hugging Face folder to load for a local `path`, refusing in one line what transformers would
    fail on with a traceback. A GGUF file, or a folder with exactly one and no config.json, is converted
    once into heft's cache (see `assets.gguf_model_dir`)."""
    import json

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    field = "model.name_or_path"
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _gguf_folder(path)
        raise ConfigError(f"{field}: {str(path)!r} is a file; give a model folder (holding {_FOLDER_FILES}) "
                          "or a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_folder(ggufs[0])
        if ggufs:
            raise ConfigError(f"{field}: {str(path)!r} holds {len(ggufs)} .gguf files "
                              f"({', '.join(g.name for g in ggufs[:4])}) and no config.json; set {field} to "
                              "the .gguf file to use")
        held = sorted(p.name for p in path.iterdir())
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "") if held else "nothing"
        raise ConfigError(f"{field}: {str(path)!r} is not a Hugging Face model folder: it has no config.json "
                          f"(it holds {shown}). A model folder holds {_FOLDER_FILES}; a single .gguf file also works")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: cannot read {config_file} ({_first_line(e)}); it must be a JSON object") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{field}: {config_file} holds a {type(config).__name__}, not a JSON object")
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return path  # transformers uses its own code for a known model_type, even when there is an auto_map
    if config.get("auto_map"):
        if not cfg.trust_remote_code:
            raise ConfigError(
                f"{field}: {str(path)!r} needs custom model code: its config.json has model_type {model_type!r} and "
                "an auto_map to Python files in that folder, which transformers runs only when allowed. Set "
                "model.trust_remote_code: true only if you trust the code in that folder")
        return path
    if model_type is None:
        raise ConfigError(f"{field}: {config_file} has no model_type; add the architecture's model_type "
                          "(e.g. \"llama\") or use the folder as saved by `save_pretrained`")
    raise ConfigError(f"{field}: {config_file} has model_type {model_type!r}, which transformers "
                      f"{transformers.__version__} does not know. If the model is newer than this version, upgrade "
                      "transformers (`pip install -U transformers`); otherwise correct model_type")


def _gguf_folder(gguf_path: Path) -> Path:
    from heft.data.assets import gguf_model_dir
    from heft.errors import AssetError

    try:
        return gguf_model_dir(gguf_path)
    except AssetError as e:
        raise ConfigError(f"model.name_or_path: {e}") from None


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


def check_layer_ids(field: str, layer_ids: list[int], num_layers: int) -> list[int]:
    """`layer_ids` sorted, after checking them against the model's depth (`field` names the config field)."""
    bad = [i for i in layer_ids if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{field}: {bad} out of range; the model has {num_layers} decoder layers (0..{num_layers - 1})")
    return sorted(layer_ids)


def hidden_size(model: nn.Module) -> int:
    cfg = unwrap(model).config
    cfg = getattr(cfg, "text_config", None) or cfg
    for key in ("hidden_size", "n_embd", "d_model"):
        if getattr(cfg, key, None):
            return int(getattr(cfg, key))
    return int(unwrap(model).get_input_embeddings().weight.shape[1])


# --- base-model fingerprint -----------------------------------------------------------------

# Config keys that change with how a model was loaded or saved, not with what it computes: the
# dtype (weights are compared dtype-independently below), caching, the class list, and the path
# and transformers version written by save_pretrained. Keys starting with "_" are dropped too.
_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "dtype", "torch_dtype", "use_cache", "architectures", "quantization_config",
    "attn_implementation", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
})
_SAMPLES_PER_TENSOR = 1024  # evenly strided elements hashed per tensor, plus the first and last _ENDS
_ENDS = 8


def fingerprint(model: nn.Module, tokenizer) -> dict[str, str]:
    """Hashes identifying a freshly loaded base model, to check on reload that adapters meet the same base.

    `config`: sha256 of the config's JSON (sorted keys) without `_VOLATILE_CONFIG_KEYS` and private
    `_` keys, at every nesting level. `weights`: sha256 over every state_dict tensor in name order
    of its name, shape and a fixed sample of values (about 1,040 per tensor), floats rounded to
    bfloat16, so float32 and bfloat16 loads of one checkpoint agree (a float16 load can differ, by
    double rounding); the cost does not grow with tensor size (milliseconds for a 7B model's ~300
    tensors). A 4-bit quantized model gives "unavailable: 4-bit quantized". `tokenizer`: sha256 of
    the vocabulary, the bos/eos/pad/unk tokens and ids, `add_bos_token` and the chat template.
    Compute it on the plain model before adapters are attached.
    """
    base = unwrap(model)
    config = _strip_volatile(base.config.to_dict())
    return {
        "config": _sha256_json(config),
        "weights": _weights_hash(base),
        "tokenizer": _tokenizer_hash(tokenizer),
    }


def fingerprint_differences(saved: dict, mine: dict) -> list[str]:
    """Names of the parts (`config`, `weights`, `tokenizer`) whose hashes differ, in sorted order.

    A part missing from `saved` (a run folder written before that part existed) is not compared,
    nor one that either side could not compute ("unavailable: ...").
    """
    def usable(value) -> bool:
        return isinstance(value, str) and not value.startswith("unavailable")

    return sorted(k for k in saved if k in mine and usable(saved[k]) and usable(mine[k]) and saved[k] != mine[k])


def _strip_volatile(value):
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items()
                if k not in _VOLATILE_CONFIG_KEYS and not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_strip_volatile(v) for v in value]
    return value


def _sha256_json(value) -> str:
    import hashlib
    import json

    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _weights_hash(model: nn.Module) -> str:
    import hashlib

    quantized = getattr(getattr(model, "config", None), "quantization_config", None) is not None
    if quantized or getattr(model, "is_quantized", False):
        return "unavailable: 4-bit quantized"
    digest = hashlib.sha256()
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name].detach()
            flat = tensor.reshape(-1)
            n = flat.numel()
            if n <= _SAMPLES_PER_TENSOR + 2 * _ENDS:
                sample = flat
            else:
                # integer strides: a float linspace rounds past the last index once n > 2**24
                strided = torch.arange(_SAMPLES_PER_TENSOR) * (n - 1) // (_SAMPLES_PER_TENSOR - 1)
                idx = torch.cat([torch.arange(_ENDS), strided, torch.arange(n - _ENDS, n)]).to(flat.device)
                sample = flat.index_select(0, idx)
            if sample.is_floating_point():
                data = sample.to(torch.bfloat16).view(torch.int16)  # same bits from a float32 or bfloat16 load
            else:
                data = sample.to(torch.int64)
            digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
            digest.update(data.cpu().numpy().tobytes())
    return digest.hexdigest()


def _tokenizer_hash(tokenizer) -> str:
    parts = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: [getattr(tokenizer, f"{k}_token", None), getattr(tokenizer, f"{k}_token_id", None)]
                    for k in ("bos", "eos", "pad", "unk")},
        "add_bos_token": getattr(tokenizer, "add_bos_token", None),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return _sha256_json(parts)
