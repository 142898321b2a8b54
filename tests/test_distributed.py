"""Data parallel on CPU: 2 processes (torchrun, gloo) give the same adapters and predictions as one
process with the same global batch, evaluate every row exactly once, and keep ReFT's R orthonormal
and identical on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

from conftest import boolq_rows, tiny_config, write_jsonl
from heft.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def test_two_processes_match_one(tiny_model_dir, boolq_files, tmp_path):
    val = write_jsonl(tmp_path / "val.jsonl", boolq_rows(19, offset=3, google=True))  # odd: 10 + 9 rows
    stages = [{"method": "lora", "epochs": 1, "lr": 1e-2, "batch_size": 4},
              {"method": "reft", "epochs": 1, "lr": 1e-2, "batch_size": 4}]
    cfg = tmp_path / "cfg.yaml"
    # checkpoint_every exercises checkpointing under DDP (the log flush before a save is collective)
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_model_dir, (boolq_files[0], val), stages, checkpoint_every=2)))
    proc = torchrun("-m", "heft", "train", "--config", str(cfg), "--out", str(tmp_path / "ddp"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One process, global batch 2 x 4 = 8.
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "single"),
                 "--stages.0.batch_size", "8", "--stages.1.batch_size", "8"]) == 0
    for f in ("stages/00-lora/adapter/adapter_model.safetensors", "stages/01-reft/reft.safetensors"):
        a, b = load_file(str(tmp_path / "single" / f)), load_file(str(tmp_path / "ddp" / f))
        assert a.keys() == b.keys()
        for k in a:  # same math, different float summation order across processes
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    single = [json.loads(x) for x in (tmp_path / "single" / "predictions.jsonl").read_text().splitlines()]
    ddp = [json.loads(x) for x in (tmp_path / "ddp" / "predictions.jsonl").read_text().splitlines()]
    assert [p["idx"] for p in ddp] == list(range(19)), "each evaluation row exactly once, in order"
    assert [p["pred"] for p in ddp] == [p["pred"] for p in single]
    assert max(abs(a["p_yes"] - b["p_yes"]) for a, b in zip(single, ddp)) < 1e-4
    steps = [s["optimizer_steps"] for s in json.loads((tmp_path / "ddp" / "metrics.json").read_text())["stages"]]
    assert steps == [5, 5], "40 training rows in global batches of 8"


def test_reft_rotation_orthonormal_and_identical_on_every_rank(tiny_model_dir, tmp_path):
    marks = tmp_path / "ranks.txt"
    worker = Path(__file__).with_name("ddp_reft_worker.py")
    proc = torchrun(str(worker), str(tiny_model_dir), str(marks), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(marks.read_text().splitlines()) == ["ok 0 of 2", "ok 1 of 2"]
