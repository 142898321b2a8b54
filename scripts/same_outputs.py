"""Check that a code change leaves heft's outputs unchanged: run `heft run` and `heft compare` on a tiny
random Llama (built here, deterministic) with one version of heft, again with another, and compare. It also
trains one run through the token prefix and one through the layer prefix (`heft train`).

    python scripts/same_outputs.py make DIR            # tiny model + data in DIR/assets (once), outputs in DIR/out
    PYTHONPATH=OLD/src python scripts/same_outputs.py make OLD_DIR --assets DIR/assets
    python scripts/same_outputs.py check OLD_DIR/out DIR/out

`check` asserts: every predictions.jsonl byte-identical; every metrics.json, stage.json and epochs.jsonl
number equal (wall-clock times, dates and versions excepted; fields only the new version writes are
additions, not differences); report.json's and summary.json's accuracies, intervals and paired tests equal. It prints what differs and exits 1 if anything does.

The tiny model and rows come from tests/conftest.py, so both versions see the same files.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMES = {"train_seconds", "seconds", "created", "heft_version", "peak_memory", "python", "torch", "transformers", "peft",
         "seconds_not_retrained", "run_folders", "plots", "suite", "base_model_fingerprint"}


def make_assets(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import yaml
    from conftest import boolq_rows, build_tiny_llama, tiny_config, write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    model = build_tiny_llama(folder / "tiny-llama")
    files = (write_jsonl(folder / "train.jsonl", boolq_rows(48)), write_jsonl(folder / "validation.jsonl", boolq_rows(20, 5, True)))
    common = tiny_config(model, files, [], data={"train_size": 16, "eval_size": 19})
    del common["stages"]
    lora = {"method": "lora", "lr": 1.0e-3, "scheduler": "constant", "batch_size": 8}
    reft = {"method": "reft", "lr": 2.0e-3, "batch_size": 8}
    strategies = {"base": [], "lora": [{**lora, "epochs": 2}], "reft": [{**reft, "epochs": 2}],
                  "heft": [{**lora, "epochs": 1}, {**reft, "epochs": 1}], "joint": [{"method": "joint", "epochs": 1, "batch_size": 8}]}
    (folder / "suite.yaml").write_text(yaml.safe_dump({"common": common, "strategies": strategies}, sort_keys=False))
    # One run through each speed path: the token prefix (ReFT on the last positions only, frozen first
    # tokens kept) and the layer prefix (LoRA and ReFT on the upper two of four layers).
    token = {**common, "reft": {**common.get("reft", {}), "positions": {"first": 0, "last": 3}}, "frozen_prefix": "cache",
             "stages": [{**reft, "epochs": 2}]}
    layers = {**common, "lora": {**common.get("lora", {}), "layers": [2, 3]}, "reft": {**common.get("reft", {}), "layers": [2, 3]},
              "stages": [{**lora, "epochs": 1}, {**reft, "epochs": 1}]}
    (folder / "token-prefix.yaml").write_text(yaml.safe_dump(token, sort_keys=False))
    (folder / "layer-prefix.yaml").write_text(yaml.safe_dump(layers, sort_keys=False))


def make(out: Path, assets: Path) -> None:
    if not (assets / "suite.yaml").is_file():
        make_assets(assets)
    suite = str(assets / "suite.yaml")
    heft = [sys.executable, "-m", "heft"]
    subprocess.run(heft + ["run", "--config", suite, "--out", str(out / "run")], check=True)
    subprocess.run(heft + ["compare", "--config", suite, "--seeds", "0", "1", "--out", str(out / "compare")], check=True)
    for name in ("token-prefix", "layer-prefix"):
        subprocess.run(heft + ["train", "--config", str(assets / f"{name}.yaml"), "--out", str(out / name)], check=True)


def _numbers(a, b, where: str, diffs: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in TIMES:
                continue
            if k not in a:
                continue  # a field the new version adds: not a change of an existing output
            if k not in b:
                diffs.append(f"{where}.{k}: missing in new")
                continue
            _numbers(a[k], b[k], f"{where}.{k}", diffs)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{where}: {len(a)} vs {len(b)} items")
        for i, (x, y) in enumerate(zip(a, b)):
            _numbers(x, y, f"{where}[{i}]", diffs)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)):
            diffs.append(f"{where}: {a!r} vs {b!r}")
    elif a != b:
        diffs.append(f"{where}: {a!r} vs {b!r}")


def _records(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def check(old: Path, new: Path) -> int:
    diffs: list[str] = []
    compared = 0
    for p in sorted(old.rglob("predictions.jsonl")):
        q = new / p.relative_to(old)
        compared += 1
        if not q.is_file():
            diffs.append(f"{q}: missing")
        elif p.read_bytes() != q.read_bytes():
            diffs.append(f"{q.relative_to(new)}: predictions differ")
    for name in ("metrics.json", "stage.json", "report.json", "summary.json"):
        for p in sorted(old.rglob(name)):
            q = new / p.relative_to(old)
            if "epoch-" in str(p):
                continue  # snapshots moved out of run folders (stage cache)
            if not q.is_file():
                diffs.append(f"{q}: missing")
                continue
            _numbers(json.loads(p.read_text()), json.loads(q.read_text()), str(q.relative_to(new)), diffs)
    for p in sorted(old.rglob("epochs.jsonl")):
        q = new / p.relative_to(old)
        _numbers(_records(p), _records(q) if q.is_file() else [], str(q.relative_to(new)), diffs)
    for d in diffs:
        print("DIFF", d)
    print(f"{compared} prediction files compared; {len(diffs)} difference(s)")
    return 1 if diffs or not compared else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir", type=Path)
    m.add_argument("--assets", type=Path, help="reuse these assets (default: DIR/assets)")
    c = sub.add_parser("check")
    c.add_argument("old", type=Path)
    c.add_argument("new", type=Path)
    a = p.parse_args()
    if a.cmd == "make":
        make(a.dir / "out", a.assets or a.dir / "assets")
        return 0
    return check(a.old, a.new)


if __name__ == "__main__":
    sys.exit(main())
