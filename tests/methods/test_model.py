"""load_model on folders transformers cannot load, GGUF files, and the base-model fingerprint.

Nothing downloads: broken folders are hand-written config.json files, the GGUF is written here with
the `gguf` package from a tiny random Llama, and every model is built from a config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import _build_tokenizer
from heft.data import assets
from heft.config.schema import ModelConfig
from heft.errors import ConfigError
from heft.methods.model import fingerprint, fingerprint_differences, load_model

CPU = torch.device("cpu")


def _load(path: Path | str, **kw):
    return load_model(ModelConfig(name_or_path=str(path), **kw), CPU)


def _refusal(path: Path | str, **kw) -> str:
    with pytest.raises(ConfigError) as info:
        _load(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model.name_or_path: ")
    return msg


def _folder(tmp_path: Path, name: str, config: dict | None = None, files: dict[str, bytes] | None = None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for file, data in (files or {}).items():
        (folder / file).write_bytes(data)
    return folder


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HEFT_CACHE", str(tmp_path / "cache"))


# --- folders transformers cannot load ---------------------------------------------------------


def test_unknown_model_type_names_it_and_the_transformers_version(tmp_path):
    import transformers

    folder = _folder(tmp_path, "unknown", {"model_type": "nonexistent-xyz", "hidden_size": 8})
    msg = _refusal(folder)
    assert "model_type 'nonexistent-xyz'" in msg
    assert f"transformers {transformers.__version__} does not know" in msg
    assert "pip install -U transformers" in msg


def test_custom_code_is_refused_until_trusted(tmp_path):
    auto_map = {"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    folder = _folder(tmp_path, "custom", {"model_type": "x-custom", "auto_map": auto_map})
    msg = _refusal(folder)
    assert "needs custom model code" in msg and "'x-custom'" in msg
    assert "set model.trust_remote_code: true only if you trust the code" in msg.lower()
    # Trusted, heft lets transformers try; here the code files are missing, which is still one line.
    assert "needs custom model code" not in _refusal(folder, trust_remote_code=True)


def test_auto_map_on_a_known_model_type_loads_without_trust(tmp_path, tiny_model_dir):
    folder = tmp_path / "llama-with-auto-map"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    model, _ = _load(folder)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_config_without_model_type(tmp_path):
    assert "has no model_type" in _refusal(_folder(tmp_path, "untyped", {"hidden_size": 8}))


def test_empty_folder_says_what_a_model_folder_holds(tmp_path):
    msg = _refusal(_folder(tmp_path, "empty"))
    assert "has no config.json (it holds nothing)" in msg
    for needle in ("tokenizer.json", "*.safetensors", ".gguf"):
        assert needle in msg


def test_folder_with_two_ggufs_asks_which(tmp_path):
    folder = _folder(tmp_path, "two", files={"a.gguf": b"GGUF", "b.gguf": b"GGUF"})
    msg = _refusal(folder)
    assert "2 .gguf files (a.gguf, b.gguf)" in msg and "set model.name_or_path to the .gguf file" in msg


def test_missing_tokenizer_is_one_line(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("tokenizer*"))
    msg = _refusal(folder)
    assert "cannot load the tokenizer" in msg and "tokenizer.json" in msg


def test_missing_weights_suggest_random_init(tmp_path, tiny_model_dir):
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    msg = _refusal(folder)
    assert "model.init: random" in msg
    model, _ = _load(folder, init="random")  # the suggested fix works
    assert model.config.num_hidden_layers == 4


# --- GGUF ------------------------------------------------------------------------------------


def _byte_level_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes, so any text has a token sequence."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def _write_gguf(path: Path, architecture: str = "llama", seed: int = 0):
    """A 2-layer float32 Llama in GGUF as llama.cpp writes it (q/k rows permuted); returns the source model."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = ["<s>", "</s>", "<pad>", *_byte_level_alphabet(), "Ġt", "Ġth"]
    heads, kv_heads = 4, 2
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    sd = {k: v.numpy() for k, v in model.state_dict().items()}

    def permute(w, n):  # inverse of what transformers undoes when reading llama q/k from GGUF
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny")
    w.add_context_length(128), w.add_embedding_length(64), w.add_block_count(2), w.add_feed_forward_length(128)
    w.add_head_count(heads), w.add_head_count_kv(kv_heads), w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default")
    w.add_token_list(tokens), w.add_token_merges(["Ġ t", "Ġt h"])
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_bos_token_id(0), w.add_eos_token_id(1), w.add_pad_token_id(2)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm"}
    for i in range(2):
        hf = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[hf + "self_attn.q_proj.weight"], heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[hf + "self_attn.k_proj.weight"], kv_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[hf + theirs + ".weight"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return model


def test_gguf_file_is_converted_once_and_loads_the_same_weights(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    source = _write_gguf(tmp_path / "tiny.gguf")
    model, tokenizer = _load(tmp_path / "tiny.gguf")
    ids = torch.tensor([[0, 70, 71, 72, 260]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits, atol=1e-5)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    converted = list((tmp_path / "cache" / "models").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("gguf-tiny-")
    assert (converted[0] / "config.json").is_file() and not list(converted[0].rglob("*.gguf"))

    # Again, and through the folder holding it: the cached copy is reused, not rebuilt.
    monkeypatch.setattr(assets, "_convert_gguf", lambda *a: pytest.fail("converted the same GGUF twice"))
    again, _ = _load(tmp_path)
    assert fingerprint(again, tokenizer) == fingerprint(model, tokenizer)

    # A replaced file (new mtime) is converted afresh.
    os.utime(tmp_path / "tiny.gguf", ns=(1, 1))
    with pytest.raises(pytest.fail.Exception, match="converted the same GGUF twice"):
        _load(tmp_path / "tiny.gguf")


def test_gguf_of_an_unsupported_architecture_is_refused(tmp_path):
    pytest.importorskip("gguf")
    _write_gguf(tmp_path / "odd.gguf", architecture="nonexistent-arch")
    msg = _refusal(tmp_path / "odd.gguf")
    assert "cannot convert" in msg and "nonexistent-arch" in msg and "original Hugging Face release" in msg
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == []  # no half-built folder


# --- fingerprint -----------------------------------------------------------------------------


def _same_shape_other_weights(tmp_path: Path, tiny_model_dir: Path) -> Path:
    from transformers import AutoConfig, LlamaForCausalLM

    folder = tmp_path / "other-weights"
    folder.mkdir()
    _build_tokenizer(folder)
    torch.manual_seed(1)
    LlamaForCausalLM(AutoConfig.from_pretrained(tiny_model_dir)).save_pretrained(folder)
    return folder


def test_fingerprint_same_model_twice_and_across_dtypes(tiny_model_dir):
    first = fingerprint(*_load(tiny_model_dir))
    assert set(first) == {"config", "weights", "tokenizer"} and all(len(v) == 64 for v in first.values())
    assert fingerprint(*_load(tiny_model_dir)) == first
    bf16, _ = _load(tiny_model_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert fingerprint(bf16, _load(tiny_model_dir)[1]) == first


def test_fingerprint_tells_other_weights_and_tokenizers_apart(tmp_path, tiny_model_dir):
    base = fingerprint(*_load(tiny_model_dir))
    other = fingerprint(*_load(_same_shape_other_weights(tmp_path, tiny_model_dir)))
    assert fingerprint_differences(base, other) == ["weights"]

    model, tokenizer = _load(tiny_model_dir)
    assert tokenizer.add_tokens(["zebra-crossing"]) == 1
    assert fingerprint_differences(base, fingerprint(model, tokenizer)) == ["tokenizer"]


def test_fingerprint_sees_a_change_in_one_weight_and_in_the_config(tiny_model_dir):
    model, tokenizer = _load(tiny_model_dir)
    base = fingerprint(model, tokenizer)
    with torch.no_grad():
        model.model.norm.weight[5] += 0.5  # 64 elements: all of them are hashed
    model.config.rms_norm_eps = 1e-3
    assert fingerprint_differences(base, fingerprint(model, tokenizer)) == ["config", "weights"]


def test_weights_hash_samples_tensors_larger_than_float32_can_index():
    from heft.methods.model import _weights_hash

    big = torch.nn.Module()
    # 2**24 + 3 rounds up to 2**24 + 4 in float32, one past the end
    big.w = torch.nn.Parameter(torch.zeros(2**24 + 4, dtype=torch.bfloat16), requires_grad=False)
    before = _weights_hash(big)
    with torch.no_grad():
        big.w[-1] = 1.0  # the last elements are always in the sample
    assert _weights_hash(big) != before


def test_fingerprint_of_a_quantized_model_is_unavailable_and_not_compared(tiny_model_dir, monkeypatch):
    model, tokenizer = _load(tiny_model_dir)
    base = fingerprint(model, tokenizer)
    monkeypatch.setattr(model.config, "quantization_config", {"load_in_4bit": True}, raising=False)
    quantized = fingerprint(model, tokenizer)
    assert quantized["weights"] == "unavailable: 4-bit quantized"
    assert quantized["config"] == base["config"]
    assert fingerprint_differences(base, quantized) == []


def test_fingerprint_differences_ignores_parts_an_old_run_did_not_save():
    mine = {"config": "a", "weights": "b", "tokenizer": "c"}
    assert fingerprint_differences({}, mine) == []
    assert fingerprint_differences({"config": "a", "weights": "x"}, mine) == ["weights"]
    assert fingerprint_differences({"tokenizer": "x", "config": "y"}, mine) == ["config", "tokenizer"]
