"""`heft tune` on the tiny Llama: trials as run folders scored on the dev split, the report and best.yaml, pruning at
epoch ends, bad input refused in one line before any trial, and workers sharing one study: two processes on a journal
file (and on a real PostgreSQL server where HEFT_TEST_POSTGRES names one), and a worker killed with SIGKILL
mid-trial whose trial is retried from its run folder, every trial accounted for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

optuna = pytest.importorskip("optuna")

from conftest import tiny_config  # noqa: E402
from heft.config.load import load  # noqa: E402
from heft.errors import ConfigError  # noqa: E402
from heft.run.folder import RunFolder  # noqa: E402
from heft.training.checkpoint import latest  # noqa: E402
from heft.tune.study import read_tuned, tune  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

POSTGRES = os.environ.get("HEFT_TEST_POSTGRES")
SEARCH = {"stages.0.lr": {"log_uniform": [1.0e-4, 1.0e-2]}, "lora.r": {"choice": [2, 4]}}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def write_config(tmp_path: Path, model: Path, files: tuple[Path, Path], epochs: float = 2, search: dict | None = SEARCH,
                 train_size: int = 16) -> Path:
    """A LoRA config on the tiny model: `train_size` rows, `epochs` epochs, 8 dev rows, with `search:`."""
    raw = tiny_config(model, files, [{"method": "lora", "epochs": epochs, "lr": 1e-3}], data={"train_size": train_size})
    if search is not None:
        raw["search"] = search
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(params=["journal", "postgres"])
def storage(request, tmp_path) -> str:
    if request.param == "postgres":
        if POSTGRES is None:
            pytest.skip("HEFT_TEST_POSTGRES is unset: no PostgreSQL server to test against (.ci/run starts one)")
        return POSTGRES
    return f"journal:{tmp_path / 'shared.journal'}"


def trials_of(storage: str, name: str) -> list:
    from heft.tune.storage import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials()


def test_trials_are_run_folders_on_the_dev_split_and_best_yaml_trains(tmp_path, tiny_model_dir, boolq_files):
    config = write_config(tmp_path, tiny_model_dir, boolq_files)
    out = tmp_path / "tune"
    report = tune(config, out, 3, pruner="none")
    assert report["counts"] == {"complete": 3, "pruned": 0, "failed": 0, "retried": 0, "running": 0, "waiting": 0}
    rows = report["rows"]
    assert [r["run"] for r in rows] == ["trial-0", "trial-1", "trial-2"]
    for row in rows:
        run = RunFolder(out / row["run"])
        metrics, cfg = run.read_metrics(), run.read_config()
        assert (metrics.eval_split, metrics.n, cfg.data.eval_split, cfg.eval.every_epoch) == ("dev", 8, "dev", True)
        assert metrics.accuracy == row["value"]  # the trial's value is its run's final dev accuracy
        assert (cfg.stages[0].lr, cfg.lora.r) == (row["values"]["stages.0.lr"], row["values"]["lora.r"])
        assert row["dev"] == [run.read_epochs()[0].accuracy] and row["epochs"] == [1.0]  # the pruner's step 1
    assert len({r["values"]["stages.0.lr"] for r in rows}) == 3
    best = max(rows, key=lambda r: (r["value"], -r["number"]))
    assert report["best"]["number"] == best["number"]
    tuned = read_tuned(config, [], 3)
    best_cfg = load(out / "best.yaml")
    assert best_cfg == tuned.final_config(best["values"])  # the tuned config's own evaluation split, ready for heft train
    assert (best_cfg.data.eval_split, best_cfg.eval.every_epoch, best_cfg.stages[0].lr) == \
        ("validation", False, best["values"]["stages.0.lr"])
    names = {p.name for p in (out / "plots").iterdir()}
    assert names == {"history.png", "epochs.png", "vs_stages_0_lr.png", "vs_lora_r.png", "importances.png"}
    text = (out / "tune.md").read_text()
    assert "| `stages.0.lr` | log_uniform | [0.0001, 0.01] |" in text and f"Trial {best['number']}: dev accuracy" in text
    # the same command again: the study is finished, so no trial runs and the report is the same
    again = tune(config, out, 3, pruner="none")
    assert len(trials_of(f"journal:{out / 'optuna.journal'}", "lora")) == 3
    assert again["rows"] == rows and again["best"] == report["best"]


def test_a_pruned_trial_stops_at_the_epoch_end_and_its_folder_stays_resumable(tmp_path, tiny_model_dir, boolq_files):
    config = write_config(tmp_path, tiny_model_dir, boolq_files, epochs=3)
    out = tmp_path / "tune"
    report = tune(config, out, 2, pruner=optuna.pruners.ThresholdPruner(lower=1.01))  # below 101%: every trial stops
    assert report["counts"]["pruned"] == 2 and report["best"] is None and not (out / "best.yaml").exists()
    for row in report["rows"]:
        run = RunFolder(out / row["run"])
        assert run.is_heft() and not run.is_finished()  # stopped after epoch 1 of 3
        assert [p.stage_epoch for p in run.read_epochs()] == [1.0]
        assert row["dev"] == [run.read_epochs()[0].accuracy] and row["value"] == row["dev"][0]


def test_bad_input_is_one_line_before_any_trial(tmp_path, tiny_model_dir, boolq_files):
    config = write_config(tmp_path, tiny_model_dir, boolq_files, epochs=1)
    journal = tmp_path / "s.journal"
    tune(config, tmp_path / "first", 1, storage=f"journal:{journal}", pruner="none")
    (tmp_path / "other").mkdir()
    other = write_config(tmp_path / "other", tiny_model_dir, boolq_files, epochs=1,
                         search={"stages.0.lr": {"log_uniform": [1.0e-4, 3.0e-3]}})

    def refused(*args, **kwargs) -> str:
        with pytest.raises(ConfigError) as e:
            tune(*args, **kwargs)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert refused(other, tmp_path / "second", 1, storage=f"journal:{journal}", study_name="lora") == (
        "--study-name: study 'lora' exists with another search space (lora.r: choice [2, 4]; stages.0.lr: log_uniform "
        "[0.0001, 0.01]); use the same `search:`, or another --study-name")
    assert refused(config, tmp_path / "second", 2, storage=f"journal:{journal}") == (
        "--trials: study 'lora' has 1 trials in all; pass --trials 1, or another --study-name")
    assert refused(config, tmp_path / "second", 1, storage=f"journal:{journal}", overrides=[("stages.0.epochs", "2")]) == (
        "--study-name: study 'lora' exists with another config (differs in stages.0.epochs); use the same config and "
        "overrides, or another --study-name")
    assert refused(config, tmp_path / "second", 1, storage=f"journal:{tmp_path / 'no' / 's.journal'}") == (
        f"--storage: the folder {tmp_path / 'no'} of the journal file does not exist; create it or choose another path")
    unreachable = refused(config, tmp_path / "second", 1, storage="postgresql://heft:secret@127.0.0.1:9/heft")
    assert unreachable.startswith("--storage: cannot reach postgresql://heft:***@127.0.0.1:9/heft: ") and "secret" not in unreachable
    assert "refused" in unreachable  # the driver's own reason
    assert refused(config, tmp_path / "first", 1, study_name="another") == (
        f"--out: {tmp_path / 'first'} holds the trials of study 'lora' (in journal:{journal}), not of 'another'; choose "
        "another --out, or pass --study-name lora")
    bad_space = write_config(tmp_path / "other", tiny_model_dir, boolq_files, search={"stages.0.lrr": {"uniform": [1, 2]}})
    with pytest.raises(ConfigError) as e:  # one line per problem (all of them: tests/tune/test_space.py)
        tune(bad_space, tmp_path / "second", 1)
    assert str(e.value) == ("invalid search space:\n  - search.stages.0.lrr: stages.0 has no field `lrr` (did you mean lr?); "
                            "its fields: method, epochs, lr, scheduler, warmup_steps, weight_decay, batch_size, grad_accum, "
                            "max_grad_norm, max_length, name")
    assert not (tmp_path / "second").exists()  # nothing written by any refused start
    assert len(trials_of(f"journal:{journal}", "lora")) == 1


def _worker(config: Path, out: Path, trials: int, storage: str, name: str, log: Path, heartbeat: float = 60) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "heft", "tune", "--config", str(config), "--trials", str(trials),
                             "--out", str(out), "--storage", storage, "--study-name", name, "--pruner", "none",
                             "--heartbeat", str(heartbeat)], stdout=subprocess.DEVNULL, stderr=log.open("w"), env=ENV)


def test_two_workers_share_one_study_and_run_exactly_n_trials(tmp_path, tiny_model_dir, boolq_files, storage):
    config = write_config(tmp_path, tiny_model_dir, boolq_files, epochs=1, train_size=8)
    name = f"two-{uuid.uuid4().hex[:8]}"
    workers = [_worker(config, tmp_path / "tune", 5, storage, name, tmp_path / f"w{i}.log") for i in range(2)]
    codes = [w.wait(timeout=900) for w in workers]
    assert codes == [0, 0], [(tmp_path / f"w{i}.log").read_text()[-2000:] for i in range(2)]
    trials = trials_of(storage, name)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["heft_run"] for t in trials) == [f"trial-{k}" for k in range(5)]
    assert all(RunFolder(tmp_path / "tune" / f"trial-{k}").is_finished() for k in range(5))
    report = (tmp_path / "tune" / "tune.json")
    assert report.is_file() and '"complete": 5' in report.read_text()


def test_a_worker_killed_mid_trial_is_retried_from_its_run_folder(tmp_path, tiny_model_dir, boolq_files, storage):
    config = write_config(tmp_path, tiny_model_dir, boolq_files, epochs=6)
    name = f"kill-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "tune"
    first = _worker(config, out, 2, storage, name, tmp_path / "first.log")
    checkpoints = out / "trial-0" / "stages" / "00-lora" / "checkpoints"
    deadline = time.monotonic() + 600
    while latest(checkpoints) is None and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # mid-trial: after its first epoch's evaluation and checkpoint, before its last
    first.wait()
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    before = RunFolder(out / "trial-0").read_epochs()
    assert 1 <= len(before) < 6 and not RunFolder(out / "trial-0").is_finished()
    second = _worker(config, out, 2, storage, name, tmp_path / "second.log")
    assert second.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
    trials = trials_of(storage, name)
    states = [t.state.name for t in trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"]  # the killed trial, the other one, the killed one's retry
    killed, retry = trials[0], trials[2]
    assert retry.user_attrs["heft_retry_of"] == 0 and retry.user_attrs["heft_run"] == "trial-0"
    assert retry.params == killed.params  # the same values, so the same run folder continues
    assert killed.user_attrs["heft_error"].startswith(f"its worker (PID {first.pid} on ")
    assert retry.intermediate_values[1] == before[0].accuracy  # what the folder measured before the kill, reported first
    run = RunFolder(out / "trial-0")
    assert run.is_finished() and run.read_metrics().accuracy == retry.value
    log = (tmp_path / "second.log").read_text()
    assert "stage 0 (lora): resuming from " in log  # continued from the killed worker's epoch checkpoint
    text = (out / "tune.md").read_text()
    assert "2 in all: 2 complete, 0 pruned, 0 failed; 1 more stopped with their worker and were retried" in text
