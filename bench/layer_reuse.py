"""Benchmark: training epochs with the frozen lower layers reused (heft.reuse.layer_prefix) vs every layer each step.

Issue #15, item 1 (the layer prefix). When only the upper decoder layers are adapted, the stream entering the
lowest adapted layer depends only on frozen weights: heft computes it once per row and, from the second epoch on,
bypasses the layers below. Two configurations, each with two sides in their own processes, on the same model,
rows and batch order (one shuffled order per epoch):

- `reft`: LoReFT rank 4 on the upper half (layers 15..29 of 30) at the first 7 + last 7 prompt positions (the
  paper's positions; editing the first ones rules out the token prefix)
- `lora`: LoRA r 8 (alpha 16, dropout 0.05, all linear layers) on the upper half, through PEFT; the full side is
  then a plain PEFT training loop

Sides: `layers` (heft.reuse.layer_prefix.FrozenLayers kept across epochs, AdamW step as heft.training.loop) and `full` (the same
step, every layer each step). Rounds alternate the sides' order; the ratio is computed per round and its spread
reported. The expected figure, from the arithmetic: with half the layers bypassed, the step loses the lower half's
forward. A frozen layer's backward (input gradients only) costs about one forward, a trained one's about two, so
the ratio is 1.33x (backward = 2 forwards) to 1.5x (backward = 1 forward), less the head and optimizer's share.

    python bench/layer_reuse.py [--rows 48] [--batch 8] [--epochs 3] [--rounds 2] [--configs reft lora]
                                [--dtype fp32|bf16] [--out bench/results/layer_reuse.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from prefix_reuse import make_spec, spec_args  # noqa: E402
from reft_vs_pyreft import autocast, build_model, time_steps  # noqa: E402

CONFIGS = ("reft", "lora")
SIDES = ("layers", "full")


def make_step(spec: dict, config: str, side: str):
    """One training step (a function of the batch rows) of `config` on `side`."""
    from heft.config.schema import LoraConfig, PositionsConfig, ReftConfig
    from heft.reuse.layer_prefix import FrozenLayers, lowest_layer
    from heft.methods.lora import attach, trainable
    from heft.training.loop import answer_loss
    from heft.methods.model import decoder_layers, fp32_output_head, hidden_size
    from heft.methods.reft import ReftModel
    from heft.training.runtime import Runtime, model_forward
    from heft.data.tokens import Encoded, train_batch

    model = build_model(spec)
    if spec["dtype"] == "bf16":
        fp32_output_head(model)
    torch.manual_seed(0)
    upper = tuple(range(spec["num_layers"] // 2, spec["num_layers"]))
    if config == "reft":
        cfg = ReftConfig(kind="loreft", rank=4, layers=upper, positions=PositionsConfig(7, 7), init="identity")
        top = ReftModel(model, cfg, decoder_layers(model), hidden_size(model)).to(spec["device"])
        named = list(top.interventions.named_parameters())
    else:
        top = attach(model, LoraConfig(r=8, alpha=16.0, dropout=0.05, layers=upper))
        named = trainable(top)
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=spec["lr"], weight_decay=0.0, foreach=True)
    top.train()
    rows = [Encoded(r["prompt"], (r["answer"], r["answer"]), 1, False) for r in spec["rows"]]
    layers = None
    if side == "layers":
        k, why = lowest_layer(top, named)
        assert why is None, why
        rt = Runtime(torch.device(spec["device"]), bf16=spec["dtype"] == "bf16")
        layers = FrozenLayers(top, k, rows, spec["pad_id"], rt, keep=True, budget_gb=8.0, desc="bench")

    def step(batch_rows: list[dict]) -> torch.Tensor:
        idx = [r["i"] for r in batch_rows]
        batch = {k: v.to(spec["device"]) for k, v in train_batch([rows[i] for i in idx], spec["pad_id"]).items()}
        keep = int(batch.pop("logits_to_keep"))
        if layers is not None and not layers.checked:
            assert layers.check(idx, batch, keep) is None
        with layers.bypass(idx, batch["input_ids"].shape[1]) if layers is not None else contextlib.nullcontext():
            with autocast(spec):
                loss = answer_loss(model_forward(top, batch, keep), batch["targets"])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, layers


def run_one(config: str, side: str, spec: dict) -> dict:
    step, layers = make_step(spec, config, side)
    out = time_steps(step, spec)
    out["cache_gb"] = layers.store.bytes / 1e9 if layers is not None else None
    out["bypassed_layers"] = layers.k if layers is not None else 0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    spec_args(ap)  # --last is unused here: ReFT edits the first 7 + last 7 positions
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--out", default=str(HERE / "results" / "layer_reuse.json"))
    ap.add_argument("--one", nargs=2, metavar=("CONFIG", "SIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        result = run_one(*args.one, json.loads(Path(args.spec).read_text()))
        print("RESULT " + json.dumps(result))
        return

    from peer_venv import run_json

    runs: dict[str, dict[str, list[dict]]] = {c: {s: [] for s in SIDES} for c in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec = make_spec(args, spec_path)
        per_epoch = len(spec["batches"]) // args.epochs
        tokens = sum(len(r["prompt"]) + len(r["answer"]) for r in spec["rows"])
        print(f"{len(spec['rows'])} rows ({tokens / len(spec['rows']):.0f} tokens each on average), {per_epoch} "
              f"batches of {args.batch} per epoch, {args.epochs} epochs, {args.rounds} rounds, {args.dtype}; "
              f"each side-run takes ~1-2 min on 2 cores", flush=True)
        for rnd in range(args.rounds):
            for config in args.configs:
                for side in (SIDES if rnd % 2 == 0 else SIDES[::-1]):
                    print(f"round {rnd + 1}: {config} {side} ...", flush=True)
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", config, side, "--spec", str(spec_path)]
                    runs[config][side].append(run_json(cmd, f"{config}-{side}"))

    def epochs(run: dict) -> list[float]:
        return [sum(run["step_seconds"][e * per_epoch:(e + 1) * per_epoch]) for e in range(args.epochs)]

    summary = {}
    for config, sides in runs.items():
        later = {s: [statistics.mean(epochs(r)[1:]) for r in rs] for s, rs in sides.items()}
        ratios = [f / l for f, l in zip(later["full"], later["layers"])]
        first = [epochs(f)[0] / epochs(l)[0] for f, l in zip(sides["full"], sides["layers"])]
        losses = max(abs(a - b) for f, l in zip(sides["full"], sides["layers"]) for a, b in zip(f["losses"], l["losses"]))
        summary[config] = {
            "epoch_seconds": {s: [epochs(r) for r in rs] for s, rs in sides.items()},
            "mean_epoch_seconds_from_the_second": later, "full_over_layers_per_round": ratios,
            "full_over_layers_median": statistics.median(ratios), "first_epoch_full_over_layers": first,
            "loss_max_abs_diff": losses, "cache_gb": sides["layers"][0]["cache_gb"],
            "bypassed_layers": sides["layers"][0]["bypassed_layers"],
        }
    result = {
        "benchmark": "training_epochs_frozen_layers", "model": "SmolLM2-135M shape, random weights",
        "num_layers": args.num_layers, "rows": len(spec["rows"]), "batch": args.batch, "epochs": args.epochs,
        "rounds": args.rounds, "seq_len_cap": args.seq_len, "mean_tokens_per_row": tokens / len(spec["rows"]),
        "dtype": args.dtype, "device": args.device, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "expected_full_over_layers": [1.33, 1.5], "configs": summary, "runs": runs,
    }
    print(f"\nUpper half adapted ({args.num_layers // 2}..{args.num_layers - 1}), SmolLM2-135M shape, "
          f"{len(spec['rows'])} rows, batch {args.batch}, {args.dtype}, {args.device}")
    print(f"{'config':<7}{'side':<8}" + "".join(f"{'round ' + str(r + 1) + ', s/epoch':>18}" for r in range(args.rounds)))
    for config, s in summary.items():
        for side in SIDES:
            print(f"{config:<7}{side:<8}" + "".join(f"{x:>18.1f}" for x in s["mean_epoch_seconds_from_the_second"][side]))
        print(f"{config:<7}{'ratio':<8}" + "".join(f"{x:>17.2f}x" for x in s["full_over_layers_per_round"])
              + f"   (median {s['full_over_layers_median']:.2f}x; first epoch "
              + ", ".join(f"{x:.2f}x" for x in s["first_epoch_full_over_layers"]) + f"; largest loss difference "
              f"{s['loss_max_abs_diff']:.1e}; {s['cache_gb']:.2f} GB kept)")
    print("expected from the arithmetic: 1.33-1.5x (epochs from the second on)")
    from heft.run.atomic import write_json

    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
