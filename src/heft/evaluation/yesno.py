"""Evaluation: yes/no accuracy by answer log-likelihood (default) or by greedy generation.

Scoring compares log p(answer | prompt) of the two answers, as lm-evaluation-harness does for
BoolQ. When both answers are one token after their shared prefix (` yes` / ` no`), one forward pass
with logits at the last prompt position scores both; otherwise each answer is scored in full.
Accuracy comes with a 95% Wilson score interval.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from heft.data.tokens import Encoded, prompt_batch, train_batch
from heft.training.runtime import Runtime, gather_rows, model_forward, share_rows


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


