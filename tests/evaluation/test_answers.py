"""Tests for heft.evaluation.answers: answer extraction, number normalisation, exact match, stop sequences, metrics."""

from __future__ import annotations

import pytest

from heft.errors import ConfigError, DataError
from heft.evaluation.answers import (GSM8K_STOPS, Extractor, exact_match, extract, generation_metrics, gold_answer, normalize_number, stop_at)

# ----------------------------------------------------------------------------- normalize_number


@pytest.mark.parametrize("raw, expected", [
    ("1,234", "1234"),
    ("$5", "5"),
    ("5.0", "5"),
    ("5.00", "5"),
    ("-3", "-3"),
    ("0.50", "0.5"),
    ("72.", "72"),
    ("$1,234.50", "1234.5"),
    ("100", "100"),  # no "1E+2" from Decimal.normalize
    ("1,000,000", "1000000"),
    ("-0", "0"),
    (".5", "0.5"),
    ("-.25", "-0.25"),
    (" 42 ", "42"),
    ("007", "7"),
])
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("raw", ["", "$", ".", "1.2.3", "abc", "1e5", "NaN", "--3"])
def test_normalize_number_rejects_non_numbers(raw):
    with pytest.raises(ValueError, match="is not a number"):
        normalize_number(raw)


# ----------------------------------------------------------------------------- extract, per kind

AFTER_HASH = Extractor("after_hash")
LAST_NUMBER = Extractor("last_number")
LETTER = Extractor("letter")
FIRST_WORD = Extractor("first_word")
FULL = Extractor("full")


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("#### -5", "-5"),
    ("#### 3.50", "3.5"),
    ("#### $18", "18"),        # lm-eval's strict regex would miss the "$"
    ("####42", "42"),
    ("#### 5\n#### 6", "5"),    # the first "####", as lm-eval's strict-match
    ("The answer is 72", None),  # strict: no "####", no answer
    ("#### none", None),
    ("#### .", None),
])
def test_after_hash(text, expected):
    assert extract(text, AFTER_HASH) == expected


@pytest.mark.parametrize("text, expected", [
    ("She has 3 apples and buys 5 more, so 8.", "8"),
    ("It costs $1,234.50 in total.", "1234.5"),
    ("The temperature fell to -7 degrees", "-7"),
    ("Half is 0.50", "0.5"),
    ("5 + 5 = 10...", "10"),
    ("I have 5 apples, ...", "5"),   # "..." has no digit, skipped (lm-eval would take it)
    ("He earns $5, then leaves", "5"),
    ("#### 72", "72"),
    ("x = 4", "4"),                  # single digit: lm-eval's second alternative
    ("no numbers here", None),
    ("", None),
    ("version 1.2.3", None),         # last match is not a number
])
def test_last_number(text, expected):
    assert extract(text, LAST_NUMBER) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is (B).", "B"),
    ("B", "B"),
    ("C. Paris", "C"),
    ("D) 42", "D"),
    ("[E]", "E"),
    ("Answer: C", "C"),
    ("answer is D because the others are wrong", "D"),
    ("The answer is option A", "A"),
    ("A) is wrong; the answer is (B)", "B"),  # an answer phrase wins over an earlier letter
    ("I pick (A), not (B)", "A"),             # otherwise the first marked letter
    ("Looking at it:\nB\nbecause", "B"),     # a letter alone at the end of a line
    ("A cat sat on the mat", None),           # the article is not a choice
    ("Bob and Carl Ate Dinner", None),        # capitals inside words never count
    ("The answer is (F)", None),              # not a choice
    ("", None),
])
def test_letter(text, expected):
    assert extract(text, LETTER) == expected


def test_letter_uses_given_choices():
    ex = Extractor("letter", choices=("A", "B", "C", "D"))
    assert extract("The answer is (E).", ex) is None
    assert extract("The answer is (D).", ex) == "D"
    assert extract("I'd say (Yes)", Extractor("letter", choices=("Yes", "No"))) == "Yes"


@pytest.mark.parametrize("pattern, text, expected", [
    (r"Answer: (\w+)", "Reasoning... Answer: Paris. Done", "Paris"),
    (r"Answer: (\w+)", "Answer: first\nAnswer: second", "first"),
    (r"Answer: (\w+)", "no answer line", None),
    (r"\[\[(.*?)\]\]", "final [[ 12 apples ]]", "12 apples"),
    (r"Answer:(\s*)", "Answer:   ", None),           # empty capture is unparseable
    (r"(?:x(\d)|y)", "y", None),                     # group that did not take part
])
def test_regex(pattern, text, expected):
    assert extract(text, Extractor("regex", pattern=pattern)) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes, because the passage says so.", "yes"),
    ("  no.", "no"),
    ("**Yes**", "yes"),
    ("- NO -", "no"),
    ("... !!", None),
    ("", None),
])
def test_first_word(text, expected):
    assert extract(text, FIRST_WORD) == expected


@pytest.mark.parametrize("text, expected", [
    ("  Paris \n", "Paris"),
    ("two words", "two words"),
    ("   \n", None),
])
def test_full(text, expected):
    assert extract(text, FULL) == expected


# ----------------------------------------------------------------------------- Extractor errors


def test_bad_regex_message_names_pattern_and_fix():
    with pytest.raises(ConfigError) as e:
        Extractor("regex", pattern="Answer: (\\d+")
    message = str(e.value)
    assert "'Answer: (\\\\d+'" in message
    assert "not a valid regular expression" in message
    assert "re.escape" in message


@pytest.mark.parametrize("kwargs, words", [
    ({"kind": "regex", "pattern": r"Answer: \w+"}, ["has no capture group", "wrap the answer in parentheses"]),
    ({"kind": "regex"}, ["needs a pattern"]),
    ({"kind": "number"}, ["'number' is unknown", "last_number"]),
    ({"kind": "full", "pattern": "(x)"}, ["only used by kind 'regex'", "'full'"]),
    ({"kind": "full", "choices": ("A",)}, ["only used by kind 'letter'"]),
    ({"kind": "letter", "choices": ("A", " ")}, ["non-empty strings"]),
])
def test_bad_extractor_config(kwargs, words):
    with pytest.raises(ConfigError) as e:
        Extractor(**kwargs)
    for word in words:
        assert word in str(e.value)


# ----------------------------------------------------------------------------- gold, match, stops


def test_gold_answer_gsm8k_solution():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = 72 clips.\n#### 72"
    assert gold_answer(solution, AFTER_HASH) == "72"
    assert gold_answer(solution.replace("#### 72", "#### 1,000"), AFTER_HASH) == "1000"
    # The "####" line wins for last_number too, although other numbers come before and after it.
    assert gold_answer("3 + 4 = 7\n#### 7\nchecked by 2 people", LAST_NUMBER) == "7"
    assert gold_answer("so she has 9 left", LAST_NUMBER) == "9"
    assert gold_answer("(C) Paris", LETTER) == "C"
    assert gold_answer(" yes", FIRST_WORD) == "yes"


def test_gold_answer_without_answer_names_target_and_kind():
    with pytest.raises(DataError) as e:
        gold_answer("She has some apples.", AFTER_HASH)
    assert "'She has some apples.'" in str(e.value)
    assert "'after_hash'" in str(e.value)
    assert "'#### <number>'" in str(e.value)


@pytest.mark.parametrize("pred, gold, ex, expected", [
    ("1000", "1,000", AFTER_HASH, True),
    ("72.00", "72", LAST_NUMBER, True),
    ("$72", "72", LAST_NUMBER, True),
    ("-3", "3", LAST_NUMBER, False),
    ("0.5", "0.50", LAST_NUMBER, True),
    ("7", "72", LAST_NUMBER, False),
    (None, "72", LAST_NUMBER, False),
    ("b", "B", LETTER, True),
    ("C", "B", LETTER, False),
    ("yes", "Yes.", FIRST_WORD, True),
    ("no", "yes", FIRST_WORD, False),
    ("New  York\n", "new york", FULL, True),
    ("New Yorker", "new york", FULL, False),
    (None, "", FULL, False),
])
def test_exact_match(pred, gold, ex, expected):
    assert exact_match(pred, gold, ex) is expected


def test_extract_then_match_end_to_end():
    generated = "She bakes 3 trays of 24 cookies, so 3 * 24 = 72.\n\nQuestion: how many eggs"
    answer = extract(stop_at(generated, GSM8K_STOPS), LAST_NUMBER)
    assert answer == "72"  # without the stop, the next question's text would be read
    assert exact_match(answer, gold_answer("3*24=72\n#### 72", LAST_NUMBER), LAST_NUMBER)


@pytest.mark.parametrize("text, expected", [
    ("72\n\nQuestion: next", "72\n\n"),      # lm-eval gsm8k 3.0 does not stop at a blank line
    ("72 Question: next\n\nmore", "72 "),
    ("answer 5</s>junk", "answer 5"),
    ("answer 5<|im_end|>\n", "answer 5"),
    ("one line\nsecond line", "one line\nsecond line"),
    ("", ""),
])
def test_stop_at(text, expected):
    assert stop_at(text, GSM8K_STOPS) == expected


def test_stop_at_the_earliest_stop_whatever_its_order():
    assert stop_at("a STOP2 b STOP1", ("STOP1", "STOP2")) == "a "


def test_stop_at_without_stops_and_with_empty_stop():
    assert stop_at("abc\n\n", ()) == "abc\n\n"
    with pytest.raises(ConfigError, match="empty string"):
        stop_at("abc", ("\n\n", ""))


# ----------------------------------------------------------------------------- metrics


def test_generation_metrics_counts_unparseable_as_wrong():
    preds = [
        {"pred": "72", "correct": True},
        {"pred": "5", "correct": False},
        {"pred": None, "correct": False},
        {"pred": None, "correct": True},  # inconsistent row: no answer is never right
    ]
    metrics = generation_metrics(preds)
    assert metrics["correct"] == 1
    assert metrics["n"] == 4
    assert metrics["unparseable"] == 2
    assert metrics["accuracy"] == pytest.approx(0.25)
    low, high = metrics["ci95"]
    assert 0.0 < low < 0.25 < high < 1.0
    assert (low, high) == pytest.approx((0.04559, 0.69936), abs=1e-4)


def test_generation_metrics_empty_and_bad_rows():
    assert generation_metrics([]) == {"accuracy": 0.0, "correct": 0, "n": 0, "unparseable": 0, "ci95": (0.0, 1.0)}
    with pytest.raises(DataError, match=r"prediction 1 has no 'correct'"):
        generation_metrics([{"pred": "1", "correct": True}, {"pred": "2"}])
