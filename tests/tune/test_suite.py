"""`heft compare --tune N`: each trained strategy tuned on the dev split with the same N trials, then the seeds
trained from the best configs and compared on the evaluated split."""

from __future__ import annotations

import json

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from conftest import tiny_config  # noqa: E402
from heft.cli import main  # noqa: E402
from heft.config.suite import read_suite  # noqa: E402
from heft.run.folder import RunFolder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_tunes_every_strategy_with_the_same_trials_then_trains_the_best(tmp_path, tiny_model_dir, boolq_files):
    common = tiny_config(tiny_model_dir, boolq_files, [], data={"train_size": 8})
    common.pop("stages")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"common": common, "strategies": {
        "base": [], "lora": [{"method": "lora", "epochs": 1, "lr": 1e-3}],
        "reft": {"stages": [{"method": "reft", "epochs": 1, "lr": 1e-3}],  # its own space; lora: the default one
                 "search": {"stages.0.lr": {"log_uniform": [1e-4, 1e-2]}}}}}))
    out = tmp_path / "study"
    assert main(["compare", "--config", str(suite), "--seeds", "0", "1", "--out", str(out), "--tune", "2"]) == 0
    tuned = tmp_path / "study-tune"
    assert sorted(p.name for p in tuned.iterdir()) == ["lora", "reft", "suite.yaml", "tuning.md"]
    best = {}
    for name in ("lora", "reft"):
        report = json.loads((tuned / name / "tune.json").read_text())
        assert report["study"] == f"study-{name}" and report["counts"]["complete"] == 2  # the same trials each
        assert list(report["space"]) == (["stages.0.lr", "lora.r"] if name == "lora" else ["stages.0.lr"])
        assert all(RunFolder(tuned / name / r["run"]).read_metrics().eval_split == "dev" for r in report["rows"])
        best[name] = report["best"]
    configs = read_suite(tuned / "suite.yaml", [])
    assert configs["lora"].stages[0].lr == best["lora"]["values"]["stages.0.lr"]
    assert configs["lora"].lora.r == best["lora"]["values"]["lora.r"]
    assert configs["reft"].stages[0].lr == best["reft"]["values"]["stages.0.lr"]
    assert configs["reft"].data.eval_split == "validation" and configs["base"].stages == ()
    for seed in (0, 1):  # the seeds trained the best configs, scored on the evaluated split
        run = RunFolder(out / f"seed-{seed}" / "lora")
        assert run.read_config().stages[0].lr == best["lora"]["values"]["stages.0.lr"]
        assert run.read_metrics().eval_split == "validation"
    assert (out / "report.md").is_file()
    row = (f"| lora | `stages.0.lr` log_uniform [0.0001, 0.003], `lora.r` choice [4, 8, 16] | 2 / 0 / 0 | "
           f"{best['lora']['value']:.2%} (trial {best['lora']['number']}) |")
    assert row in (tuned / "tuning.md").read_text()
    # the comparison's own report states the search, the trials each strategy got and the best dev scores
    report_md = (out / "report.md").read_text()
    assert "## Tuning on the dev split" in report_md and "`heft compare --tune 2`: the same 2 trials each" in report_md
    assert row.replace("[lora/tune.md](lora/tune.md)", "[../study-tune/lora/tune.md](../study-tune/lora/tune.md)") in report_md
    tuning = json.loads((out / "report.json").read_text())["tuning"]
    assert sorted(tuning) == ["lora", "reft"] and tuning["reft"]["best_dev_accuracy"] == best["reft"]["value"]
    assert tuning["lora"]["searched"]["lora.r"] == {"choice": [4, 8, 16]} and tuning["lora"]["trials"] == 2


def test_a_bad_search_of_one_strategy_is_one_line_before_any_trial(tmp_path, tiny_model_dir, boolq_files, capsys):
    common = tiny_config(tiny_model_dir, boolq_files, [], data={"train_size": 8})
    common.pop("stages")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"common": common, "strategies": {
        "base": [], "reft": {"stages": [{"method": "reft", "epochs": 1, "lr": 1e-3}],
                             "search": {"reft.rnk": {"choice": [2, 4]}}}}}))
    out = tmp_path / "study"
    assert main(["compare", "--config", str(suite), "--seeds", "0", "--out", str(out), "--tune", "2"]) == 2
    err = capsys.readouterr().err
    assert "strategies.reft: invalid search space" in err and "search.reft.rnk: reft has no field `rnk`" in err
    assert not (tmp_path / "study-tune" / "reft").exists()  # refused before any study or trial
