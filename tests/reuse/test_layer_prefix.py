"""Tests for frozen-layer reuse in training (heft.reuse.layer_prefix): when every trained weight sits in decoder layer k or
above (LoRA on upper layers, ReFT editing layer k - 1's output or above), layers 0..k-1 return each row's kept
stream instead of computing it. The loss and every trained gradient equal the full path's within 1e-5 (fp32) on
Llama, Qwen2, Gemma 3 (sliding and global layers) and GPT-2 (absolute positions), kept or recomputed; whole runs give
the same log, adapters and predictions; the full path is taken, with the reason, wherever the bypass would not be
exact."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from heft.config.schema import LoraConfig, PositionsConfig, ReftConfig
from heft.config.load import from_dict
from heft.reuse.layer_prefix import FrozenLayers, lowest_layer, reach
from heft.methods.lora import trainable as lora_trainable
from heft.training.loop import answer_loss
from heft.methods.model import decoder_layers, hidden_size
from heft.methods.reft import ReftModel
from heft.training.runtime import model_forward
from heft.data.tokens import Encoded, train_batch

from conftest import tiny_config
from helpers import CPU, random_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch: str, layers: int = 4) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":  # absolute positions added before the first layer; no dropout (it would be refused)
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    if arch == "gemma3":  # a short window on some layers, so which layer is which kind matters
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **common, head_dim=16, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2)))
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[arch]
    return cls[1](cls[0](**common))


def _rows(n: int = 10, seed: int = 1) -> list[Encoded]:
    rnd = random.Random(seed)
    return [Encoded([rnd.randrange(1, 64) for _ in range(rnd.randrange(3, 20))],
                    tuple([rnd.randrange(1, 64) for _ in range(rnd.randrange(1, 4))] for _ in range(2)),
                    rnd.randrange(2), False) for _ in range(n)]


def _with_reft(model: nn.Module, layers: tuple[int, ...]) -> tuple[ReftModel, list[tuple[str, nn.Parameter]]]:
    """Seeded random LoReFT on `layers` (first 2 + last 2 positions, edits far from zero), the model frozen."""
    model.requires_grad_(False)
    cfg = ReftConfig(rank=2, layers=layers, positions=PositionsConfig(2, 2), init="random")
    reft = ReftModel(model, cfg, decoder_layers(model), hidden_size(model))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(reft.interventions.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return reft.train(), list(reft.interventions.named_parameters())


def _with_lora(model: nn.Module, layers: tuple[int, ...]) -> tuple[nn.Module, list[tuple[str, nn.Parameter]]]:
    """LoRA on `layers` only, its B matrices random (so the update and A's gradients are not zero)."""
    peft_model = random_lora(model, layers).train()
    return peft_model, lora_trainable(peft_model)


def loss_and_grads(model: nn.Module, trained: list[tuple[str, nn.Parameter]], rows: list[Encoded], idx: list[int],
                   layers: FrozenLayers | None) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batch = train_batch([rows[i] for i in idx], 0)
    keep = int(batch.pop("logits_to_keep"))
    if layers is None:
        loss = answer_loss(model_forward(model, batch, keep), batch["targets"])
        loss.backward()
    else:
        with layers.bypass(idx, batch["input_ids"].shape[1]):
            loss = answer_loss(model_forward(model, batch, keep), batch["targets"])
            loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in trained}


def assert_same(model: nn.Module, trained: list[tuple[str, nn.Parameter]], rows: list[Encoded], k: int,
                batches: list[list[int]]) -> FrozenLayers:
    assert lowest_layer(model, trained) == (k, None)
    kept = FrozenLayers(model, k, rows, 0, CPU, keep=True, budget_gb=1.0, desc="test")
    again = FrozenLayers(model, k, rows, 0, CPU, keep=False, budget_gb=0.0, desc="test")
    first = train_batch([rows[i] for i in batches[0]], 0)
    assert kept.check(batches[0], first, int(first.pop("logits_to_keep"))) is None and model.training
    # the bypassed layers' insides never run once the streams are kept
    calls = []
    inner = kept.layers[0]
    probe = next(m for m in inner.modules() if m is not inner and not list(m.children()))
    handle = probe.register_forward_hook(lambda *a: calls.append(1))
    biggest = 0.0
    try:
        for rnd in range(2):  # the second round reads the kept streams back
            for idx in batches:
                loss, grads = loss_and_grads(model, trained, rows, idx, None)
                calls.clear()
                for layers in (kept, again):
                    got_loss, got_grads = loss_and_grads(model, trained, rows, idx, layers)
                    assert got_loss == pytest.approx(loss, abs=1e-5), idx
                    for n, g in grads.items():
                        assert torch.allclose(got_grads[n], g, atol=1e-5, rtol=1e-4), (n, idx, (got_grads[n] - g).abs().max())
                    if layers is kept and rnd == 1:
                        assert not calls, "a bypassed layer computed"
                biggest = max([biggest] + [float(g.abs().max()) for g in grads.values()])
    finally:
        handle.remove()
    assert biggest > 1e-3  # real gradients, not zeros
    assert len(kept.store) == len(rows) and not again.store
    assert all("forward" not in layer.__dict__ for layer in kept.layers)  # every bypass undone
    return kept


BATCHES = [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [1, 8], [9]]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "gpt2"])
@pytest.mark.parametrize("setup", ["lora-upper", "reft-upper"])
def test_loss_and_gradients_equal_the_full_path(arch, setup):
    """LoRA on layers 2 and 3: layers 0-1 bypassed; ReFT on layers 1 and 3: layers 0-1 bypassed, and layer 1's edit
    lands on the kept stream."""
    model = _model(arch)
    if setup == "lora-upper":
        model, trained = _with_lora(model, (2, 3))
    else:
        model, trained = _with_reft(model, (1, 3))
    assert_same(model, trained, _rows(), 2, BATCHES)


def test_reft_on_every_layer_bypasses_the_first():
    """The default ReFT (every layer edited): layer 0 computes what it always did; only its output is edited."""
    reft, trained = _with_reft(_model("llama"), (0, 1, 2, 3))
    assert_same(reft, trained, _rows(), 1, BATCHES)


def test_reft_on_the_last_layer_only():
    """The stream entering the last layer is kept; that layer runs, unedited, and its output is edited."""
    reft, trained = _with_reft(_model("qwen2"), (3,))
    assert_same(reft, trained, _rows(), 3, BATCHES)


def test_gradient_checkpointing():
    """A checkpointed layer reruns its forward in the backward: the bypass holds until the backward is done."""
    model = _model("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, trained = _with_lora(model, (2, 3))
    assert_same(model, trained, _rows(), 2, BATCHES)


def test_the_budget_keeps_what_fits():
    """The kept rows are fixed up front (the shortest that fit, in fixed groups); the others' streams are computed in
    each batch that holds them, and the loss is the full path's either way."""
    reft, trained = _with_reft(_model("llama"), (2,))
    rows = _rows(40)
    one = FrozenLayers(reft, 3, rows, 0, CPU, keep=True, budget_gb=1.0, desc="t")
    with one.bypass([0], 30):
        pass
    lengths = one.store.lengths
    per_token = one.store.bytes // sum(lengths[i] for i in one.store)
    order = [i for g in one.groups for i in g]
    budget = per_token * sum(lengths[i] for i in order[:20])
    layers = FrozenLayers(reft, 3, rows, 0, CPU, keep=True, budget_gb=budget / 1e9, desc="t")
    for idx in ([0, 1, 2], [3, 4, 5], list(range(6, 40))):
        loss, _ = loss_and_grads(reft, trained, rows, idx, layers)
        full, _ = loss_and_grads(reft, trained, rows, idx, None)
        assert loss == pytest.approx(full, abs=1e-5)
    assert layers.store.full and layers.store.kept == set(order[:20]) and layers.store.keys() == set(order[:20])
    assert layers.store.bytes <= budget


def test_kept_streams_do_not_depend_on_the_batch_that_asked_first():
    """Streams are captured in fixed groups of rows, so a resumed run reads the very same numbers."""
    reft, _ = _with_reft(_model("llama"), (2,))
    rows = _rows(40)
    a = FrozenLayers(reft, 3, rows, 0, CPU, keep=True, budget_gb=1.0, desc="t")
    b = FrozenLayers(reft, 3, rows, 0, CPU, keep=True, budget_gb=1.0, desc="t")
    for idx in ([0, 1, 2], list(range(3, 40))):
        with a.bypass(idx, 30):
            pass
    for idx in ([39, 7], list(range(40))):
        with b.bypass(idx, 30):
            pass
    assert a.store.keys() == b.store.keys() == set(range(40))
    assert all(torch.equal(a.store[i], b.store[i]) for i in range(40))


# ----------------------------------------------------------------------------- when every layer runs


def test_reasons_the_shape_rules_it_out():
    model = _model("llama")
    lora, trained = _with_lora(model, (0, 3))
    assert lowest_layer(lora, trained) == (0, "the lowest decoder layer is adapted")
    head = next(p for n, p in lora.named_parameters() if n.endswith("lm_head.weight"))
    k, why = lowest_layer(_model("llama"), [("lm_head.weight", head)])
    assert k == 0 and "outside the decoder layers (lm_head.weight)" in why
    reft, trained = _with_reft(_model("llama"), (2, 3))
    assert lowest_layer(reft, trained) == (3, None)
    assert reach(reft, trained)[0] == 3
    reft, trained = _with_reft(_model("llama"), (3,))
    assert lowest_layer(reft, trained) == (3, None) and reach(reft, trained)[0] == 4  # the backward: the head only


def test_a_failed_check_says_why():
    reft, trained = _with_reft(_model("llama"), (2,))
    rows = _rows()
    layers = FrozenLayers(reft, 3, rows, 0, CPU, keep=True, budget_gb=1.0, desc="t")
    capture = layers.capture
    layers.capture = lambda idx: {i: h + 1.0 for i, h in capture(idx).items()}  # as if a layer passed more on
    batch = train_batch([rows[i] for i in (0, 1)], 0)
    why = layers.check([0, 1], batch, int(batch.pop("logits_to_keep")))
    assert why is not None and "changed the logits" in why


def test_the_check_passes_under_bf16():
    """Under bf16 autocast a stream kept from a differently padded group rounds differently; the check uses the
    batch's own streams, so it tests the bypass, not the rounding."""
    from heft.training.runtime import Runtime

    reft, _ = _with_reft(_model("llama"), (2,))
    rows = _rows(40)
    layers = FrozenLayers(reft, 3, rows, 0, Runtime(torch.device("cpu"), bf16=True), keep=True, budget_gb=1.0, desc="t")
    with layers.bypass(list(range(40)), 30):  # every row kept, captured in groups of 16
        pass
    batch = train_batch([rows[i] for i in (5, 17, 33)], 0)
    assert layers.check([5, 17, 33], batch, int(batch.pop("logits_to_keep"))) is None


# ----------------------------------------------------------------------------- lora.layers


def test_lora_layers_adapts_only_those(tiny_model_dir, boolq_files):
    from heft.errors import ConfigError
    from heft.methods.lora import layer_targets

    lora, _ = _with_lora(_model("llama"), (1, 3))
    adapted = {(int(n.split("layers.")[1].split(".")[0]), n.split(".")[-4])
               for n, _ in lora.named_parameters() if "lora_A" in n}
    assert {i for i, _ in adapted} == {1, 3} and len(adapted) == 2 * 7  # q k v o gate up down in each
    picked = layer_targets(_model("llama"), LoraConfig(layers=(2,), target_modules=("q_proj", "mlp.down_proj")))
    assert picked == ["model.layers.2.self_attn.q_proj", "model.layers.2.mlp.down_proj"]
    for bad, said in (([], "lora.layers: an empty list"), ([1, 1], "duplicate"), ([-1], ">= 0")):
        with pytest.raises(ConfigError, match=said):
            from_dict(tiny_config(tiny_model_dir, boolq_files, [{"method": "lora"}], lora={"layers": bad}))
    with pytest.raises(ConfigError, match=r"lora.layers: \[9\] out of range; the model has 4 decoder layers"):
        layer_targets(_model("llama"), LoraConfig(layers=(2, 9)))
    with pytest.raises(ConfigError, match="cannot be combined with the pattern"):
        layer_targets(_model("llama"), LoraConfig(layers=(2,), target_modules=".*proj"))
    with pytest.raises(ConfigError, match="no linear layer named"):
        layer_targets(_model("llama"), LoraConfig(layers=(2,), target_modules=("c_attn",)))


# ----------------------------------------------------------------------------- whole runs


def _run(tiny_model_dir: Path, boolq_files, out: Path, stages: list[dict], mode: str, **extra: Any) -> dict[str, Any]:
    from heft.run.pipeline import train_run

    cfg = from_dict(tiny_config(tiny_model_dir, boolq_files, stages, frozen_prefix=mode, seed=2, **extra))
    train_run(cfg, out)
    got: dict[str, Any] = {"p_yes": torch.tensor([json.loads(x)["p_yes"]
                                                  for x in (out / "predictions.jsonl").read_text().splitlines()])}
    for d in sorted((out / "stages").iterdir()):
        log = [json.loads(x) for x in (d / "train_log.jsonl").read_text().splitlines()]
        got[d.name] = {"loss": torch.tensor([r["loss"] for r in log]), "norm": torch.tensor([r["grad_norm"] for r in log])}
        files = list(d.glob("reft.safetensors")) + list(d.glob("adapter/adapter_model.safetensors"))
        got[d.name]["weights"] = load_file(str(files[0]))
    return got


@pytest.mark.parametrize("strategy", ["lora", "reft", "heft"])
def test_training_runs_equal_the_full_path(tiny_model_dir, boolq_files, tmp_path, caplog, strategy):
    """LoRA on layers 2-3 (with its dropout, drawn in the same order), ReFT on layers 1-3, and HEFT (both, merged):
    the same per-step losses and gradient norms, adapters and predictions with the lower layers bypassed."""
    # lr 1e-2: at 5e-2 this tiny model's LoRA training is chaotic (Adam's first steps turn a 1e-7 rounding difference
    # into 1e-2 in the loss within four steps), whichever path runs
    lora = {"method": "lora", "epochs": 2, "lr": 1e-2, "batch_size": 4}
    reft = {"method": "reft", "epochs": 2, "lr": 1e-2, "batch_size": 4}
    stages = {"lora": [lora], "reft": [reft], "heft": [lora, reft]}[strategy]
    extra = {"lora": {"layers": [2, 3], "dropout": 0.1}, "reft": {"layers": [1, 2, 3]}}
    got = {}
    for mode in ("off", "cache", "recompute"):
        with caplog.at_level(logging.INFO, logger="heft.reuse"):
            caplog.clear()
            got[mode] = _run(tiny_model_dir, boolq_files, tmp_path / mode, stages, mode, **extra)
        said = caplog.text
        assert ("decoder layers 0..1 of 4 are frozen and unedited" in said) == (mode != "off"), said
        assert "not taken" not in said
    for mode in ("cache", "recompute"):
        for stage in (k for k in got["off"] if k != "p_yes"):
            want, have = got["off"][stage], got[mode][stage]
            assert torch.allclose(have["loss"], want["loss"], atol=1e-5), (mode, stage, have["loss"], want["loss"])
            assert torch.allclose(have["norm"], want["norm"], atol=1e-5, rtol=1e-5)
            for k, v in want["weights"].items():
                assert torch.allclose(have["weights"][k], v, atol=1e-5), (stage, k)
            assert want["loss"][0] != want["loss"][-1]  # it trained
        assert torch.allclose(got[mode]["p_yes"], got["off"]["p_yes"], atol=1e-5)


def test_a_failed_check_takes_the_full_path(tiny_model_dir, boolq_files, tmp_path, caplog, monkeypatch):
    """The check runs on the stage's first batch, before any step; a failure is said once, at INFO."""
    import heft.reuse.layer_prefix

    stages = [{"method": "reft", "epochs": 1, "lr": 2e-2, "batch_size": 4}]
    expected = _run(tiny_model_dir, boolq_files, tmp_path / "off", stages, "off", reft={"layers": [2, 3]})
    monkeypatch.setattr(heft.reuse.layer_prefix.FrozenLayers, "check", lambda self, idx, batch, keep: "a reason")
    with caplog.at_level(logging.INFO, logger="heft.reuse"):
        got = _run(tiny_model_dir, boolq_files, tmp_path / "fallback", stages, "cache", reft={"layers": [2, 3]})
    assert "layer prefix not taken: a reason" in caplog.text
    assert "full path, every token and layer forward and backward" in caplog.text
    assert torch.allclose(got["00-reft"]["loss"], expected["00-reft"]["loss"], atol=1e-5)
