"""Kill trials: for each speed path, a tiny-model training run killed with SIGKILL at random optimizer steps and
continued with `heft train --resume`, compared byte for byte with an uninterrupted run.

    python scripts/kill_trials.py [--trials 4] [--paths full token-cache token-recompute layer] [--out DIR]

Per path: two uninterrupted runs (the control: the path itself is deterministic), then `--trials` runs, each killed
at a step drawn at random (seeded) between the first and the last, then resumed. A trial is identical when the
trained weights (`reft.safetensors`), `predictions.jsonl` and every logged loss and gradient norm equal the first
uninterrupted run's. It prints a table and writes DIR/kill_trials.json.

The model is a random tiny Llama (4 layers, 64 wide, as scripts/same_outputs.py builds it) with the test suite's
word-level tokenizer; one ReFT stage of 3 epochs (27 optimizer steps), fp32, `checkpoint_every: 5`, so most kills land
between checkpoints and the resumed run redoes steps.
Paths: `full` (frozen_prefix: off), `token-cache` / `token-recompute` (ReFT on the last 3 prompt positions: the
token prefix), `layer` (ReFT on layers 1 and 3 of the first 2 + last 2 positions: the layer prefix bypasses layers
0-1).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    "full": {"reft": {"positions": {"first": 0, "last": 3}}, "frozen_prefix": "off"},
    "token-cache": {"reft": {"positions": {"first": 0, "last": 3}}, "frozen_prefix": "cache"},
    "token-recompute": {"reft": {"positions": {"first": 0, "last": 3}}, "frozen_prefix": "recompute"},
    "layer": {"reft": {"layers": [1, 3], "positions": {"first": 2, "last": 2}}, "frozen_prefix": "cache"},
}
EXPECT = {"full": "full path", "token-cache": "come before the first edited position",
          "token-recompute": "come before the first edited position", "layer": "decoder layers 0..1 of 4 are frozen"}


def make_assets(folder: Path) -> tuple[Path, tuple[Path, Path]]:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import boolq_rows, build_tiny_llama, write_jsonl

    model = folder / "tiny-llama"
    if not (model / "config.json").is_file():
        build_tiny_llama(model)
    files = (write_jsonl(folder / "train.jsonl", boolq_rows(48)), write_jsonl(folder / "validation.jsonl", boolq_rows(12, 5, True)))
    return model, files


def write_config(folder: Path, name: str, model: Path, files: tuple[Path, Path]) -> Path:
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import tiny_config

    raw = tiny_config(model, files, [{"method": "reft", "epochs": 3, "lr": 5e-3, "batch_size": 4}],
                      data={"train_size": 36, "eval_size": 12}, checkpoint_every=5, seed=3, **PATHS[name])
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def heft(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "heft", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def outputs(run: Path) -> dict:
    stage = next((run / "stages").iterdir())
    log = [json.loads(x) for x in (stage / "train_log.jsonl").read_text().splitlines()]
    return {"weights": (stage / "reft.safetensors").read_bytes(), "predictions": (run / "predictions.jsonl").read_bytes(),
            "log": [(r["step"], r["loss"], r["grad_norm"]) for r in log]}


def differences(a: dict, b: dict) -> list[str]:
    return [k for k in a if a[k] != b[k]]


def uninterrupted(config: Path, out: Path, env: dict, expect: str) -> dict:
    proc = heft("train", "--config", str(config), "--out", str(out), env=env)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{out}: heft train failed:\n{err[-3000:]}")
    if expect not in err:
        raise SystemExit(f"{out}: the log does not show the expected path ({expect!r}):\n{err[-3000:]}")
    return outputs(out)


def killed_and_resumed(config: Path, out: Path, env: dict, at_step: int) -> tuple[bool, int]:
    """(whether the kill landed mid-stage, the step the last log line had reached when killed)."""
    proc = heft("train", "--config", str(config), "--out", str(out), env=env)
    log = out / "stages" / "00-reft" / "train_log.jsonl"
    reached = 0
    while proc.poll() is None:
        if log.is_file():
            reached = len(log.read_text().splitlines())
            if reached >= at_step:
                break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # a real kill: no handler, no cleanup
    proc.wait()
    if (out / "stages" / "00-reft" / "stage.json").exists():
        return False, reached
    resumed = heft("train", "--out", str(out), "--resume", env=env)
    _, err = resumed.communicate()
    if resumed.returncode != 0:
        raise SystemExit(f"{out}: --resume failed:\n{err[-3000:]}")
    return True, reached


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--out", type=Path, default=Path("/tmp/heft-kill-trials"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model, files = make_assets(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    rng = random.Random(args.seed)
    results = {}
    for name in args.paths:
        began = time.time()
        folder = args.out / name
        if folder.exists():
            import shutil

            shutil.rmtree(folder)
        folder.mkdir()
        config = write_config(folder, name, model, files)
        ref = uninterrupted(config, folder / "ref", env, EXPECT[name])
        control = differences(ref, uninterrupted(config, folder / "control", env, EXPECT[name]))
        steps = len(ref["log"])
        trials = []
        for t in range(args.trials):
            at = rng.randrange(2, steps)
            mid, reached = killed_and_resumed(config, folder / f"trial-{t}", env, at)
            diff = differences(ref, outputs(folder / f"trial-{t}")) if mid else None
            trials.append({"kill_at_step": at, "log_reached": reached, "mid_stage": mid, "differs": diff})
            print(f"{name}: trial {t}: killed at step {reached} of {steps}: "
                  f"{'finished before the kill' if not mid else 'identical' if not diff else 'DIFFERS: ' + ', '.join(diff)}",
                  flush=True)
        done = [t for t in trials if t["mid_stage"]]
        results[name] = {"steps": steps, "control_identical": not control, "trials": trials,
                         "identical": sum(not t["differs"] for t in done), "killed_mid_stage": len(done),
                         "seconds": round(time.time() - began)}
    print(f"\n{'path':<16} {'control':<10} {'identical after kill + resume':<30} seconds")
    for name, r in results.items():
        print(f"{name:<16} {'same' if r['control_identical'] else 'DIFFERS':<10} "
              f"{r['identical']} of {r['killed_mid_stage']:<25} {r['seconds']}")
    (args.out / "kill_trials.json").write_text(json.dumps(results, indent=1))
    sys.exit(0 if all(r["control_identical"] and r["identical"] == r["killed_mid_stage"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
