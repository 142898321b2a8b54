"""Evaluation: yes/no accuracy by answer log-likelihood (default) or by greedy generation.

Scoring compares log p(answer | prompt) of the two answers, as lm-evaluation-harness does for
BoolQ. When both answers are one token after their shared prefix (` yes` / ` no`), one forward pass
with logits at the last prompt position scores both; otherwise each answer is scored in full.
Accuracy comes with a 95% Wilson score interval.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import sharding
from .config import DataConfig, EvalConfig
from .data import Example, majority_choice, majority_label
from .tokens import Encoded, prompt_batch, train_batch
from .runtime import Runtime, gather_rows, model_forward, share_rows
from .stats import wilson_interval  # noqa: F401  (heft.evaluate.wilson_interval, as before)


def _shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def single_token_split(row: Encoded) -> tuple[list[int], int, int] | None:
    """(prompt + shared answer prefix, false token, true token) when one token decides, else None."""
    no, yes = row.answers
    k = _shared_prefix(no, yes)
    if len(no) == k + 1 and len(yes) == k + 1:
        return row.prompt + no[:k], no[k], yes[k]
    return None


@torch.no_grad()
def score(model: nn.Module, rows: list[Encoded], *, batch_size: int, pad_id: int, rt: Runtime,
          desc: str = "eval") -> list[dict[str, Any]]:
    """Per-row {label, pred, p_yes, lp_no, lp_yes}, in the order of `rows`.

    On the one-pass route lp_no/lp_yes leave out the answers' shared prefix (it is the same for
    both, so predictions and p_yes are unaffected); otherwise they are full answer log-likelihoods.
    """
    model.eval()
    device = rt.device
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i].prompt)))  # similar lengths together
    order, real = share_rows(order, model, rt)  # this process's share, gathered below
    out: list[dict[str, Any] | None] = [None] * len(rows)
    splits = [single_token_split(r) for r in rows]
    fast = all(s is not None for s in splits)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=2.0,
                      disable=not rt.main):
        idx = order[start:start + batch_size]
        if fast:
            skip = [rows[i].content_start for i in idx]
            batch = {k: v.to(device) for k, v in prompt_batch([splits[i][0] for i in idx], pad_id, skip).items()}
            # ReFT edits the prompt only, not a shared answer prefix appended to it (as in training).
            batch["prompt_len"] = torch.tensor([len(rows[i].prompt) - rows[i].content_start for i in idx], device=device)
            with rt.autocast():
                logits = model_forward(model, batch, 1)[:, -1].float()  # (B, V)
            logp = torch.log_softmax(logits, dim=-1)
            no_tok = torch.tensor([splits[i][1] for i in idx], device=device)
            yes_tok = torch.tensor([splits[i][2] for i in idx], device=device)
            lp = torch.stack([logp.gather(1, no_tok[:, None])[:, 0], logp.gather(1, yes_tok[:, None])[:, 0]], 1)
        else:
            cols = []
            for cand in (0, 1):
                items = [Encoded(rows[i].prompt, rows[i].answers, cand, False, content_start=rows[i].content_start) for i in idx]
                batch = {k: v.to(device) for k, v in train_batch(items, pad_id).items()}
                keep = int(batch.pop("logits_to_keep"))
                with rt.autocast():
                    logits = model_forward(model, batch, keep)[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                tgt = batch["targets"]
                tok_lp = logp.gather(2, tgt.clamp(min=0)[:, :, None])[:, :, 0] * (tgt != -100)
                cols.append(tok_lp.sum(1))
            lp = torch.stack(cols, 1)  # (B, 2)
        lp = lp.cpu()
        p_yes = torch.softmax(lp, dim=1)[:, 1]
        for j, i in enumerate(idx):
            if start + j >= real:
                break  # padding (FSDP): scored by another process
            pred = bool(lp[j, 1] > lp[j, 0])
            out[i] = {"label": bool(rows[i].label), "pred": pred, "p_yes": float(p_yes[j]),
                      "lp_no": float(lp[j, 0]), "lp_yes": float(lp[j, 1])}
    return gather_rows(out, rt)


@torch.no_grad()
def generate_texts(model: nn.Module, rows: list[Encoded], tokenizer: Any, *, batch_size: int, max_new_tokens: int,
                   rt: Runtime, stop: tuple[str, ...] = (), desc: str = "generate") -> list[str]:
    """Greedy continuations of each row's prompt (special tokens dropped), in the order of `rows`; a row stops
    early at any of the `stop` strings (the caller cuts the text there)."""
    model.eval()
    device = rt.device
    out: list[str | None] = [None] * len(rows)
    inner = getattr(model, "module", model)
    mine, real = share_rows(list(range(len(rows))), inner, rt)
    sync = sharding.is_sharded(inner) and rt.num_processes > 1  # every process decodes until all are done
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, unit="batch", mininterval=2.0, disable=not rt.main):
        ids = mine[start:start + batch_size]
        chunk = [rows[i] for i in ids]
        batch = {k: v.to(device) for k, v in prompt_batch([r.prompt for r in chunk], tokenizer.pad_token_id,
                                                           [r.content_start for r in chunk]).items()}
        # use_cache: the loader turns the model config's cache off for training; without it every step re-runs the
        # whole sequence (quadratic), and ReFT's prompt edits, applied on the prompt pass only, would be lost
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        if sync:
            kwargs["synced_gpus"] = True
        if stop:
            kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
        with rt.autocast(), sharding.root_gathered(inner):
            try:
                seqs = _generate(inner, batch, kwargs)
            except ValueError:  # stop_strings needs a tokenizer transformers can map strings onto (not word-level ones)
                if not stop:
                    raise
                kwargs = {k: v for k, v in kwargs.items() if k not in ("stop_strings", "tokenizer")}
                seqs = _generate(inner, batch, kwargs)  # the caller still cuts the text at the stops
        width = batch["input_ids"].shape[1]
        for j, (i, s) in enumerate(zip(ids, seqs)):
            if start + j >= real:
                break  # padding (FSDP): decoded by another process
            out[i] = tokenizer.decode(s[width:], skip_special_tokens=True)
    return gather_rows(out, rt)


def _generate(inner: nn.Module, batch: dict[str, torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
    if hasattr(inner, "interventions"):
        return inner.generate(batch["input_ids"], batch["attention_mask"], batch["prompt_start"], batch["prompt_len"], **kwargs)
    return inner.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)


def generate(model: nn.Module, rows: list[Encoded], tokenizer: Any, *, batch_size: int, max_new_tokens: int,
             answer_words: tuple[str, str], rt: Runtime, desc: str = "generate") -> list[dict[str, Any]]:
    """BoolQ by greedy decoding: the prediction is the first answer word (`no`/`yes` or `false`/`true`) in the text."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in answer_words) + r")\b", re.IGNORECASE)
    texts = generate_texts(model, rows, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, rt=rt, desc=desc)
    out = []
    for r, text in zip(rows, texts):
        m = pattern.search(text)
        out.append({"label": bool(r.label), "pred": None if m is None else m.group(1).lower() == answer_words[1],
                    "text": text})
    return out


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
    from .choices import score_choices
    from .extract import Extractor, exact_match, extract, stop_at
    from .tasks import TASKS

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
    from .tasks import TASKS

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
        if task in TASKS:  # from the hub: the official splits; offline: see heft.tasks
            m["comparable"] = data.source == "hub" or TASKS[task].comparable
            if TASKS[task].note and data.source != "hub":
                m["note"] = TASKS[task].note
    return labels, sum(m["majority_baseline"] for m in per_task.values()) / len(per_task), per_task
