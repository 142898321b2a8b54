"""Scale check: every strategy for a few steps at a real model's shape, random weights, through `heft train`.

The model is built from a config.json (`model.init: random`), so no weights are fetched or shipped:
the shapes, memory and speed are the real model's, the accuracy is meaningless (random weights).
The tokenizer is the embedded SmolLM2's, so the vocabulary is its 49,152 tokens (Llama-2 has 32,000:
the shape here has 6.87 B parameters instead of 6.74 B). Each strategy runs in its own process with
the repository's Llama-2-7B config for it (`configs/llama2-7b-boolq-*.yaml`: LoRA r 32 on all linear
layers, LoReFT r 8 on all 32 layers, first 7 + last 7 positions, bf16) on a few BoolQ rows, one
epoch per stage. Prints a table (peak memory next to the computed weights + trainable state) and
writes JSON. On a GPU this is the README's bounded GPU check; on CPU it is slow (minutes per row).

    python bench/scale_check.py [--shape llama2-7b|smollm2-135m] [--rows 4] [--eval-rows 4] [--max-length 256]
        [--device auto|cpu|cuda] [--out bench/results/scale_check_<device>_<shape>.json] [--assets DIR]
    python bench/scale_check.py --export-assets DIR   # for a machine without network (a lent GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LLAMA2_7B = {  # meta-llama/Llama-2-7b-hf config.json, vocabulary aside (see the module docstring)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False,
}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def export_assets(dest: Path) -> None:
    """What a machine without network needs (about 12 MB): the SmolLM2 tokenizer and config, BoolQ's two splits."""
    from heft.data.assets import boolq_dir, smollm2_model_dir

    dest.mkdir(parents=True, exist_ok=True)
    for name in (*TOKENIZER_FILES, "config.json"):
        if (smollm2_model_dir() / name).is_file():
            shutil.copy(smollm2_model_dir() / name, dest / name)
    for name in ("train.jsonl", "validation.jsonl"):
        shutil.copy(boolq_dir() / name, dest / name)


def shape_folder(shape: str, folder: Path, src: Path) -> dict:
    """config.json for `shape` + the SmolLM2 tokenizer files from `src`: what `model.init: random` needs."""
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, folder / name)
    tok = AutoTokenizer.from_pretrained(folder)
    if shape == "llama2-7b":
        config = {**LLAMA2_7B, "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    else:
        config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return config


def param_count(config: dict) -> dict[str, int]:
    d, f, n, v = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"], config["vocab_size"]
    kv = d * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d
    lora_r = 32  # the Llama-2-7B configs: r 32 on q, k, v, o, gate, up, down
    lora_layer = lora_r * ((d + d) * 2 + (d + kv) * 2 + (d + f) * 3)
    heads = v * d * (1 if config.get("tie_word_embeddings") else 2)
    return {"base": n * per_layer + heads + d, "lora": n * lora_layer, "reft": n * 2 * (8 * d * 2 + 8),
            "head_fp32_copy": v * d}


def run_strategy(name: str, shape_dir: Path, data: tuple[Path, Path], out: Path, args: argparse.Namespace) -> dict:
    cfg = ROOT / "configs" / f"llama2-7b-boolq-{name}.yaml"
    stages = len([line for line in cfg.read_text().splitlines() if line.strip().startswith("- {method")])
    overrides = ["--model.name_or_path", str(shape_dir), "--model.init", "random", "--data.source", "local",
                 "--data.train_path", str(data[0]), "--data.eval_path", str(data[1]), "--data.dev_size", "0",
                 "--data.train_size", str(args.rows), "--data.eval_size", str(args.eval_rows),
                 "--data.max_length", str(args.max_length), "--eval.batch_size", str(args.batch)]
    for i in range(stages):
        overrides += [f"--stages.{i}.epochs", "1", f"--stages.{i}.batch_size", str(args.batch), f"--stages.{i}.grad_accum", "1",
                      f"--stages.{i}.warmup_steps", "0"]
    if args.device == "cpu":
        overrides += ["--model.dtype", "bfloat16"]  # the configs' dtype; `auto` would mean fp32 on CPU
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "heft", "train", "--config", str(cfg), "--out", str(out), *overrides],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        killed = proc.returncode < 0  # a signal: on Linux SIGKILL (-9) here is the out-of-memory killer
        return {"ok": False, "wall_seconds": round(wall, 1), "returncode": proc.returncode,
                "error": f"killed by signal {-proc.returncode}" if killed else proc.stderr[-1500:]}
    metrics = json.loads((out / "metrics.json").read_text())
    meta = json.loads((out / "meta.json").read_text())
    stages_out = [{"method": s["method"], "trainable_params": s["trainable_params"], "optimizer_steps": s["optimizer_steps"],
                   "tokens": s["tokens"], "train_seconds": s["train_seconds"],
                   "tokens_per_second": round(s["tokens"] / max(s["train_seconds"], 1e-9), 1),
                   "peak_memory": s.get("peak_memory")} for s in metrics["stages"]]
    return {"ok": True, "wall_seconds": round(wall, 1), "device": meta["device"], "mixed_precision": meta["mixed_precision"],
            "eval_rows": metrics["n"], "stages": stages_out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("llama2-7b", "smollm2-135m"), default="llama2-7b")
    ap.add_argument("--strategies", nargs="+", default=["lora", "reft", "heft"], choices=("lora", "reft", "heft"))
    ap.add_argument("--rows", type=int, default=4, help="training rows per stage")
    ap.add_argument("--eval-rows", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2, help="per-stage batch size (and evaluation batch size)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--assets", help="folder written by --export-assets (default: heft's cache, fetched if missing)")
    ap.add_argument("--export-assets", metavar="DIR", help="write the tokenizer, config and BoolQ files to DIR and stop")
    ap.add_argument("--out", help="JSON path (default bench/results/scale_check_<device>_<shape>.json)")
    args = ap.parse_args()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.export_assets:
        export_assets(Path(args.export_assets))
        print(f"wrote {args.export_assets}")
        return
    if args.assets:
        assets = Path(args.assets)
    else:
        assets = Path(tempfile.mkdtemp(prefix="heft-scale-assets-"))
        export_assets(assets)
    data = (assets / "train.jsonl", assets / "validation.jsonl")
    hardware = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = shape_folder(args.shape, Path(tmp) / "shape", assets)
        counts = param_count(config)
        for name in args.strategies:
            print(f"{name}: training {args.rows} rows per stage at the {args.shape} shape on {args.device} ...", flush=True)
            results[name] = run_strategy(name, Path(tmp) / "shape", data, Path(tmp) / name, args)
            print(json.dumps(results[name])[:600], flush=True)
    gb = 1e9
    computed = {  # bf16 frozen weights + heft's fp32 copy of the output head + fp32 trainable weights, grads, AdamW moments
        "lora": (counts["base"] * 2 + counts["head_fp32_copy"] * 4 + counts["lora"] * 16) / gb,
        "reft": (counts["base"] * 2 + counts["head_fp32_copy"] * 4 + counts["reft"] * 16) / gb,
    }
    print(f"\nScale check: {args.shape} shape ({counts['base'] / 1e9:.2f} B params, random weights), {args.device} "
          f"({hardware}), batch {args.batch}, max {args.max_length} tokens, {args.rows} rows per stage")
    print(f"{'strategy':<9}{'stage':<7}{'trainable':>12}{'tok/s':>9}{'peak GB':>9}{'computed GB*':>14}  what")
    for name, r in results.items():
        if not r["ok"]:
            print(f"{name:<9}FAILED: {r['error'].strip().splitlines()[-1]}")
            continue
        for s in r["stages"]:
            pm = s["peak_memory"] or {}
            print(f"{name:<9}{s['method']:<7}{s['trainable_params']:>12,}{s['tokens_per_second']:>9.1f}"
                  f"{pm.get('gb', float('nan')):>9.2f}{computed[s['method']]:>14.2f}  {pm.get('what', '')}")
    print("* computed: bf16 frozen weights + fp32 output-head copy + 16 bytes per trainable parameter; activations excluded")
    out = Path(args.out or ROOT / f"bench/results/scale_check_{args.device}_{args.shape}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from heft.run.atomic import write_json

    write_json(out, {"benchmark": "scale_check", "shape": args.shape, "params": counts, "device": args.device,
                     "hardware": hardware, "batch": args.batch, "max_length": args.max_length, "rows": args.rows,
                     "computed_gb": {k: round(v, 2) for k, v in computed.items()}, "strategies": results,
                     "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
