"""BoolQ data: reading and checking rows, the dev split, prompt formats, tokenization and batching.

BoolQ (Clark et al., 2019; CC BY-SA 3.0): yes/no questions about a Wikipedia passage.

Rows come as Google format (`question`, `passage`, `answer`: bool) or SuperGLUE format
(`question`, `passage`, `label`: bool or 0/1, `idx`); booleans may also be the strings true/false/yes/no
in any case, as spreadsheets write them. Text files are UTF-8 (a leading BOM is accepted). Every row is
checked where it enters and remembers where it came from (`Example.source`); a bad row stops the run
with its file, line and field. The dev split is carved from train with a fixed
permutation (independent of the run seed, so every seed and strategy sees the same dev rows).

Batches are left-padded: the prompt and answer of every row end at the last position, so the
loss needs the logits of only the last `max_answer_len + 1` positions, and scoring needs only the
last one. Position ids are passed explicitly, so left padding changes nothing for absolute-position
models either.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .config import DataConfig
from .errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEV_SPLIT_SEED = 20250912  # fixed: the dev split must not move with the training seed


@dataclass(frozen=True)
class Example:
    question: str
    passage: str
    label: bool
    idx: int
    # where the row came from, for messages: "train.jsonl:5", "x.parquet:row 3", "command line";
    # not part of equality, so the same row read from two files compares equal
    source: str = field(default="", compare=False)


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    dev: list[Example]
    eval: list[Example]


# ----------------------------------------------------------------------------- reading rows


_TRUE, _FALSE = ("true", "yes"), ("false", "no")


def _label(row: dict[str, Any], where: str) -> bool:
    if "answer" in row:
        value, name = row["answer"], "answer"
    elif "label" in row:
        value, name = row["label"], "label"
    else:
        raise DataError(f"{where}: missing field `answer` (Google format) or `label` (SuperGLUE format)")
    if isinstance(value, bool):
        return value
    if name == "label" and isinstance(value, int) and value in (0, 1):
        return bool(value)  # SuperGLUE ClassLabel: 0 = False, 1 = True
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    accepted = "true/false/yes/no, any case" + (", or 0/1" if name == "label" else "")
    raise DataError(f"{where}: field `{name}` must be a boolean ({accepted}), got {value!r}")


def parse_row(row: Any, where: str, need_passage: bool = True, index: int = 0) -> Example:
    """One checked Example from a raw row; `where` (`file:line`) goes into error messages and `Example.source`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in ("question", "passage") if need_passage else ("question",):
        value = row.get(name)
        if value is None:
            raise DataError(f"{where}: missing field `{name}`")
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: field `{name}` must be non-empty text, got {value!r}")
    passage = row.get("passage") or ""
    idx = row.get("idx", index)
    return Example(row["question"].strip(), passage.strip(), _label(row, where),
                   int(idx) if isinstance(idx, int) else index, source=where)


def _utf8(raw: bytes, p: Path, line: int | None = None) -> str:
    """`raw` (a whole file, or its `line`) decoded as UTF-8; bad bytes raise DataError naming the file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is None:  # a whole file: the line of the bad byte and its offset in the file
            line, pos = raw.count(b"\n", 0, e.start) + 1, f"at byte offset {e.start} of the file"
        else:
            pos = f"at byte {e.start + 1} of the line"
        raise DataError(f"{p}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} {pos}); save the file as UTF-8 "
                        "(spreadsheets: 'CSV UTF-8' or 'Unicode (UTF-8)' when saving)") from None


def read_rows(path: str | Path, need_passage: bool = True) -> list[Example]:
    """All rows of a jsonl/json/parquet file, checked; the first bad row raises DataError."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    rows: list[tuple[str, Any]] = []
    if p.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{p}: reading parquet needs pyarrow (`pip install pyarrow`)") from None
        import pyarrow as pa

        try:
            table = pq.read_table(p)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{p}: not a readable parquet file ({e})") from None
        rows = [(f"{p}:row {i}", r) for i, r in enumerate(table.to_pylist())]
    elif p.suffix == ".json":
        try:
            data = json.loads(_utf8(p.read_bytes(), p).removeprefix("\ufeff"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: not valid JSON ({e}); for one object per line name the file .jsonl") from None
        if isinstance(data, dict) and "data" in data:
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of rows (or {{\"data\": [...]}})")
        rows = [(f"{p}:item {i}", r) for i, r in enumerate(data)]
    else:
        # bytes.splitlines breaks at \n, \r\n and \r, as text mode does, so line numbers match an editor's
        for n, raw in enumerate(p.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
            line = _utf8(raw, p, n)
            if not line.strip():
                continue
            try:
                rows.append((f"{p}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{n}: malformed JSON line ({e.msg} at column {e.colno})") from None
    out = [parse_row(r, where, need_passage, i) for i, (where, r) in enumerate(rows)]
    if not out:
        raise DataError(f"{p}: the file holds no rows")
    return out


def _hub_split(split: str) -> list[Example]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source: `hub` needs the datasets package (`pip install heft[hub]`)") from None
    ds = datasets.load_dataset("google/boolq", split=split)
    return [parse_row(r, f"google/boolq[{split}] row {i}", True, i) for i, r in enumerate(ds)]


def load_splits(cfg: DataConfig, with_train: bool = True) -> Splits:
    """Train (minus dev, optionally subsampled), dev, and the evaluation rows, as the config says."""
    need_passage = cfg.prompt_format == "passage"
    if cfg.source == "boolq":
        from .assets import boolq_dir

        folder = boolq_dir()
        train = read_rows(folder / "train.jsonl") if (with_train or cfg.eval_split == "dev") else []
        valid = read_rows(folder / "validation.jsonl")
    elif cfg.source == "hub":
        train = _hub_split("train") if (with_train or cfg.eval_split == "dev") else []
        valid = _hub_split("validation")
    else:
        train = read_rows(cfg.train_path, need_passage) if cfg.train_path and (with_train or cfg.eval_split == "dev") else []
        valid = read_rows(cfg.eval_path, need_passage)
    order = list(range(len(train)))
    random.Random(DEV_SPLIT_SEED).shuffle(order)
    if train and cfg.dev_size >= len(train):
        raise ConfigError(f"data.dev_size: {cfg.dev_size} leaves no training rows out of {len(train)}; lower it")
    dev = [train[i] for i in order[: cfg.dev_size]]
    rest = [train[i] for i in order[cfg.dev_size:]]
    if cfg.train_size is not None:
        rest = rest[: cfg.train_size]
    evaluation = dev if cfg.eval_split == "dev" else valid
    if cfg.eval_size is not None:
        evaluation = evaluation[: cfg.eval_size]
    return Splits(rest, dev, evaluation)


def majority_label(rows: Sequence[Example]) -> bool:
    """The more frequent label (ties: True), the constant predictor of the majority baseline."""
    yes = sum(r.label for r in rows)
    return yes * 2 >= len(rows)


# ----------------------------------------------------------------------------- prompts and tokens


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
    answers: tuple[list[int], list[int]]  # token ids of the (False, True) answers after the prompt
    label: int
    truncated: bool


class Encoder:
    """Tokenizes examples for one tokenizer, prompt format and length budget."""

    def __init__(self, tokenizer: Any, fmt: str, max_length: int):
        self.tok, self.fmt, self.max_length = tokenizer, fmt, max_length

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=True)["input_ids"]

    def _answer_ids(self, prompt: str, prompt_ids: list[int], answer: str) -> list[int]:
        full = self._ids(prompt + answer)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            return full[len(prompt_ids):]
        return self.tok(answer, add_special_tokens=False)["input_ids"]

    def encode(self, ex: Example, split: str = "") -> Encoded:
        """Prompt and answer ids of one row; a passage that does not fit is cut, anything else raises DataError."""
        where = (ex.source or f"row idx {ex.idx}") + (f" ({split} split)" if split else "")
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
        return Encoded(ids, answers, int(ex.label), truncated)


def encode_all(encoder: Encoder, rows: Sequence[Example], split_name: str) -> list[Encoded]:
    """Every row of one split encoded, before anything is written; the first row that cannot fit raises
    DataError naming its file and line (`Example.source`) and the split."""
    return [encoder.encode(ex, split_name) for ex in rows]


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
    seqs = [e.prompt + e.answers[e.label] for e in items]
    ids, mask = _left_pad(seqs, pad_id)
    ans_len = torch.tensor([len(e.answers[e.label]) for e in items])
    keep = int(ans_len.max()) + 1
    width = ids.shape[1]
    # Target for kept logit k (position width-keep+k) is the token at width-keep+k+1, if it is an answer token.
    pos = torch.arange(width - keep + 1, width)  # (K-1,) positions of predicted tokens
    is_answer = pos[None, :] >= (width - ans_len)[:, None]
    targets = torch.where(is_answer, ids[:, width - keep + 1:], torch.full_like(ids[:, :keep - 1], -100))
    plen = torch.tensor([len(e.prompt) for e in items])
    return {
        "input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
        "prompt_start": width - ans_len - plen, "prompt_len": plen, "targets": targets,
        "logits_to_keep": torch.tensor(keep),
    }


def prompt_batch(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for scoring or generation: every prompt ends at the last position."""
    ids, mask = _left_pad(prompts, pad_id)
    plen = torch.tensor([len(p) for p in prompts])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask),
            "prompt_start": ids.shape[1] - plen, "prompt_len": plen}


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
