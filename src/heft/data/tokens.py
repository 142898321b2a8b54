"""Prompts, tokens and batches: an `Example` becomes an `Encoded` row (prompt ids, the ids of each answer),
and rows become left-padded batches.

Batches are left-padded: the prompt and answer of every row end at the last position, so the
loss needs the logits of only the last `max_answer_len + 1` positions, and scoring needs only the
last one. Position ids are passed explicitly, so left padding changes nothing for absolute-position
models either. `prompt_start` / `prompt_len` tell ReFT where each row's prompt is.

A request made after training (`heft predict`, `heft.generate` / `heft.score`, the lm-eval bridge) gets the
prompt the run trained and evaluated on: `PromptFormat.row` turns it into the row the run would have read
(a chat run's user turn, with the system message its rows share), and the same `Encoder.encode` encodes it.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from heft.data.rows import Example
from heft.errors import DataError


def prompt_text(ex: Example, fmt: str, passage: str | None = None) -> str:
    p = ex.passage if passage is None else passage
    if fmt == "passage":
        return f"{p}\nQuestion: {ex.question}?\nAnswer:"
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\nPlease answer the following question with true or false, question: {ex.question}?\n\n"
            "Answer format: true/false\n\n### Response:\n")


def candidates(fmt: str) -> tuple[str, str]:
    """Answer texts for (False, True)."""
    return (" no", " yes") if fmt == "passage" else ("the correct answer is false", "the correct answer is true")


@dataclass(frozen=True)
class Encoded:
    prompt: list[int]
    answers: tuple[list[int], ...]  # token ids of each answer after the prompt: BoolQ (False, True); choices; a target
    label: int
    truncated: bool
    prompts: tuple[list[int], ...] = ()
    """Per-choice prompts (winogrande): choice j follows prompts[j]; `prompt` is the right one's."""
    content_start: int = 0
    """Prompt tokens before the user's content (reft.positions.first_from: content): ReFT's first group starts here."""

    def prompt_for(self, j: int) -> list[int]:
        return self.prompts[j] if self.prompts else self.prompt


class Encoder:
    """Tokenizes examples for one tokenizer, prompt format and length budget."""

    def __init__(self, tokenizer: Any, fmt: str, max_length: int, first_from: str = "prompt"):
        self.tok, self.fmt, self.max_length, self.first_from = tokenizer, fmt, max_length, first_from

    def content_start(self, prompt: list[int]) -> int:
        """Where ReFT's first group starts in a plain prompt: after the special tokens (BOS) in front with
        first_from: content, else at 0. (A chat prompt's start comes from its template: `chat_prompt`.)"""
        if self.first_from != "content":
            return 0
        special = set(self.tok.all_special_ids)
        n = 0
        while n < len(prompt) - 1 and prompt[n] in special:
            n += 1
        return n

    def chat_prompt(self, turns: Sequence[tuple[str, str]], where: str, continue_final: bool = False
                    ) -> tuple[str, list[int], int]:
        """A conversation as the model reads it before answering: the chat template's text with its generation
        prompt, its ids (the template's own tokens, trailing whitespace included), and how many of them come
        before the first non-system message's content (0 unless first_from: content). `continue_final`: the
        last turn is the start of the assistant's answer, left open (lm-eval's gen_prefix)."""
        if getattr(self.tok, "chat_template", None) is None:
            raise DataError(f"{where}: data.format: chat needs a tokenizer with a chat template; this model's has none "
                            "(use data.format: completion)")
        kw = {"add_generation_prompt": not continue_final, "continue_final_message": continue_final}
        text = self.tok.apply_chat_template(_dicts(turns), tokenize=False, **kw)
        ids = list(self.tok.apply_chat_template(_dicts(turns), tokenize=True, return_dict=False, **kw))
        return text, ids, self._turn_start(turns, text, ids, where) if self.first_from == "content" else 0

    def _turn_start(self, turns: Sequence[tuple[str, str]], text: str, ids: list[int], where: str) -> int:
        """How many of `ids` (the tokens of `text`) come before the first non-system message's content. Its place
        in the template is where two renderings of the conversation up to that message, with one-letter contents
        `a` and `b`, part; searching for its text instead would stop at an earlier occurrence (in the system
        message)."""
        fail = DataError(f"{where}: reft.positions.first_from: content cannot find the user's content in this chat "
                         "template's tokens; use first_from: prompt")
        k = next((i for i, (role, _) in enumerate(turns) if role != "system"), None)
        if k is None:
            raise fail
        probes = [self.tok.apply_chat_template(_dicts([*turns[:k], (turns[k][0], letter)]), tokenize=False)
                  for letter in "ab"]
        at = len(os.path.commonprefix(probes))
        content = turns[k][1]
        if at == len(probes[0]) or text[:at] != probes[0][:at] or not (
                text.startswith(content, at) or text.startswith(content.strip(), at)):  # templates may trim it
            raise fail
        try:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:  # a slow tokenizer has no offsets: count the tokens of the text in front
            front = list(self.tok(text[:at], add_special_tokens=False)["input_ids"])
            if ids[:len(front)] != front:
                raise fail from None
            return len(front)
        if list(enc["input_ids"]) != ids:
            raise fail
        return next((n for n, (_, end) in enumerate(enc["offset_mapping"]) if end > at), len(ids) - 1)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def _answer_ids(self, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
        full = self._ids(prompt + answer)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return full[len(prompt_ids):]
        return self.tok(answer, add_special_tokens=False)["input_ids"]

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's split of context + continuation into ids: trailing whitespace of the context
        moves to the continuation, the whole string is encoded, and the continuation is what follows the
        encoded context's length."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self._ids(context)
        whole = self._ids(context + continuation)
        return ctx, whole[len(ctx):]

    def _chat(self, ex: Example, where: str) -> tuple[list[tuple[list[int], list[int]]], int]:
        """A chat row's (prompt, answer) pairs and where its content starts. A training or evaluation row ends with
        the assistant's answer; a request (`PromptFormat.row`) ends before it, with `choices` to score as the
        answer, or nothing after the prompt (generation)."""
        answered = ex.messages[-1][0] == "assistant"
        history = ex.messages[:-1] if answered else ex.messages
        _, prompt, start = self.chat_prompt(history, where)
        if ex.choices:
            answers = [self._chat_answer((*history, ("assistant", c)), prompt, where) for c in ex.choices]
        else:
            answers = [self._chat_answer(ex.messages, prompt, where) if answered else []]
        return [(prompt, a) for a in answers], start

    def _chat_answer(self, turns: Sequence[tuple[str, str]], prompt: list[int], where: str) -> list[int]:
        """The ids of the last (assistant) turn: what the whole conversation's tokens add to the prompt's."""
        full = list(self.tok.apply_chat_template(_dicts(turns), tokenize=True, return_dict=False))
        if full[:len(prompt)] != prompt or len(full) == len(prompt):
            raise DataError(f"{where}: the chat template renders the conversation without its prompt as a prefix; "
                            "heft cannot tell the answer tokens apart (use data.format: completion)")
        return full[len(prompt):]

    def _encode_general(self, ex: Example, where: str, training: bool) -> Encoded:
        """A rendered row: prompt and continuation ids as lm-eval makes them; a prompt that does not fit keeps its
        last tokens (as lm-eval does), a continuation that does not fit raises DataError. A generated answer is not
        read when evaluating, so then only the prompt has to fit."""
        start = 0
        if ex.messages:
            pairs, start = self._chat(ex, where)
        elif ex.kind == "generate":
            prompt, answer = self._pair(ex.context or "", ex.delimiter + (ex.target or ""))
            eos = self.tok.eos_token_id
            pairs = [(prompt, answer + ([eos] if eos is not None else []))]  # trained to stop
        elif ex.contexts:
            pairs = [self._pair(c, ex.delimiter + a) for c, a in zip(ex.contexts, ex.choices)]
        else:
            pairs = [self._pair(ex.context or "", ex.delimiter + c) for c in ex.choices]
        longest = max(len(a) for _, a in pairs) if training or ex.kind != "generate" else 0
        if longest + 1 > self.max_length:
            raise DataError(f"{where}: an answer needs {longest} tokens, more than data.max_length={self.max_length} "
                            f"allows after at least one prompt token; raise data.max_length to at least {longest + 1}")
        budget = self.max_length - longest
        truncated = any(len(p) > budget for p, _ in pairs)
        if not ex.messages:
            start = self.content_start(pairs[0][0])
        skip = max(0, start - max(0, len(pairs[0][0]) - budget))  # the cut prompt's first tokens are gone
        prompts = [p[-budget:] for p, _ in pairs]
        answers = tuple(a for _, a in pairs)
        label = int(ex.label) if ex.kind == "choice" else 0
        if ex.contexts:
            return Encoded(prompts[label], answers, label, truncated, tuple(prompts), content_start=skip)
        return Encoded(prompts[0], answers, label, truncated, content_start=skip)

    def encode(self, ex: Example, split: str = "") -> Encoded:
        """Prompt and answer ids of one row; a passage that does not fit is cut, anything else raises DataError."""
        where = (ex.source or f"row idx {ex.idx}") + (f" ({split} split)" if split else "")
        if ex.kind != "yesno":
            return self._encode_general(ex, where, training=split == "train")
        prompt = prompt_text(ex, self.fmt)
        ids = self._ids(prompt)
        answers = tuple(self._answer_ids(prompt, ids, a) for a in candidates(self.fmt))
        longest = max(len(a) for a in answers)
        truncated = False
        if len(ids) + longest > self.max_length:
            if self.fmt != "passage":
                raise DataError(f"{where}: the question alone needs {len(ids) + longest} tokens, more than "
                                f"data.max_length={self.max_length}; raise data.max_length to at least "
                                f"{len(ids) + longest} or shorten that question")
            p_ids = self.tok(ex.passage, add_special_tokens=False)["input_ids"]
            fixed = len(ids) - len(p_ids)
            budget = self.max_length - longest - fixed
            while True:
                if budget <= 0:
                    need = max(fixed + longest + 1, self.max_length + 1)  # + 1: at least one passage token
                    raise DataError(f"{where}: question and answer need more than data.max_length="
                                    f"{self.max_length} tokens; raise data.max_length to at least {need}")
                prompt = prompt_text(ex, self.fmt, self.tok.decode(p_ids[:budget]))
                ids = self._ids(prompt)
                if len(ids) + longest <= self.max_length:
                    break
                budget -= len(ids) + longest - self.max_length  # re-tokenizing merged a few tokens differently
            answers = tuple(self._answer_ids(prompt, ids, a) for a in candidates(self.fmt))
            truncated = True
        return Encoded(ids, answers, int(ex.label), truncated, content_start=self.content_start(ids))


def encode_all(encoder: Encoder, rows: Sequence[Example], split_name: str) -> list[Encoded]:
    """Every row of one split encoded, before anything is written; the first row that cannot fit raises
    DataError naming its file and line (`Example.source`) and the split."""
    return [encoder.encode(ex, split_name) for ex in rows]


def _dicts(turns: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in turns]


# ----------------------------------------------------------------------------- requests after training

Request = str | Sequence[Mapping[str, str]]
"""A prompt as text, or a conversation: a list of {role, content} messages, ending before the assistant's answer."""


@dataclass(frozen=True)
class PromptFormat:
    """What a run's prompts are made of beyond its config: for `data.format: chat`, the system message its rows
    open with. Recorded in the run folder (meta.json `prompt`) so that a request after training gets the prompt
    the run trained and evaluated on."""

    format: str = "boolq"
    """`data.format`: `chat` renders every prompt with the tokenizer's chat template."""
    system: str | None = None
    """The system message every chat row of the run opens with; None: they open with none."""
    mixed_system: bool = False
    """The run's chat rows open with different system messages (or only some with one): a request gives its own."""

    @property
    def chat(self) -> bool:
        return self.format == "chat"

    @classmethod
    def of_rows(cls, fmt: str, rows: Sequence[Example]) -> PromptFormat:
        """The format of a run with data.format `fmt` that reads `rows` (training, dev and evaluation)."""
        if fmt != "chat":
            return cls(fmt)
        systems = {r.messages[0][1] if r.messages[0][0] == "system" else None for r in rows if r.messages}
        if len(systems) > 1:
            return cls(fmt, mixed_system=True)
        return cls(fmt, system=next(iter(systems), None))

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "system": self.system, "mixed_system": self.mixed_system}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PromptFormat:
        return cls(raw["format"], raw.get("system"), bool(raw.get("mixed_system", False)))

    def with_system(self, system: str) -> PromptFormat:
        """This format with the system message `system` (empty: none) for requests that give none."""
        return replace(self, system=system or None, mixed_system=False)

    def conversation(self, messages: Sequence[Mapping[str, str]], where: str) -> tuple[tuple[str, str], ...]:
        """`messages` checked, as (role, content) turns, opening with the run's system message if they give none."""
        if not self.chat:
            raise DataError(f"{where}: chat messages, but this run was trained on plain prompts (data.format: "
                            f"{self.format}); give the prompt as text")
        if isinstance(messages, (str, Mapping)) or not messages:
            raise DataError(f"{where}: messages must be a non-empty list of {{role, content}} turns, got {messages!r}")
        turns = []
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{k}] must be {{role: text, content: text}}, got {m!r}")
            turns.append((m["role"], m["content"]))
        if all(role == "system" for role, _ in turns):
            raise DataError(f"{where}: the messages hold no user turn; add the user's message")
        if turns[0][0] != "system":
            if self.mixed_system:
                raise DataError(f"{where}: this run's chat rows open with different system messages, so none is "
                                "implied; give one (a system turn first, or heft predict --system TEXT)")
            if self.system is not None:
                turns.insert(0, ("system", self.system))
        return tuple(turns)

    def row(self, request: Request, choices: Sequence[str] | None = None, where: str = "request") -> Example:
        """The row the run would read for `request`: a chat run's text is the user's turn of a conversation; other
        runs take the text as the whole prompt (scored choices follow it after a space, as lm-eval; generation
        continues it). `Encoder.encode` of this row is the run's own encoding."""
        common: dict[str, Any] = {"question": "", "passage": "", "label": 0, "idx": 0, "source": where,
                                  "task": "request"}
        if isinstance(request, str):
            if not request.strip():
                raise DataError(f"{where}: the prompt must be non-empty text, got {request!r}")
            if not self.chat:
                if choices is not None:
                    return Example(**common, context=request, choices=tuple(choices))
                return Example(**common, context=request, target="", gold="", delimiter="")
            request = [{"role": "user", "content": request}]
        turns = self.conversation(request, where)
        if turns[-1][0] == "assistant":
            raise DataError(f"{where}: the last message is the assistant's; end the messages with the turn it answers "
                            "(heft adds the template's generation prompt)")
        return Example(**common, messages=turns, choices=tuple(choices or ()), delimiter="")


def encode_request(encoder: Encoder, fmt: PromptFormat, request: Request, choices: Sequence[str] | None = None,
                   where: str = "request") -> Encoded:
    """The exact encoded prompt (template, system message, content start) a run with `fmt` trained and evaluated
    on, for one request: text or chat messages, with `choices` to score after it or none (generation)."""
    return encoder.encode(fmt.row(request, choices, where))


# ----------------------------------------------------------------------------- batches


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def train_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompt+answer rows; `targets` (B, K-1) hold the answer ids for the last K logits."""
    seqs = [e.prompt_for(e.label) + e.answers[e.label] for e in items]
    ids, mask = _left_pad(seqs, pad_id)
    ans_len = torch.tensor([len(e.answers[e.label]) for e in items])
    keep = int(ans_len.max()) + 1
    width = ids.shape[1]
    # Target for kept logit k (position width-keep+k) is the token at width-keep+k+1, if it is an answer token.
    pos = torch.arange(width - keep + 1, width)  # (K-1,) positions of predicted tokens
    is_answer = pos[None, :] >= (width - ans_len)[:, None]
    targets = torch.where(is_answer, ids[:, width - keep + 1:], torch.full_like(ids[:, :keep - 1], -100))
    plen = torch.tensor([len(e.prompt_for(e.label)) for e in items])
    skip = torch.tensor([e.content_start for e in items])  # ReFT's positions start at the user's content
    return {
        "input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
        "prompt_start": width - ans_len - plen + skip, "prompt_len": plen - skip, "targets": targets,
        "logits_to_keep": torch.tensor(keep),
    }


def prompt_batch(prompts: list[list[int]], pad_id: int, content_start: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Left-padded prompts for scoring or generation: every prompt ends at the last position; ReFT's positions
    start `content_start` tokens into each prompt."""
    ids, mask = _left_pad(prompts, pad_id)
    plen = torch.tensor([len(p) for p in prompts])
    skip = torch.tensor(content_start if content_start is not None else [0] * len(prompts))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
            "prompt_start": ids.shape[1] - plen + skip, "prompt_len": plen - skip}


class BucketBatches:
    """Shuffled batches of similar-length rows; the order is a pure function of (seed, epoch).

    Rows are shuffled, cut into pools of `pool` batches, each pool sorted by length and cut into
    batches, then the batches are shuffled. With `bucketing=False` batches are plain shuffled slices.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, bucketing: bool = True, pool: int = 50):
        self.lengths, self.batch_size, self.seed, self.bucketing, self.pool = list(lengths), batch_size, seed, bucketing, pool

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if not self.bucketing:
            return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        span = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), span):
            chunk = sorted(order[start:start + span], key=lambda i: self.lengths[i])
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def iterate(self, total_batches: int, start_epoch: int = 0) -> Iterator[tuple[int, list[int]]]:
        """(epoch, batch indices) for `total_batches` batches, epoch after epoch."""
        done, epoch = 0, start_epoch
        while done < total_batches:
            for b in self.epoch(epoch):
                if done == total_batches:
                    return
                yield epoch, b
                done += 1
            epoch += 1
