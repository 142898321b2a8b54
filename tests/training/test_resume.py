"""Crash safety: a SIGKILLed training process resumes to bit-identical adapters and predictions;
every write is atomic; output folders are never mixed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from heft.training import checkpoint
from heft.run import atomic
from heft.methods import lora
from heft.cli import main


def _cfg(tiny_model_dir, boolq_files, tmp_path, **reft) -> Path:
    raw = tiny_config(tiny_model_dir, boolq_files,
                      [{"method": "lora", "epochs": 2, "lr": 1e-2, "batch_size": 2},
                       {"method": "reft", "epochs": 2, "lr": 1e-2, "batch_size": 2}],
                      lora={"dropout": 0.1}, reft={"dropout": 0.1, **reft}, checkpoint_every=3)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {f"lora/{k}": v for k, v in load_file(str(run / "stages/00-lora/adapter/adapter_model.safetensors")).items()}
    out.update({f"reft/{k}": v for k, v in load_file(str(run / "stages/01-reft/reft.safetensors")).items()})
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dir, boolq_files, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    cfg = _cfg(tiny_model_dir, boolq_files, tmp)
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "run")]) == 0
    return cfg, tmp / "run"


@pytest.fixture(scope="module")
def token_prefix_reference(tiny_model_dir, boolq_files, tmp_path_factory):
    """The same run with ReFT on the last 3 prompt positions only: its stage takes the token prefix, kept keys/values."""
    tmp = tmp_path_factory.mktemp("token-prefix")
    cfg = _cfg(tiny_model_dir, boolq_files, tmp, positions={"first": 0, "last": 3})
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "run")]) == 0
    return cfg, tmp / "run"


@pytest.mark.parametrize("kill_in", ["00-lora", "01-reft", "01-reft token prefix"])
def test_sigkill_then_resume_is_bit_identical(request, tmp_path, kill_in):
    """Killed after the stage's first checkpoint and resumed: also on the token prefix, whose kept keys/values the
    resumed run computes again (in the same fixed groups, so to the same numbers)."""
    cfg, ref = request.getfixturevalue("token_prefix_reference" if "token" in kill_in else "reference")
    kill_in = kill_in.split()[0]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "heft", "train", "--config", str(cfg), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    pointer = out / "stages" / kill_in / "checkpoints" / checkpoint.LATEST
    deadline = time.time() + 120
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)  # a real kill: no handler, no cleanup
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the training process finished before it could be killed"
    assert not (out / "stages" / kill_in / "stage.json").exists(), "killed after the stage ended, not mid-stage"
    assert not (out / "metrics.json").exists()
    # A folder holding an unfinished run is refused without --resume, and names both ways out.
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 2
    assert main(["train", "--out", str(out), "--resume"]) == 0  # config taken from the folder itself
    ref_t, got_t = _tensors(ref), _tensors(out)
    assert ref_t.keys() == got_t.keys()
    for k in ref_t:
        assert torch.equal(ref_t[k], got_t[k]), k
    ref_p = (ref / "predictions.jsonl").read_text()
    assert (out / "predictions.jsonl").read_text() == ref_p
    log = [json.loads(line) for line in (out / "stages" / kill_in / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, len(log) + 1)), "each step logged exactly once after resuming"
    assert not (out / "stages" / kill_in / "checkpoints").exists(), "checkpoints are removed once the stage is saved"


def test_resume_refuses_a_different_config(reference, tmp_path, capsys):
    cfg, ref = reference
    code = main(["train", "--config", str(cfg), "--out", str(ref), "--resume", "--stages.0.lr", "0.5"])
    assert code == 2
    err = capsys.readouterr().err
    assert "different config" in err and "--overwrite" in err


def test_resume_of_a_finished_run_changes_nothing(reference, capsys):
    cfg, ref = reference
    before = (ref / "metrics.json").read_text()
    assert main(["train", "--config", str(cfg), "--out", str(ref), "--resume"]) == 0
    assert (ref / "metrics.json").read_text() == before


def test_nonempty_folder_message_names_resume_and_overwrite(reference, capsys):
    cfg, ref = reference
    assert main(["train", "--config", str(cfg), "--out", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and "finished run" in err


def test_resume_without_a_run_is_refused(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume"]) == 2
    assert "holds no run" in capsys.readouterr().err


# ----------------------------------------------------------------------------- atomic writes


def test_crash_during_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"accuracy": 0.5})

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        atomic.write_json(target, {"accuracy": 0.9})
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary file left behind"


def test_crash_while_saving_an_adapter_keeps_the_old_one(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"old and complete")

    class Exploding:
        def save_pretrained(self, where):
            Path(where, "adapter_model.safetensors").write_bytes(b"half")
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        lora.save(Exploding(), folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == b"old and complete"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"], "the temporary folder is removed"


def test_checkpoint_pointer_survives_a_crash_mid_save(tmp_path, monkeypatch):
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    first = checkpoint.save(tmp_path, checkpoint.snapshot([("w", p)], opt), sched, checkpoint.Progress(step=1, micro=1))
    real_save = torch.save

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(tmp_path, checkpoint.snapshot([("w", p)], opt), sched, checkpoint.Progress(step=2, micro=2))
    monkeypatch.setattr(torch, "save", real_save)
    assert checkpoint.latest(tmp_path) == first
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latest", "step-000001"]
    with torch.no_grad():
        p.zero_()
    progress = checkpoint.restore(first, [("w", p)], opt, sched)
    assert progress.step == 1 and torch.equal(p.detach(), torch.ones(3))


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    from heft.errors import CheckpointError

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ck = checkpoint.save(tmp_path, checkpoint.snapshot([("w", p)], opt), sched, checkpoint.Progress(step=1, micro=1))
    data = (ck / "trainable.safetensors").read_bytes()
    (ck / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        checkpoint.restore(ck, [("w", p)], opt, sched)
