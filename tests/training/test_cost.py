"""Tests for the training-cost estimate (heft.training.cost): the FLOPs of what a stage runs, per path: the full path
through the adapted layers only (`lora.layers`), the layer prefix (lower layers once per kept row), the token prefix
(tokens before the first edited position once per kept row, or every step with `recompute`); checked on the
arithmetic, then on whole runs against the model's own parameter counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_config
from heft.config.load import from_dict
from heft.run.folder import RunFolder
from heft.run.records import StageProgress, StageRecord
from heft.training.cost import Depth, RunTracker, stage_cost

pytestmark = pytest.mark.usefixtures("one_thread")

D = Depth(total=100, layers=(20, 20, 20, 20))  # 20 outside the layers: the head and the final norm


def test_the_full_path_reaches_the_lowest_adapted_layer():
    assert stage_cost(D, 0, 10).flops(10) == 4 * 100 * 10  # every layer adapted: (2 + 2) N per token
    assert stage_cost(D, 2, 10).flops(10) == 2 * (100 + 60) * 10  # the upper half: the backward skips 40
    assert stage_cost(D, 4, 10).flops(10) == 2 * (100 + 20) * 10  # ReFT on the last layer's output: the head only


def test_the_layer_prefix_runs_the_lower_layers_once_per_kept_row():
    cached = stage_cost(D, 2, 10, bypassed=2, kept=1.0)
    assert cached.flops(10) == stage_cost(D, 2, 10).flops(10)  # the first epoch runs every layer
    assert cached.flops(20) == 2 * ((100 - 40 + 60) * 20 + 40 * 10)  # then the 40 below layer 2 are bypassed
    assert stage_cost(D, 2, 10, bypassed=2, kept=0.0).flops(20) == stage_cost(D, 2, 10).flops(20)  # recompute
    half = stage_cost(D, 2, 10, bypassed=2, kept=0.5).flops(20)
    assert half == pytest.approx((cached.flops(20) + stage_cost(D, 2, 10).flops(20)) / 2)


def test_the_token_prefix_runs_the_prefix_without_gradients():
    cached = stage_cost(D, 0, 10, prefix_share=0.75, kept=1.0)
    assert cached.flops(20) == 2 * (0.25 * 200 * 20 + 0.75 * 100 * 10)  # suffix forward and backward, prefix once
    recompute = stage_cost(D, 0, 10, prefix_share=0.75, kept=0.0)
    assert recompute.flops(20) == 2 * (0.25 * 200 + 0.75 * 100) * 20  # the prefix forward every step
    assert cached.flops(20) < recompute.flops(20) < stage_cost(D, 0, 10).flops(20)


def test_a_stage_finished_before_a_restart_keeps_its_own_flops(tiny_model_dir, boolq_files, tmp_path):
    """Its evaluation point after a restart reads the stage's record, not an estimate from the config."""
    cfg = from_dict(tiny_config(tiny_model_dir, boolq_files, [{"method": "reft", "epochs": 1}]))
    run = RunFolder(tmp_path / "run")
    stage = cfg.stages[0]
    run.stage_dir(0, stage).mkdir(parents=True)
    run.write_stage(0, stage, StageRecord(index=0, method="reft", trainable_params=1, optimizer_steps=2, epochs=1.0,
                                          train_seconds=1.0, tokens=50, final_loss=0.5, flops=1234.0))
    tracker = RunTracker(run, cfg, n_params=100, num_layers=4, reft_layers=[0, 1, 2, 3], main=True)
    acc = {"accuracy": 0.5, "correct": 1, "n": 2}
    assert tracker.record(0, stage, 1.0, StageProgress(2, 1.0, 1.0, 50, 0.5), acc).flops == 1234.0
    # no record and no plan reported: the full path from the config (ReFT on every layer reaches layer 1)
    assert tracker.stage_flops(stage, 10) == pytest.approx(10 * (2 + 2 * 0.75) * 100)


# ----------------------------------------------------------------------------- whole runs


def _stage(tiny_model_dir: Path, boolq_files, out: Path, stage: dict, **sections) -> tuple[dict, dict]:
    from heft.run.pipeline import train_run

    cfg = from_dict(tiny_config(tiny_model_dir, boolq_files, [stage], data={"eval_size": 4}, **sections))
    train_run(cfg, out)
    record = json.loads(next((out / "stages").iterdir()).joinpath("stage.json").read_text())
    return record, json.loads((out / "meta.json").read_text())


def _layer_params(tiny_model_dir: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return [sum(p.numel() for p in layer.parameters()) for layer in model.model.layers]


@pytest.mark.parametrize("mode", ["off", "cache"])
def test_lora_on_the_upper_layers(tiny_model_dir, boolq_files, tmp_path, mode):
    """LoRA on layers 2-3 of 4: the backward stops at layer 2 on every path; `cache` (the layer prefix) runs
    layers 0-1 in the first epoch only."""
    lora = {"method": "lora", "epochs": 2, "lr": 1e-3, "batch_size": 4}
    record, meta = _stage(tiny_model_dir, boolq_files, tmp_path / mode, lora, lora={"layers": [2, 3]}, frozen_prefix=mode)
    n, below = meta["non_embedding_params"], sum(_layer_params(tiny_model_dir)[:2])
    tokens = record["tokens"]
    if mode == "off":
        assert record["flops"] == pytest.approx(2 * (n + n - below) * tokens)
    else:
        assert record["flops"] == pytest.approx(2 * ((n - below + n - below) * tokens + below * tokens / 2))
    assert record["flops"] < 4 * n * tokens


@pytest.mark.parametrize("mode", ["cache", "recompute"])
def test_reft_on_the_last_positions(tiny_model_dir, boolq_files, tmp_path, mode):
    """ReFT on the last 3 prompt positions of every layer: the tokens before them run without gradients (once per
    row with `cache`, every step with `recompute`); the backward stops above layer 0, whose output is edited."""
    from transformers import AutoTokenizer

    from heft.data.rows import load_splits
    from heft.data.tokens import Encoder, encode_all

    reft = {"method": "reft", "epochs": 2, "lr": 2e-3, "batch_size": 4}
    sections = {"reft": {"positions": {"first": 0, "last": 3}}, "frozen_prefix": mode}
    record, meta = _stage(tiny_model_dir, boolq_files, tmp_path / mode, reft, **sections)
    cfg = from_dict(tiny_config(tiny_model_dir, boolq_files, [reft], **sections))
    rows = encode_all(Encoder(AutoTokenizer.from_pretrained(tiny_model_dir), cfg.data.prompt_format,
                              cfg.data.max_length), load_splits(cfg.data).train, "train")
    before = sum(min(len(r.prompt) - min(3, len(r.prompt)), len(r.prompt) - 1) for r in rows)
    tokens = sum(len(r.prompt) + len(r.answers[r.label]) for r in rows)
    share = before / tokens
    assert record["tokens"] == 2 * tokens and 0.5 < share < 1
    n, g = meta["non_embedding_params"], meta["non_embedding_params"] - _layer_params(tiny_model_dir)[0]
    suffix = (1 - share) * (n + g) * 2 * tokens
    prefix = share * n * (tokens if mode == "cache" else 2 * tokens)
    assert record["flops"] == pytest.approx(2 * (suffix + prefix), rel=1e-9)
    assert record["flops"] < 4 * n * record["tokens"]
