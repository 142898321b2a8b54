"""Benchmark: peak resident memory of each strategy's training (issue #5, item 5).

Each strategy of the default suite runs in its own process (so peaks do not mix) on a short budget
(the default settings, fewer rows), and reports its peak RSS. Prints a table and writes JSON.

    python bench/memory.py [--rows 96] [--out bench/results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import resource, sys
from heft.cli import main
code = main(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96, help="training rows per strategy (default settings otherwise)")
    ap.add_argument("--out", default="bench/results/memory.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("base", "lora", "reft", "heft"):
            cmd = [sys.executable, "-c", CHILD, "run", "--only", name, "--out", str(Path(tmp) / name),
                   "--data.train_size", str(args.rows), "--data.eval_size", "32"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
            kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK_RSS_KB")))
            results[name] = {"peak_rss_gb": round(kb / 1024 / 1024, 2)}
    print(f"\nPeak resident memory, default settings (SmolLM2-135M, batch 8, max 256 tokens), {args.rows} training rows")
    print(f"{'strategy':<10}{'peak RSS GB':>12}")
    for name, r in results.items():
        print(f"{name:<10}{r['peak_rss_gb']:>12.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "peak_rss_per_strategy", "train_rows": args.rows, "strategies": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
