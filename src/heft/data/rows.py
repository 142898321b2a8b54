"""Data: reading and checking rows of every task, and the train / dev / evaluation splits.
(Prompts, tokens and batches are heft.data.tokens.)

BoolQ (Clark et al., 2019; CC BY-SA 3.0): yes/no questions about a Wikipedia passage. Its rows come as Google format (`question`, `passage`, `answer`: bool) or SuperGLUE format
(`question`, `passage`, `label`: bool or 0/1, `idx`); booleans may also be the strings true/false/yes/no
in any case, as spreadsheets write them. Text files are UTF-8 (a leading BOM is accepted). Every row is
checked where it enters and remembers where it came from (`Example.source`); a bad row stops the run
with its file, line and field. The dev split is carved from train with a fixed
permutation (independent of the run seed, so every seed and strategy sees the same dev rows).
Other tasks' rows (built-in tasks, and local `multiple_choice` / `completion` / `chat` files) become the
same `Example` with a rendered context and choices or a target (`parse_general`). A local row missing a
field of `data.format` but holding every field of another format names that format.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from heft.config.schema import DataConfig
from heft.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

DEV_SPLIT_SEED = 20250912  # fixed: the dev split must not move with the training seed


@dataclass(frozen=True)
class Example:
    """One row of any task. A BoolQ row has `question`, `passage` and a boolean `label`, and its prompt comes
    from `data.prompt_format`; every other row carries its rendered `context` (or one per choice in
    `contexts`, or chat `messages`) with `choices` to score (label: the right one's index) or a `target`
    to train on and a `gold` answer to match (generation)."""

    question: str
    passage: str
    label: bool | int
    idx: int
    # where the row came from, for messages: "train.jsonl:5", "x.parquet:row 3", "command line";
    # not part of equality, so the same row read from two files compares equal
    source: str = field(default="", compare=False)
    task: str = "boolq"
    context: str | None = None
    choices: tuple[str, ...] = ()
    """Continuation texts, each scored after `context` + `delimiter` (lm-eval's target_delimiter)."""
    contexts: tuple[str, ...] = ()
    """Per-choice contexts with one shared continuation (winogrande's partial scoring)."""
    target: str | None = None
    gold: str | None = None
    messages: tuple[tuple[str, str], ...] = ()
    delimiter: str = " "

    @property
    def kind(self) -> str:
        """`yesno` (BoolQ prompt formats), `choice` (scored choices) or `generate` (greedy text, exact match)."""
        if self.context is None and not self.contexts and not self.messages:
            return "yesno"
        return "choice" if self.choices else "generate"


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
        _unicode(value, name, where)
    passage = row.get("passage") or ""
    idx = row.get("idx", index)
    return Example(row["question"].strip(), passage.strip(), _label(row, where),
                   int(idx) if isinstance(idx, int) else index, source=where)


def _unicode(value: str, name: str, where: str) -> None:
    """Text a tokenizer can take: JSON's `\\ud800` escapes decode to unpaired surrogates, which are not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: field `{name}` is not valid Unicode text (an unpaired surrogate escape such as "
                        "\\ud800)") from None


def _text(row: dict, name: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(name)
    if value is None:
        raise DataError(f"{where}: missing field `{name}`")
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise DataError(f"{where}: field `{name}` must be non-empty text, got {value!r}")
    _unicode(value, name, where)
    return value


def _choice_label(row: dict, n: int, where: str) -> int:
    value = row.get("label")
    if value is None:
        raise DataError(f"{where}: missing field `label` (the index of the right choice, 0..{n - 1})")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise DataError(f"{where}: field `label` must be the index of the right choice, 0..{n - 1}, got {value!r}")
    return value


def _choices(row: dict, where: str) -> tuple[str, ...]:
    choices = row.get("choices")
    if choices is None:
        raise DataError(f"{where}: missing field `choices` (a list of answer texts)")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise DataError(f"{where}: field `choices` must be a list of at least 2 non-empty texts, got {choices!r}")
    for c in choices:
        _unicode(c, "choices", where)
    return tuple(choices)


def parse_general(row: Any, where: str, fmt: str, task: str, index: int = 0) -> Example:
    """One checked row of a general task: `multiple_choice` (question/prompt, choices, label), `completion`
    (prompt, completion), `chat` (messages), or `rendered` (a built-in task's context(s), choices, label or
    context, target, gold; see heft.data.tasks)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    idx = row.get("idx", row.get("id", index))
    idx = int(idx) if isinstance(idx, int) and not isinstance(idx, bool) else index
    common = dict(question="", passage="", idx=idx, source=where, task=task)
    if fmt == "rendered":
        if "target" in row:
            return Example(**common, label=0, context=_text(row, "context", where), target=_text(row, "target", where),
                           gold=_text(row, "gold", where))
        choices = _choices(row, where)
        contexts = tuple(row.get("contexts") or ())
        context = None if contexts else _text(row, "context", where, allow_empty=True)
        return Example(**common, label=_choice_label(row, len(choices), where), context=context, choices=choices,
                       contexts=contexts)
    if fmt == "multiple_choice":
        key = "question" if "question" in row else "prompt"
        if key not in row:
            raise DataError(f"{where}: missing field `question` (or `prompt`): the text the choices answer")
        choices = _choices(row, where)
        return Example(**common, label=_choice_label(row, len(choices), where), context=_text(row, key, where),
                       choices=choices)
    if fmt == "completion":
        completion = _text(row, "completion", where)
        return Example(**common, label=0, context=_text(row, "prompt", where), target=completion, gold=completion.strip(),
                       delimiter="")
    messages = row.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{where}: field `messages` must be a list of at least 2 {{role, content}} turns, got {messages!r}")
    turns = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{k}] must be {{role: text, content: text}}, got {m!r}")
        turns.append((m["role"], m["content"]))
    if turns[-1][0] != "assistant":
        raise DataError(f"{where}: the last message must have role `assistant` (the answer trained on and matched), "
                        f"got role {turns[-1][0]!r}")
    answer = turns[-1][1]
    if not answer.strip():  # as an empty `completion`: nothing to train on, and an exact match of nothing
        raise DataError(f"{where}: field `messages[{len(turns) - 1}].content` (the assistant's answer) must be non-empty "
                        f"text, got {answer!r}")
    return Example(**common, label=0, messages=tuple(turns), target=answer, gold=answer.strip(), delimiter="")


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


def read_rows(path: str | Path, need_passage: bool = True, fmt: str = "boolq", columns: dict[str, str] | None = None,
              task: str = "local") -> list[Example]:
    """All rows of a jsonl/json/parquet file in the shape `fmt`, fields renamed by `columns` first, checked;
    the first bad row raises DataError."""
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
    if columns:
        rows = [(where, _rename(r, columns, where)) for where, r in rows]
    out = [_parse(r, where, fmt, need_passage, task, i) for i, (where, r) in enumerate(rows)]
    if not out:
        raise DataError(f"{p}: the file holds no rows")
    return out


# The fields a row of each local format has (each group: one of these names), to tell which format a row is in.
_FORMAT_FIELDS = {
    "boolq": (("question",), ("passage",), ("answer", "label")),
    "multiple_choice": (("question", "prompt"), ("choices",), ("label",)),
    "completion": (("prompt",), ("completion",)),
    "chat": (("messages",),),
}


def _parse(row: Any, where: str, fmt: str, need_passage: bool, task: str, index: int) -> Example:
    """One row of a file in the shape `fmt`. When the row is refused, lacks a field of `fmt` and has every field of
    another local format, the error names that format: the usual cause is `data.format` left at its default."""
    try:
        if fmt == "boolq":
            return parse_row(row, where, need_passage, index)
        return parse_general(row, where, fmt, task, index)
    except DataError as e:
        fits = _formats_fitting(row, need_passage)
        if fmt not in _FORMAT_FIELDS or fmt in fits or not fits:
            raise
        fix = f"set data.format: {fits[0]}" if len(fits) == 1 else "set data.format to the file's shape"
        raise DataError(f"{e}; the row's fields ({', '.join(sorted(map(str, row)))}) are those of data.format: "
                        f"{' or '.join(fits)}, not {fmt}; {fix}") from None


def _formats_fitting(row: Any, need_passage: bool) -> list[str]:
    """The local formats whose fields `row` has (BoolQ without `passage` when the prompt does not use it)."""
    if not isinstance(row, dict):
        return []
    fits = []
    for fmt, groups in _FORMAT_FIELDS.items():
        if fmt == "boolq" and not need_passage:
            groups = tuple(g for g in groups if g != ("passage",))
        if all(any(name in row for name in group) for group in groups):
            fits.append(fmt)
    return fits


def _rename(row: Any, columns: dict[str, str], where: str) -> Any:
    """`row` with the fields `columns` names renamed (data.columns: {field in the file: heft's name})."""
    if not isinstance(row, dict):
        return row
    missing = [k for k in columns if k not in row]
    if missing:
        raise DataError(f"{where}: data.columns renames {missing[0]!r}, which this row does not have "
                        f"(its fields: {', '.join(sorted(map(str, row)))})")
    return {columns.get(k, k): v for k, v in row.items()}


def _fixed_order(rows: list[Example]) -> list[Example]:
    """`rows` in a fixed shuffled order (independent of the run seed): a pool to cut dev and training rows from."""
    order = list(range(len(rows)))
    random.Random(DEV_SPLIT_SEED).shuffle(order)
    return [rows[i] for i in order]


def _builtin_splits(cfg: DataConfig, with_train: bool) -> tuple[list[Example], list[Example], list[Example]]:
    """Train, dev and evaluation rows of the built-in tasks (a mixture: concatenated, each capped)."""
    from heft.data.assets import tasks_dir
    from heft.data.tasks import carve, spec

    hub = cfg.source == "hub"
    folder = None if hub else tasks_dir()
    train: list[Example] = []
    dev: list[Example] = []
    evaluation: list[Example] = []
    for t in cfg.tasks:
        sp = spec(t.name)
        if hub:  # the official training and evaluated splits
            from heft.data.tasks import HUB, hub_rows

            where = f"{HUB[t.name][0]}[%s] row %d"
            rows = [parse_general(r, where % ("train", i), "rendered", t.name, i) for i, r in enumerate(hub_rows(t.name, "train"))]
            held = [parse_general(r, where % ("eval", i), "rendered", t.name, i) for i, r in enumerate(hub_rows(t.name, "eval"))]
            pool = _fixed_order(rows)
        elif sp.eval is not None:  # a separate evaluated split: train on the whole pool
            pool = _fixed_order(read_rows(folder / t.name / "pool.jsonl", fmt="rendered", task=t.name))
            held = read_rows(folder / t.name / "eval.jsonl", fmt="rendered", task=t.name)
        else:
            rows = read_rows(folder / t.name / "pool.jsonl", fmt="rendered", task=t.name)
            pool_idx, held_idx = carve(len(rows))
            pool, held = [rows[i] for i in pool_idx], [rows[i] for i in held_idx]
        n_dev = min(cfg.dev_size, len(pool) // 4)
        dev += pool[:n_dev]
        size = t.train_size if t.train_size is not None else cfg.train_size
        train += pool[n_dev:][:size] if size is not None else pool[n_dev:]
        eval_size = t.eval_size if t.eval_size is not None else cfg.eval_size
        evaluation += held[:eval_size] if eval_size is not None else held
    return (train if with_train or cfg.eval_split == "dev" else []), dev, evaluation


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
    if cfg.source == "builtin" or (cfg.source == "hub" and cfg.tasks):
        train, dev, evaluation = _builtin_splits(cfg, with_train)
        return Splits(train, dev, dev if cfg.eval_split == "dev" else evaluation)
    if cfg.source == "boolq":
        from heft.data.assets import boolq_dir

        folder = boolq_dir()
        train = read_rows(folder / "train.jsonl") if (with_train or cfg.eval_split == "dev") else []
        valid = read_rows(folder / "validation.jsonl")
    elif cfg.source == "hub":
        train = _hub_split("train") if (with_train or cfg.eval_split == "dev") else []
        valid = _hub_split("validation")
    else:
        kw = dict(fmt=cfg.format, columns=cfg.columns)
        train = read_rows(cfg.train_path, need_passage, **kw) if cfg.train_path and (with_train or cfg.eval_split == "dev") else []
        valid = read_rows(cfg.eval_path, need_passage, **kw)
    if train and cfg.dev_size >= len(train):
        raise ConfigError(f"data.dev_size: {cfg.dev_size} leaves no training rows out of {len(train)}; lower it")
    pool = _fixed_order(train)
    dev, rest = pool[: cfg.dev_size], pool[cfg.dev_size:]
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


def majority_choice(rows: Sequence[Example]) -> int:
    """The most frequent gold choice index among choice rows (ties: the lowest index)."""
    counts: dict[int, int] = {}
    for r in rows:
        counts[int(r.label)] = counts.get(int(r.label), 0) + 1
    return max(sorted(counts), key=lambda k: counts[k]) if counts else 0
