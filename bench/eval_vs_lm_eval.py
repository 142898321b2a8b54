"""Benchmark: heft's BoolQ evaluation vs lm-evaluation-harness (issue #5, item 3).

Both sides score the same BoolQ validation rows with the same local model folder (the embedded
SmolLM2-135M-Instruct by default), by comparing log p(" no" | prompt) and log p(" yes" | prompt):

- `heft`: `heft.data.tokens.Encoder` (the `passage` prompt) + `heft.evaluation.yesno.score` (one forward pass per
  row, left-padded batches sorted by length, logits only at the last position) + `accuracy`.
- `lm-eval`: lm-evaluation-harness 0.4.13, `hf` model (`HFLM`), zero-shot, the built-in `boolq`
  task's own config (prompt `{{passage}}\\nQuestion: {{question}}?\\nAnswer:`, choices `no`/`yes`)
  with only its data source swapped for a local JSON file (the hub is unreachable), through
  `lm_eval.simple_evaluate`. It runs in its own virtual environment that sees heft's torch and
  transformers (`--system-site-packages`), so both sides run the same model code.

Same rows: heft reads and checks them (`heft.data.rows.load_splits`), and the lm-eval side reads a JSON
file written from exactly those rows (question and passage as heft stripped them, label 0/1), so
the prompt texts are identical; the script then checks that lm-eval's context and continuation
token ids equal heft's prompt and answer ids on every row. heft's length budget is set high enough
that no passage is cut (lm-eval cuts nothing below the model's context length); the JSON says how
many rows heft would have truncated (must be 0).

Timed: the evaluation itself, model loading excluded on both sides. heft: reading the rows,
tokenizing, scoring, accuracy. lm-eval: `simple_evaluate` with the loaded `HFLM` (building the task
and reading its data file, tokenizing, scoring, metrics; bootstrap_iters=0, the stderr of a mean is
analytic anyway; building lm-eval's TaskManager index is done before the timer). Same batch size
(heft counts rows, lm-eval counts requests; lm-eval's logits cache lets one forward pass serve
both answers of a row). Each side runs in a fresh process per round, the order alternating.

    python bench/eval_vs_lm_eval.py [--rows 300] [--rounds 2] [--batch-size 16] [--dtype fp32|bf16]
                                    [--device cpu|cuda] [--model smollm2-135m] [--out bench/results/eval_vs_lm_eval.json]

fp32 (the default of this script): float32 weights, no autocast, on both sides: the same arithmetic.
bf16: each tool's own bf16 recipe (heft: bf16 autocast with an fp32 vocabulary head; lm-eval:
bfloat16 weights), so near-tied rows may then differ. default: each tool as a user gets it without
flags (heft: bf16 autocast where the CPU or GPU has native bf16, else fp32; lm-eval: `dtype=auto`,
i.e. the dtype saved in the model folder, float32 for the embedded SmolLM2). The first run builds lm-eval's environment in
$HEFT_CACHE/bench-venvs/lm-eval (default ~/.cache/heft/bench-venvs/lm-eval).
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

HERE = Path(__file__).resolve().parent
SIDES = ("heft", "lm-eval")
LM_EVAL_STEPS = [["lm-eval==0.4.13"]]
TASK = "boolq_local"
MAX_LENGTH = 8192  # heft's length budget here: no BoolQ passage is cut (lm-eval cuts none below this)


def run_heft(spec: dict) -> dict:
    import torch
    from heft.config.schema import DataConfig, ModelConfig
    from heft.data.rows import load_splits
    from heft.data.tokens import Encoder
    from heft.evaluation.evaluate import accuracy
    from heft.evaluation.yesno import score
    from heft.methods.model import load_model
    from heft.training.runtime import Runtime, use_bf16

    # heft's Runtime, with the device chosen by the flag (no launcher here: one process).
    device = torch.device(spec["device"])
    bf16 = use_bf16("auto", device) if spec["dtype"] == "default" else spec["dtype"] == "bf16"
    rt = Runtime(device, bf16)
    model, tok = load_model(ModelConfig(name_or_path=spec["model_path"], dtype="float32"), rt.device)
    start = time.perf_counter()
    rows = load_splits(DataConfig(eval_size=spec["rows"], max_length=MAX_LENGTH), with_train=False).eval
    enc = Encoder(tok, "passage", MAX_LENGTH)
    encoded = [enc.encode(r) for r in rows]
    preds = score(model, encoded, batch_size=spec["batch_size"], pad_id=tok.pad_token_id, rt=rt)
    metrics = accuracy(preds)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "accuracy": metrics["accuracy"], "preds": [bool(p["pred"]) for p in preds],
            "truncated": sum(e.truncated for e in encoded), "torch": torch.__version__, "bf16_autocast": rt.bf16}


def run_lm_eval(spec: dict) -> dict:
    from importlib import metadata

    # lm-eval 0.4.13 no longer pulls torch/transformers into its venv, and `--system-site-packages` only
    # shows the base interpreter's packages: put heft's site-packages last, so lm-eval's own packages win
    # and both sides run the same torch and transformers.
    for p in spec.get("heft_site_packages", []):
        if p not in sys.path:
            sys.path.append(p)

    import lm_eval
    import torch
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # The built-in boolq task, data source swapped for the local rows.
    builtin = Path(lm_eval.__file__).parent / "tasks" / "super_glue" / "boolq" / "default.yaml"
    task = yaml.safe_load(builtin.read_text())
    task.pop("tag", None)
    task.pop("dataset_name", None)
    task.pop("training_split", None)
    task.update(task=TASK, dataset_path="json", dataset_kwargs={"data_files": {"validation": spec["data_file"]}})
    dtype = {"fp32": "float32", "bf16": "bfloat16", "default": "auto"}[spec["dtype"]]
    lm = HFLM(pretrained=spec["model_path"], dtype=dtype,
              batch_size=spec["batch_size"], device=spec["device"])
    manager = TaskManager()
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, num_fewshot=0,
                                  bootstrap_iters=0, log_samples=True)
    seconds = time.perf_counter() - start
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    preds = [bool(max(range(2), key=lambda j: s["filtered_resps"][j][0])) for s in samples]
    # The token ids lm-eval scored, for the identity check against heft's.
    docs = [json.loads(x) for x in Path(spec["data_file"]).read_text().splitlines()]
    ids = []
    for doc in docs:
        context = f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"
        pairs = [lm._encode_pair(context, " " + c) for c in ("no", "yes")]
        ids.append({"context": pairs[0][0], "no": pairs[0][1], "yes": pairs[1][1], "context_yes": pairs[1][0]})
    return {"seconds": seconds, "accuracy": out["results"][TASK]["acc,none"], "preds": preds, "ids": ids,
            "lm_eval": metadata.version("lm_eval"), "transformers": metadata.version("transformers"),
            "torch": torch.__version__}


def write_rows(n: int, path: Path) -> list:
    """The first n validation rows as heft reads them, as JSON lines for lm-eval's `json` loader."""
    from heft.config.schema import DataConfig
    from heft.data.rows import load_splits

    rows = load_splits(DataConfig(eval_size=n), with_train=False).eval
    path.write_text("".join(json.dumps({"idx": r.idx, "question": r.question, "passage": r.passage,
                                        "label": int(r.label)}) + "\n" for r in rows))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded alias or local Hugging Face model folder")
    ap.add_argument("--rows", type=int, default=300, help="first N BoolQ validation rows")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "default"], default="fp32",
                    help="fp32: float32, no autocast, both sides; bf16 / default: each tool's own bf16 / default recipe")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--out", default=str(HERE / "results" / "eval_vs_lm_eval.json"))
    ap.add_argument("--one", choices=SIDES, help=argparse.SUPPRESS)  # internal: run one side on --spec
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        spec = json.loads(Path(args.spec).read_text())
        result = run_heft(spec) if args.one == "heft" else run_lm_eval(spec)
        print("RESULT " + json.dumps(result))
        return

    sys.path.insert(0, str(HERE))
    from peer_venv import ensure_venv, run_json
    from transformers import AutoTokenizer

    from heft.data.tokens import Encoder
    from heft.methods.model import resolve_model_path

    lm_eval_python = ensure_venv("lm-eval", LM_EVAL_STEPS, system_site_packages=True)
    pythons = {"heft": sys.executable, "lm-eval": str(lm_eval_python)}
    model_path = resolve_model_path(args.model)
    runs: dict[str, list[dict]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "boolq_validation.jsonl"
        rows = write_rows(args.rows, data_file)
        import torch
        import transformers

        site = sorted({str(Path(m.__file__).resolve().parent.parent) for m in (torch, transformers)})
        spec = {"model_path": model_path, "rows": args.rows, "batch_size": args.batch_size, "dtype": args.dtype,
                "device": args.device, "data_file": str(data_file), "heft_site_packages": site}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = dict(os.environ, HF_DATASETS_CACHE=str(Path(tmp) / "hf-datasets"), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        for r in range(args.rounds):
            for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                print(f"round {r + 1}/{args.rounds}: {side} ...", flush=True)
                cmd = [pythons[side], str(Path(__file__).resolve()), "--one", side, "--spec", str(spec_path)]
                runs[side].append(run_json(cmd, side, env=env))

    # Same inputs: lm-eval's context/continuation ids vs heft's prompt/answer ids, row by row.
    tok = AutoTokenizer.from_pretrained(model_path)
    enc = Encoder(tok, "passage", MAX_LENGTH)
    ids = runs["lm-eval"][0].pop("ids")
    for run in runs["lm-eval"][1:]:
        run.pop("ids")
    same_ids = 0
    for ex, theirs in zip(rows, ids):
        e = enc.encode(ex)
        same_ids += (e.prompt == theirs["context"] == theirs["context_yes"] and e.answers[0] == theirs["no"]
                     and e.answers[1] == theirs["yes"])
    heft_preds, lm_preds = runs["heft"][0]["preds"], runs["lm-eval"][0]["preds"]
    agree = sum(a == b for a, b in zip(heft_preds, lm_preds)) / len(rows)
    med = {s: statistics.median(x["seconds"] for x in runs[s]) for s in SIDES}
    result = {
        "benchmark": "boolq_eval_vs_lm_eval", "model": args.model, "model_path": model_path, "rows": len(rows),
        "rounds": args.rounds, "batch_size": args.batch_size, "dtype": args.dtype, "device": args.device,
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "lm_eval_version": runs["lm-eval"][0]["lm_eval"], "torch": runs["heft"][0]["torch"],
        "transformers": runs["lm-eval"][0]["transformers"],
        "heft_bf16_autocast": runs["heft"][0]["bf16_autocast"], "lm_eval_dtype_arg": {"fp32": "float32",
                                                                                   "bf16": "bfloat16", "default": "auto"}[args.dtype],
        "rows_with_identical_token_ids": same_ids, "heft_truncated_rows": runs["heft"][0]["truncated"],
        "accuracy": {s: runs[s][0]["accuracy"] for s in SIDES},
        "prediction_agreement": agree, "goal_agreement_at_least": 0.995,
        "predictions_stable_across_rounds": {s: all(x["preds"] == runs[s][0]["preds"] for x in runs[s]) for s in SIDES},
        "seconds": {s: [x["seconds"] for x in runs[s]] for s in SIDES}, "median_seconds": med,
        "speedup_heft": med["lm-eval"] / med["heft"], "goal_speedup_at_least": 2.0,
        "predictions": {s: runs[s][0]["preds"] for s in SIDES},
    }
    print(f"\nBoolQ evaluation, {len(rows)} validation rows, {args.model}, {args.dtype}, {args.device}, "
          f"batch {args.batch_size}, {args.rounds} alternating rounds (model load excluded)")
    print(f"{'tool':<10}{'accuracy':>10}{'median s':>10}{'rows/s':>8}")
    for s in SIDES:
        print(f"{s:<10}{result['accuracy'][s]:>10.4f}{med[s]:>10.2f}{len(rows) / med[s]:>8.1f}")
    print(f"identical token ids on {same_ids}/{len(rows)} rows; heft truncated {result['heft_truncated_rows']} rows")
    print(f"same prediction on {agree:.2%} of rows (goal >= 99.5%)")
    print(f"speed-up of heft: {result['speedup_heft']:.2f}x (goal >= 2x)")
    from heft.run.atomic import write_json

    write_json(Path(args.out), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
