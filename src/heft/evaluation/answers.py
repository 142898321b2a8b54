"""Answer extraction and exact match for generative evaluation (greedy decoding), e.g. GSM8K.

A generated continuation is cut at the first stop sequence (`stop_at`), an answer is pulled out of
it by an `Extractor` (`extract`), and compared with the gold answer (`exact_match`). The number
rules follow lm-evaluation-harness's gsm8k task:

- "strict-match" (`after_hash`): `#### (\\-?[0-9\\.\\,]+)`, the format of GSM8K's gold solutions;
- "flexible-extract" (`last_number`): `(-?[$0-9.,]{2,})|(-?[0-9]+)`, the last match.

Numbers are then normalised (`normalize_number`: "$1,234.50" -> "1234.5"), so "72", "72.00" and
"$72" all match a gold "72", where lm-eval compares the extracted strings as written.
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, get_args

from heft.errors import ConfigError, DataError

Kind = Literal["last_number", "after_hash", "letter", "regex", "first_word", "full"]
KINDS: tuple[str, ...] = get_args(Kind)
NUMBER_KINDS = ("last_number", "after_hash")
DEFAULT_CHOICES = ("A", "B", "C", "D", "E")

# lm-eval gsm8k's `until`; "\n\n" ends the answer before the model starts a new few-shot question.
GSM8K_STOPS = ("Question:", "</s>", "<|im_end|>")  # lm-eval gsm8k 3.0 `until` (1.0 also stopped at "\n\n")

# lm-eval's strict-match, plus an optional space and "$" ("####72", "#### $72") it would miss.
_AFTER_HASH = re.compile(r"#### ?\$?(-?[0-9.,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_PLAIN_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")


@dataclass(frozen=True)
class Extractor:
    """How to pull an answer out of generated text.

    kind:
      - ``after_hash``: the number after ``####`` (GSM8K gold format, lm-eval "strict-match"),
        normalised with `normalize_number`.
      - ``last_number``: the last number in the text (lm-eval "flexible-extract"), normalised.
        Matches without a digit ("..." ends many sentences) are skipped.
      - ``letter``: a choice letter that stands alone as an answer. An answer phrase wins
        ("answer is B because", "Answer: (C)"); otherwise the first letter in brackets ("(B)",
        "[B]") or followed by ``) ] . : , ;`` or the end of a line ("B. Paris", "B"). Outside an
        answer phrase a letter followed by a word is not an answer, so the article in "A cat"
        gives None. Case-sensitive; a letter inside a word ("Bob") never counts.
      - ``regex``: the first capture group of `pattern` at its first match (`re.search`), stripped.
      - ``first_word``: the first word, lowercased, punctuation stripped ("**Yes**, it is" -> "yes").
      - ``full``: the whole text, stripped.
    pattern: the regular expression for ``regex`` (needs one capture group); unused otherwise.
    choices: the letters (or labels) for ``letter``; empty means A-E.
    """

    kind: Kind
    pattern: str | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"extractor kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if self.kind == "regex":
            if not self.pattern:
                raise ConfigError(
                    "extractor kind 'regex' needs a pattern with one capture group, e.g. pattern=r'Answer: (\\w+)'"
                )
            _compile(self.pattern)
        elif self.pattern is not None:
            raise ConfigError(
                f"extractor pattern {self.pattern!r} is only used by kind 'regex', not {self.kind!r}; "
                "remove it or set kind='regex'"
            )
        if self.choices and self.kind != "letter":
            raise ConfigError(f"extractor choices {self.choices!r} are only used by kind 'letter', not {self.kind!r}; remove them")
        if any(not isinstance(c, str) or not c.strip() for c in self.choices):
            raise ConfigError(f"extractor choices {self.choices!r} must be non-empty strings, e.g. ('A', 'B', 'C', 'D')")


@functools.lru_cache(maxsize=64)
def _compile(pattern: str) -> re.Pattern[str]:
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ConfigError(
            f"extractor pattern {pattern!r} is not a valid regular expression ({e}); "
            "fix it or escape special characters with re.escape"
        ) from None
    if compiled.groups < 1:
        raise ConfigError(
            f"extractor pattern {pattern!r} has no capture group; wrap the answer in parentheses, e.g. r'Answer: (\\w+)'"
        )
    return compiled


@functools.lru_cache(maxsize=16)
def _letter_patterns(choices: tuple[str, ...]) -> tuple[re.Pattern[str], re.Pattern[str]]:
    alt = "|".join(re.escape(c) for c in sorted(choices, key=len, reverse=True))
    phrase = re.compile(rf"(?i:answer)(?:\s+is)?\s*:?\s*(?i:option\s+)?[(\[]?({alt})(?![A-Za-z0-9])")
    marked = re.compile(rf"(?<![A-Za-z0-9])(?:\(({alt})\)|\[({alt})\]|({alt})(?=[)\].:,;]|[ \t]*$))", re.MULTILINE)
    return phrase, marked


def normalize_number(s: str) -> str:
    """Canonical form of a number: "1,234" -> "1234", "$5" -> "5", "5.00" -> "5", "0.50" -> "0.5".

    Commas and "$" are dropped (GSM8K's thousands separators, not decimal commas), a trailing "."
    (end of sentence) is removed, "-3" keeps its sign, "-0" becomes "0". Raises ValueError when
    what is left is not a plain decimal number.
    """
    cleaned = s.strip().replace(",", "").replace("$", "").rstrip(".")
    if not _PLAIN_NUMBER.fullmatch(cleaned):
        raise ValueError(f"{s!r} is not a number; expected digits with an optional '-', '$', ',' and one '.'")
    value = Decimal(cleaned)
    if value == 0:
        return "0"
    return format(value.normalize(), "f")


def _number_or_none(s: str) -> str | None:
    try:
        return normalize_number(s)
    except ValueError:
        return None


def extract(text: str, ex: Extractor) -> str | None:
    """The answer in `text` according to `ex`, or None when there is none (unparseable)."""
    if ex.kind == "after_hash":
        m = _AFTER_HASH.search(text)
        return _number_or_none(m.group(1)) if m else None
    if ex.kind == "last_number":
        for m in reversed(list(_FLEXIBLE.finditer(text))):
            if any(ch.isdigit() for ch in m.group(0)):
                return _number_or_none(m.group(0))
        return None
    if ex.kind == "letter":
        phrase, marked = _letter_patterns(ex.choices or DEFAULT_CHOICES)
        m = phrase.search(text) or marked.search(text)
        return next(g for g in m.groups() if g is not None) if m else None
    if ex.kind == "regex":
        assert ex.pattern is not None  # checked in Extractor.__post_init__
        m = _compile(ex.pattern).search(text)
        answer = m.group(1) if m else None
        return answer.strip() if answer is not None and answer.strip() else None
    if ex.kind == "first_word":
        for token in text.split():
            word = token.strip(string.punctuation).lower()
            if word:
                return word
        return None
    assert ex.kind == "full", ex.kind
    return text.strip() or None


def _canonical(answer: str, ex: Extractor) -> str:
    if ex.kind in NUMBER_KINDS:
        number = _number_or_none(answer)
        if number is not None:
            return number
    if ex.kind == "first_word":
        answer = answer.strip().strip(string.punctuation)
    return " ".join(answer.split()).casefold()


def exact_match(pred: str | None, gold: str, ex: Extractor) -> bool:
    """Whether an extracted answer equals the gold answer.

    Numbers (kinds ``after_hash``, ``last_number``) are compared after `normalize_number`, so
    "1,000" equals "1000.00"; everything else case-insensitively with whitespace collapsed. An
    unparseable prediction (None) is never correct.
    """
    if pred is None:
        return False
    return _canonical(pred, ex) == _canonical(gold, ex)


def gold_answer(target_text: str, ex: Extractor) -> str:
    """The gold answer in a training target, e.g. a GSM8K solution "... #### 72" -> "72".

    For the number kinds the "####" line wins when there is one (the reasoning before it holds
    other numbers); otherwise the target is read with `extract`. Raises DataError when the target
    holds no answer of the extractor's kind.
    """
    if ex.kind in NUMBER_KINDS and "####" in target_text:
        answer = extract(target_text, Extractor("after_hash"))
    else:
        answer = extract(target_text, ex)
    if answer is None:
        shown = target_text if len(target_text) <= 80 else target_text[:77] + "..."
        raise DataError(
            f"target {shown!r} has no answer for extractor kind {ex.kind!r}; "
            "end GSM8K-style targets with '#### <number>' or choose another extractor kind"
        )
    return answer


def stop_at(text: str, stops: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop sequence."""
    if any(not stop for stop in stops):
        raise ConfigError(
            f"stop sequences {tuple(stops)!r} include an empty string, which would cut every answer to nothing; remove it"
        )
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))
    return text[:cut]


def generation_metrics(preds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy over generated answers, each a mapping with ``pred`` (str | None) and ``correct`` (bool).

    Unparseable answers (``pred`` None) count as wrong and are also reported in ``unparseable``.
    Returns accuracy, correct, n, unparseable and ci95 (95% Wilson interval as a (low, high) tuple).
    """
    from heft.evaluation.stats import wilson_interval

    correct = unparseable = 0
    for i, row in enumerate(preds):
        missing = [key for key in ("pred", "correct") if key not in row]
        if missing:
            raise DataError(
                f"prediction {i} has no {', '.join(repr(k) for k in missing)}; "
                "each prediction needs 'pred' (str or None) and 'correct' (bool)"
            )
        if row["pred"] is None:
            unparseable += 1
        elif row["correct"]:
            correct += 1
    n = len(preds)
    return {
        "accuracy": correct / n if n else 0.0,
        "correct": correct,
        "n": n,
        "unparseable": unparseable,
        "ci95": wilson_interval(correct, n),
    }
