"""Evaluation: yes/no accuracy by answer log-likelihood (default) or by greedy generation.

Scoring compares log p(answer | prompt) of the two answers, as lm-evaluation-harness does for
BoolQ. When both answers are one token after their shared prefix (` yes` / ` no`), one forward pass
with logits at the last prompt position scores both; otherwise each answer is scored in full.
Accuracy comes with a 95% Wilson score interval.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from heft.config.schema import DataConfig, EvalConfig
from heft.data.rows import Example, majority_choice, majority_label
from heft.data.tokens import Encoded
from heft.training.runtime import Runtime
from heft.evaluation.generate import generate_texts
from heft.evaluation.stats import wilson_interval


def is_correct(p: dict[str, Any]) -> bool:
    """A prediction is right: generation records say so (`correct`, exact match), others compare `pred` with `label`;
    an unparseable answer (pred None) is wrong."""
    if "correct" in p:
        return bool(p["correct"])
    return p["pred"] is not None and p["pred"] == p["label"]


def accuracy(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy, its 95% interval and counts; an unparseable generation counts as wrong."""
    n = len(preds)
    correct = sum(1 for p in preds if is_correct(p))
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0, "ci95": [lo, hi], "n": n, "correct": correct}


def task_metrics(preds: list[dict[str, Any]], acc_norm_tasks: set[str]) -> dict[str, dict[str, Any]]:
    """Per task (predictions carry `task`): accuracy with its interval and counts, lm-eval's acc_norm where the
    task reports it, the unparseable count of generative tasks, and the chance baseline (1 / choices)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for p in preds:
        by.setdefault(p.get("task", "boolq"), []).append(p)
    out = {}
    for task, ps in by.items():
        m = accuracy(ps)
        if task in acc_norm_tasks and all(p.get("pred_norm") is not None for p in ps):
            m["acc_norm"] = sum(p["pred_norm"] == p["label"] for p in ps) / len(ps)
        if any("correct" in p for p in ps):
            m["unparseable"] = sum(p["pred"] is None for p in ps)
            m["chance"] = 0.0
        else:
            m["chance"] = sum(1 / len(p["lls"]) if "lls" in p else 0.5 for p in ps) / len(ps)
        out[task] = m
    return out


def evaluate_tasks(model: nn.Module, tokenizer: Any, rows: list[Example], encoded: list[Encoded], e: EvalConfig,
                   rt: Runtime) -> list[dict[str, Any]]:
    """Rows of general tasks, one prediction each, in order. Choices are scored by log-likelihood (lm-eval's acc
    and acc_norm): {label, pred, pred_norm, lls, idx, task, truncated}; generative rows are decoded greedily
    (stopped at the task's stop strings) and matched after extracting the answer: {label (the gold answer),
    pred (the extracted answer, None if unparseable), text, correct, idx, task, truncated}."""
    from heft.evaluation.choices import score_choices
    from heft.evaluation.answers import Extractor, exact_match, extract, stop_at
    from heft.data.tasks import TASKS

    preds: list[dict[str, Any]] = [{} for _ in rows]
    chosen = [i for i, r in enumerate(rows) if r.kind == "choice"]
    if chosen:
        got = score_choices(model, [encoded[i] for i in chosen], [[len(c) for c in rows[i].choices] for i in chosen],
                            batch_size=e.batch_size, pad_id=tokenizer.pad_token_id, rt=rt)
        for i, p in zip(chosen, got):
            preds[i] = {k: p[k] for k in ("label", "pred", "pred_norm", "lls")}
    by_task: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        if r.kind == "generate":
            by_task.setdefault(r.task, []).append(i)
    for task, idx in by_task.items():  # each task with its own stop strings and answer extractor
        spec = TASKS.get(task)
        stops = spec.stops if spec is not None else ()
        kind = e.extractor if e.extractor != "auto" else (spec.extractor if spec is not None else "full")
        ex = Extractor(kind, pattern=e.pattern if kind == "regex" else None)
        texts = generate_texts(model, [encoded[i] for i in idx], tokenizer, batch_size=e.batch_size,
                               max_new_tokens=e.max_new_tokens or 256, rt=rt, stop=stops)
        for i, text in zip(idx, texts):
            text = stop_at(text, stops)
            pred = extract(text, ex)
            preds[i] = {"label": rows[i].gold, "pred": pred, "text": text, "correct": exact_match(pred, rows[i].gold or "", ex)}
    for p, r, x in zip(preds, rows, encoded):
        p.update(idx=r.idx, task=r.task, truncated=x.truncated)
    return preds


def baselines(data: DataConfig, train: list[Example], evaluation: list[Example], preds: list[dict[str, Any]]
              ) -> tuple[Any, float, dict[str, dict[str, Any]] | None]:
    """(majority label, majority baseline, per-task metrics). BoolQ: the training majority (True on ties) and its
    accuracy on the evaluation rows. General tasks: per task, the most frequent gold choice in training (the
    constant predictor; none for generation), its accuracy, the chance baseline and the task's own metrics;
    the run's baseline is their mean over tasks."""
    from heft.data.tasks import TASKS

    if all(r.kind == "yesno" for r in evaluation):
        majority = majority_label(train) if train else True
        return majority, sum(r.label == majority for r in evaluation) / len(evaluation), None
    acc_norm = {n for n, t in TASKS.items() if t.acc_norm} | ({"local"} if data.format == "multiple_choice" else set())
    per_task = task_metrics(preds, acc_norm)
    labels: dict[str, int | None] = {}
    for task, m in per_task.items():
        rows = [r for r in evaluation if r.task == task]
        seen = [r for r in train if r.task == task and r.kind == "choice"]
        label = majority_choice(seen) if seen else (majority_choice(rows) if rows[0].kind == "choice" else None)
        labels[task] = label
        m["majority_label"] = label
        m["majority_baseline"] = sum(r.label == label for r in rows) / len(rows) if label is not None else 0.0
        if task in TASKS:  # from the hub: the official splits; offline: see heft.data.tasks
            m["comparable"] = data.source == "hub" or TASKS[task].comparable
            if TASKS[task].note and data.source != "hub":
                m["note"] = TASKS[task].note
    return labels, sum(m["majority_baseline"] for m in per_task.values()) / len(per_task), per_task
