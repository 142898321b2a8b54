"""The table of bad inputs in docs/reliability.md, each through the CLI: the exact message the user
gets, nothing written for the refused run, and a finished run next to it left byte-identical."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import boolq_rows, tiny_config, write_jsonl
from heft.cli import main

STAGES = [{"method": "lora", "epochs": 1, "lr": 1e-2}, {"method": "reft", "epochs": 1, "lr": 1e-2}]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_run(tiny_model_dir, boolq_files, tmp_path_factory):
    """A finished run that every bad attempt below must leave untouched."""
    tmp = tmp_path_factory.mktemp("saved")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, boolq_files, STAGES)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


def _bad_train_file(tmp: Path, kind: str) -> Path:
    good = [json.dumps(r) for r in boolq_rows(6)]
    lines = {
        "malformed": good[:2] + ['{"question": "is it", "passage": "x", "label": tr'] + good[2:],
        "missing": good[:3] + [json.dumps({"passage": "A passage.", "label": True})],
        "empty": good[:1] + [json.dumps({"question": "is it", "passage": "   ", "label": True})],
        "nonbool": good[:4] + [json.dumps({"question": "is it", "passage": "A passage.", "answer": "maybe"})],
        "nothing": [],
    }[kind]
    path = tmp / f"{kind}.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


CASES = {
    # name: (how to make it, expected exit code, text the user must see)
    "malformed JSON line": ("data:malformed", 2, "malformed.jsonl:3: malformed JSON line"),
    "missing field": ("data:missing", 2, "missing.jsonl:4: missing field `question`"),
    "empty field": ("data:empty", 2, "empty.jsonl:2: field `passage` must be non-empty text"),
    "non-boolean answer": ("data:nonbool", 2, "nonbool.jsonl:5: field `answer` must be a boolean (true/false), got 'maybe'"),
    "empty dataset": ("data:nothing", 2, "nothing.jsonl: the file holds no rows"),
    "unknown config key": ("--stages.0.learning_rate=0.1", 2, "stages[0].learning_rate: unknown field"),
    "wrong type": ("--lora.r=eight", 2, "lora.r: expected an integer, got 'eight'"),
    "out-of-range layers": ("--reft.layers=[1, 7]", 2, "reft.layers: [7] out of range; the model has 4 decoder layers (0..3)"),
    "rank larger than hidden size": ("--reft.rank=100", 2, "reft.rank: 100 is larger than the model's hidden size 64"),
    "positions that do not fit": ("--reft.positions.first=40", 2, "reft.positions: first + last = 42 positions do not fit in max_length 32"),
    "missing model path": ("--model.name_or_path=/no/such/model", 2, "model.name_or_path: '/no/such/model' is not a folder on this machine"),
    "wrong layers path": ("--model.layers_path=model.nothing", 2, "model.layers_path: 'model.nothing' is not a list of layers"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_clearly_and_loses_nothing(name, saved_run, tiny_model_dir, boolq_files, tmp_path, capsys):
    how, code, message = CASES[name]
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES, data={"max_length": 32})
    overrides = []
    if how.startswith("data:"):
        raw["data"]["train_path"] = str(_bad_train_file(tmp_path, how[5:]))
    else:
        overrides.append(how)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    before = _digest(saved_run)
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out), *overrides]) == code
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert not out.exists() or not any(out.iterdir()), "a refused run writes nothing"
    assert _digest(saved_run) == before
    # The same mistake aimed at the finished run's folder (as a resume) is refused too, and changes nothing.
    main(["train", "--config", str(cfg), "--out", str(saved_run), *overrides, "--resume"])
    assert _digest(saved_run) == before


def test_dataset_smaller_than_one_batch_trains(tiny_model_dir, boolq_files, tmp_path):
    train = write_jsonl(tmp_path / "tiny.jsonl", boolq_rows(5))
    raw = tiny_config(tiny_model_dir, (train, boolq_files[1]), STAGES, data={"dev_size": 2})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_rows"] == 3 and [s["optimizer_steps"] for s in metrics["stages"]] == [1, 1]


def test_passages_far_longer_than_max_length_are_truncated(tiny_model_dir, boolq_files, tmp_path):
    rows = boolq_rows(12)
    for r in rows[:4]:
        r["passage"] = " ".join([r["passage"]] * 60)  # hundreds of tokens
    train = write_jsonl(tmp_path / "long.jsonl", rows)
    val = write_jsonl(tmp_path / "long_val.jsonl", rows[:6])
    raw = tiny_config(tiny_model_dir, (train, val), STAGES, data={"dev_size": 2, "max_length": 48})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [p["truncated"] for p in preds] == [True] * 4 + [False] * 2


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, boolq_files, tmp_path,
                                                                               monkeypatch, capsys):
    import torch

    from heft import checkpoint, train

    real = train.answer_loss
    calls = {"n": 0}

    def poisoned(logits, targets, reduction="mean"):
        calls["n"] += 1
        loss = real(logits, targets, reduction)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(train, "answer_loss", poisoned)
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES[:1], checkpoint_every=1, log_every=5)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at optimizer step 4" in err
    ck = checkpoint.latest(tmp_path / "run" / "stages" / "00-lora" / "checkpoints")
    assert ck is not None and ck.name == "step-000003", "the last good checkpoint is kept"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(ck / "trainable.safetensors")).values())


def test_four_bit_on_cpu_is_a_clear_error(tiny_model_dir, boolq_files, tmp_path, capsys):
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES[:1], model={"quantization": "4bit"}, lora={"merge": False})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "model.quantization: 4bit (QLoRA through bitsandbytes) needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_four_bit_with_merge_is_refused(tiny_model_dir, boolq_files, tmp_path, capsys):
    raw = tiny_config(tiny_model_dir, boolq_files, STAGES[:1], model={"quantization": "4bit"})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "lora.merge: a LoRA stage cannot be merged into 4-bit weights" in capsys.readouterr().err


def test_reloading_onto_a_different_base_model_or_a_corrupt_adapter_is_a_clear_error(saved_run, tmp_path, capsys):
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    # A base model with another vocabulary and depth under the same path the run names.
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    other = tmp_path / "other-model"
    shutil.copytree(cfg["model"]["name_or_path"], other, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    cfg["model"]["name_or_path"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "trained on a base model with vocab_size=" in err and "num_layers=4" in err and "num_layers=2" in err
    # The right base model, but a truncated LoRA adapter file.
    shutil.rmtree(run)
    shutil.copytree(saved_run, run)
    weights = run / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["eval", str(run)]) == 2
    assert "cannot load the LoRA adapter" in capsys.readouterr().err
