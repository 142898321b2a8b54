"""Tests for frozen-prefix reuse in ReFT training (heft.reuse.token_prefix): with edits only on the last prompt positions, the
tokens before them run once without gradients and only the edited tokens and the answer run forward and backward.
The loss and every intervention gradient equal the full path's within 1e-5 (fp32) on several architectures, kept
or recomputed; whole training runs (ReFT-only, HEFT merged and unmerged) give the same log and adapters; the full
path is taken, with the reason, wherever the reuse would not be exact."""

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

from heft.config.load import from_dict
from heft.training.loop import answer_loss
from heft.reuse.token_prefix import FrozenPrefix, why_not
from heft.methods.reft import ReftModel
from heft.training.runtime import model_forward
from heft.data.tokens import Encoded, train_batch

from conftest import tiny_config
from helpers import tiny_arch, with_reft as random_reft
from helpers import CPU, make_rows

pytestmark = pytest.mark.usefixtures("one_thread")


def with_reft(model: nn.Module, last: int, first: int = 0, first_from: str = "prompt") -> ReftModel:
    """test_choice_cache's seeded random LoReFT (edits and gradients far from zero), in training mode as a stage
    trains it, the model underneath frozen."""
    model.requires_grad_(False)
    return random_reft(model, first, last, first_from).train()


def loss_and_grads(reft: ReftModel, rows: list[Encoded], idx: list[int], pad_id: int,
                   prefix: FrozenPrefix | None) -> tuple[float, dict[str, torch.Tensor]]:
    reft.zero_grad(set_to_none=True)
    if prefix is None:
        batch = train_batch([rows[i] for i in idx], pad_id)
        keep = int(batch.pop("logits_to_keep"))
        loss = answer_loss(model_forward(reft, batch, keep), batch["targets"])
    else:
        kwargs, targets, _ = prefix.batch(idx)
        loss = answer_loss(reft(**kwargs).logits, targets)
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in reft.interventions.named_parameters()}


def assert_same(reft: ReftModel, rows: list[Encoded], pad_id: int, batches: list[list[int]]) -> FrozenPrefix:
    kept = FrozenPrefix(reft, rows, pad_id, CPU, keep=True, budget_gb=1.0, desc="test")
    again = FrozenPrefix(reft, rows, pad_id, CPU, keep=False, budget_gb=0.0, desc="test")
    biggest = 0.0
    for _ in range(2):  # the second round reads the kept rows back
        for idx in batches:
            loss, grads = loss_and_grads(reft, rows, idx, pad_id, None)
            for prefix in (kept, again):
                got_loss, got_grads = loss_and_grads(reft, rows, idx, pad_id, prefix)
                assert got_loss == pytest.approx(loss, abs=1e-5), idx
                for n, g in grads.items():
                    assert torch.allclose(got_grads[n], g, atol=1e-5, rtol=1e-4), (n, idx, (got_grads[n] - g).abs().max())
            biggest = max([biggest] + [float(g.abs().max()) for g in grads.values()])
    assert biggest > 1e-3  # real gradients, not zeros
    assert kept.store and not again.store
    return kept


# ----------------------------------------------------------------------------- the same loss and gradients


@pytest.mark.parametrize("last", [1, 3])
@pytest.mark.parametrize("skip", [0, 2], ids=["first_from-prompt", "first_from-content"])
def test_loss_and_gradients_equal_the_full_path(tiny, last, skip):
    model, tok = tiny
    rows = [Encoded(r.prompt, r.answers, r.label, False, content_start=skip) for r in make_rows(tok, 9)[0]]
    # a row whose whole content is edited: no prefix past its skipped tokens (or none at all)
    short = tok("Cats sleep")["input_ids"]
    rows.append(Encoded(short[:skip + last], rows[0].answers, 1, False, content_start=skip))
    reft = with_reft(model, last, first_from="content" if skip else "prompt")
    assert_same(reft, rows, tok.pad_token_id, [[0, 1, 2], [3, 4, 5, 6, 7, 8, 9], [9], [2, 9, 5]])


@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "gpt2"])
def test_other_architectures(arch):
    """GPT-2's absolute positions, Qwen2's biases, Gemma 3's sliding/global layers and scaled embeddings."""
    extra = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if arch == "gpt2" else {}
    if arch == "gpt2":
        import transformers as tf

        torch.manual_seed(0)
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64, **extra))
    else:
        model = tiny_arch(arch)
    rnd = random.Random(1)
    rows = [Encoded([rnd.randrange(1, 64) for _ in range(rnd.randrange(3, 20))],
                    tuple([rnd.randrange(1, 64) for _ in range(rnd.randrange(1, 4))] for _ in range(2)), rnd.randrange(2),
                    False) for _ in range(10)]
    reft = with_reft(model, 2)
    assert_same(reft, rows, 0, [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9], [1, 8]])


def test_the_budget_keeps_what_fits(tiny):
    """The kept rows are fixed up front: the shortest prefixes whose keys/values fit; the others are computed in each
    batch that holds them, and the loss is the full path's either way."""
    model, tok = tiny
    rows = make_rows(tok, 6)[0]
    reft = with_reft(model, 2)
    one = FrozenPrefix(reft, rows, tok.pad_token_id, CPU, keep=True, budget_gb=1.0, desc="t")
    one.batch([0])
    per_token = one.store.bytes // sum(one.split[i] for i in one.store)
    order = [i for g in one.groups for i in g]
    budget = per_token * (one.split[order[0]] + one.split[order[1]] + one.split[order[2]] // 2)
    prefix = FrozenPrefix(reft, rows, tok.pad_token_id, CPU, keep=True, budget_gb=budget / 1e9, desc="t")
    for idx in ([0, 1, 2], [3, 4, 5]):
        prefix.batch(idx)
    assert prefix.store.kept == set(order[:2]) and prefix.store.keys() == set(order[:2]) and prefix.store.full
    assert prefix.store.bytes <= budget
    for idx in ([0, 1, 2], [3, 4, 5]):
        loss, _ = loss_and_grads(reft, rows, idx, tok.pad_token_id, prefix)
        full, _ = loss_and_grads(reft, rows, idx, tok.pad_token_id, None)
        assert loss == pytest.approx(full, abs=1e-5)
    assert prefix.store.keys() == set(order[:2])


def test_kept_keys_values_do_not_depend_on_the_batch_that_asked_first(tiny):
    """Kept rows are computed in fixed groups, so a run resumed mid-epoch (whose first batches differ from an
    uninterrupted run's) reads the very same numbers."""
    model, tok = tiny
    rows = make_rows(tok, 40)[0]
    reft = with_reft(model, 2)
    a = FrozenPrefix(reft, rows, tok.pad_token_id, CPU, keep=True, budget_gb=1.0, desc="t")
    b = FrozenPrefix(reft, rows, tok.pad_token_id, CPU, keep=True, budget_gb=1.0, desc="t")
    assert len(a.groups) == 3
    for idx in ([0, 1, 2], list(range(3, 40))):
        a.batch(idx)
    for idx in ([39, 7], [20], list(range(40))):
        b.batch(idx)
    assert a.store.keys() == b.store.keys() == set(range(40))
    assert all(torch.equal(a.store[i], b.store[i]) for i in range(40))
    kwargs_a, _, _ = a.batch([5, 30])
    kwargs_b, _, _ = b.batch([5, 30])
    field = a.field
    for la, lb in zip(kwargs_a[field].layers, kwargs_b[field].layers):
        assert torch.equal(la.keys, lb.keys) and torch.equal(la.values, lb.values)


def test_a_sliding_window_shorter_than_the_rows_is_named(tiny_model_dir):
    """Gemma 3's sliding layers keep only the last `sliding_window` keys/values: rows longer than that cannot be
    regrouped, and the reason says so."""
    model = tiny_arch("gemma3", sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    rnd = random.Random(1)
    rows = [Encoded([rnd.randrange(1, 64) for _ in range(rnd.randrange(6, 20))], ([5], [6]), rnd.randrange(2), False)
            for _ in range(8)]
    reft = with_reft(model, 2)
    why = FrozenPrefix(reft, rows, 0, CPU, keep=True, budget_gb=1.0, desc="t").check([0, 1, 2])
    assert why is not None and "sliding window of 4 tokens" in why and "longest row" in why
    wide = tiny_arch("gemma3", sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    assert FrozenPrefix(with_reft(wide, 2), rows, 0, CPU, keep=True, budget_gb=1.0, desc="t").check([0, 1, 2]) is None


# ----------------------------------------------------------------------------- when the full path is taken


def test_reasons_the_shape_rules_it_out(tiny):
    model, tok = tiny
    both = with_reft(model, 2, first=2)
    assert "positions.first is 2" in why_not(both, list(both.interventions.named_parameters()))
    last = with_reft(model, 2)
    named = [(f"reft.{n}", p) for n, p in last.interventions.named_parameters()]
    assert why_not(last, named) is None
    assert "weights below the interventions" in why_not(last, named + [("model.lm_head.weight", model.lm_head.weight)])
    assert why_not(nn.Linear(2, 2), []) == "no ReFT interventions on the model"


# ----------------------------------------------------------------------------- whole runs


def _run(tiny_model_dir: Path, boolq_files, out: Path, stages: list[dict], mode: str, **extra: Any) -> dict[str, Any]:
    from heft.run.pipeline import train_run

    cfg = from_dict(tiny_config(tiny_model_dir, boolq_files, stages, reft={"positions": {"first": 0, "last": 3}},
                                frozen_prefix=mode, seed=2, **extra))
    train_run(cfg, out)
    reft_dir = next(d for d in sorted((out / "stages").iterdir()) if d.name.endswith("reft"))
    log = [json.loads(x) for x in (reft_dir / "train_log.jsonl").read_text().splitlines()]
    return {"loss": torch.tensor([r["loss"] for r in log]), "norm": torch.tensor([r["grad_norm"] for r in log]),
            "reft": load_file(str(reft_dir / "reft.safetensors")),
            "p_yes": torch.tensor([json.loads(x)["p_yes"] for x in (out / "predictions.jsonl").read_text().splitlines()])}


@pytest.mark.parametrize("strategy", ["reft", "heft-merged", "heft-unmerged"])
def test_training_runs_equal_the_full_path(tiny_model_dir, boolq_files, tmp_path, caplog, strategy):
    """The same per-step losses and gradient norms, adapters and predictions: the prefix reads the merged (or frozen
    unmerged) LoRA of the stage before, never the base weights alone."""
    reft = {"method": "reft", "epochs": 2, "lr": 2e-2, "batch_size": 4}
    stages = [reft] if strategy == "reft" else [{"method": "lora", "epochs": 1, "lr": 5e-2, "batch_size": 4}, reft]
    extra = {"lora": {"merge": strategy == "heft-merged"}}
    got = {}
    for mode in ("off", "cache", "recompute"):
        with caplog.at_level(logging.INFO, logger="heft.reuse"):
            caplog.clear()
            got[mode] = _run(tiny_model_dir, boolq_files, tmp_path / mode, stages, mode, **extra)
        said = caplog.text
        if mode == "off":
            assert "come before the first edited position" not in said and "(frozen_prefix: off)" in said, said
        else:
            assert "come before the first edited position" in said, said
    for mode in ("cache", "recompute"):
        assert torch.allclose(got[mode]["loss"], got["off"]["loss"], atol=1e-5), (mode, got[mode]["loss"], got["off"]["loss"])
        assert torch.allclose(got[mode]["norm"], got["off"]["norm"], atol=1e-5, rtol=1e-5)
        for k, v in got["off"]["reft"].items():
            assert torch.allclose(got[mode]["reft"][k], v, atol=1e-5), k
        assert torch.allclose(got[mode]["p_yes"], got["off"]["p_yes"], atol=1e-5)
    assert got["off"]["loss"][0] != got["off"]["loss"][-1]  # it trained


def test_a_cache_that_cannot_be_regrouped_is_not_reused(tiny_model_dir, boolq_files, tmp_path, caplog, monkeypatch):
    """Found on the stage's first batch, before any step: the reason at INFO, then the next path that fits (ReFT
    on every layer: the layer prefix), never a switch mid-run."""
    import heft.reuse.token_prefix

    stages = [{"method": "reft", "epochs": 1, "lr": 2e-2, "batch_size": 4}]
    expected = _run(tiny_model_dir, boolq_files, tmp_path / "off", stages, "off")
    monkeypatch.setattr(heft.reuse.token_prefix, "why_not_regroupable", lambda past, longest: "a reason")
    with caplog.at_level(logging.INFO, logger="heft.reuse"):
        got = _run(tiny_model_dir, boolq_files, tmp_path / "fallback", stages, "cache")
    assert "token prefix not taken: this model's keys/values cache cannot be regrouped by row: a reason" in caplog.text
    assert "decoder layer 0 of 4 is frozen" in caplog.text
    assert torch.allclose(got["loss"], expected["loss"], atol=1e-5)


def test_prefix_cache_gb_is_checked(tiny_model_dir, boolq_files):
    from heft.errors import ConfigError

    with pytest.raises(ConfigError, match="prefix_cache_gb: must be >= 0"):
        from_dict(tiny_config(tiny_model_dir, boolq_files, [], prefix_cache_gb=-1))
    with pytest.raises(ConfigError, match="frozen_prefix"):
        from_dict(tiny_config(tiny_model_dir, boolq_files, [], frozen_prefix="always"))
