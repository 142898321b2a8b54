"""lm-evaluation-harness bridge: a heft run folder as an lm-eval model, registered as `heft`.

    heft lm-eval runs/x --tasks boolq,arc_easy --limit 100                  # heft's command
    python -m heft.lm_eval_bridge --model heft --model_args run=runs/x --tasks boolq   # lm-eval's own CLI
    import heft.lm_eval_bridge; lm_eval.simple_evaluate(model="heft", model_args="run=runs/x", tasks=["boolq"])

lm-eval 0.4.x finds models only in its registry (no plugin entry points), so `--model heft` exists once
this module is imported: `heft lm-eval` and `python -m heft.lm_eval_bridge` (lm-eval's CLI, verbatim
arguments) import it for you. `import heft` never imports lm_eval; this module needs the `lm-eval` extra.

Why not lm-eval's `hf` model around heft's module: ReFT edits "the first f and last l prompt tokens",
so a model call must know where each request's context ends. lm-eval's `hf` model right-pads
context+continuation without that length, and its logits cache shares one forward pass between
requests whose context+continuation tokens are equal wherever the context ends; a position-dependent
model would get silently wrong scores. Here every request is one heft row:

- `loglikelihood(context, continuation)`: tokenized as lm-eval tokenizes it (trailing whitespace of the
  context moves to the continuation, the whole string is encoded and split at the encoded context's
  length; an empty context is the prefix token, BOS else EOS), then scored by `heft.evaluation.choices.score_choices`,
  which puts ReFT's edits on the context tokens only (first f from `reft.positions.first_from`, last l
  of the context) and never on the continuation. Two requests are merged only when context *and*
  continuation ids are equal. A request longer than `max_length` keeps its last tokens (lm-eval's `hf`
  model keeps one more context token: it does not feed the last continuation token).
- `generate_until`: greedy, through heft's generation (edits on each prompt only), cut at the `until`
  strings. Sampling and beam search are answered for base and LoRA-only runs and refused for ReFT runs.
- `loglikelihood_rolling`: lm-eval's token windows over the document; base and LoRA-only runs only, since
  a whole document has no prompt for ReFT's positions.

A chat run (`data.format: chat`) is evaluated on the prompts it trained on: `heft lm-eval` turns on lm-eval's
`apply_chat_template`, and `apply_chat_template` renders each conversation as heft's own evaluation does
(`heft.data.tokens`: the system message the run's rows share when lm-eval gives none, ReFT's first group from the
first non-system message's content). A context rendered there keeps the template's own ids, trailing whitespace
included: it is not split as lm-eval splits plain text.

One process: the requests are not split between processes.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  lm-eval's own models (hf, ...): its get_model adds them only to an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import model_registry, register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from heft.evaluation.choices import log_norm, score_choices
from heft.errors import ConfigError, DataError
from heft.training.runtime import model_forward
from heft.data.tokens import Encoded, prompt_batch

logger = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for generate_until
_UNSET_TOKENIZER_LENGTH = 10 ** 12  # tokenizers without a length report a huge sentinel


def model_max_length(config: Any, tokenizer: Any, default: int = 2048) -> int:
    """The context length lm-eval's `hf` model uses: the (text) config's n_positions / max_position_embeddings /
    n_ctx, else the tokenizer's model_max_length if it has one, else `default`."""
    cfg = getattr(config, "text_config", None) or config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    length = getattr(tokenizer, "model_max_length", None)
    return int(length) if length is not None and length < _UNSET_TOKENIZER_LENGTH else default


def _where(request: Any) -> str:
    return f"task {getattr(request, 'task_name', None) or '?'} (doc {getattr(request, 'doc_id', None)})"


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"model_args {name}={value!r}: give a positive whole number (heft has no `auto` size)")
    return int(value)


class HeftLM(LM):
    """A finished heft run folder (or hf://USER/REPO) answering lm-eval's requests; see the module docstring.

    model_args: run=DIR (required), batch_size=N (default 16), max_length=N (default: the model's context
    length, as lm-eval's `hf`), allow_other_base=true (as `heft eval --allow-other-base`)."""

    def __init__(self, run: str | Path | None = None, batch_size: int | str = 16, max_length: int | None = None,
                 allow_other_base: bool = False, device: str | None = None, max_batch_size: int | None = None,
                 **unknown: Any):
        super().__init__()
        if unknown:
            raise ConfigError(f"model_args: unknown option(s) {', '.join(sorted(unknown))}; heft takes run=DIR, "
                              "batch_size=N, max_length=N and allow_other_base=true")
        if not run:
            raise ConfigError("model_args: give the run folder, e.g. --model_args run=runs/heft-default/heft")
        from heft.api import load

        self.batch_size = _positive_int(batch_size, "batch_size")
        self.model, self.tokenizer = load(run, allow_other_base=bool(allow_other_base))
        self.session = self.model.session
        self.rt = self.session.rt
        if self.rt.num_processes > 1:
            raise ConfigError("heft's lm-eval model runs in one process; start it without torchrun / accelerate launch")
        if device is not None and str(device) != str(self.rt.device):
            logger.info("device=%s ignored: heft runs on %s", device, self.rt.device)
        self.max_length = (_positive_int(max_length, "max_length") if max_length is not None
                           else model_max_length(self.session.model.config, self.tokenizer))
        self.encoder = self.session.encoder()
        self.prompt = self.model.prompt
        self._chats: dict[str, tuple[list[int], int]] = {}  # text apply_chat_template returned -> (ids, content start)
        self._told_plain = False
        self._device = self.rt.device

    # ------------------------------------------------------------------ tokens

    @property
    def is_reft(self) -> bool:
        return self.session.reft is not None

    @property
    def prefix_token_id(self) -> int:
        """What an empty context becomes (lm-eval's `hf`): BOS, else EOS."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def _fit(self, prompt: list[int], budget: int, start: int | None = None) -> tuple[list[int], int]:
        """The last `budget` prompt tokens and where ReFT's first group starts in them (`start` in the whole prompt;
        None: after the special tokens in front, with first_from: content)."""
        skip = self.encoder.content_start(prompt) if start is None else start
        cut = max(0, len(prompt) - budget)
        return prompt[cut:], max(0, skip - cut)

    def _context(self, context: str, where: str) -> tuple[list[int], int] | None:
        """A chat context's ids and content start, if `apply_chat_template` rendered it; None for plain text (a chat
        run says once that it was trained on its template)."""
        if context in self._chats:
            return self._chats[context]
        if self.prompt.chat and context and not self._told_plain:
            self._told_plain = True
            logger.warning("%s: this run was trained on chat prompts (data.format: chat), but lm-eval sent a context "
                           "without its chat template; pass --apply_chat_template (heft lm-eval does) to evaluate it "
                           "on the prompts it trained on", where)
        return None

    def encode_request(self, context: str, continuation: str, where: str = "request") -> Encoded:
        """One loglikelihood request as a heft row: the context is the prompt, the continuation its one answer."""
        chat = self._context(context, where)
        start = None
        if chat is not None:  # the template's ids as they are; the continuation is what its text adds to them
            ctx, start = chat
            whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):] if whole[:len(ctx)] == ctx else \
                self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        elif context == "":
            cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            prefix = self.prefix_token_id
            ctx, cont = (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
        else:
            ctx, cont = self.encoder._pair(context, continuation)
        if not cont:
            raise DataError(f"{where}: the continuation {continuation!r} has no tokens of its own; lm-eval scores "
                            "a continuation of at least one token")
        if len(cont) + 1 > self.max_length:
            raise DataError(f"{where}: the continuation needs {len(cont)} tokens, more than max_length={self.max_length} "
                            f"allows after one context token; pass --model_args max_length={len(cont) + 1} or more")
        prompt, skip = self._fit(ctx, self.max_length - len(cont), start)
        return Encoded(prompt, (cont,), 0, len(prompt) < len(ctx), content_start=skip)

    # ------------------------------------------------------------------ lm-eval's three requests

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood of the continuation, whether it is the greedy continuation), per request in order."""
        rows: list[Encoded] = []
        slot: dict[tuple, int] = {}  # the exact split: context ids, continuation ids, where the edits start
        which = []
        for r in requests:
            context, continuation = r.args
            e = self.encode_request(context, continuation, _where(r))
            key = (tuple(e.prompt), tuple(e.answers[0]), e.content_start)
            if key not in slot:
                slot[key] = len(rows)
                rows.append(e)
            which.append(slot[key])
        got = score_choices(self.session.top, rows, None, batch_size=self.batch_size, pad_id=self.tokenizer.pad_token_id,
                            rt=self.rt, desc="lm-eval loglikelihood") if rows else []
        out = []
        for r, k in zip(requests, which):
            res = (float(got[k]["lls"][0]), bool(got[k]["greedy"][0]))
            self.cache_hook.add_partial("loglikelihood", r.args, res)
            out.append(res)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole document, in lm-eval's windows of max_length tokens (base and LoRA-only)."""
        if self.is_reft and requests:
            raise ConfigError(f"{_where(requests[0])}: loglikelihood_rolling: rolling perplexity over a whole document "
                              "has no prompt for ReFT's positions, so a ReFT run cannot answer it; evaluate this task "
                              "with a base or LoRA-only run, or leave it out")
        windows: list[tuple[int, list[int], list[int]]] = []  # (request, context ids, predicted ids)
        for i, r in enumerate(requests):
            (text,) = r.args
            ids = self.tokenizer(text)["input_ids"]
            for w in get_rolling_token_windows(token_list=ids, prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                ctx, pred = make_disjoint_window(w)
                windows.append((i, ctx, pred))
        lls = self._score_windows([(c, p) for _, c, p in windows])
        total = [0.0] * len(requests)
        for (i, _, _), ll in zip(windows, lls):
            total[i] += ll
        for r, t in zip(requests, total):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return total

    @torch.no_grad()
    def _score_windows(self, windows: list[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log-likelihood of each window's predicted ids: the model reads (context + predicted)[:-1], as
        lm-eval's `hf` model, so a window of max_length predictions needs max_length positions."""
        model = self.session.top
        model.eval()
        out = [0.0] * len(windows)
        order = sorted(range(len(windows)), key=lambda k: -(len(windows[k][0]) + len(windows[k][1])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            seqs = [(windows[k][0] + windows[k][1])[:-1] for k in idx]
            batch = {k: v.to(self.rt.device) for k, v in prompt_batch(seqs, self.tokenizer.pad_token_id).items()}
            keep = max(len(windows[k][1]) for k in idx)
            with self.rt.autocast():
                logits = model_forward(model, batch, keep).float()  # (B, keep, V)
            for b, k in enumerate(idx):  # row by row: no second (B, keep, V) tensor of log-probabilities
                pred = windows[k][1]
                tgt = torch.tensor(pred, device=logits.device)
                rows = logits[b, keep - len(pred):]  # (len(pred), V)
                out[k] = float((rows.gather(1, tgt[:, None])[:, 0] - log_norm(rows)[0]).sum())
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut at the first of its `until` strings; greedy for ReFT runs."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        settings = []
        for i, r in enumerate(requests):
            context, gen = r.args
            s = _generation_settings(dict(gen or {}), _where(r))
            if s["sampling"] and self.is_reft:
                raise ConfigError(f"{_where(r)}: generate_until asks for {s['sampling']}; heft decodes ReFT runs "
                                  "greedily only (the edits sit on each prompt's positions, which sampling and beam "
                                  "search do not keep); set do_sample: false, temperature: 0 and num_beams: 1 in the "
                                  "task's generation_kwargs (or --gen_kwargs), or evaluate a base or LoRA-only run")
            settings.append(s)
            groups[(s["max_gen_toks"], s["sampling"], repr(sorted(s["extra"].items())))].append(i)
        texts: list[str] = [""] * len(requests)
        eos = self.tokenizer.eos_token
        for (max_gen, sampling, _), idx in groups.items():
            if max_gen >= self.max_length:
                raise ConfigError(f"{_where(requests[idx[0]])}: max_gen_toks={max_gen} leaves no room for the prompt "
                                  f"in max_length={self.max_length}; lower max_gen_toks or raise model_args max_length")
            rows = []
            for i in idx:
                context = requests[i].args[0]
                ids, start = self._context(context, _where(requests[i])) or (self.tokenizer(context)["input_ids"], None)
                prompt, skip = self._fit(ids, self.max_length - max_gen, start)
                rows.append(Encoded(prompt, (), 0, len(prompt) < len(ids), content_start=skip))
            stops = sorted({s for i in idx for s in settings[i]["until"]})
            if sampling:
                got = self._sample(rows, max_gen, settings[idx[0]]["extra"])
            else:
                from heft.evaluation.generate import generate_texts

                got = generate_texts(self.session.top, rows, self.tokenizer, batch_size=self.batch_size,
                                     max_new_tokens=max_gen, rt=self.rt, stop=tuple(stops), desc="lm-eval generate")
            for i, text in zip(idx, got):
                until = settings[i]["until"] + ([eos] if eos and eos not in settings[i]["until"] else [])
                texts[i] = _cut(text, until)
                self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
        return texts

    @torch.no_grad()
    def _sample(self, rows: list[Encoded], max_new_tokens: int, extra: dict[str, Any]) -> list[str]:
        """Sampling or beam search with Hugging Face's generate (base and LoRA-only runs)."""
        model = self.session.top
        out = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            batch = prompt_batch([r.prompt for r in chunk], self.tokenizer.pad_token_id)
            ids, mask = batch["input_ids"].to(self.rt.device), batch["attention_mask"].to(self.rt.device)
            with self.rt.autocast():
                seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **extra)
            out += [self.tokenizer.decode(s[ids.shape[1]:], skip_special_tokens=True) for s in seqs]
        return out

    # ------------------------------------------------------------------ chat templates (--apply_chat_template)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "heft")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered as text by the tokenizer's template. For a chat run it is the run's own prompt
        (see the module docstring), remembered with its ids; without `add_generation_prompt` the last (assistant)
        turn is left open, as lm-eval's `hf` model does."""
        if not self.prompt.chat:
            return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        where = "lm-eval chat prompt"
        text, ids, start = self.encoder.chat_prompt(self.prompt.conversation(chat_history, where), where,
                                                    continue_final=not add_generation_prompt)
        self._chats[text] = (ids, start)
        return text


def _generation_settings(gen: dict[str, Any], where: str) -> dict[str, Any]:
    """lm-eval's generation_kwargs read as lm-eval reads them: `until` (str or list), max_gen_toks (or
    max_new_tokens), and whether they ask for sampling (do_sample, or a temperature > 0 without do_sample) or
    beam search (num_beams > 1); what else they hold goes to Hugging Face's generate when sampling."""
    until = gen.pop("until", None)
    until = [] if until is None else [until] if isinstance(until, str) else list(until)
    if not all(isinstance(u, str) for u in until):
        raise ConfigError(f"{where}: generation_kwargs until={until!r}; give a string or a list of strings")
    max_gen = next((gen.pop(k) for k in ("max_gen_toks", "max_new_tokens", "max_tokens") if gen.get(k) is not None),
                   DEFAULT_MAX_GEN_TOKS)
    for k in ("max_gen_toks", "max_new_tokens", "max_tokens"):
        gen.pop(k, None)
    temperature = float(gen.get("temperature", 0.0) or 0.0)
    do_sample = gen.get("do_sample")
    samples = bool(do_sample) if do_sample is not None else temperature > 0
    beams = int(gen.get("num_beams", 1) or 1)
    what = " and ".join(x for x, on in (("sampling (do_sample / temperature > 0)", samples),
                                         (f"beam search (num_beams={beams})", beams > 1)) if on)
    extra = {k: v for k, v in gen.items() if k not in ("do_sample", "temperature")}
    if samples:
        extra.update(do_sample=True, temperature=temperature if temperature > 0 else 1.0)
    else:
        extra["do_sample"] = False
    return {"until": until, "max_gen_toks": _positive_int(max_gen, "max_gen_toks"), "sampling": what, "extra": extra}


def _cut(text: str, until: list[str]) -> str:
    """The text before the first stop string (lm-eval: each non-empty stop in turn)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def task_manager(tasks: list[str], include_path: str | Path | None = None) -> Any:
    """lm-eval's TaskManager for `tasks`, every name checked. Tasks found in `include_path` are read from there
    alone; lm-eval's index of its ~15k built-in task files (several seconds) is built only when one is not there."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"--include-path {include_path}: not a folder; give the folder that holds your task YAMLs")
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = TaskManager(include_path=str(include_path))
    else:
        manager = TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]
    if unknown:
        raise ConfigError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists the "
                          "built-in ones, --include-path DIR adds your own YAMLs")
    return manager


def evaluate(lm: HeftLM, tasks: list[str], *, limit: float | None = None, include_path: str | Path | None = None,
             num_fewshot: int | None = None, manager: Any = None, apply_chat_template: bool | None = None
             ) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` of `tasks` with a heft model; per-sample records are kept in `samples`. Prompts go
    through the chat template when `apply_chat_template` says so; None: when the run is a chat run."""
    import lm_eval

    manager = manager if manager is not None else task_manager(tasks, include_path)
    chat = lm.prompt.chat if apply_chat_template is None else apply_chat_template
    if chat and apply_chat_template is None:
        logger.info("a chat run: lm-eval's prompts go through its chat template, as it trained")
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                      task_manager=manager, log_samples=True, apply_chat_template=chat)
    assert results is not None  # one process: rank 0
    return results


def _register() -> None:
    """`--model heft` in lm-eval's registry (once: importing this module again keeps the first class)."""
    if "heft" not in model_registry:
        register_model("heft")(HeftLM)


_register()


def main(argv: list[str] | None = None) -> None:
    """lm-eval's own command line with `--model heft` registered: `python -m heft.lm_eval_bridge --model heft ...`."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
