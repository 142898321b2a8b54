"""Benchmark: inference overhead of ReFT interventions (issue #5, item 4).

Scores the same BoolQ validation rows with the same model twice per round, alternating order to
cancel machine drift: once plain, once with LoReFT interventions (non-zero edits) hooked on the
chosen layers. Prints a table and writes JSON. Goal: with/without <= 1.05.

    python bench/reft_overhead.py [--rows 128] [--rounds 3] [--model smollm2-135m] [--out bench/results/reft_overhead.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded alias, local folder or hub id")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", default="all", help='"all" or a comma list, e.g. 8,16,24')
    ap.add_argument("--out", default="bench/results/reft_overhead.json")
    args = ap.parse_args()

    from heft.config.schema import DataConfig, ModelConfig, PositionsConfig, ReftConfig, RunConfig
    from heft.data.rows import load_splits
    from heft.data.tokens import Encoder
    from heft.evaluation.yesno import score
    from heft.methods.model import decoder_layers, hidden_size, load_model
    from heft.training.runtime import make_runtime
    from heft.methods.reft import ReftModel

    cfg = RunConfig(model=ModelConfig(name_or_path=args.model), precision="auto")
    acc = make_runtime(cfg.precision)
    model, tok = load_model(cfg.model, acc.device)
    rows = load_splits(DataConfig(eval_size=args.rows), with_train=False).eval
    encoded = [Encoder(tok, "passage", 256).encode(r) for r in rows]
    layers = "all" if args.layers == "all" else tuple(int(x) for x in args.layers.split(","))
    torch.manual_seed(0)
    reft = ReftModel(model, ReftConfig(rank=4, layers=layers, positions=PositionsConfig(7, 7), init="random"),
                     decoder_layers(model), hidden_size(model)).to(acc.device)

    def run(with_reft: bool) -> float:
        start = time.perf_counter()
        score(reft if with_reft else model, encoded, batch_size=args.batch_size, pad_id=tok.pad_token_id,
              rt=acc, desc="with ReFT" if with_reft else "plain")
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run(False)  # warm-up: allocator, kernels
    times = {"plain": [], "reft": []}
    for r in range(args.rounds):
        for name in (("plain", "reft") if r % 2 == 0 else ("reft", "plain")):
            times[name].append(run(name == "reft"))
    tokens = sum(len(e.prompt) for e in encoded)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "reft_inference_overhead", "model": args.model, "rows": len(encoded), "prompt_tokens": tokens,
        "rounds": args.rounds, "batch_size": args.batch_size, "reft_layers": args.layers, "device": str(acc.device),
        "bf16_autocast": acc.bf16, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(), "seconds": times, "median_seconds": med,
        "ratio_reft_over_plain": med["reft"] / med["plain"], "goal_ratio_at_most": 1.05,
    }
    print(f"\nReFT inference overhead: {len(encoded)} BoolQ rows ({tokens} prompt tokens), {args.rounds} alternating rounds")
    print(f"{'setting':<14}{'median s':>10}{'tokens/s':>10}")
    for k in ("plain", "reft"):
        print(f"{k:<14}{med[k]:>10.2f}{tokens / med[k]:>10.0f}")
    print(f"ratio reft/plain: {result['ratio_reft_over_plain']:.3f} (goal <= 1.05)")
    from heft.run.atomic import write_json

    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
