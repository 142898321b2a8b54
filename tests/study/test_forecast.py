"""The expected duration of a study: each run's epochs, rows and evaluation passes at the speeds measured so far,
logged once the first training speed is known and again as each strategy starts; and the log says which stages a
strategy trains and which it takes from the stage cache."""

from __future__ import annotations

import logging
import re

import pytest
import yaml

from conftest import tiny_config
from heft.cli import main
from heft.study import forecast as fc
from heft.study.forecast import Forecast, PlannedRun, duration, passes

BASE = PlannedRun("out/base", "base", (), 600, 500, 1, "boolq")
LORA = PlannedRun("out/lora", "lora", (("lora", 2.0),), 600, 500, 1, "boolq")
HEFT = PlannedRun("out/heft", "heft", (("reft", 1.0),), 600, 500, 1, "boolq")  # its LoRA stage comes from the cache


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(fc.time, "perf_counter", lambda: now[0])
    return now


def test_evaluation_passes_count_the_epochs_a_run_trains():
    assert passes([2.0], True, every_epoch=False) == 1
    assert passes([2.0], True, every_epoch=True) == 2  # after epoch 1, and the final evaluation after epoch 2
    assert passes([1.0, 1.0], True, every_epoch=True) == 2  # after stage 0, and the final one
    assert passes([1.5], True, every_epoch=True) == 2
    assert passes([], False, every_epoch=True) == 1  # nothing trained here: the final evaluation alone


def test_a_runs_time_is_its_epochs_rows_and_passes_at_the_measured_speeds(clock):
    f = Forecast([BASE, LORA, HEFT])
    assert f.seconds(BASE) is None and f.seconds_left() is None  # nothing measured yet
    f.start("out/base")
    f.pace("evaluation", 30.0)
    f.done("out/base")
    assert f.seconds(BASE) == 30.0 and f.seconds(LORA) is None  # no training speed yet
    f.start("out/lora")
    f.pace("lora", 0.5)
    assert f.seconds(LORA) == 2 * 600 * 0.5 + 30.0
    assert f.seconds(HEFT) == 600 * 0.5 + 30.0  # ReFT not measured yet: assumed at the measured methods' mean
    assert f.not_measured() == ["reft"]
    other = PlannedRun("out/x", "x", (), 600, 100, 1, "other data")  # evaluation of another setup, not measured
    assert f.seconds(other) == 0.5 * 0.5 * 100
    clock[0] += 200.0  # 200 s into LoRA-only: what is left of it, and HEFT
    assert f.seconds_left() == pytest.approx(630.0 - 200.0 + 330.0)
    f.pace("reft", 0.1)
    assert f.seconds(HEFT) == 600 * 0.1 + 30.0 and f.not_measured() == []


def test_the_log_gives_the_suites_time_once_measured_and_each_strategys_at_its_start(clock, caplog):
    f = Forecast([BASE, LORA, HEFT])
    with caplog.at_level(logging.INFO, logger="heft"):
        f.start("out/base")
        f.pace("evaluation", 30.0)
        f.done("out/base")
        f.start("out/lora")
        f.pace("lora", 0.5)
        f.pace("lora", 0.5)  # later groups of steps refine the speed, and are not announced again
        clock[0] += 630.0
        f.done("out/lora")
        f.start("out/heft")
    assert caplog.messages == [
        "base: evaluation only; the expected time follows once a speed is measured",
        "lora: training lora 2 epochs on 600 rows; 1 evaluation pass; the expected time follows once a speed is measured",
        "expected: about 16 min for the whole suite (2 strategies left); not measured yet, so assumed: reft",
        "heft: expected about 6 min (training reft 1 epoch on 600 rows; 1 evaluation pass); about 6 min left for the "
        "whole suite (1 strategy); not measured yet, so assumed: reft",
    ]


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (5, 59, 60, 89 * 60, 90 * 60, 5 * 3600)] == [
        "under a minute", "under a minute", "about 1 min", "about 89 min", "about 1.5 h", "about 5.0 h"]


def test_heft_run_logs_what_each_strategy_trains_or_takes_and_its_expected_time(tiny_model_dir, boolq_files, tmp_path,
                                                                                caplog):
    common = tiny_config(tiny_model_dir, boolq_files, [], data={"train_size": 16, "eval_size": 8})
    del common["stages"]
    lora = {"method": "lora", "lr": 1.0e-3, "scheduler": "constant", "batch_size": 8}
    reft = {"method": "reft", "lr": 2.0e-3, "batch_size": 8}
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"common": common, "strategies": {
        "base": [], "lora": [{**lora, "epochs": 2}], "heft": [{**lora, "epochs": 1}, {**reft, "epochs": 1}]}}))
    with caplog.at_level(logging.INFO, logger="heft"):
        assert main(["run", "--config", str(suite), "--out", str(tmp_path / "out")]) == 0
    logged = caplog.messages
    assert "base: no stages to train: evaluation only" in logged
    assert "lora: stage 0 (lora) to train" in logged
    assert "heft: stage 0 (lora) taken from the stage cache (lora (epoch 1 snapshot)); stage 1 (reft) to train" in logged
    # LoRA-only trains first (HEFT starts from its first epoch), and its first steps give the suite's expected time;
    # the durations themselves depend on the machine
    time = r"(under a minute|about \d+ min|about \d+\.\d h)"
    expected = [m for m in logged if m.startswith("expected: ")]
    assert len(expected) == 1 and logged.index(expected[0]) > logged.index("lora: stage 0 (lora) to train")
    assert re.fullmatch(f"expected: {time} for the whole suite \\(3 strategies left\\); not measured yet, so assumed: "
                        "reft, evaluation", expected[0]), expected
    assert any(re.fullmatch(f"base: expected {time} \\(evaluation only\\); {time} left for the whole suite \\(2 strategies\\); "
                            "not measured yet, so assumed: reft", m) for m in logged), logged
    assert any(re.fullmatch(f"heft: expected {time} \\(training reft 1 epoch on 16 rows; 1 evaluation pass\\); {time} left "
                            "for the whole suite \\(1 strategy\\); not measured yet, so assumed: reft", m) for m in logged), logged
