"""Benchmark: ReFT training epochs with the frozen prefix reused (heft.reuse.token_prefix) vs today's full path and pyreft 0.1.0.

Issue #15, item 1. ReFT on the last prompt positions only (`positions.first: 0`): the tokens before the first
edited one cannot change in training, so heft runs them once without gradients and keeps their keys/values; from
the second epoch on only the edited tokens and the answer run forward and backward. Sides, each in its own process,
on the same model, rows and batch order (one shuffled order per epoch, the same for every side):

- `prefix`:  heft's ReftModel with `heft.reuse.token_prefix.FrozenPrefix` (frozen_prefix: cache), AdamW step as heft.training.loop
- `full`:    heft's ReftModel, every token forward and backward (frozen_prefix: off), the same step otherwise
- `pyreft`:  pyreft 0.1.0 in its own environment (transformers 4.45.1), the loop of bench/reft_vs_pyreft.py

Model: SmolLM2-135M's shape with random weights (bench/reft_vs_pyreft.py's `build_model`: bit-identical in both
environments; step time does not depend on the weights). Rows: BoolQ training rows in heft's `passage` format,
cut to --seq-len tokens (the default run's 256). LoReFT rank 4 on all 30 layers, the last --last prompt positions.
Reported per side: the wall time of each epoch; the ratio that matters is the mean epoch time from the second
epoch on (goals: full / prefix >= 3, pyreft / prefix >= 4). heft's two sides start from the same exact-zero edit,
so their losses must agree step by step (to 1e-5 in fp32; bf16 rounds each batch differently).

    python bench/prefix_reuse.py [--rows 48] [--batch 8] [--epochs 3] [--last 7] [--seq-len 256]
                                 [--dtype fp32|bf16] [--sides prefix full pyreft] [--out bench/results/prefix_reuse.json]

The layer prefix (the stream entering the lowest adapted layer, kept when only upper layers are adapted) is
bench/layer_reuse.py's (docs/benchmarks.md section 11).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reft_vs_pyreft import PYREFT_STEPS, autocast, build_model, heft_step, run_pyreft, time_steps  # noqa: E402

SIDES = ("prefix", "full", "pyreft")


def prefix_step(spec: dict):
    """heft's training step with the frozen prefix kept across epochs (a function of the batch rows)."""
    from heft.config.schema import PositionsConfig, ReftConfig
    from heft.training.loop import answer_loss
    from heft.methods.model import decoder_layers, fp32_output_head, hidden_size
    from heft.reuse.token_prefix import FrozenPrefix, why_not
    from heft.methods.reft import ReftModel
    from heft.training.runtime import Runtime
    from heft.data.tokens import Encoded

    model = build_model(spec)
    if spec["dtype"] == "bf16":
        fp32_output_head(model)
    torch.manual_seed(0)
    cfg = ReftConfig(kind="loreft", rank=spec["rank"], layers="all", positions=PositionsConfig(0, spec["last"]),
                     init="identity")
    reft = ReftModel(model, cfg, decoder_layers(model), hidden_size(model)).to(spec["device"])
    params = list(reft.interventions.parameters())
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, foreach=True)
    reft.train()
    assert why_not(reft, list(reft.interventions.named_parameters())) is None
    rows = [Encoded(r["prompt"], (r["answer"], r["answer"]), 1, False) for r in spec["rows"]]
    rt = Runtime(torch.device(spec["device"]), bf16=spec["dtype"] == "bf16")
    prefix = FrozenPrefix(reft, rows, spec["pad_id"], rt, keep=True, budget_gb=8.0, desc="bench")

    def step(batch_rows: list[dict]) -> torch.Tensor:
        kwargs, targets, _ = prefix.batch([r["i"] for r in batch_rows])
        with autocast(spec):
            loss = answer_loss(reft(**kwargs).logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, prefix


def run_side(side: str, spec: dict) -> dict:
    if side == "prefix":
        step, prefix = prefix_step(spec)
        out = time_steps(step, spec)
        out["cache_gb"] = prefix.store.bytes / 1e9
        return out
    if side == "full":
        spec = dict(spec, first=0)
        return time_steps(heft_step(spec)[0], spec)
    return run_pyreft(dict(spec, first=0))


def make_spec(args: argparse.Namespace, path: Path) -> dict:
    from heft.config.schema import DataConfig
    from heft.data.rows import load_splits
    from heft.methods.model import resolve_model_path
    from heft.data.tokens import Encoder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"))
    enc = Encoder(tok, "passage", args.seq_len)
    rows = []
    for i, ex in enumerate(load_splits(DataConfig(train_size=args.rows, dev_size=200, eval_size=1)).train[:args.rows]):
        e = enc.encode(ex)
        rows.append({"i": i, "prompt": e.prompt, "answer": e.answers[e.label]})
    batches = []
    for epoch in range(args.epochs):  # one shuffled order per epoch, the same for every side
        order = list(range(len(rows)))
        random.Random(epoch).shuffle(order)
        batches += [[rows[j] for j in order[k:k + args.batch]] for k in range(0, len(order), args.batch)]
    spec = {"rows": rows, "batches": batches, "warmup": 0, "num_layers": args.num_layers, "rank": 4, "first": 0,
            "last": args.last, "lr": 2e-3, "dtype": args.dtype, "device": args.device,
            "pad_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    path.write_text(json.dumps(spec))
    return spec


def spec_args(ap: argparse.ArgumentParser) -> None:
    """The arguments make_spec reads (shared with bench/layer_reuse.py)."""
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--last", type=int, default=7)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--num-layers", type=int, default=30, help="30 is SmolLM2-135M; fewer only for smoke tests")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--device", default="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    spec_args(ap)
    ap.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    ap.add_argument("--out", default=str(HERE / "results" / "prefix_reuse.json"))
    ap.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        result = run_side(args.one, json.loads(Path(args.spec).read_text()))
        import transformers

        result.update(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
        print("RESULT " + json.dumps(result))
        return

    from peer_venv import ensure_venv, run_json

    pythons = {"prefix": sys.executable, "full": sys.executable}
    if "pyreft" in args.sides:
        pythons["pyreft"] = str(ensure_venv("pyreft", PYREFT_STEPS))
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec = make_spec(args, spec_path)
        per_epoch = len(spec["batches"]) // args.epochs
        tokens = sum(len(r["prompt"]) + len(r["answer"]) for r in spec["rows"])
        print(f"{len(spec['rows'])} rows ({tokens / len(spec['rows']):.0f} tokens each on average), {per_epoch} "
              f"batches of {args.batch} per epoch, {args.epochs} epochs, {args.dtype}", flush=True)
        for side in args.sides:
            print(f"{side} ...", flush=True)
            cmd = [pythons[side], str(Path(__file__).resolve()), "--one", side, "--spec", str(spec_path)]
            runs[side] = run_json(cmd, side)
    epochs = {s: [sum(r["step_seconds"][e * per_epoch:(e + 1) * per_epoch]) for e in range(args.epochs)]
              for s, r in runs.items()}
    later = {s: statistics.mean(t[1:]) for s, t in epochs.items()}
    result = {
        "benchmark": "reft_epochs_frozen_prefix", "model": "SmolLM2-135M shape, random weights",
        "num_layers": args.num_layers, "rows": len(spec["rows"]), "batch": args.batch, "epochs": args.epochs,
        "seq_len_cap": args.seq_len, "mean_tokens_per_row": tokens / len(spec["rows"]), "rank": 4,
        "positions": {"first": 0, "last": args.last}, "dtype": args.dtype, "device": args.device,
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "versions": {s: {k: runs[s][k] for k in ("torch", "transformers")} for s in runs},
        "epoch_seconds": epochs, "mean_epoch_seconds_from_the_second": later,
        "cache_gb": runs.get("prefix", {}).get("cache_gb"),
        "goals": {"full_over_prefix_at_least": 3.0, "pyreft_over_prefix_at_least": 4.0},
        "runs": runs,
    }
    if "prefix" in runs:
        for other in ("full", "pyreft"):
            if other in runs:
                result[f"{other}_over_prefix"] = later[other] / later["prefix"]
                result[f"{other}_over_prefix_first_epoch"] = epochs[other][0] / epochs["prefix"][0]
    if "prefix" in runs and "full" in runs:
        a, b = runs["prefix"]["losses"], runs["full"]["losses"]
        result["loss_max_abs_diff_prefix_vs_full"] = max(abs(x - y) for x, y in zip(a, b))
    print(f"\nReFT epochs, last {args.last} positions, SmolLM2-135M shape ({args.num_layers} layers), "
          f"{len(spec['rows'])} rows, batch {args.batch}, {args.dtype}, {args.device}")
    print(f"{'side':<8}" + "".join(f"{'epoch ' + str(e + 1) + ' s':>12}" for e in range(args.epochs))
          + f"{'from 2nd, s':>13}{'vs prefix':>11}")
    for s, t in epochs.items():
        ratio = later[s] / later["prefix"] if "prefix" in later else float("nan")
        print(f"{s:<8}" + "".join(f"{x:>12.1f}" for x in t) + f"{later[s]:>13.1f}{ratio:>10.2f}x")
    if "loss_max_abs_diff_prefix_vs_full" in result:
        print(f"prefix vs full, largest per-step loss difference: {result['loss_max_abs_diff_prefix_vs_full']:.2e}")
    if result["cache_gb"] is not None:
        print(f"prefix cache held: {result['cache_gb']:.2f} GB")
    print("goals: full / prefix >= 3x, pyreft / prefix >= 4x (epochs from the second on)")
    from heft.run.atomic import write_json

    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
