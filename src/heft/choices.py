"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness 0.4.x scores `multiple_choice` tasks.

For a row with context c and choices a_1..a_N (token ids after the prompt), each choice's score is

    ll_j = sum_t log p(a_j,t | c, a_j,<t)

and the harness's two accuracies are

    acc       pred      = argmax_j ll_j
    acc_norm  pred_norm = argmax_j ll_j / chars_j      chars_j: characters of choice j's *text*

(the harness's `completion_len`: `len()` of each `doc_to_choice` string, without the space it puts
between context and choice), ties going to the first maximum (numpy's argmax). `greedy` says whether
every choice token is the model's argmax (the harness's `is_greedy`).

Every (prompt + choice) sequence is scored in one forward pass: sequences of all rows and all choices
are sorted by length and batched together, left-padded by `heft.tokens.train_batch`, so only the logits
of the last (longest choice + 1) positions are computed. ReFT edits go on the prompt positions only
(train_batch's `prompt_start`/`prompt_len`), so every choice of a row sees the same edited context, as
in training. Under several processes each scores an interleaved share of the sequences and the
log-likelihoods are gathered; under FSDP the shares are padded so every process runs the same passes.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .tokens import Encoded, train_batch
from .errors import DataError
from .evaluate import _gather, _share, wilson_interval
from .runtime import Runtime, model_forward


def choose(lls: Sequence[float], chars: Sequence[int] | None = None) -> int:
    """The index of the best choice: argmax of `lls`, or of `lls / chars` (acc_norm); first maximum wins.

    Same answer as lm-eval's `np.argmax(lls)` / `np.argmax(lls / completion_len)`, NaN included (numpy
    returns the first NaN)."""
    values = [ll / c for ll, c in zip(lls, chars)] if chars is not None else list(lls)
    for j, v in enumerate(values):
        if math.isnan(v):
            return j
    return max(range(len(values)), key=values.__getitem__)  # max() keeps the first of equal keys


def _check(rows: list[Encoded], choice_chars: list[list[int]] | None) -> None:
    if choice_chars is not None and len(choice_chars) != len(rows):
        raise DataError(f"choice_chars: {len(choice_chars)} lists for {len(rows)} rows; give one list per row")
    for i, r in enumerate(rows):
        n = len(r.answers)
        if not r.prompt or any(not p for p in r.prompts):
            raise DataError(f"row {i}: empty prompt; the first choice token needs at least one context token "
                            "(lm-eval uses the end-of-text token)")
        if n < 1 or any(len(a) == 0 for a in r.answers):
            raise DataError(f"row {i}: every choice needs at least one token, got lengths {[len(a) for a in r.answers]}")
        if not 0 <= r.label < n:
            raise DataError(f"row {i}: label {r.label} is not one of its {n} choices (0..{n - 1})")
        if choice_chars is not None:
            c = choice_chars[i]
            if len(c) != n or any(not isinstance(x, int) or x <= 0 for x in c):
                raise DataError(f"choice_chars[{i}]: {c!r}; give {n} positive character counts, one per choice")


@torch.no_grad()
def score_choices(model: nn.Module, rows: list[Encoded], choice_chars: list[list[int]] | None, *, batch_size: int,
                  pad_id: int, rt: Runtime, desc: str = "eval") -> list[dict[str, Any]]:
    """Per row, in the order of `rows`: {label, pred, pred_norm, lls, greedy}.

    `rows[i].answers` holds row i's choices (any number, at least one token each) and `rows[i].label` the
    index of the right one. `choice_chars[i][j]` is the length in characters of choice j's text (lm-eval:
    the choice string without its leading space), which acc_norm divides by; with None, `pred_norm` is
    None. `lls[j]` is the summed log-likelihood of choice j's tokens given the prompt, `greedy[j]` whether
    each of them is the argmax.
    """
    _check(rows, choice_chars)
    model.eval()
    device = rt.device
    seqs = [(i, j) for i, r in enumerate(rows) for j in range(len(r.answers))]  # one per (row, choice)
    plen = [len(rows[i].prompt_for(j)) for i, j in seqs]
    clen = [len(rows[i].answers[j]) for i, j in seqs]
    # longest first (a batch that does not fit shows at once), then by choice length: similar widths and keeps
    order = sorted(range(len(seqs)), key=lambda s: (-(plen[s] + clen[s]), -clen[s], s))
    order, real = _share(order, model, rt)  # this process's share of the sequences, gathered below
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=2.0,
                      disable=not rt.main):
        idx = order[start:start + batch_size]
        items = [Encoded(rows[seqs[s][0]].prompt_for(seqs[s][1]), rows[seqs[s][0]].answers, seqs[s][1], False,
                         content_start=rows[seqs[s][0]].content_start) for s in idx]
        batch = {k: v.to(device) for k, v in train_batch(items, pad_id).items()}
        keep = int(batch.pop("logits_to_keep"))
        with rt.autocast():
            logits = model_forward(model, batch, keep)[:, :-1].float()  # (B, keep-1, V)
        tgt = batch["targets"]  # (B, keep-1), -100 where no choice token
        is_tok = tgt != -100
        # log_softmax gathered at the targets, without a second (B, keep-1, V) tensor
        tok_lp = logits.gather(2, tgt.clamp(min=0)[:, :, None])[:, :, 0] - torch.logsumexp(logits, dim=-1)
        ll = torch.where(is_tok, tok_lp, 0.0).sum(1).cpu()  # (B,); where, not *: a pad position may hold NaN
        top = ((logits.argmax(-1) == tgt) | ~is_tok).all(1).cpu()  # (B,)
        for k, s in enumerate(idx):
            if start + k >= real:
                break  # padding (FSDP): scored by another process
            out[s] = (float(ll[k]), bool(top[k]))
    lls: list[list[float]] = [[] for _ in rows]
    greedy: list[list[bool]] = [[] for _ in rows]
    for (i, _), (v, g) in zip(seqs, _gather(out, rt)):  # seqs run row by row, choice by choice
        lls[i].append(v)
        greedy[i].append(g)
    return [{"label": int(r.label), "pred": choose(lls[i]),
             "pred_norm": choose(lls[i], choice_chars[i]) if choice_chars is not None else None,
             "lls": lls[i], "greedy": greedy[i]} for i, r in enumerate(rows)]


def choice_accuracy(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """lm-eval's acc and acc_norm with counts and the 95% Wilson interval of acc; acc_norm is None when
    the rows were scored without character lengths."""
    n = len(preds)
    correct = sum(1 for p in preds if p["pred"] == p["label"])
    has_norm = all(p.get("pred_norm") is not None for p in preds)
    correct_norm = sum(1 for p in preds if p["pred_norm"] == p["label"]) if has_norm else None
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0,
            "acc_norm": (correct_norm / n if n else 0.0) if correct_norm is not None else None,
            "n": n, "correct": correct, "correct_norm": correct_norm, "ci95": [lo, hi]}
