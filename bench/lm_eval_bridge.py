"""Benchmark: lm-evaluation-harness's own `hf` model vs `--model heft` (heft.lm_eval_bridge) on one local task.

The same ARC-Easy documents (heft's built-in arc_easy evaluation rows: the ARC-Easy test split, first `--rows`)
are written as lm-eval's own `arc/arc_easy.yaml` task with only its data source swapped for a local JSON file
(the Hugging Face hub is unreachable here), and scored in one process by `lm_eval.simple_evaluate` twice:

- `hf`: `model="hf", model_args="pretrained=FOLDER,dtype=float32,add_bos_token=..."` on the base model folder
  (the embedded SmolLM2-135M by default);
- `heft`: `model="heft", model_args="run=RUN"` on a base run folder of the same model
  (`heft train` with `stages: []`, fp32), found through lm-eval's registry as `--model heft` is; both get
  `batch_size=B` from simple_evaluate (as from `lm_eval --batch_size B`).

Row by row it compares the prediction behind `acc` (argmax of the choices' log-likelihoods) and `acc_norm`
(per character), and the log-likelihoods themselves. The base run also evaluated the rows itself when it was
written (heft's own multiple-choice scoring), shown as a third column. Seconds are each `simple_evaluate`
call (the model is loaded inside it); on a shared machine they are informational only.

    python bench/lm_eval_bridge.py [--rows 50] [--batch-size 16] [--threads 2] [--model smollm2-135m]
                                   [--out bench/results/lm_eval_bridge.json]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK = "arc_easy_bridge"


def argmax(values: list[float]) -> int:  # numpy's: first maximum, first NaN
    for j, v in enumerate(values):
        if math.isnan(v):
            return j
    return max(range(len(values)), key=values.__getitem__)


def write_task(rows: list, folder: Path) -> dict:
    """lm-eval's own arc_easy.yaml over the rows, as a local JSON file."""
    import lm_eval
    import yaml

    sys.path.insert(0, str(HERE))
    from mc_vs_lm_eval import write_arc_docs

    data = folder / "arc_easy_docs.jsonl"
    write_arc_docs(rows, data)
    task = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml").read_text())
    for k in ("tag", "dataset_name", "training_split", "validation_split"):
        task.pop(k, None)
    task.update(task=TASK, dataset_path="json", dataset_kwargs={"data_files": {"test": str(data)}}, test_split="test")
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return task


def lls_of(results: dict) -> list[list[float]]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded alias or local Hugging Face model folder")
    ap.add_argument("--rows", type=int, default=50, help="the first N evaluation rows of heft's arc_easy (ARC-Easy test)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default=str(HERE / "results" / "lm_eval_bridge.json"))
    args = ap.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

    import lm_eval
    import torch
    import transformers
    import yaml
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    import heft.lm_eval_bridge  # noqa: F401  registers --model heft
    from heft.config.schema import DataConfig, TaskConfig
    from heft.data.rows import load_splits
    from heft.run.atomic import read_jsonl, write_json
    from heft.methods.model import resolve_model_path

    torch.set_num_threads(args.threads)
    model_path = resolve_model_path(args.model)
    rows = load_splits(DataConfig(source="builtin", tasks=(TaskConfig("arc_easy", eval_size=args.rows),)),
                       with_train=False).eval
    tok = AutoTokenizer.from_pretrained(model_path)
    adds_bos = tok("Question: x")["input_ids"] != tok("Question: x", add_special_tokens=False)["input_ids"]
    result: dict = {"benchmark": "lm_eval_bridge", "model": args.model, "model_path": model_path, "rows": len(rows),
                    "split": "ARC-Easy test (heft's built-in arc_easy rows), first rows", "batch_size": args.batch_size,
                    "dtype": "float32, no autocast", "device": "cpu", "threads": args.threads,
                    "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "load_average_start": list(os.getloadavg()), "torch": torch.__version__,
                    "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
                    "timing_note": "seconds measured on a shared machine: informational only, not a speed claim"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
        (tmp / "tasks").mkdir()
        result["task_yaml"] = write_task(rows, tmp / "tasks")
        cfg = {"stages": [], "model": {"name_or_path": model_path, "dtype": "float32"}, "precision": "fp32",
               "data": {"source": "builtin", "tasks": [{"name": "arc_easy", "eval_size": args.rows}]},
               "eval": {"batch_size": args.batch_size}}
        (tmp / "heft.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"base run folder: heft train, {args.model}, stages: [] ...", flush=True)
        subprocess.run([sys.executable, "-m", "heft", "train", "--config", str(tmp / "heft.yaml"), "--out",
                        str(tmp / "run")], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        own = read_jsonl(tmp / "run" / "predictions.jsonl")
        manager = TaskManager(include_path=str(tmp / "tasks"), include_defaults=False)
        sides = {"hf": f"pretrained={model_path},dtype=float32,add_bos_token={adds_bos}",
                 "heft": f"run={tmp / 'run'}"}
        out: dict = {}
        for name, model_args in sides.items():
            print(f"lm_eval.simple_evaluate(model={name!r}, model_args={model_args!r}) ...", flush=True)
            start = time.perf_counter()
            res = lm_eval.simple_evaluate(model=name, model_args=model_args, tasks=[TASK], task_manager=manager,
                                          batch_size=args.batch_size, device="cpu", num_fewshot=0, log_samples=True,
                                          bootstrap_iters=0)
            out[name] = {"seconds": time.perf_counter() - start, "lls": lls_of(res), "results": res["results"][TASK]}
        result["model_args"] = sides
    chars = [[len(c) for c in r.choices] for r in rows]
    preds = {name: {"acc": [argmax(x) for x in o["lls"]],
                    "acc_norm": [argmax([v / c for v, c in zip(x, ch)]) for x, ch in zip(o["lls"], chars)]}
             for name, o in out.items()}
    preds["heft eval"] = {"acc": [p["pred"] for p in own], "acc_norm": [p["pred_norm"] for p in own]}
    gold = [int(r.label) for r in rows]
    result["accuracy"] = {k: sum(a == g for a, g in zip(v["acc"], gold)) / len(gold) for k, v in preds.items()}
    result["acc_norm"] = {k: sum(a == g for a, g in zip(v["acc_norm"], gold)) / len(gold) for k, v in preds.items()}
    result["lm_eval_results"] = {k: o["results"] for k, o in out.items()}
    result["seconds"] = {k: o["seconds"] for k, o in out.items()}
    result["rows_same_acc_prediction"] = sum(a == b for a, b in zip(preds["hf"]["acc"], preds["heft"]["acc"]))
    result["rows_same_acc_norm_prediction"] = sum(a == b for a, b in zip(preds["hf"]["acc_norm"], preds["heft"]["acc_norm"]))
    result["rows_heft_bridge_same_as_heft_eval"] = sum(
        a == b and c == d for a, b, c, d in zip(preds["heft"]["acc"], preds["heft eval"]["acc"],
                                                preds["heft"]["acc_norm"], preds["heft eval"]["acc_norm"]))
    result["max_abs_loglikelihood_diff_hf_vs_heft"] = max(
        abs(a - b) for x, y in zip(out["hf"]["lls"], out["heft"]["lls"]) for a, b in zip(x, y))
    result["max_abs_loglikelihood_diff_heft_vs_heft_eval"] = max(
        abs(a - b) for x, p in zip(out["heft"]["lls"], own) for a, b in zip(x, p["lls"]))
    result["load_average_end"] = list(os.getloadavg())
    write_json(Path(args.out), result)
    report(result)
    print(f"wrote {args.out}")


def report(r: dict) -> None:
    n = r["rows"]
    print(f"\nARC-Easy (test split), first {n} rows, {r['model']}, float32, cpu, {r['threads']} threads, "
          f"batch {r['batch_size']}; load average at start {r['load_average_start'][0]:.2f}")
    print(f"{'model':<22}{'acc':>8}{'acc_norm':>10}{'seconds':>9}")
    for k, label in (("hf", "lm-eval --model hf"), ("heft", "lm-eval --model heft"), ("heft eval", "heft's own scoring")):
        secs = f"{r['seconds'][k]:>9.1f}" if k in r["seconds"] else f"{'-':>9}"
        print(f"{label:<22}{r['accuracy'][k]:>8.4f}{r['acc_norm'][k]:>10.4f}{secs}")
    print(f"hf vs heft: same acc prediction on {r['rows_same_acc_prediction']}/{n} rows, same acc_norm prediction on "
          f"{r['rows_same_acc_norm_prediction']}/{n}; max |log-likelihood diff| {r['max_abs_loglikelihood_diff_hf_vs_heft']:.3g}")
    print(f"--model heft vs heft's own scoring: same predictions on {r['rows_heft_bridge_same_as_heft_eval']}/{n} rows; "
          f"max |log-likelihood diff| {r['max_abs_loglikelihood_diff_heft_vs_heft_eval']:.3g}")
    print("seconds: one simple_evaluate call each (model loading included) on a shared machine: not a speed measurement")


if __name__ == "__main__":
    main()
