"""Data parallel on CPU: 2 processes (torchrun or `accelerate launch`, gloo; DDP, and FSDP2 with the
shipped config) give the same adapters and predictions as one process with the same global batch,
evaluate every row exactly once, keep ReFT's R orthonormal and identical on every rank, and resume a
killed run exactly (every rank's random state); FSDP checkpoints hold whole tensors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import boolq_rows, tiny_config, write_jsonl
from heft.training import checkpoint
from heft.errors import CheckpointError
from heft.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parents[2]
ADAPTERS = ("stages/00-lora/adapter/adapter_model.safetensors", "stages/01-reft/reft.safetensors")


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def kill_at_first_checkpoint(cmd: list[str], pointer: Path, cwd: Path) -> None:
    """Start `cmd` (a launcher and its workers) and SIGKILL all of them at once, with no chance to clean
    up, as soon as the checkpoint pointer `pointer` appears (or after 120 s, or when it ends)."""
    launcher = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not pointer.exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    family = [launcher.pid, *(c.pid for c in psutil.Process(launcher.pid).children(recursive=True))]
    for pid in family:
        os.kill(pid, signal.SIGKILL)
    launcher.wait()


@pytest.fixture(scope="module")
def single(tiny_model_dir, boolq_files, tmp_path_factory) -> tuple[Path, Path]:
    """A config for 2 processes x batch 4, and its reference: one process with batch 8."""
    tmp = tmp_path_factory.mktemp("single")
    val = write_jsonl(tmp / "val.jsonl", boolq_rows(19, offset=3, google=True))  # odd: 10 + 9 rows
    stages = [{"method": "lora", "epochs": 1, "lr": 1e-2, "batch_size": 4},
              {"method": "reft", "epochs": 1, "lr": 1e-2, "batch_size": 4}]
    cfg = tmp / "cfg.yaml"
    # checkpoint_every exercises checkpointing under DDP (the log flush and RNG gather before a save are collective)
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, (boolq_files[0], val), stages, checkpoint_every=2)))
    assert main(["train", "--config", str(cfg), "--out", str(tmp / "run"),
                 "--stages.0.batch_size", "8", "--stages.1.batch_size", "8"]) == 0
    return cfg, tmp / "run"


def assert_same_run(single: Path, ddp: Path) -> None:
    """Adapters equal within float tolerance, the same predictions, each evaluation row once."""
    for f in ADAPTERS:
        a, b = load_file(str(single / f)), load_file(str(ddp / f))
        assert a.keys() == b.keys()
        for k in a:  # same math, different float summation order across processes
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    one = [json.loads(x) for x in (single / "predictions.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (ddp / "predictions.jsonl").read_text().splitlines()]
    assert [p["idx"] for p in two] == list(range(19)), "each evaluation row exactly once, in order"
    assert [p["pred"] for p in two] == [p["pred"] for p in one]
    assert max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(one, two)) < 1e-4
    steps = [s["optimizer_steps"] for s in json.loads((ddp / "metrics.json").read_text())["stages"]]
    assert steps == [5, 5], "40 training rows in global batches of 8"
    assert json.loads((ddp / "meta.json").read_text())["num_processes"] == 2


def test_two_processes_match_one(single, tmp_path):
    cfg, ref = single
    proc = torchrun("-m", "heft", "train", "--config", str(cfg), "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(ref, tmp_path / "ddp")


def test_two_processes_reuse_frozen_prefixes_and_match_one(single, tmp_path):
    """ReFT on the last positions only: every process keeps the prefixes of the rows it trains on (heft.reuse.token_prefix),
    through DDP's wrapper, and the run equals one process's."""
    cfg, _ = single
    raw = yaml.safe_load(cfg.read_text())
    raw["reft"]["positions"] = {"first": 0, "last": 3}
    last = tmp_path / "last.yaml"
    last.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(last), "--out", str(tmp_path / "one"),
                 "--stages.0.batch_size", "8", "--stages.1.batch_size", "8"]) == 0
    proc = torchrun("-m", "heft", "train", "--config", str(last), "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "come before the first edited position" in proc.stderr
    assert_same_run(tmp_path / "one", tmp_path / "ddp")


def test_two_processes_bypass_frozen_layers_and_match_one(single, tmp_path):
    """LoRA and ReFT on the upper layers only: every process keeps the streams of the rows it trains on
    (heft.reuse.layer_prefix) and bypasses the layers below, through DDP's wrapper, and the run equals one process's."""
    cfg, _ = single
    raw = yaml.safe_load(cfg.read_text())
    raw["lora"]["layers"] = raw["reft"]["layers"] = [2, 3]
    upper = tmp_path / "upper.yaml"
    upper.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(upper), "--out", str(tmp_path / "one"),
                 "--stages.0.batch_size", "8", "--stages.1.batch_size", "8"]) == 0
    proc = torchrun("-m", "heft", "train", "--config", str(upper), "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(lora): decoder layers 0..1 of 4 are frozen" in proc.stderr  # LoRA on 2-3
    assert "(reft): decoder layers 0..2 of 4 are frozen" in proc.stderr  # ReFT on the output of 2-3
    assert "every layer runs from here on" not in proc.stderr
    assert_same_run(tmp_path / "one", tmp_path / "ddp")


def test_accelerate_launch_runs_two_processes(single, tmp_path):
    # `accelerate launch --cpu --num_processes 2` and `distributed_type: MULTI_CPU` start ONE process
    # in accelerate 1.15 (no MPI); the shipped config starts two through torchrun, joined with gloo.
    cfg, ref = single
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu-2proc.yaml"),
           "-m", "heft", "train", "--config", str(cfg), "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(ref, tmp_path / "ddp")


def test_reft_rotation_orthonormal_and_identical_on_every_rank(tiny_model_dir, tmp_path):
    marks = tmp_path / "ranks.txt"
    worker = Path(__file__).with_name("ddp_reft_worker.py")
    proc = torchrun(str(worker), str(tiny_model_dir), str(marks), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(marks.read_text().splitlines()) == ["ok 0 of 2", "ok 1 of 2"]


def test_killed_ddp_run_resumes_exactly_on_every_rank(tiny_model_dir, boolq_files, tmp_path):
    """With dropout, each rank draws its own masks: resuming needs every rank's generator state."""
    raw = tiny_config(tiny_model_dir, boolq_files, [{"method": "lora", "epochs": 2, "lr": 1e-2, "batch_size": 2}],
                      lora={"dropout": 0.2}, checkpoint_every=3)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    args = ["-m", "heft", "train", "--config", str(cfg), "--out"]
    assert torchrun(*args, str(tmp_path / "ref"), cwd=tmp_path).returncode == 0
    out = tmp_path / "run"
    kill_at_first_checkpoint([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              *args, str(out)], out / "stages/00-lora/checkpoints" / checkpoint.LATEST, tmp_path)
    assert not (out / "stages/00-lora/stage.json").exists(), "killed after the stage ended, not mid-stage"
    rng = load_file(str(checkpoint.latest(out / "stages/00-lora/checkpoints") / "rng.safetensors"))
    assert {"rank0.cpu", "rank1.cpu"} <= rng.keys() and not torch.equal(rng["rank0.cpu"], rng["rank1.cpu"])
    proc = torchrun("-m", "heft", "train", "--out", str(out), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(tmp_path / "ref" / ADAPTERS[0])), load_file(str(out / ADAPTERS[0]))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "ref/predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()


def test_checkpoint_refuses_parameters_the_optimizer_does_not_hold():
    # What FSDP's prepare leaves behind when the list is not rebound: the optimizer updates sharded copies.
    listed, sharded = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([sharded], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with pytest.raises(CheckpointError, match="rebind"):
        checkpoint.snapshot([("w", listed)], opt)


FSDP_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/fsdp.yaml"),
               "--num_processes", "2", "--main_process_port", "0", str(Path(__file__).with_name("fsdp_cpu_launch.py"))]


def fsdp(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """heft under accelerate's FSDP2 with the shipped config, 2 gloo processes on CPU (see fsdp_cpu_launch.py)."""
    return subprocess.run([*FSDP_LAUNCH, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_fsdp_two_processes_match_one(single, tmp_path):
    """LoRA stage, then ReFT on the merged model, both sharded: whole adapters saved, the same predictions."""
    cfg, ref = single
    proc = fsdp("train", "--config", str(cfg), "--out", str(tmp_path / "fsdp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp" / "meta.json").read_text())["distributed"] == "FSDP"
    assert_same_run(ref, tmp_path / "fsdp")
    r = load_file(str(tmp_path / "fsdp" / ADAPTERS[1]))["L0_first.rotation"]  # saved whole, orthonormal rows
    torch.testing.assert_close(r @ r.T, torch.eye(r.shape[0]), atol=1e-5, rtol=0)


def test_fsdp_with_bf16_autocast_follows_one_process(single, tmp_path):
    """heft's bf16 autocast under FSDP: the loss curves follow one process's within bf16 rounding."""
    cfg, _ = single
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "one"), "--precision", "bf16",
                 "--stages.0.batch_size", "8", "--stages.1.batch_size", "8"]) == 0
    proc = fsdp("train", "--config", str(cfg), "--out", str(tmp_path / "fsdp"), "--precision", "bf16", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "fsdp/meta.json").read_text())["mixed_precision"] == "bf16"
    for stage in ("00-lora", "01-reft"):
        one, two = ([json.loads(x)["loss"] for x in (tmp_path / d / "stages" / stage / "train_log.jsonl").read_text().splitlines()]
                    for d in ("one", "fsdp"))
        assert len(one) == len(two) == 5 and max(abs(a - b) for a, b in zip(one, two)) < 0.1, (stage, one, two)
    a, b = ([json.loads(x)["pred"] for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in ("one", "fsdp"))
    assert sum(x == y for x, y in zip(a, b)) >= len(a) - 2, "bf16 rounding may flip a near-tie, not more"


def test_fsdp_joint_stage_and_generation(tiny_model_dir, boolq_files, tmp_path):
    """LoRA and ReFT trained together under FSDP with gradient accumulation and gradient checkpointing,
    evaluated by greedy decoding on an odd number of rows."""
    val = write_jsonl(tmp_path / "val.jsonl", boolq_rows(7, offset=1, google=True))
    stages = [{"method": "joint", "epochs": 1, "lr": 1e-2, "batch_size": 2, "grad_accum": 2}]
    raw = tiny_config(tiny_model_dir, (boolq_files[0], val), stages, eval={"method": "generate", "max_new_tokens": 3},
                      model={"gradient_checkpointing": True})
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "one"), "--stages.0.batch_size", "4"]) == 0
    proc = fsdp("train", "--config", str(cfg), "--out", str(tmp_path / "fsdp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one/predictions.jsonl").read_text().splitlines()]
    two = [json.loads(x) for x in (tmp_path / "fsdp/predictions.jsonl").read_text().splitlines()]
    assert [p["idx"] for p in two] == list(range(7))
    assert [p["pred"] for p in two] == [p["pred"] for p in one]
    assert json.loads((tmp_path / "fsdp/metrics.json").read_text())["stages"][0]["optimizer_steps"] == 5, "40 rows, 8 a step"
    for f in ("stages/00-joint/adapter/adapter_model.safetensors", "stages/00-joint/reft.safetensors"):
        a, b = load_file(str(tmp_path / "one" / f)), load_file(str(tmp_path / "fsdp" / f))
        for k in a:  # AdamW at lr 1e-2 magnifies summation-order differences where a gradient is near 0
            torch.testing.assert_close(a[k], b[k], atol=2e-4, rtol=1e-3)


def test_fsdp_checkpoint_holds_whole_tensors_and_resumes_under_ddp(tiny_model_dir, boolq_files, tmp_path, capsys):
    """A killed FSDP run's checkpoint holds whole tensors: 2 DDP processes resume it; 1 process is refused
    (the global batch would change)."""
    raw = tiny_config(tiny_model_dir, boolq_files, [{"method": "reft", "epochs": 2, "lr": 1e-2, "batch_size": 2}],
                      checkpoint_every=2)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert fsdp("train", "--config", str(cfg), "--out", str(tmp_path / "ref"), cwd=tmp_path).returncode == 0
    out = tmp_path / "run"
    kill_at_first_checkpoint([*FSDP_LAUNCH, "train", "--config", str(cfg), "--out", str(out)],
                             out / "stages/00-reft/checkpoints" / checkpoint.LATEST, tmp_path)
    ckpt = checkpoint.latest(out / "stages/00-reft/checkpoints")
    assert ckpt is not None and not (out / "stages/00-reft/stage.json").exists()
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    assert tensors["reft.L0_first.rotation"].shape == (2, 64), "whole, not a shard"
    moments = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert sorted(v["exp_avg"].numel() for v in moments.values()) == sorted(t.numel() for t in tensors.values())
    assert main(["train", "--out", str(out), "--resume"]) != 0
    assert "written by 2 process(es), but this run has 1" in capsys.readouterr().err
    proc = torchrun("-m", "heft", "train", "--out", str(out), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(tmp_path / "ref/stages/00-reft/reft.safetensors")), load_file(str(out / "stages/00-reft/reft.safetensors"))
    for k in a:  # the first steps sharded, the rest replicated: the same math, another summation order
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_fsdp_version_1_is_refused(single, tmp_path, monkeypatch, capsys):
    # accelerate cannot build an FSDP1 plugin without an accelerator device, so this stands in for one.
    import accelerate
    from accelerate.utils import DistributedType

    class FSDP1Accelerator:
        distributed_type, is_fsdp2 = DistributedType.FSDP, False

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(accelerate, "Accelerator", FSDP1Accelerator)
    cfg, _ = single
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "v1")]) != 0
    assert "fsdp_version: 2" in capsys.readouterr().err and not (tmp_path / "v1").exists()


def test_deepspeed_is_refused_before_any_work(single, tmp_path, monkeypatch, capsys):
    cfg, _ = single
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` with a DeepSpeed config sets
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "ds")]) != 0
    assert "DeepSpeed is not supported" in capsys.readouterr().err and not (tmp_path / "ds").exists()


def _suite(root: Path, model_dir: Path, files: tuple[Path, Path], batch: int) -> Path:
    common = tiny_config(model_dir, files, [], data={"train_size": 16})
    del common["stages"]
    lora_stage = {"method": "lora", "lr": 1e-2, "batch_size": batch}
    reft_stage = {"method": "reft", "epochs": 1, "lr": 1e-2, "batch_size": batch}
    path = root / f"suite-{batch}.yaml"
    path.write_text(yaml.safe_dump({"common": common, "strategies": {
        "lora": [{**lora_stage, "epochs": 2}], "reft": [reft_stage], "heft": [{**lora_stage, "epochs": 1}, reft_stage]}}))
    return path


def test_fsdp_heft_run_suite_matches_one_process(tiny_model_dir, boolq_files, tmp_path):
    """`heft run` under FSDP: every strategy, HEFT's LoRA stage taken from LoRA-only's epoch-1 snapshot
    (saved whole by both processes), the same predictions as one process with the same global batch."""
    assert main(["run", "--config", str(_suite(tmp_path, tiny_model_dir, boolq_files, 8)), "--out", str(tmp_path / "one")]) == 0
    proc = fsdp("run", "--config", str(_suite(tmp_path, tiny_model_dir, boolq_files, 4)), "--out", str(tmp_path / "fsdp"),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Accuracy on") == 1, "only the main process prints the table"
    one, two = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "fsdp"))
    assert two["shared_stages"] == one["shared_stages"] == {"heft": "lora (epoch 1 snapshot)"}
    for name in ("lora", "reft", "heft"):
        a = [json.loads(x)["pred"] for x in (tmp_path / "one" / name / "predictions.jsonl").read_text().splitlines()]
        b = [json.loads(x)["pred"] for x in (tmp_path / "fsdp" / name / "predictions.jsonl").read_text().splitlines()]
        assert a == b, name
        assert json.loads((tmp_path / "fsdp" / name / "meta.json").read_text())["distributed"] == "FSDP"
