"""The Python API: a trained run folder as a model you can call, and four helpers.

    model, tokenizer = heft.load("runs/x")          # base model + LoRA (merged or attached) + ReFT hooks
    out = model.generate(**tokenizer(["Question: ...\\nAnswer:"], return_tensors="pt"), max_new_tokens=8)
    heft.score(model, tokenizer, ["Question: ...\\nAnswer:"], [["yes", "no"]])   # log-likelihood per choice
    heft.generate(model, tokenizer, ["Question: ...\\nAnswer:"], max_new_tokens=32)
    heft.generate(model, tokenizer, messages=[[{"role": "user", "content": "..."}]])   # a chat run
    heft.train("my.yaml", "runs/y")                  # the run folder

`heft.score` and `heft.generate` give each request the prompt the run trained and evaluated on
(`heft.data.tokens.encode_request`): a chat run (`data.format: chat`) renders a text prompt as the user's
turn, and `messages=` as they are, through the tokenizer's chat template, with the system message the run's
rows share when the messages give none; ReFT's first positions start where the run's did.

ReFT edits "the first f and last l prompt tokens" of each row. A `HeftModel` takes the prompt of a
plain call from its attention mask: every attended token of the input is prompt, with left or right
padding, and the first group starts at its first token. In `generate`, only the prompt pass is edited,
as in training and evaluation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from heft.data.tokens import Encoded, PromptFormat, Request, encode_request

logger = logging.getLogger(__name__)

__all__ = ["HeftModel", "load", "score", "generate", "train"]


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_start, prompt_len) per row: the attended tokens are the prompt (left or right padded)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = attention_mask.to(torch.long)
    return mask.argmax(1), mask.sum(1)  # argmax: the first attended position


class HeftModel(nn.Module):
    """A finished run's model: call it like the Hugging Face model it wraps (`forward`, `generate`)."""

    def __init__(self, session: Any, prompt: PromptFormat | None = None):
        super().__init__()
        self.top = session.top  # the ReFT wrapper if the run trained ReFT, else the (maybe PEFT) model
        self.reft = session.reft
        self.config = session.model.config
        self.session = session
        # how the run builds prompts: heft.score, heft.generate, heft predict and the lm-eval bridge encode with it
        self.prompt = prompt if prompt is not None else PromptFormat(session.cfg.data.format)

    def encode(self, request: Request, choices: Sequence[str] | None = None, where: str = "request") -> Encoded:
        """The ids the run's own evaluation would give `request` (text, or chat messages), with `choices`."""
        return encode_request(self.session.encoder(), self.prompt, request, choices, where)

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
    """(model, tokenizer) of a finished run folder or of a folder `heft export` wrote, ready for `forward`/`generate`,
    in eval mode."""
    from heft.hub import resolve
    from heft.run.folder import RunFolder
    from heft.run.pipeline import load_run
    from heft.serve.export import ExportFolder, load_export

    path = resolve(run)
    if ExportFolder(path).is_export():
        s, cfg = load_export(path, allow_other_base=allow_other_base)
        meta = ExportFolder(path).read_meta()
    else:
        s, cfg = load_run(path, allow_other_base=allow_other_base)
        meta = RunFolder(path).read_meta()
    model = HeftModel(s, run_prompt(meta, cfg.data.format, path))
    model.eval()
    return model, s.tokenizer


def run_prompt(meta: dict[str, Any], data_format: str, path: Path) -> PromptFormat:
    """The prompt format meta.json records; a folder written before heft recorded it has its config's format,
    and for a chat run no system message (with a warning: its rows may have had one)."""
    if "prompt" in meta:
        return PromptFormat.from_json(meta["prompt"])
    if data_format == "chat":
        logger.warning("%s: written before heft recorded the system message of its chat rows; requests get none "
                       "unless they give one (heft predict --system TEXT, or a system turn in messages=)", path)
    return PromptFormat(data_format)


def _requests(prompts: Sequence[str] | None, messages: Sequence[Sequence[dict]] | None, what: str
              ) -> list[tuple[Request, str]]:
    """Each request with its name for messages: `prompts` (text) or `messages` (conversations), exactly one."""
    if (prompts is None) == (messages is None):
        raise ValueError(f"{what}: give prompts (texts) or messages= (one list of {{role, content}} per "
                         "conversation), exactly one of them")
    if isinstance(prompts, str) or isinstance(messages, (str, dict)):
        raise ValueError(f"{what}: give a list of requests (prompts=[text], messages=[[{{role, content}}, ...]])")
    if prompts is not None:
        return [(p, f"{what}: prompts[{i}]") for i, p in enumerate(prompts)]
    return [(m, f"{what}: messages[{i}]") for i, m in enumerate(messages)]


def score(model: HeftModel, tokenizer: Any, prompts: Sequence[str] | None = None,
          choices: Sequence[Sequence[str]] | None = None, *, messages: Sequence[Sequence[dict]] | None = None,
          batch_size: int = 16) -> list[dict[str, Any]]:
    """Per request: the summed log-likelihood of each choice after it, `pred` (the most likely) and `pred_norm` (per
    character: lm-eval's acc_norm). A plain run scores ` ` + choice after the text (as lm-evaluation-harness); a
    chat run scores each choice as the assistant's whole turn, as it trained on its answers."""
    from heft.evaluation.choices import score_choices

    requests = _requests(prompts, messages, "heft.score")
    if choices is None or len(requests) != len(choices):
        raise ValueError(f"heft.score: {len(requests)} requests but {'no' if choices is None else len(choices)} lists "
                         "of choices; give one list per request")
    for (_, where), c in zip(requests, choices):
        if isinstance(c, str) or not c or not all(isinstance(x, str) for x in c):
            raise ValueError(f"{where}: choices must be a non-empty list of texts, got {c!r}")
    rows = [model.encode(r, list(c), where) for (r, where), c in zip(requests, choices)]
    got = score_choices(model.top, rows, [[len(x) for x in c] for c in choices], batch_size=batch_size,
                        pad_id=tokenizer.pad_token_id, rt=model.session.rt)
    return [{"lls": g["lls"], "pred": g["pred"], "pred_norm": g["pred_norm"]} for g in got]


def generate(model: HeftModel, tokenizer: Any, prompts: Sequence[str] | None = None, *,
             messages: Sequence[Sequence[dict]] | None = None, max_new_tokens: int = 64,
             batch_size: int = 16) -> list[str]:
    """Greedy continuations of each request, as the run's own evaluation decodes them (ReFT edits on each row's
    own prompt positions): text, or with `messages=` chat conversations."""
    from heft.evaluation.generate import generate_texts

    rows = [model.encode(r, None, where) for r, where in _requests(prompts, messages, "heft.generate")]
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
