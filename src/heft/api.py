"""The Python API: a trained run folder as a model you can call, and four helpers.

    model, tokenizer = heft.load("runs/x")          # base model + LoRA (merged or attached) + ReFT hooks
    out = model.generate(**tokenizer(["Question: ...\\nAnswer:"], return_tensors="pt"), max_new_tokens=8)
    heft.score(model, tokenizer, ["Question: ...\\nAnswer:"], [["yes", "no"]])   # log-likelihood per choice
    heft.generate(model, tokenizer, ["Question: ...\\nAnswer:"], max_new_tokens=32)
    heft.train("my.yaml", "runs/y")                  # the run folder

ReFT edits "the first f and last l prompt tokens" of each row. A `HeftModel` takes the prompt of a
plain call from its attention mask: every attended token of the input is prompt, with left or right
padding. In `generate`, only the prompt pass is edited, as in training and evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["HeftModel", "load", "score", "generate", "train"]


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_start, prompt_len) per row: the attended tokens are the prompt (left or right padded)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(torch.long)
    return mask.argmax(1), mask.sum(1)  # argmax: the first attended position


class HeftModel(nn.Module):
    """A finished run's model: call it like the Hugging Face model it wraps (`forward`, `generate`)."""

    def __init__(self, session: Any):
        super().__init__()
        self.top = session.top  # the ReFT wrapper if the run trained ReFT, else the (maybe PEFT) model
        self.reft = session.reft
        self.config = session.model.config
        self.session = session

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if self.reft is None:
            return self.top(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is not None and "position_ids" not in kwargs:  # left padding: positions count real tokens
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        start, length = _positions(input_ids, attention_mask)
        return self.reft(input_ids, start, length, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("use_cache", True)  # the loader turns the cache off for training
        if self.reft is None:
            return self.top.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        start, length = _positions(input_ids, attention_mask)
        return self.reft.generate(input_ids, attention_mask, start, length, **kwargs)


def load(run: str | Path, *, allow_other_base: bool = False) -> tuple[HeftModel, Any]:
    """(model, tokenizer) of a finished run folder, ready for `forward`/`generate`, in eval mode."""
    from heft.hub import resolve
    from heft.run.pipeline import load_run

    s, _ = load_run(resolve(run), allow_other_base=allow_other_base)
    model = HeftModel(s)
    model.eval()
    return model, s.tokenizer


def _encoded(model: HeftModel, prompt: str, choices: list[str] | None) -> Any:
    from heft.data.rows import Example

    if choices is not None:
        ex = Example("", "", 0, 0, source="heft.score", task="api", context=prompt, choices=tuple(choices))
    else:
        ex = Example("", "", 0, 0, source="heft.generate", task="api", context=prompt, target="", gold="", delimiter="")
    return model.session.encoder().encode(ex, "eval")


def score(model: HeftModel, tokenizer: Any, prompts: list[str], choices: list[list[str]], *,
          batch_size: int = 16) -> list[dict[str, Any]]:
    """Per prompt: the summed log-likelihood of each choice after it (` ` + choice, as lm-evaluation-harness),
    `pred` (the most likely) and `pred_norm` (per character: lm-eval's acc_norm)."""
    from heft.evaluation.choices import score_choices

    if len(prompts) != len(choices):
        raise ValueError(f"score: {len(prompts)} prompts but {len(choices)} lists of choices; give one list per prompt")
    rows = [_encoded(model, p, list(c)) for p, c in zip(prompts, choices)]
    got = score_choices(model.top, rows, [[len(x) for x in c] for c in choices], batch_size=batch_size,
                        pad_id=tokenizer.pad_token_id, rt=model.session.rt)
    return [{"lls": g["lls"], "pred": g["pred"], "pred_norm": g["pred_norm"]} for g in got]


def generate(model: HeftModel, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 64,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations of `prompts` (ReFT edits on each row's own prompt positions)."""
    from heft.evaluation.generate import generate_texts

    rows = [_encoded(model, p, None) for p in prompts]
    return generate_texts(model.top, rows, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          rt=model.session.rt)


def train(config: str | Path | dict | Any, out: str | Path, *, overwrite: bool = False, resume: bool = False) -> Path:
    """Train a run (a config file, a plain dict, or a RunConfig) into `out`; returns the run folder."""
    from heft.config.schema import RunConfig
    from heft.config.load import from_dict, load as load_config
    from heft.run.pipeline import train_run

    cfg = config if isinstance(config, RunConfig) else from_dict(config) if isinstance(config, dict) else load_config(config)
    train_run(cfg, Path(out), overwrite=overwrite, resume=resume)
    return Path(out)
