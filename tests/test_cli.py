"""End-to-end tests of the command line on the tiny Llama: `heft train | eval | predict | run`.

Every run is tiny (16 training rows, batch 8, 1-2 epochs, 20 validation rows); the four single-strategy
runs are trained once per module and shared by the tests that inspect them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import boolq_rows, tiny_config, write_jsonl
from safetensors.torch import load_file

from heft.cli import main

# Hand-computed trainable-parameter counts for the tiny Llama (d=64, ffn=128, 4 heads of 16, 2 kv heads, 4 layers).
D, FFN, KV, LAYERS, LORA_R, REFT_R = 64, 128, 2 * 16, 4, 4, 2
LINEARS = [(D, D), (D, KV), (D, KV), (D, D), (D, FFN), (D, FFN), (FFN, D)]  # q k v o gate up down: (in, out)
LORA_PARAMS = LAYERS * sum(LORA_R * (i + o) for i, o in LINEARS)  # A: (r, in), B: (out, r)
REFT_PARAMS = LAYERS * 2 * (REFT_R * D + REFT_R * D + REFT_R)  # per layer: first + last group; R, W, b
assert (LORA_PARAMS, REFT_PARAMS) == (16384, 2064)

STAGE = {"epochs": 1, "batch_size": 8}
STRATEGIES = {
    "lora": [{"method": "lora", **STAGE}],
    "reft": [{"method": "reft", **STAGE}],
    "heft": [{"method": "lora", **STAGE}, {"method": "reft", **STAGE}],
    "joint": [{"method": "joint", **STAGE}],
}
EXPECTED_PARAMS = {"lora": LORA_PARAMS, "reft": REFT_PARAMS, "heft": LORA_PARAMS + REFT_PARAMS,
                   "joint": LORA_PARAMS + REFT_PARAMS, "base": 0}

LORA_FILES = ["adapter/README.md", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"]
REFT_FILES = ["reft.safetensors", "reft_config.json"]
STAGE_FILES = ["stage.json", "train_log.jsonl"]
EXPECTED_FILES = {
    "lora": {"00-lora": LORA_FILES + STAGE_FILES},
    "reft": {"00-reft": REFT_FILES + STAGE_FILES},
    "heft": {"00-lora": LORA_FILES + STAGE_FILES, "01-reft": REFT_FILES + STAGE_FILES},
    "joint": {"00-joint": LORA_FILES + REFT_FILES + STAGE_FILES},
}


def file_list(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def expected_files(strategy: str) -> list[str]:
    files = ["config.yaml", "meta.json", "metrics.json", "predictions.jsonl"]
    for stage, names in EXPECTED_FILES[strategy].items():
        files += [f"stages/{stage}/{n}" for n in names]
    return sorted(files)


def raw_config(model_dir: Path, files, stages: list[dict], **sections) -> dict:
    raw = tiny_config(model_dir, files, stages, **sections)
    raw["data"].setdefault("train_size", 16)
    return raw


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def validation_labels(files) -> list[bool]:
    return [json.loads(line)["answer"] for line in files[1].read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, boolq_files, tmp_path_factory) -> dict[str, Path]:
    """Each strategy trained once through `heft train`."""
    root = tmp_path_factory.mktemp("cli-runs")
    out = {}
    for name, stages in STRATEGIES.items():
        cfg = write_yaml(root / f"{name}.yaml", raw_config(tiny_model_dir, boolq_files, stages))
        folder = root / name
        assert main(["train", "--config", str(cfg), "--out", str(folder)]) == 0
        out[name] = folder
    return out


# ----------------------------------------------------------------------------- heft train


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_train_writes_exactly_the_run_folder(runs, strategy):
    assert file_list(runs[strategy]) == expected_files(strategy)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_train_metrics_and_predictions(runs, tiny_model_dir, boolq_files, strategy):
    folder = runs[strategy]
    m = json.loads((folder / "metrics.json").read_text())
    labels = validation_labels(boolq_files)
    assert m["strategy"] == strategy
    assert m["n"] == len(labels) == 20  # accuracy itself is recomputed from predictions.jsonl below
    lo, hi = m["ci95"]
    assert 0.0 <= lo <= m["accuracy"] <= hi <= 1.0
    assert m["trainable_params"] == EXPECTED_PARAMS[strategy]
    assert m["train_rows"] == 16 and m["epochs"] == len(STRATEGIES[strategy])
    assert [s["method"] for s in m["stages"]] == [s["method"] for s in STRATEGIES[strategy]]
    assert all(s["optimizer_steps"] == 2 for s in m["stages"])  # 16 rows / batch 8, one epoch
    assert m["majority_baseline"] == sum(label == m["majority_label"] for label in labels) / len(labels)

    preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == m["n"]
    assert [p["idx"] for p in preds] == list(range(20))
    assert [p["label"] for p in preds] == labels
    for p in preds:
        assert {"idx", "label", "pred", "p_yes"} <= set(p)
        assert 0.0 <= p["p_yes"] <= 1.0 and p["pred"] == (p["p_yes"] > 0.5)
    assert m["accuracy"] == sum(p["pred"] == p["label"] for p in preds) / len(preds)
    assert m["correct"] == sum(p["pred"] == p["label"] for p in preds)

    meta = json.loads((folder / "meta.json").read_text())
    assert meta["strategy"] == strategy and meta["base_model"] == str(tiny_model_dir)
    per_stage = [json.loads((folder / "stages" / s / "stage.json").read_text())["trainable_params"]
                 for s in EXPECTED_FILES[strategy]]
    assert sum(per_stage) == m["trainable_params"]
    logs = [json.loads(line) for s in EXPECTED_FILES[strategy]
            for line in (folder / "stages" / s / "train_log.jsonl").read_text().splitlines()]
    assert logs and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)


@pytest.mark.parametrize("strategy", ["lora", "joint"])
def test_saved_lora_adapter_loads_with_peft(runs, tiny_model_dir, strategy):
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    adapter = runs[strategy] / "stages" / f"00-{strategy}" / "adapter"
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == LORA_PARAMS
    assert all("lora_A" in k or "lora_B" in k for k in saved)
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in saved.items())  # trained, not the zero init
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


@pytest.mark.parametrize("strategy", ["reft", "heft", "joint"])
def test_saved_reft_files(runs, strategy):
    stage = [s for s in EXPECTED_FILES[strategy] if s.endswith(("reft", "joint"))][0]
    folder = runs[strategy] / "stages" / stage
    tensors = load_file(str(folder / "reft.safetensors"))
    assert sum(t.numel() for t in tensors.values()) == REFT_PARAMS
    assert len(tensors) == LAYERS * 2 * 3
    meta = json.loads((folder / "reft_config.json").read_text())
    assert meta["rank"] == REFT_R and meta["layers"] == [0, 1, 2, 3] and meta["hidden_size"] == D
    assert meta["positions"] == {"first": 2, "last": 2, "first_from": "prompt"}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_eval_reproduces_the_run(runs, capsys, strategy):
    folder = runs[strategy]
    capsys.readouterr()
    assert main(["eval", str(folder), "--json"]) == 0
    out = capsys.readouterr().out
    assert "predictions identical to the saved ones" in out
    r = json.loads(out.strip().splitlines()[-1])
    m = json.loads((folder / "metrics.json").read_text())
    assert r["accuracy"] == m["accuracy"] and r["n"] == m["n"] and r["correct"] == m["correct"]
    assert r["matches_saved_predictions"] is True
    assert r["max_abs_p_yes_diff"] < 1e-5


@pytest.mark.parametrize("strategy", ["lora", "heft"])
def test_predict_prints_answer_and_probability(runs, boolq_files, capsys, strategy):
    row = json.loads(boolq_files[1].read_text().splitlines()[0])
    saved = json.loads((runs[strategy] / "predictions.jsonl").read_text().splitlines()[0])
    capsys.readouterr()
    assert main(["predict", str(runs[strategy]), "--passage", row["passage"], "--question", row["question"]]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"(yes|no) \(p_yes=([01]\.\d{3})\)", line)
    assert match, line
    p_yes = float(match.group(2))
    assert abs(p_yes - saved["p_yes"]) < 2e-3  # the same row, alone instead of in a padded batch
    assert (match.group(1) == "yes") == saved["pred"]


def test_second_train_into_the_same_folder_needs_overwrite(runs, tiny_model_dir, boolq_files, tmp_path, capsys):
    cfg = write_yaml(tmp_path / "lora.yaml", raw_config(tiny_model_dir, boolq_files, STRATEGIES["lora"]))
    before = {p: (runs["lora"] / p).read_bytes() for p in file_list(runs["lora"])}
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out", str(runs["lora"])]) == 2
    err = capsys.readouterr().err
    assert "heft: error: --out:" in err and "is not empty" in err and "--overwrite" in err
    assert {p: (runs["lora"] / p).read_bytes() for p in file_list(runs["lora"])} == before  # untouched

    base = write_yaml(tmp_path / "base.yaml", raw_config(tiny_model_dir, boolq_files, []))
    out = tmp_path / "base-run"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    assert main(["train", "--config", str(base), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", "--config", str(base), "--out", str(out), "--overwrite"]) == 2  # not a heft folder: kept
    assert "heft replaces only its own folders" in capsys.readouterr().err
    assert file_list(out) == ["stale.txt"]
    (out / "stale.txt").unlink()
    assert main(["train", "--config", str(base), "--out", str(out)]) == 0  # an empty folder is fine
    assert main(["train", "--config", str(cfg), "--out", str(out), "--overwrite"]) == 0  # a heft run is replaced
    assert file_list(out) == expected_files("lora")  # replaced by a swap, not mixed with the old run
    assert json.loads((out / "metrics.json").read_text())["trainable_params"] == EXPECTED_PARAMS["lora"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "no aside folder or lock left"


@pytest.mark.parametrize("override, needles", [
    (["--lora.rnk", "4"], ["lora.rnk: unknown field", "valid fields: r, alpha"]),
    (["--lora.r", "eight"], ["lora.r: expected an integer, got 'eight'"]),
    (["--stages.0.epochs", "-1"], ["stages[0].epochs: must be positive"]),
    (["--stages.3.lr", "0.1"], ["--stages.3.lr: index 3 is out of range"]),
    (["--lora.r"], ["--lora.r: missing a value"]),
    (["stray"], ["unexpected argument 'stray'"]),
])
def test_bad_config_through_the_cli(tiny_model_dir, boolq_files, tmp_path, capsys, override, needles):
    cfg = write_yaml(tmp_path / "lora.yaml", raw_config(tiny_model_dir, boolq_files, STRATEGIES["lora"]))
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out), *override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("heft: error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.exists()  # nothing written before the config is valid


def test_eval_and_predict_need_a_run_folder(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert f"heft: error: {tmp_path}: not a heft run folder (no config.yaml)" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "--question", "is it"]) == 2
    assert "not a heft run folder" in capsys.readouterr().err


def test_missing_config_file_through_the_cli(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "--config: no such file" in capsys.readouterr().err


def test_bad_data_row_through_the_cli(tiny_model_dir, boolq_files, tmp_path, capsys):
    rows = boolq_rows(12)
    rows[4]["label"] = "maybe"
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = write_yaml(tmp_path / "lora.yaml", raw_config(tiny_model_dir, (train, boolq_files[1]), STRATEGIES["lora"],
                                                          data={"dev_size": 2}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"heft: error: {train}:5: field `label` must be a boolean" in err and "'maybe'" in err


# ----------------------------------------------------------------------------- heft run


@pytest.fixture(scope="module")
def suite(tiny_model_dir, boolq_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    # 10 training rows (4 yes, 6 no) and 19 validation rows (9 yes, 10 no): the majority label is `no`
    common = raw_config(tiny_model_dir, boolq_files, [], data={"train_size": 10, "eval_size": 19})
    del common["stages"]
    lora_stage = {"method": "lora", "lr": 1.0e-3, "scheduler": "constant", "batch_size": 8}
    reft_stage = {"method": "reft", "epochs": 1, "batch_size": 8}
    path = write_yaml(root / "suite.yaml", {
        "common": common,
        "strategies": {
            "base": [],
            "lora": [{**lora_stage, "epochs": 2}],
            "reft": [reft_stage],
            "heft": [{**lora_stage, "epochs": 1}, reft_stage],
        },
    })
    out = root / "out"
    assert main(["run", "--config", str(path), "--out", str(out)]) == 0
    # the same 1-epoch LoRA stage, trained on its own
    alone = write_yaml(root / "lora1.yaml", {**common, "stages": [{**lora_stage, "epochs": 1}]})
    assert main(["train", "--config", str(alone), "--out", str(root / "lora1")]) == 0
    return path, out, root / "lora1"


def test_run_summary_shape(suite, boolq_files):
    _, out, _ = suite
    summary = json.loads((out / "summary.json").read_text())
    assert isinstance(summary["majority_baseline"], float)
    labels = validation_labels(boolq_files)[:19]
    # the training majority is `no` (6 of 10 rows), so the baseline is the share of `no` among the 19 scored rows
    assert summary["majority_label"] == "no" and labels.count(False) == 10
    assert summary["majority_baseline"] == 10 / 19
    assert list(summary["strategies"]) == ["base", "lora", "reft", "heft"]  # suite order, not training order
    for name, r in summary["strategies"].items():
        assert set(r) == {"accuracy", "ci95", "n", "trainable_params", "train_seconds", "epochs"}
        assert r["n"] == 19 and len(r["ci95"]) == 2
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert r["trainable_params"] == EXPECTED_PARAMS[name]
        m = json.loads((out / name / "metrics.json").read_text())
        assert r["accuracy"] == m["accuracy"] and m["strategy"] == name
        preds = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(preds) == r["n"] and [p["label"] for p in preds] == labels
        correct = sum(p["pred"] == p["label"] for p in preds)
        assert m["correct"] == correct and r["accuracy"] == correct / r["n"]
    assert [summary["strategies"][n]["epochs"] for n in ("base", "lora", "reft", "heft")] == [0, 2, 1, 2]
    assert summary["strategies"]["base"]["train_seconds"] == 0
    assert (out / "summary.md").is_file()


def test_run_majority_baseline_is_the_training_majority(suite, boolq_files):
    """All strategies share data, so they share one majority label: the more frequent training label."""
    _, out, _ = suite
    summary = json.loads((out / "summary.json").read_text())
    metrics = {n: json.loads((out / n / "metrics.json").read_text()) for n in ("base", "lora", "reft", "heft")}
    trained = {(m["majority_label"], m["majority_baseline"]) for n, m in metrics.items() if n != "base"}
    assert len(trained) == 1
    label, baseline = trained.pop()
    labels = validation_labels(boolq_files)[:19]
    assert label is False and baseline == sum(x == label for x in labels) / 19 == 10 / 19
    assert (metrics["base"]["majority_label"], metrics["base"]["majority_baseline"]) == (label, baseline)
    assert summary["majority_label"] == ("yes" if label else "no")
    assert summary["majority_baseline"] == baseline


def test_run_shares_heft_lora_stage_exactly(suite):
    _, out, alone = suite
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shared_stages"] == {"heft": "lora (epoch 1 snapshot)"}
    stage = json.loads((out / "heft" / "stages" / "00-lora" / "stage.json").read_text())
    assert stage["reused_from"] == "lora (epoch 1 snapshot)"
    assert file_list(out / "heft") == expected_files("heft")
    # the reused stage's log is the source's first epoch, copied so the folder is complete on its own
    copied = (out / "heft" / "stages" / "00-lora" / "train_log.jsonl").read_text().splitlines()
    source = (out / "lora" / "stages" / "00-lora" / "train_log.jsonl").read_text().splitlines()
    assert copied and copied == source[:len(copied)] and len(copied) == stage["optimizer_steps"] < len(source)
    assert file_list(out / "lora") == expected_files("lora")  # the snapshot lives in the study's stage cache
    cached = sorted(p.relative_to(out / "stage-cache").as_posix() for p in (out / "stage-cache").rglob("*") if p.is_file())
    assert len({c.split("/")[0] for c in cached}) == 1, cached  # one entry: LoRA-only's epoch 1, wanted by HEFT
    assert sorted(c.split("/", 1)[1] for c in cached) == sorted(
        ["entry.json", "epochs.jsonl", "stage-0/train_log.jsonl"] + [f"stage-0/{n}" for n in LORA_FILES])
    shared = load_file(str(out / "heft" / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"))
    own = load_file(str(alone / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(out / "lora" / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"))
    assert shared.keys() == own.keys() == final.keys()
    assert all(torch.equal(shared[k], own[k]) for k in own), "reused epoch-1 snapshot differs from a 1-epoch run"
    assert not all(torch.equal(shared[k], final[k]) for k in own)  # the snapshot is not the 2-epoch adapter
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in own.items())


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON (RFC 8259); write null")


def test_run_folders_hold_strict_json(suite):
    _, out, _ = suite
    files = sorted(out.rglob("*.json")) + sorted(out.rglob("*.jsonl"))
    assert len(files) > 10
    for path in files:
        for text in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            try:
                json.loads(text, parse_constant=_strict)  # NaN / Infinity break jq, JavaScript, strict parsers
            except ValueError as e:
                pytest.fail(f"{path.relative_to(out)}: {e}")


def test_run_again_reuses_finished_runs(suite, monkeypatch, capsys):
    import heft.study.compare

    path, out, _ = suite
    before = (out / "summary.json").read_text()
    adapter = out / "lora" / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("heft run retrained a finished strategy")

    monkeypatch.setattr(heft.study.compare, "train_run", no_training)
    assert main(["run", "--config", str(path), "--out", str(out)]) == 0
    assert (out / "summary.json").read_text() == before
    assert adapter.stat().st_mtime_ns == mtime
    assert "heft" in capsys.readouterr().out


def test_run_refuses_a_folder_of_a_different_config(suite, capsys):
    path, out, _ = suite
    assert main(["run", "--config", str(path), "--out", str(out), "--lora.r", "2"]) == 2
    assert "holds a finished run of a different config" in capsys.readouterr().err


def test_run_shares_only_when_exact_with_grad_accum(tiny_model_dir, boolq_files, tmp_path):
    # 16 rows / batch 8 = 2 micro-batches per epoch; grad_accum 3 puts the epoch boundary inside an accumulation,
    # so LoRA-only's epoch-1 snapshot is not what a 1-epoch run (which steps on its last partial group) ends with.
    common = raw_config(tiny_model_dir, boolq_files, [])
    del common["stages"]
    lora_stage = {"method": "lora", "scheduler": "constant", "batch_size": 8, "grad_accum": 3}
    path = write_yaml(tmp_path / "suite.yaml", {"common": common, "strategies": {
        "lora": [{**lora_stage, "epochs": 2}], "heft": [{**lora_stage, "epochs": 1}]}})
    out = tmp_path / "out"
    assert main(["run", "--config", str(path), "--out", str(out)]) == 0
    alone = write_yaml(tmp_path / "lora1.yaml", {**common, "stages": [{**lora_stage, "epochs": 1}]})
    assert main(["train", "--config", str(alone), "--out", str(tmp_path / "lora1")]) == 0
    shared = load_file(str(out / "heft" / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"))
    own = load_file(str(tmp_path / "lora1" / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"))
    reused = json.loads((out / "summary.json").read_text())["shared_stages"]
    if reused:  # sharing is only allowed when it is exact
        assert all(torch.equal(shared[k], own[k]) for k in own), f"shared {reused} but the adapters differ"


def test_stage_cache_keys_follow_what_a_prefix_computes():
    """A prefix key changes with anything its training depends on, and not with what it does not."""
    from heft.config.load import from_dict, to_dict
    from heft.reuse.stage_cache import StageCache, prefix_key, produces, starts

    data = {"source": "local", "train_path": "t.jsonl", "eval_path": "v.jsonl"}
    lora = {"method": "lora", "scheduler": "constant"}
    long = from_dict({"data": data, "stages": [{**lora, "epochs": 2}]})
    heft = from_dict({"data": data, "stages": [{**lora, "epochs": 1, "name": "first"}, {"method": "reft"}]})
    assert prefix_key(heft, 1, 1) in produces(long)  # epoch 1 of a constant-LR stage = a 1-epoch stage
    assert prefix_key(heft, 1, 1) == dict(starts(heft))[1]
    other = [from_dict({"data": data, "stages": [{**lora, "epochs": 2, **change}]})
             for change in ({"lr": 2e-3}, {"scheduler": "cosine"}, {"batch_size": 4}, {"grad_accum": 2})]
    assert all(prefix_key(heft, 1, 1) not in produces(o) for o in other)
    reseeded = from_dict({"data": data, "seed": 1, "stages": [{**lora, "epochs": 2}]})
    assert prefix_key(heft, 1, 1) not in produces(reseeded)
    evaluated = from_dict({"data": {**data, "eval_size": 5}, "eval": {"batch_size": 2}, "stages": [{**lora, "epochs": 2}]})
    assert prefix_key(heft, 1, 1) in produces(evaluated)  # evaluation settings do not change training
    cosine = from_dict({"data": data, "stages": [{"method": "lora", "scheduler": "cosine", "epochs": 2}]})
    assert prefix_key(heft, 1, 1) not in produces(cosine)  # mid-stage states are prefixes only at a constant LR
    reft = from_dict({"data": data, "stages": [{"method": "reft", "epochs": 2}]})
    # the full path rounds differently from the reused prefix, and kept layer streams from recomputed ones
    for mode in ("recompute", "off"):
        assert prefix_key(reft, 1, 1) not in produces(from_dict({**to_dict(reft), "frozen_prefix": mode}))
    assert prefix_key(heft, 1, 1) in produces(from_dict({**to_dict(long), "frozen_prefix": "off"}))  # LoRA, all layers
    upper = from_dict({**to_dict(long), "lora": {"layers": [1]}})  # LoRA above layer 0: the lower layer is bypassed
    assert prefix_key(upper, 1, 1) not in produces(from_dict({**to_dict(upper), "frozen_prefix": "off"}))
    cache = StageCache(Path("unused"), {"heft": heft, "long": long})
    assert cache.wanted == {prefix_key(heft, 1, 1)} and cache.order({"heft": heft, "long": long}) == ["long", "heft"]


# ----------------------------------------------------------------------------- entry point


def test_python_m_heft_train(tiny_model_dir, boolq_files, tmp_path):
    stages = [{"method": "lora", "epochs": 1, "batch_size": 8}]
    cfg = write_yaml(tmp_path / "lora.yaml", raw_config(tiny_model_dir, boolq_files, stages, data={"train_size": 8}))
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "heft", "train", "--config", str(cfg), "--out", str(out),
                           "--stages.0.lr", "1e-4"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora: accuracy" in proc.stdout
    assert file_list(out) == expected_files("lora")
    assert yaml.safe_load((out / "config.yaml").read_text())["stages"][0]["lr"] == pytest.approx(1e-4)


def test_generation_evaluation_through_the_cli(tiny_model_dir, boolq_files, tmp_path):
    """eval.method: generate runs greedy decoding (with ReFT edits on the prompt pass) and saves the text."""
    raw = tiny_config(tiny_model_dir, boolq_files, [{"method": "reft", "epochs": 1, "lr": 1e-2}],
                      eval={"method": "generate", "max_new_tokens": 2})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    preds = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 20 and all("text" in p and p["pred"] in (True, False, None) for p in preds)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["correct"] == sum(1 for p in preds if p["pred"] is not None and p["pred"] == p["label"])


def test_random_init_needs_only_the_config_and_tokenizer(tiny_model_dir, boolq_files, tmp_path, capsys):
    """`model.init: random` builds the architecture from config.json (no weight files), seeded: the run
    folder re-evaluates to the same predictions, and it is not the pretrained model."""
    import shutil

    shape = tmp_path / "shape-only"
    shutil.copytree(tiny_model_dir, shape, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    raw = raw_config(shape, boolq_files, [{"method": "lora", "epochs": 1, "lr": 1e-2, "batch_size": 8}],
                     model={"init": "random"})
    path = write_yaml(tmp_path / "cfg.yaml", raw)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["matches_saved_predictions"] is True
    assert json.loads((tmp_path / "run/stages/00-lora/stage.json").read_text())["peak_memory"]["gb"] > 0
    raw["model"] = {"name_or_path": str(tiny_model_dir)}
    assert main(["train", "--config", str(write_yaml(tmp_path / "p.yaml", raw)), "--out", str(tmp_path / "pre")]) == 0
    a = (tmp_path / "run/predictions.jsonl").read_text()
    assert a != (tmp_path / "pre/predictions.jsonl").read_text()
    raw["model"] = {"name_or_path": str(shape)}  # pretrained weights asked for, none there
    assert main(["train", "--config", str(write_yaml(tmp_path / "m.yaml", raw)), "--out", str(tmp_path / "m")]) == 2
    assert "set model.init: random" in capsys.readouterr().err
