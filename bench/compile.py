"""Benchmark: `model.compile: true` (torch.compile of each decoder layer, dynamic shapes) vs eager (issue #15, item 4).

Three workloads of the default run, each eager and compiled in its own process (torch.compile's caches are
per process), on SmolLM2-135M's shape with random weights (bench/reft_vs_pyreft.py's `build_model`; timing does
not depend on the weights) and BoolQ training rows in heft's passage format (cut at --seq-len, so batches differ
in length as in a real run):

- `lora`:  a LoRA training step (heft's default LoRA: r 8, all linear layers, dropout 0.05), AdamW
- `reft`:  a LoReFT training step (rank 4, all layers, first 7 + last 7 positions), AdamW
- `score`: a scoring pass (no gradients, logits of the last position only), batch --score-batch

Each process times its first --first calls (where compiling happens) and then --steps more. Reported per
workload: the steady-state seconds per call (median of the later ones), the compile overhead (first calls minus
as many steady calls), and the speed-up. A whole run cannot gain more than the steady-state speed-up, so the
issue's rule (on by default only where it wins >= 1.2x including compile time over a default run) needs at
least that; the table also gives the default run's projected time both ways from its call counts (LoRA 150
steps, ReFT 225 steps, 2,500 scored rows; `heft run`, batch 8).

    python bench/compile.py [--batch 8] [--steps 6] [--first 3] [--dtype fp32] [--out bench/results/compile.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reft_vs_pyreft import autocast, build_model  # noqa: E402

WORKLOADS = ("lora", "reft", "score")
DEFAULT_RUN_CALLS = {"lora": 150, "reft": 225, "score": 2500 / 16}  # heft run: per workload, at batch 8 / 16


def make_step(workload: str, spec: dict, compiled: bool):
    from heft.config.schema import LoraConfig, PositionsConfig, ReftConfig
    from heft.methods.lora import attach
    from heft.training.loop import answer_loss
    from heft.methods.model import compile_layers, decoder_layers, fp32_output_head, hidden_size
    from heft.methods.reft import ReftModel
    from heft.training.runtime import model_forward
    from heft.data.tokens import Encoded, prompt_batch, train_batch

    model = build_model(spec)
    if spec["dtype"] == "bf16":
        fp32_output_head(model)
    torch.manual_seed(0)
    if workload == "lora":
        model = attach(model, LoraConfig())
    if compiled:
        compile_layers(model)
    if workload == "reft":
        model = ReftModel(model, ReftConfig(rank=4, positions=PositionsConfig(7, 7)), decoder_layers(model),
                          hidden_size(model))
    if workload == "score":
        model.eval()

        def score(rows: list[dict]) -> None:
            batch = prompt_batch([r["prompt"] for r in rows], spec["pad_id"])
            with torch.no_grad(), autocast(spec):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)

        return score
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

    def step(rows: list[dict]) -> None:
        batch = train_batch([Encoded(r["prompt"], (r["answer"], r["answer"]), 1, False) for r in rows], spec["pad_id"])
        keep = int(batch.pop("logits_to_keep"))
        with autocast(spec):
            loss = answer_loss(model_forward(model, batch, keep), batch["targets"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def run_one(workload: str, compiled: bool, spec: dict) -> dict:
    step = make_step(workload, spec, compiled)
    size = spec["score_batch"] if workload == "score" else spec["batch"]
    rows = spec["rows"]
    times = []
    for i in range(spec["first"] + spec["steps"]):
        part = [rows[(i * size + k) % len(rows)] for k in range(size)]
        start = time.perf_counter()
        step(part)
        times.append(time.perf_counter() - start)
    return {"first_seconds": times[:spec["first"]], "seconds": times[spec["first"]:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--score-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--first", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=30)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--out", default=str(HERE / "results" / "compile.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: workload:eager|compiled
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        workload, mode = args.one.split(":")
        result = run_one(workload, mode == "compiled", json.loads(Path(args.spec).read_text()))
        print("RESULT " + json.dumps(result))
        return

    from heft.config.schema import DataConfig
    from heft.data.rows import load_splits
    from heft.methods.model import resolve_model_path
    from heft.data.tokens import Encoder
    from peer_venv import run_json
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    enc = Encoder(tok, "passage", args.seq_len)
    rows = [{"prompt": e.prompt, "answer": e.answers[e.label]}
            for e in (enc.encode(x) for x in load_splits(DataConfig(train_size=200, dev_size=200, eval_size=1)).train)]
    spec = {"rows": rows, "batch": args.batch, "score_batch": args.score_batch, "steps": args.steps,
            "first": args.first, "num_layers": args.num_layers, "dtype": args.dtype, "device": "cpu",
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "spec.json"
        path.write_text(json.dumps(spec))
        for workload in args.workloads:
            for mode in ("eager", "compiled"):
                print(f"{workload}, {mode} ...", flush=True)
                cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{workload}:{mode}", "--spec", str(path)]
                out.setdefault(workload, {})[mode] = run_json(cmd, f"{workload} {mode}")
    table = {}
    for workload, r in out.items():
        steady = {m: statistics.median(r[m]["seconds"]) for m in r}
        overhead = {m: sum(r[m]["first_seconds"]) - len(r[m]["first_seconds"]) * steady[m] for m in r}
        calls = DEFAULT_RUN_CALLS[workload]
        run = {m: calls * steady[m] + max(0.0, overhead[m]) for m in r}
        table[workload] = {"steady_seconds": steady, "compile_overhead_seconds": overhead["compiled"],
                           "steady_speedup": steady["eager"] / steady["compiled"],
                           "default_run_calls": calls, "default_run_seconds": run,
                           "default_run_speedup": run["eager"] / run["compiled"]}
    eager = sum(t["default_run_seconds"]["eager"] for t in table.values())
    compiled = sum(t["default_run_seconds"]["compiled"] for t in table.values())
    result = {"benchmark": "torch_compile_vs_eager", "model": "SmolLM2-135M shape, random weights",
              "num_layers": args.num_layers, "batch": args.batch, "score_batch": args.score_batch,
              "dtype": args.dtype, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "workloads": table, "default_run_seconds": {"eager": eager, "compiled": compiled},
              "default_run_speedup": eager / compiled, "goal_speedup_to_turn_on": 1.2, "runs": out}
    print(f"\ntorch.compile (each decoder layer, dynamic shapes) vs eager, SmolLM2-135M shape, {args.dtype}, CPU")
    print(f"{'workload':<8}{'eager s/call':>14}{'compiled':>10}{'speed-up':>10}{'compile s':>11}{'default run':>13}")
    for w, t in table.items():
        print(f"{w:<8}{t['steady_seconds']['eager']:>14.3f}{t['steady_seconds']['compiled']:>10.3f}"
              f"{t['steady_speedup']:>9.2f}x{t['compile_overhead_seconds']:>11.1f}{t['default_run_speedup']:>12.2f}x")
    print(f"projected default run: eager {eager / 60:.1f} min, compiled {compiled / 60:.1f} min "
          f"({result['default_run_speedup']:.2f}x; on by default only at >= 1.2x)")
    from heft.run.atomic import write_json

    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
