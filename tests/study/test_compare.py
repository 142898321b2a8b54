"""`heft compare` on the tiny model: the report's numbers are recomputed here from the run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from safetensors.torch import load_file

from heft.training import cost
from heft.evaluation import stats
from heft.evaluation.evaluate import accuracy
from heft.cli import main
from heft.config.load import from_dict
from heft.config.suite import read_suite
from heft.run.pipeline import train_run
from heft.run.folder import RunFolder, StudyFolder
from heft.run.records import Metrics
from heft.study.report import build_report, console_table, report_markdown
from heft.study.report_records import MAJORITY, Report

SEEDS = [0, 1]


def _suite(root: Path, model_dir: Path, files) -> Path:
    common = tiny_config(model_dir, files, [], data={"train_size": 16, "eval_size": 19})
    del common["stages"]
    lora = {"method": "lora", "lr": 1.0e-3, "scheduler": "constant", "batch_size": 8}
    reft = {"method": "reft", "lr": 2.0e-3, "batch_size": 8}
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump({"common": common, "strategies": {
        "base": [], "lora": [{**lora, "epochs": 2}], "reft": [{**reft, "epochs": 2}], "heft": [{**lora, "epochs": 1}, {**reft, "epochs": 1}],
    }}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tiny_model_dir, boolq_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    path = _suite(root, tiny_model_dir, boolq_files)
    out = root / "out"
    args = ["compare", "--config", str(path), "--seeds", *map(str, SEEDS), "--out", str(out), "--tensorboard", "--target", "0.5"]
    assert main(args) == 0
    return out, args


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _folder(out: Path, name: str, seed: int) -> Path:
    return out / "seedless" / name if name == "base" else out / f"seed-{seed}" / name


def _correct(folder: Path) -> list[bool]:
    rows = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
    return [r["pred"] == r["label"] for r in rows]


def test_report_accuracy_matches_run_folders(study):
    out, _ = study
    report = _report(out)
    assert list(report["strategies"]) == ["base", "lora", "reft", "heft"] and report["seeds"] == SEEDS and report["n"] == 19
    for name, s in report["strategies"].items():
        accs = [json.loads((_folder(out, name, seed) / "metrics.json").read_text())["accuracy"] for seed in SEEDS]
        assert list(s["accuracy_per_seed"].values()) == accs
        assert s["mean"] == pytest.approx(np.mean(accs))
        assert s["std"] == pytest.approx(np.std(accs, ddof=1))
        half = 12.706 * np.std(accs, ddof=1) / math.sqrt(2)
        if len(set(accs)) > 1:
            assert s["ci95"] == pytest.approx([np.mean(accs) - half, np.mean(accs) + half])
        else:  # base: one evaluation serves every seed, so no interval over seeds exists
            assert s["ci95"] is None and s["std"] == 0
        m = json.loads((_folder(out, name, 0) / "metrics.json").read_text())
        assert s["trainable_params"] == m["trainable_params"]
    assert report["strategies"]["base"]["train_tokens"] == 0 and report["strategies"]["base"]["trainable_params"] == 0
    majority = json.loads((out / "seed-0" / "lora" / "metrics.json").read_text())["majority_baseline"]
    assert report["majority_baseline"] == majority
    # the two seeds really are different trainings
    lora0, lora1 = (load_file(str(out / f"seed-{s}" / "lora" / "stages" / "00-lora" / "adapter" / "adapter_model.safetensors"))
                    for s in SEEDS)
    assert not all(torch.equal(lora0[k], lora1[k]) for k in lora0)


def test_report_paired_tests_match_predictions(study):
    out, _ = study
    report = _report(out)
    assert len(report["pairs"]) == 6 + 3  # every pair, and each trained strategy vs the majority baseline
    majority = json.loads((out / "seed-0" / "lora" / "metrics.json").read_text())["majority_label"]
    for pair in report["pairs"]:
        a = np.array([_correct(_folder(out, pair["a"], s)) for s in SEEDS])
        if pair["b"] == "majority":
            labels = [json.loads(x)["label"] for x in (_folder(out, pair["a"], 0) / "predictions.jsonl").read_text().splitlines()]
            b = np.array([[lab == majority for lab in labels]] * len(SEEDS))
            assert b.mean() == pytest.approx(report["majority_baseline"])
        else:
            b = np.array([_correct(_folder(out, pair["b"], s)) for s in SEEDS])
        for i, s in enumerate(SEEDS):
            m = pair["mcnemar"][str(s)]
            assert m["a_only"] == int((a[i] & ~b[i]).sum()) and m["b_only"] == int((b[i] & ~a[i]).sum())
        assert pair["bootstrap"]["diff"] == pytest.approx(a.mean() - b.mean())
        lo, hi = pair["bootstrap"]["ci95"]
        assert lo <= pair["bootstrap"]["diff"] + 1e-12 and pair["bootstrap"]["diff"] - 1e-12 <= hi
    # "above majority?" is the verdict of each strategy's paired test against the majority, n/a without one
    against = {p["a"]: p["bootstrap"]["ci95"][0] > 0 for p in report["pairs"] if p["b"] == "majority"}
    assert set(against) == {"lora", "reft", "heft"}
    assert {n: s["above_majority"] for n, s in report["strategies"].items()} == {"base": None, **against}


def test_every_epoch_is_evaluated_and_heft_reuses_lora_epoch_one(study):
    out, _ = study
    report = _report(out)
    assert [p["epoch"] for p in report["epochs"]["base"]] == [0]
    for name in ("lora", "reft", "heft"):
        assert [p["epoch"] for p in report["epochs"][name]] == [1, 2], name
    for seed in SEEDS:
        for name in ("lora", "reft", "heft"):
            folder = _folder(out, name, seed)
            recs = [r.to_json() for r in RunFolder(folder).read_epochs()]
            final = json.loads((folder / "metrics.json").read_text())
            assert recs[-1]["accuracy"] == final["accuracy"] and recs[-1]["tokens"] == final["train_tokens"]
            assert recs[-1]["flops"] == pytest.approx(final["train_flops"])
            assert recs[0]["tokens"] < recs[1]["tokens"] and recs[0]["flops"] < recs[1]["flops"]
        lora_1, heft_1 = (RunFolder(_folder(out, n, seed)).read_epochs()[0].to_json() for n in ("lora", "heft"))
        assert heft_1["reused_from"] == "lora (epoch 1 snapshot)"
        assert {k: heft_1[k] for k in ("accuracy", "tokens", "flops", "optimizer_steps")} == \
               {k: lora_1[k] for k in ("accuracy", "tokens", "flops", "optimizer_steps")}
    assert report["shared_stages"]["heft"]["from"] == ["lora (epoch 1 snapshot)"]
    md = (out / "report.md").read_text()
    assert "taken from lora (epoch 1 snapshot)" in md


def test_targets_are_first_epochs_reaching_them(study):
    out, _ = study
    report = _report(out)
    for t in report["targets"]:
        curve = report["epochs"][t["strategy"]]
        hits = [p["epoch"] for p in curve if p["mean"] >= t["target_accuracy"] - 1e-12]
        assert t["epoch"] == (hits[0] if hits else None)
    assert {t["target"] for t in report["targets"]} >= {"50.0%", "lora's final accuracy", "heft's final accuracy"}


def test_flops_follow_the_documented_estimate(study):
    out, _ = study
    meta = json.loads((out / "seed-0" / "reft" / "meta.json").read_text())
    n = meta["non_embedding_params"]
    lora, reft = (json.loads((out / "seed-0" / name / "metrics.json").read_text()) for name in ("lora", "reft"))
    assert lora["train_flops"] == pytest.approx(4 * n * lora["train_tokens"])  # LoRA on every layer: (2 + 2) N per token
    # ReFT edits layer 0's output: its backward stops above layer 0, which the layer prefix bypasses after the first
    # epoch (the exact arithmetic per path: tests/training/test_cost.py)
    assert 2 * n * reft["train_tokens"] < reft["train_flops"] < 4 * n * reft["train_tokens"]
    assert cost.backward_fraction(2, 4) == 0.5 and cost.train_flops(10, 100, 0.5) == 3000


def test_plots_tensorboard_and_edit_norms(study):
    out, _ = study
    report = _report(out)
    assert set(report["plots"]) == {"epoch", "flops", "reft_edit_norms"}
    md = (out / "report.md").read_text()
    for path in report["plots"].values():
        assert (out / path).stat().st_size > 1000 and f"]({path})" in md
    norms = report["reft_edit_norms"]
    assert set(norms) == {"reft", "heft"} and len(norms["reft"]["per_layer"]) == 4 * 2  # 4 layers x first/last
    # recompute one gain: identity init, so ||R^T (W - R)||_F is what training learned
    t = load_file(str(out / "seed-0" / "reft" / "stages" / "00-reft" / "reft.safetensors"))
    t1 = load_file(str(out / "seed-1" / "reft" / "stages" / "00-reft" / "reft.safetensors"))
    gains = [float(torch.linalg.matrix_norm(x["L2_last.rotation"].double().T @ (x["L2_last.weight"] - x["L2_last.rotation"]).double()))
             for x in (t, t1)]
    row = next(r for r in norms["reft"]["per_layer"] if r["layer"] == 2 and r["group"] == "last")
    assert row["gain"] == pytest.approx(np.mean(gains)) and row["gain"] > 0
    events = list((out / "seed-0" / "heft" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_rerun_reuses_every_folder(study):
    out, args = study
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")}
    report = _report(out)
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/*/metrics.json")} == before
    again = _report(out)
    assert again["strategies"] == report["strategies"] and again["pairs"] == report["pairs"]


def test_report_round_trip(study, tmp_path):
    """report.json holds typed records: built -> written -> read back equal, with report.json's keys in their
    order; report.md is rendered from the records alone (the read-back report renders the same file)."""
    out, args = study
    configs = read_suite(Path(args[args.index("--config") + 1]), [])
    built = build_report(StudyFolder(out, flat=False), configs, SEEDS, [0.5])
    assert isinstance(built, Report) and built == StudyFolder(out, flat=False).read_report()
    copy = StudyFolder(tmp_path, flat=False)
    copy.write_report(built, report_markdown(built))
    again = copy.read_report()
    assert again == built
    raw = json.loads((tmp_path / "report.json").read_text())
    assert again.to_json() == raw and list(again.to_json()) == list(raw) == [
        "seeds", "n", "eval_split", "model", "train_rows", "majority_label", "majority_baseline", "strategies", "pairs",
        "epochs", "targets", "shared_stages", "reft_edit_norms", "run_folders", "plots"]
    assert list(raw["shared_stages"]["heft"]) == ["from", "seconds_not_retrained"]
    assert report_markdown(again) == (out / "report.md").read_text()


def _fake_study(root: Path, model_dir: Path, files, correct: dict[str, list[list[bool]]]) -> tuple[StudyFolder, dict]:
    """A finished study written by hand: 16 rows, half labelled yes, the training majority `yes` (so the
    majority predictor scores 50%); `correct[name][k]` says which rows seed k's run got right."""
    labels = [k % 2 == 0 for k in range(16)]
    study = StudyFolder(root, flat=False)
    configs = {}
    for name in correct:
        stages = [] if name == "base" else [{"method": "lora", "epochs": 1, "lr": 1e-3}]
        configs[name] = from_dict({**tiny_config(model_dir, files, stages), "strategy": name})
    for name, per_seed in correct.items():
        for seed, right in zip(SEEDS, per_seed):
            preds = [{"idx": k, "label": lab, "pred": lab if ok else not lab} for k, (lab, ok) in enumerate(zip(labels, right))]
            acc = accuracy(preds)
            folder = study.run(name, configs[name], seed)
            folder.write_predictions(preds)
            folder.write_metrics(Metrics(
                strategy=name, accuracy=acc["accuracy"], ci95=acc["ci95"], n=16, correct=acc["correct"],
                eval_split="validation", majority_label=True, majority_baseline=0.5, trainable_params=0 if name == "base" else 100,
                train_seconds=1.0, epochs=0.0 if name == "base" else 1.0, train_tokens=0 if name == "base" else 500,
                train_flops=0.0 if name == "base" else 1e6, train_rows=16, stages=[]))
    return study, configs


def _md_row(md: str, name: str) -> list[str]:
    """The cells of the first table row of strategy `name` in report.md."""
    line = next(x for x in md.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_equal_seeds_give_no_interval_and_the_paired_test_decides(tmp_path, boolq_files):
    """Two seeds that both scored 56.25% have std 0 but no interval; 56.25% against the 50% majority is not
    shown by the paired test, so the report says "no" where a zero-width interval said "yes"."""
    nine = [True] * 9 + [False] * 7
    study, configs = _fake_study(tmp_path / "study", tmp_path, boolq_files, {
        "base": [[True] * 12 + [False] * 4] * 2,
        "lora": [nine, nine[::-1]],  # 9 of 16 right on each seed, different rows
    })
    report = build_report(study, configs, SEEDS, [])
    lora = report.strategies["lora"]
    assert lora.mean == 0.5625 and lora.std == 0 and lora.ci95 is None
    pair = report.majority_pair("lora")
    lo, hi = pair.bootstrap.ci95
    assert pair.b == MAJORITY and pair.bootstrap.diff == pytest.approx(0.0625) and lo < 0 < hi
    assert lora.above_majority is False
    base = report.strategies["base"]  # no training: no paired test against the majority, so no verdict
    assert base.ci95 is None and base.above_majority is None and report.majority_pair("base") is None
    md = report_markdown(report)
    assert _md_row(md, "lora")[3:6] == ["none (all seeds equal)", "56.2%, 56.2%", "no"]
    assert _md_row(md, "base")[5] == "n/a"
    assert f"| lora | majority | +6.2 pts | {100 * lo:+.1f} to {100 * hi:+.1f} |" in md
    assert "| lora | 56.2% ± 0.0 | none (all seeds equal) |" in console_table(report)
    study.write_report(report, md)
    raw = json.loads((study.path / "report.json").read_text())["strategies"]["lora"]
    assert raw["ci95"] is None and raw["std"] == 0 and raw["above_majority"] is False


def test_interval_is_the_same_number_in_json_and_markdown(tmp_path, boolq_files):
    """Student's t over two seeds far apart reaches past 0% and 100%: report.json and report.md both show it
    as computed (not clipped), and a strategy clearly above the majority on both seeds is "yes"."""
    study, configs = _fake_study(tmp_path / "study", tmp_path, boolq_files, {
        "base": [[True] * 8 + [False] * 8] * 2,
        "lora": [[True] * 4 + [False] * 12, [True] * 14 + [False] * 2],
        "good": [[True] * 15 + [False], [True] * 16],
    })
    report = build_report(study, configs, SEEDS, [])
    study.write_report(report, report_markdown(report))
    raw = json.loads((study.path / "report.json").read_text())["strategies"]
    lo, hi = raw["lora"]["ci95"]
    half = 12.706 * np.std([0.25, 0.875], ddof=1) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((0.5625 - half, 0.5625 + half)) and lo < 0 and hi > 1
    md = (study.path / "report.md").read_text()
    assert _md_row(md, "lora")[3] == f"{100 * lo:.1f}% to {100 * hi:.1f}%"
    assert "not clipped" in md
    good = report.strategies["good"]
    assert report.majority_pair("good").bootstrap.ci95[0] > 0 and good.above_majority is True
    assert _md_row(md, "good")[5] == "yes"


def test_per_epoch_evaluation_does_not_change_training(tiny_model_dir, boolq_files, tmp_path):
    stage = [{"method": "joint", "epochs": 2, "lr": 1e-3, "batch_size": 8}]
    plain = tiny_config(tiny_model_dir, boolq_files, stage, data={"train_size": 16, "eval_size": 8}, lora={"dropout": 0.1},
                        reft={"dropout": 0.1})
    every = tiny_config(tiny_model_dir, boolq_files, stage, data={"train_size": 16, "eval_size": 8}, lora={"dropout": 0.1},
                        reft={"dropout": 0.1}, eval={"every_epoch": True})
    a = train_run(from_dict(plain), tmp_path / "a")
    b = train_run(from_dict(every), tmp_path / "b")
    assert a.accuracy == b.accuracy and a.correct == b.correct
    for f in ("reft.safetensors", "adapter/adapter_model.safetensors"):
        x, y = load_file(str(tmp_path / "a" / "stages" / "00-joint" / f)), load_file(str(tmp_path / "b" / "stages" / "00-joint" / f))
        assert all(torch.equal(x[k], y[k]) for k in x), f
    assert [r.epoch for r in RunFolder(tmp_path / "b").read_epochs()] == [1, 2] and not (tmp_path / "a" / "epochs.jsonl").exists()


def test_final_only_evaluates_once_per_run(tiny_model_dir, boolq_files, tmp_path):
    """`--final-only`: the same final numbers as a per-epoch study, one evaluation per run, no epoch table."""
    common = tiny_config(tiny_model_dir, boolq_files, [], data={"train_size": 16, "eval_size": 8})
    del common["stages"]
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"common": common, "strategies": {
        "lora": [{"method": "lora", "lr": 1.0e-3, "epochs": 2, "batch_size": 8}]}}, sort_keys=False))
    runs = {}
    for mode, flag in (("final", ["--final-only"]), ("every", [])):
        assert main(["compare", "--config", str(path), "--seeds", "0", "--out", str(tmp_path / mode), *flag]) == 0
        runs[mode] = _report(tmp_path / mode)
    final, every = runs["final"], runs["every"]
    assert final["strategies"]["lora"]["mean"] == every["strategies"]["lora"]["mean"]
    assert final["epochs"] == {"lora": []} and [p["epoch"] for p in every["epochs"]["lora"]] == [1, 2]
    assert not (tmp_path / "final" / "seed-0" / "lora" / "epochs.jsonl").exists()
    assert "accuracy vs" not in (tmp_path / "final" / "report.md").read_text().lower()


@pytest.mark.parametrize("seeds, message", [(["1", "1"], "duplicates"), ([], "at least one seed")])
def test_bad_seeds_are_refused(tmp_path, capsys, seeds, message):
    if seeds:
        assert main(["compare", "--seeds", *seeds, "--out", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    else:  # the command line cannot pass no seeds (argparse refuses `--seeds` alone); the Python API can
        from heft.errors import ConfigError
        from heft.study.compare import run_study
        from heft.config.suite import default_suite_path

        with pytest.raises(ConfigError, match=message):
            run_study(default_suite_path(), tmp_path / "o", [], seeds=seeds)
    assert not (tmp_path / "o").exists(), "nothing written for a refused command"


def test_stats_known_values():
    assert stats.mcnemar_exact([True] * 5 + [False], [False] * 5 + [False]) == {"a_only": 5, "b_only": 0, "p": 0.0625}
    assert stats.mcnemar_exact([True, False], [True, False])["p"] == 1.0
    assert stats.t95(2) == 4.303 and abs(stats.t95(100) - 1.984) < 2e-3
    m = stats.mean_interval([0.6, 0.7, 0.8])
    assert m["mean"] == pytest.approx(0.7) and m["std"] == pytest.approx(0.1)
    assert m["ci95"] == pytest.approx([0.7 - 4.303 * 0.1 / math.sqrt(3), 0.7 + 4.303 * 0.1 / math.sqrt(3)])
    assert stats.mean_interval([0.5]) == {"mean": 0.5, "std": None, "ci95": None}
    assert stats.mean_interval([0.5625, 0.5625]) == {"mean": 0.5625, "std": 0.0, "ci95": None}  # no spread to estimate
    assert stats.mean_interval([0.25, 0.875])["ci95"][0] < 0  # as computed, not clipped to [0, 1]
    same = np.array([[1, 0, 1, 1]])
    assert stats.paired_bootstrap(same, same) == {"diff": 0.0, "ci95": [0.0, 0.0], "p": 1.0}
    better = stats.paired_bootstrap(np.ones((1, 200)), np.zeros((1, 200)))
    assert better["diff"] == 1.0 and better["p"] == 0.0
