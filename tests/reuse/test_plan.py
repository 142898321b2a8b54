"""Tests for the choice of a stage's path (heft.reuse.plan): chosen once, before the first step, from the stage's
shape and the model; the reasons a path fitting the stage is not taken said at INFO (OPT's functional dropout,
GPT-2's dropout modules, FSDP, compiled layers), the usual ones at DEBUG; one call per step whatever was chosen,
with the same loss and gradients as the full path, and the same random stream (models that draw random numbers
in training mode, such as OPT, with dropout in the adapters)."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from torch import nn

from heft.config.schema import PositionsConfig, ReftConfig
from heft.data.tokens import Encoded
from heft.methods.lora import trainable as lora_trainable
from heft.methods.model import decoder_layers, hidden_size
from heft.methods.reft import ReftModel
from heft.reuse import plan as reuse
from heft.reuse.plan import FullPath, declared_dropout, differs_in_training
from heft.training.loop import answer_loss

from helpers import CPU, random_lora

pytestmark = pytest.mark.usefixtures("one_thread")


def _opt(dropout: float) -> nn.Module:
    """A tiny OPT: `config.dropout` is applied with nn.functional.dropout (no module), and its decoder draws a
    random number per layer in training mode (layerdrop), whatever the dropout."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                                          num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                                          dropout=dropout, attention_dropout=0.0, layerdrop=0.0, pad_token_id=0))


def _gpt2(**dropout: float) -> nn.Module:
    """A tiny GPT-2 with its real dropout settings (0.1 on embeddings, residuals and attention) unless overridden."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=4, n_head=2, n_positions=64, **dropout))


def _llama() -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                              pad_token_id=0))


def _rows(n: int = 12, seed: int = 1) -> list[Encoded]:
    rnd = random.Random(seed)
    return [Encoded([rnd.randrange(1, 64) for _ in range(rnd.randrange(4, 20))],
                    tuple([rnd.randrange(1, 64) for _ in range(rnd.randrange(1, 4))] for _ in range(2)),
                    rnd.randrange(2), False) for _ in range(n)]


def _reft(model: nn.Module, layers: tuple[int, ...] | str = "all", first: int = 0, last: int = 2,
          dropout: float = 0.0) -> tuple[ReftModel, list[tuple[str, nn.Parameter]]]:
    model.requires_grad_(False)
    cfg = ReftConfig(rank=2, layers=layers, positions=PositionsConfig(first, last), init="random", dropout=dropout)
    reft = ReftModel(model, cfg, decoder_layers(model), hidden_size(model))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(reft.interventions.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return reft.train(), [(f"reft.{n}", p) for n, p in reft.interventions.named_parameters()]


def _lora(model: nn.Module, layers: tuple[int, ...], dropout: float = 0.0) -> tuple[nn.Module, list]:
    peft_model = random_lora(model, layers, dropout).train()
    return peft_model, lora_trainable(peft_model)


def _plan(model: nn.Module, trained: list, rows: list[Encoded], mode: str = "cache") -> reuse.Plan:
    return reuse.plan(model, trained, rows, pad_id=0, rt=CPU, mode=mode, budget_gb=1.0, layers_path=None,
                      desc="stage", first=[0, 1, 2, 3])


def _loss_and_grads(plan: reuse.Plan, model: nn.Module, trained: list, idx: list[int], seed: int = 7
                    ) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step's loss and gradients as the loop runs it, from a fixed random state."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    step = plan.step(idx)
    with step.hold:
        loss = answer_loss(step.forward(model), step.targets)
        loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in trained}


def _assert_same_step(model: nn.Module, trained: list, rows: list[Encoded], chosen: reuse.Plan) -> None:
    full = reuse.Plan("full path", FullPath(rows, 0, CPU), chosen.cost)
    for idx in ([0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 9, 10, 11]):
        want, want_g = _loss_and_grads(full, model, trained, idx)
        got, got_g = _loss_and_grads(chosen, model, trained, idx)
        assert got == pytest.approx(want, abs=1e-5), (chosen.name, idx)
        for n, g in want_g.items():
            assert torch.allclose(got_g[n], g, atol=1e-5, rtol=1e-4), (chosen.name, n)


# ----------------------------------------------------------------------------- dropout, however it is applied


def test_opt_dropout_is_found_in_training_mode():
    """OPT has no dropout module: only its config field, and a pass in training mode, show it."""
    model = _opt(0.1)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert declared_dropout(model) == "config.dropout=0.1"
    ids = torch.randint(1, 64, (3, 9))

    def run() -> list[torch.Tensor]:
        return [model(input_ids=ids).logits]

    assert differs_in_training(model, CPU, run)
    assert not differs_in_training(_opt(0.0), CPU, lambda: [_opt(0.0)(input_ids=ids).logits])
    state = torch.get_rng_state()
    differs_in_training(model, CPU, run)
    assert torch.equal(torch.get_rng_state(), state), "the probe leaves the random stream as it was"


@pytest.mark.parametrize("setup", ["token prefix", "layer prefix", "default reft"])
def test_opt_with_its_dropout_takes_the_full_path_and_says_why(setup, caplog, monkeypatch):
    """The real OPT checkpoints' config.dropout (0.1): neither prefix would be exact. Also with the config field
    hidden from the static scan, the probe in training mode finds it."""
    for hide in (False, True):
        if hide:
            monkeypatch.setattr(reuse, "DROPOUT_FIELDS", ())
        if setup == "layer prefix":
            model, trained = _lora(_opt(0.1), (2, 3))
        else:
            model, trained = _reft(_opt(0.1), first=0 if setup == "token prefix" else 2)
        with caplog.at_level(logging.INFO, logger="heft.reuse"):
            caplog.clear()
            chosen = _plan(model, trained, _rows())
        assert chosen.name == "full path"
        said = caplog.text
        where = "config.dropout=0.1" if not hide else "two passes in training mode differ"
        if setup == "token prefix":
            assert f"token prefix not taken: dropout is active in the frozen model ({where}" in said, said
        assert "layer prefix not taken: dropout is active below layer" in said and where in said, said
        assert "stage: full path, every token and layer forward and backward" in said


def test_gpt2_with_its_real_dropout_takes_the_full_path():
    for model, trained in (_reft(_gpt2()), _lora(_gpt2(), (2, 3))):
        assert _plan(model, trained, _rows()).name == "full path"
    reft, trained = _reft(_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    assert _plan(reft, trained, _rows()).name == "token prefix"


def test_declared_dropout_skips_the_upper_layers_modules():
    gpt2 = _gpt2()
    assert declared_dropout(gpt2).startswith("transformer.drop (p=0.1)")
    plain = _gpt2(embd_pdrop=0.0)
    upper = {id(m) for layer in decoder_layers(plain)[2:] for m in layer.modules()}
    assert "transformer.h.0" in declared_dropout(plain, upper)
    llama = _llama()
    assert declared_dropout(llama) is None
    llama.config.attention_dropout = 0.1
    assert declared_dropout(llama) == "config.attention_dropout=0.1"


# ----------------------------------------------------------------------------- the same step on every path


@pytest.mark.parametrize("mode", ["cache", "recompute"])
def test_opt_without_dropout_reuses_with_the_same_random_stream(mode):
    """OPT draws a random number per layer in training mode even without dropout; frozen passes run in eval mode,
    so the dropout of ReFT's edits (token prefix) and of LoRA in the upper layers (layer prefix) draws the very
    masks the full path draws."""
    rows = _rows()
    reft, trained = _reft(_opt(0.0), dropout=0.3)
    chosen = _plan(reft, trained, rows, mode)
    assert chosen.name == "token prefix"
    _assert_same_step(reft, trained, rows, chosen)
    lora, trained = _lora(_opt(0.0), (2, 3), dropout=0.3)
    chosen = _plan(lora, trained, rows, mode)
    assert chosen.name == "layer prefix"
    _assert_same_step(lora, trained, rows, chosen)


def test_the_choice_and_its_log(caplog):
    """One INFO line per stage saying what runs; the usual reasons (the shape of the stage) at DEBUG only."""
    rows = _rows()
    cases = [(_lora(_llama(), (0, 1, 2, 3)), "cache", "full path", "lowest decoder layer is adapted"),
             (_reft(_llama(), first=2), "cache", "layer prefix", "positions.first is 2"),
             (_reft(_llama(), layers=(3,)), "cache", "token prefix", None),
             (_reft(_llama()), "off", "full path", None)]
    for (model, trained), mode, name, debug in cases:
        with caplog.at_level(logging.DEBUG, logger="heft.reuse"):
            caplog.clear()
            chosen = _plan(model, trained, rows, mode)
        assert chosen.name == name
        info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
        assert len(info) == 1, info
        if mode == "off":
            assert "(frozen_prefix: off)" in info[0]
        if debug is not None:
            assert any(debug in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)


def test_compiled_layers_are_not_bypassed(caplog):
    reft, trained = _reft(_llama(), layers=(2, 3), first=2)
    decoder_layers(reft.model)[3].compile()  # lazy: nothing compiles until it runs
    with caplog.at_level(logging.INFO, logger="heft.reuse"):
        assert _plan(reft, trained, _rows()).name == "full path"
    assert "layer prefix not taken: the decoder layers are compiled" in caplog.text


def test_every_path_gives_the_full_paths_step():
    rows = _rows()
    for model, trained in (_reft(_llama()), _reft(_llama(), first=2), _lora(_llama(), (2, 3))):
        chosen = _plan(model, trained, rows)
        assert chosen.name in ("token prefix", "layer prefix")
        _assert_same_step(model, trained, rows, chosen)
