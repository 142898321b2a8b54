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

from heft.training import sharding
from heft.data.tokens import Encoded, prompt_batch
from heft.training.runtime import Runtime, gather_rows, share_rows


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


