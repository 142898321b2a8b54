"""Tests for heft.data.rows and heft.data.tokens: reading and checking rows, splits, prompt encoding, batches and bucketing."""

from __future__ import annotations

import json
import re
import statistics

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import boolq_rows, write_jsonl

from heft.config.schema import DataConfig
from heft.data.rows import Example, load_splits, majority_label, read_rows
from heft.errors import ConfigError, DataError
from heft.data.tokens import (BucketBatches, Encoded, Encoder, candidates, encode_all, prompt_batch, prompt_text, train_batch)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _row(question="is it so", passage="It is so.", **label):
    return {"question": question, "passage": passage, **(label or {"answer": True})}


# ----------------------------------------------------------------------------- reading rows


def test_google_format(tmp_path):
    rows = boolq_rows(9, google=True)
    got = read_rows(write_jsonl(tmp_path / "g.jsonl", rows))
    assert len(got) == len(rows)
    assert [g.label for g in got] == [r["answer"] for r in rows]
    assert [g.question for g in got] == [r["question"] for r in rows]
    assert [g.passage for g in got] == [r["passage"].strip() for r in rows]
    assert [g.idx for g in got] == list(range(9))  # no idx field: the row index


def test_superglue_format_bool_and_int_labels(tmp_path):
    rows = boolq_rows(6)
    rows[0]["label"], rows[1]["label"] = 0, 1
    for i, r in enumerate(rows):
        r["idx"] = 100 + i
    got = read_rows(write_jsonl(tmp_path / "s.jsonl", rows))
    assert [g.label for g in got] == [bool(r["label"]) for r in rows]
    assert got[0].label is False and got[1].label is True
    assert [g.idx for g in got] == [100 + i for i in range(6)]


def test_string_booleans(tmp_path):
    rows = [_row(answer="True"), _row(answer="False"), _row(answer="true"), _row(answer="false"), _row(label="True")]
    assert [g.label for g in read_rows(write_jsonl(tmp_path / "t.jsonl", rows))] == [True, False, True, False, True]


def test_string_booleans_any_case_and_yes_no(tmp_path):
    values = {"TRUE": True, "FALSE": False, "yes": True, "No": False, "YES": True, "no": False, "fAlSe": False, " Yes ": True}
    for name in ("answer", "label"):
        rows = [_row(**{name: v}) for v in values]
        got = read_rows(write_jsonl(tmp_path / f"{name}.jsonl", rows))
        assert [g.label for g in got] == list(values.values()), name


@pytest.mark.parametrize("label, message", [
    ({"answer": "maybe"}, "field `answer` must be a boolean (true/false/yes/no, any case), got 'maybe'"),
    ({"answer": "y"}, "field `answer` must be a boolean (true/false/yes/no, any case), got 'y'"),
    ({"answer": 0}, "field `answer` must be a boolean (true/false/yes/no, any case), got 0"),
    ({"label": "maybe"}, "field `label` must be a boolean (true/false/yes/no, any case, or 0/1), got 'maybe'"),
    ({"label": "1"}, "field `label` must be a boolean (true/false/yes/no, any case, or 0/1), got '1'"),
    ({"label": 2}, "field `label` must be a boolean (true/false/yes/no, any case, or 0/1), got 2"),
])
def test_refused_boolean_message(tmp_path, label, message):
    path = write_jsonl(tmp_path / "r.jsonl", [_row(), _row(**label)])
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert str(e.value) == f"{path}:2: {message}"


def test_json_list_and_data_mapping(tmp_path):
    rows = boolq_rows(5, google=True)
    a = tmp_path / "list.json"
    a.write_text(json.dumps(rows))
    b = tmp_path / "wrapped.json"
    b.write_text(json.dumps({"version": 1, "data": rows}))
    ja, jb = read_rows(a), read_rows(b)
    assert ja == jb and len(ja) == 5
    assert [g.label for g in ja] == [r["answer"] for r in rows]


def test_parquet(tmp_path):
    rows = boolq_rows(7)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    got = read_rows(path)
    assert [g.label for g in got] == [r["label"] for r in rows] and len(got) == 7
    assert [g.source for g in got] == [f"{path}:row {i}" for i in range(7)]


def test_corrupt_parquet_is_a_data_error(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable parquet file") as e:
        read_rows(path)
    assert str(e.value).startswith(f"{path}: ")


def test_source_names_file_and_line(tmp_path):
    rows = boolq_rows(3, google=True)
    path = tmp_path / "s.jsonl"
    path.write_text("\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2]) + "\n")
    assert [g.source for g in read_rows(path)] == [f"{path}:2", f"{path}:4", f"{path}:5"]
    j = tmp_path / "s.json"
    j.write_text(json.dumps(rows))
    assert [g.source for g in read_rows(j)] == [f"{j}:item {i}" for i in range(3)]


def test_source_does_not_change_equality():
    a = Example("q", "p", True, 1, source="a.jsonl:1")
    b = Example("q", "p", True, 1, source="b.json:item 0")
    assert a == b and a.source != b.source
    assert a != Example("q", "p", False, 1, source="a.jsonl:1")


def test_utf8_bom_is_accepted(tmp_path):
    rows = boolq_rows(5, google=True)
    rows[1]["question"] = "is café au lait a drink"  # non-ASCII text survives too
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    got = read_rows(bom)
    assert got == read_rows(plain) and len(got) == 5
    assert got[1].question == "is café au lait a drink" and got[0].source == f"{bom}:1"
    plain_json = tmp_path / "plain.json"
    plain_json.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    bom_json = tmp_path / "bom.json"
    bom_json.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8-sig")
    assert bom_json.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert read_rows(bom_json) == read_rows(plain_json) == got


def test_bad_bytes_in_jsonl_name_file_and_line(tmp_path):
    good = [json.dumps(r).encode() for r in boolq_rows(3)]
    bad = b'{"question": "is it caf\xe9", "passage": "p", "answer": true}'  # latin-1, not UTF-8
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b"\n".join([good[0], b"", good[1], bad, good[2]]) + b"\n")  # the bad row is on line 4
    with pytest.raises(DataError) as e:
        read_rows(path)
    assert str(e.value) == (f"{path}:4: not UTF-8 text (byte 0xe9 at byte 24 of the line); save the file as UTF-8 "
                            "(spreadsheets: 'CSV UTF-8' or 'Unicode (UTF-8)' when saving)")


def test_bad_bytes_in_json_name_file_and_line(tmp_path):
    text = json.dumps(boolq_rows(2), indent=1).encode()
    at = text.index(b"question", text.index(b"question") + 1)  # the second row's key, a few lines down
    path = tmp_path / "latin.json"
    path.write_bytes(b"\xef\xbb\xbf" + text[:at] + b"\xff" + text[at:])
    with pytest.raises(DataError) as e:
        read_rows(path)
    line = (b"\xef\xbb\xbf" + text[:at]).count(b"\n") + 1
    assert line > 3
    assert str(e.value).startswith(f"{path}:{line}: not UTF-8 text (byte 0xff at byte offset {at + 3} of the file); "), e.value


def test_blank_lines_are_not_rows_and_nothing_is_dropped(tmp_path):
    rows = boolq_rows(12)
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:4]) + "\n\n  \n" + "".join(json.dumps(r) + "\n" for r in rows[4:]))
    got = read_rows(path)
    assert len(got) == len(rows)
    assert [g.question for g in got] == [r["question"] for r in rows]


def test_question_only_rows_need_no_passage(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "is it", "answer": True}, {"question": "is not", "answer": False}])
    got = read_rows(path, need_passage=False)
    assert [(g.question, g.passage, g.label) for g in got] == [("is it", "", True), ("is not", "", False)]
    with pytest.raises(DataError, match=r"q\.jsonl:1: missing field `passage`"):
        read_rows(path)


@pytest.mark.parametrize("bad, needles", [
    ('{"question": "q", "passage": "p", "answer": tru', ["malformed JSON line"]),
    (json.dumps({"passage": "p", "answer": True}), ["missing field `question`"]),
    (json.dumps(_row(passage="")), ["`passage`", "non-empty"]),
    (json.dumps(_row(passage="   ")), ["`passage`", "non-empty"]),
    (json.dumps(_row(question=7)), ["`question`", "non-empty text", "7"]),
    (json.dumps(_row(answer="maybe")), ["`answer`", "boolean", "'maybe'"]),
    (json.dumps(_row(answer=2)), ["`answer`", "boolean", "2"]),
    (json.dumps(_row(answer=1)), ["`answer`", "boolean"]),  # 0/1 is SuperGLUE's `label`, not Google's `answer`
    (json.dumps(_row(label=2)), ["`label`", "boolean", "2"]),
    (json.dumps(_row(answer=None)), ["`answer`"]),
    (json.dumps({"question": "q", "passage": "p"}), ["`answer`", "`label`"]),
    (json.dumps([1, 2]), ["expected a JSON object", "list"]),
    ('"just text"', ["expected a JSON object", "str"]),
])
def test_bad_row_names_file_line_and_field(tmp_path, bad, needles):
    good = [json.dumps(r) for r in boolq_rows(3)]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([good[0], "", good[1], bad, good[2]]) + "\n")  # the bad row is on line 4
    with pytest.raises(DataError) as e:
        read_rows(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: "), msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("fmt, row, message", [
    ("boolq", {"question": "do cats sleep", "choices": ["yes", "no"], "label": 0},
     "missing field `passage`; the row's fields (choices, label, question) are those of data.format: multiple_choice, "
     "not boolq; set data.format: multiple_choice"),
    ("multiple_choice", {"prompt": "Cats sleep", "completion": " a lot"},
     "missing field `choices` (a list of answer texts); the row's fields (completion, prompt) are those of "
     "data.format: completion, not multiple_choice; set data.format: completion"),
    ("completion", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
     "missing field `completion`; the row's fields (messages) are those of data.format: chat, not completion; "
     "set data.format: chat"),
    ("chat", {"question": "is it", "passage": "It is.", "answer": True},
     "field `messages` must be a list of at least 2 {role, content} turns, got None; the row's fields "
     "(answer, passage, question) are those of data.format: boolq, not chat; set data.format: boolq"),
    ("boolq", {"question": "q", "prompt": "p", "completion": "c", "choices": ["a", "b"], "label": 1},
     "missing field `passage`; the row's fields (choices, completion, label, prompt, question) are those of "
     "data.format: multiple_choice or completion, not boolq; set data.format to the file's shape"),
])
def test_row_in_another_format_names_it(tmp_path, fmt, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(DataError) as e:
        read_rows(path, fmt=fmt)
    assert str(e.value) == f"{path}:1: {message}"


@pytest.mark.parametrize("fmt, row, message", [
    ("boolq", {"question": "q", "label": True}, "missing field `passage`"),  # BoolQ's shape, one field short
    ("multiple_choice", {"question": "q", "choices": ["a", "b"], "label": 5},
     "field `label` must be the index of the right choice, 0..1, got 5"),
    ("chat", {"text": "hello"}, "field `messages` must be a list of at least 2 {role, content} turns, got None"),
])
def test_row_in_no_other_format_gets_no_format_hint(tmp_path, fmt, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(DataError) as e:
        read_rows(path, fmt=fmt)
    assert str(e.value) == f"{path}:1: {message}"


def test_question_only_boolq_rows_fit_boolq_only_under_the_question_only_prompt(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"question": "is it", "answer": True}])
    with pytest.raises(DataError) as e:
        read_rows(path, need_passage=False, fmt="chat")  # data.prompt_format: question-only
    assert str(e.value).endswith("the row's fields (answer, question) are those of data.format: boolq, not chat; "
                                 "set data.format: boolq")
    with pytest.raises(DataError) as e:
        read_rows(path, need_passage=True, fmt="chat")
    assert "data.format" not in str(e.value)  # without `passage` it is no BoolQ row of the passage prompt


@pytest.mark.parametrize("answer", ["", "  \n"])
def test_chat_row_with_an_empty_answer_is_refused_like_an_empty_completion(tmp_path, answer):
    chat = {"messages": [{"role": "user", "content": "do cats sleep"}, {"role": "assistant", "content": answer}]}
    path = write_jsonl(tmp_path / "chat.jsonl", [chat])
    with pytest.raises(DataError) as e:
        read_rows(path, fmt="chat")
    assert str(e.value) == (f"{path}:1: field `messages[1].content` (the assistant's answer) must be non-empty text, "
                            f"got {answer!r}")
    path = write_jsonl(tmp_path / "completion.jsonl", [{"prompt": "do cats sleep", "completion": answer}])
    with pytest.raises(DataError) as e:
        read_rows(path, fmt="completion")
    assert str(e.value) == f"{path}:1: field `completion` must be non-empty text, got {answer!r}"
    # an empty earlier turn is still a turn (a system prompt may be empty); only the answer must hold text
    chat["messages"] = [{"role": "system", "content": ""}, {"role": "assistant", "content": "yes"}]
    assert read_rows(write_jsonl(tmp_path / "ok.jsonl", [chat]), fmt="chat")[0].target == "yes"


def test_bad_item_in_json_names_the_item(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_row(), _row(), _row(answer="maybe")]))
    with pytest.raises(DataError, match=r"rows\.json:item 2: field `answer`"):
        read_rows(path)


@pytest.mark.parametrize("text, needle", [
    ("", "holds no rows"),
    ("\n\n", "holds no rows"),
    (" \r\n\t\n", "holds no rows"),
    ("\ufeff", "holds no rows"),
    ("\ufeff\n\n", "holds no rows"),
])
def test_empty_jsonl(tmp_path, text, needle):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=needle) as e:
        read_rows(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text, needle", [
    ("[]", "holds no rows"),
    ("\ufeff[]", "holds no rows"),
    ('{"data": []}', "holds no rows"),
    ('{"rows": []}', "expected a JSON list"),
    ("[{", "not valid JSON"),
])
def test_bad_json_files(tmp_path, text, needle):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=needle) as e:
        read_rows(path)
    assert str(e.value).startswith(f"{path}: ")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        read_rows(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- splits


@pytest.fixture
def split_files(tmp_path):
    return (write_jsonl(tmp_path / "train.jsonl", boolq_rows(30)),
            write_jsonl(tmp_path / "validation.jsonl", boolq_rows(10, offset=5, google=True)))


def _cfg(files, **kw):
    return DataConfig(source="local", train_path=str(files[0]), eval_path=str(files[1]), **{"dev_size": 6, **kw})


def test_dev_split_is_deterministic_disjoint_and_independent(split_files):
    a = load_splits(_cfg(split_files))
    b = load_splits(_cfg(split_files))
    assert a == b
    assert len(a.dev) == 6 and len(a.train) == 24 and len(a.eval) == 10
    dev_ids, train_ids = {e.idx for e in a.dev}, {e.idx for e in a.train}
    assert not dev_ids & train_ids and dev_ids | train_ids == set(range(30))
    assert [e.idx for e in a.dev] != list(range(6))  # carved by a permutation, not the first rows
    # the dev rows do not move with anything else in the config
    for other in (_cfg(split_files, train_size=5), _cfg(split_files, eval_size=3), _cfg(split_files, eval_split="dev"),
                  _cfg(split_files, max_length=32), _cfg(split_files, prompt_format="question-only")):
        assert load_splits(other).dev == a.dev
    assert load_splits(_cfg(split_files), with_train=False).train == []


def test_train_size_subsamples_outside_dev(split_files):
    full = load_splits(_cfg(split_files))
    s = load_splits(_cfg(split_files, train_size=5))
    assert len(s.train) == 5
    assert {e.idx for e in s.train} <= {e.idx for e in full.train}
    assert not {e.idx for e in s.train} & {e.idx for e in s.dev}
    assert load_splits(_cfg(split_files, train_size=5)).train == s.train


def test_eval_size_takes_first_validation_rows_in_order(split_files):
    rows = [json.loads(line) for line in split_files[1].read_text().splitlines()]
    s = load_splits(_cfg(split_files, eval_size=4))
    assert [(e.question, e.passage, e.label) for e in s.eval] == [(r["question"], r["passage"].strip(), r["answer"]) for r in rows[:4]]
    assert [e.idx for e in s.eval] == [0, 1, 2, 3]


def test_eval_split_dev(split_files):
    s = load_splits(_cfg(split_files, eval_split="dev"))
    assert s.eval == s.dev
    s3 = load_splits(_cfg(split_files, eval_split="dev", eval_size=3), with_train=False)
    assert s3.eval == s.dev[:3]


@pytest.mark.parametrize("dev_size", [30, 31])
def test_dev_size_must_leave_training_rows(split_files, dev_size):
    with pytest.raises(ConfigError, match=rf"data\.dev_size: {dev_size} leaves no training rows out of 30"):
        load_splits(_cfg(split_files, dev_size=dev_size))


# ----------------------------------------------------------------------------- encoding


LONG = Example("do cats sleep during the day",
               "Cats are small animals that often sleep during the day." + " It is noted here." * 6, True, 3)
SHORT = Example("can penguins fly", "Penguins are birds that cannot fly but swim very well.", False, 4)


def _ids(tok, text):
    return tok(text, add_special_tokens=True)["input_ids"]


def test_long_passage_is_truncated_keeping_question_and_answer(tokenizer):
    full = _ids(tokenizer, prompt_text(LONG, "passage"))
    assert len(full) > 30
    enc = Encoder(tokenizer, "passage", 24).encode(LONG)
    assert enc.truncated is True
    assert len(enc.prompt) + max(len(a) for a in enc.answers) <= 24
    assert len(enc.prompt) >= 20  # the budget is used, not thrown away
    tail = tokenizer(f"\nQuestion: {LONG.question}?\nAnswer:", add_special_tokens=False)["input_ids"]
    assert enc.prompt[-len(tail):] == tail
    head = enc.prompt[:len(enc.prompt) - len(tail)]
    assert head == full[:len(head)]  # what is left of the passage is its beginning
    no, yes = (tokenizer(a.strip(), add_special_tokens=False)["input_ids"] for a in candidates("passage"))
    assert enc.answers == (no, yes) and enc.label == 1


def test_short_rows_are_untouched(tokenizer):
    enc = Encoder(tokenizer, "passage", 64).encode(SHORT)
    assert enc.truncated is False
    assert enc.prompt == _ids(tokenizer, prompt_text(SHORT, "passage"))
    assert enc.label == 0
    # exactly at the limit is still untouched
    exact = len(enc.prompt) + max(len(a) for a in enc.answers)
    assert Encoder(tokenizer, "passage", exact).encode(SHORT) == enc
    assert Encoder(tokenizer, "passage", exact - 1).encode(SHORT).truncated is True


def test_question_only_that_does_not_fit_raises(tokenizer):
    ex = Example("do cats sleep during the day", "", True, 9)
    ok = Encoder(tokenizer, "question-only", 256).encode(ex)
    assert ok.truncated is False and ok.answers[0] != ok.answers[1]
    with pytest.raises(DataError, match=r"row idx 9: .*data\.max_length=16"):
        Encoder(tokenizer, "question-only", 16).encode(ex)


def test_passage_format_without_room_for_the_question_raises(tokenizer):
    with pytest.raises(DataError, match=r"row idx 3: .*raise data\.max_length"):
        Encoder(tokenizer, "passage", 8).encode(LONG)


def test_too_long_question_names_file_line_and_fix(tokenizer, tmp_path):
    rows = [{"question": "is it", "answer": True}, {"question": "is it " + "very " * 40 + "long", "answer": False},
            {"question": "is it not", "answer": False}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    got = read_rows(path, need_passage=False)
    enc = Encoder(tokenizer, "question-only", 64)
    need = len(_ids(tokenizer, prompt_text(got[1], "question-only"))) + max(
        len(a) for a in enc.encode(got[0]).answers)  # the answers of the long row have the same length
    assert need > 64
    with pytest.raises(DataError) as e:
        encode_all(enc, got, "dev")
    assert str(e.value).startswith(f"{path}:2 (dev split): the question alone needs ")
    assert "more than data.max_length=64; raise data.max_length to at least" in str(e.value)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2: the question alone .* at least {need} or shorten that question$"):
        enc.encode(got[1])
    # the smallest length the message asks for is enough for every row
    at_least = int(str(e.value).split("at least ")[1].split()[0])
    assert at_least == need
    assert len(encode_all(Encoder(tokenizer, "question-only", at_least), got, "dev")) == 3
    with pytest.raises(DataError):
        encode_all(Encoder(tokenizer, "question-only", at_least - 1), got, "dev")


def test_passage_without_room_names_file_line(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [_row(question="is it"), _row(question=LONG.question, passage=LONG.passage)])
    got = read_rows(path)
    short = Encoder(tokenizer, "passage", 64).encode(got[0])
    fits = len(short.prompt) + max(len(a) for a in short.answers)  # row 1 fits exactly; row 2's question is longer
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:2 \(eval split\): question and answer need more "
                                        rf"than data\.max_length={fits} tokens; raise data\.max_length to at least \d+$") as e:
        encode_all(Encoder(tokenizer, "passage", fits), got, "eval")
    at_least = int(str(e.value).rsplit(" ", 1)[1])
    assert at_least > fits
    encoded = encode_all(Encoder(tokenizer, "passage", at_least), got, "eval")  # the length asked for is enough
    assert encoded[1].truncated and len(encoded[1].prompt) + max(len(a) for a in encoded[1].answers) <= at_least


def test_encode_all_encodes_every_row_in_order(tokenizer, tmp_path):
    got = read_rows(write_jsonl(tmp_path / "t.jsonl", boolq_rows(5)))
    enc = Encoder(tokenizer, "passage", 64)
    assert encode_all(enc, got, "train") == [enc.encode(x) for x in got]
    assert [e.label for e in encode_all(enc, got, "train")] == [int(x.label) for x in got]
    assert encode_all(enc, [], "train") == []


# ----------------------------------------------------------------------------- batches


def test_train_batch_by_hand():
    a = Encoded(prompt=[5, 6, 7], answers=([20], [21, 22]), label=1, truncated=False)
    b = Encoded(prompt=[8, 9, 10, 11, 12], answers=([30], [31]), label=0, truncated=False)
    batch = train_batch([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 5, 6, 7, 21, 22], [8, 9, 10, 11, 12, 30]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]
    assert int(batch["logits_to_keep"]) == 3
    # kept logits at positions 3, 4, 5 predict tokens 4, 5; only answer tokens are targets
    assert batch["targets"].tolist() == [[21, 22], [-100, 30]]
    assert batch["prompt_start"].tolist() == [1, 0] and batch["prompt_len"].tolist() == [3, 5]


def test_train_batch_with_real_rows(tokenizer):
    enc = Encoder(tokenizer, "passage", 64)
    rows = [Example(r["question"], r["passage"], r["label"], r["idx"]) for r in boolq_rows(6)]
    items = [enc.encode(r) for r in rows]
    pad = tokenizer.pad_token_id
    batch = train_batch(items, pad)
    ids, mask, targets = batch["input_ids"], batch["attention_mask"], batch["targets"]
    width, keep = ids.shape[1], int(batch["logits_to_keep"])
    assert targets.shape == (len(items), keep - 1)
    for i, e in enumerate(items):
        ans = e.answers[e.label]
        n = len(e.prompt) + len(ans)
        assert ids[i, width - n:].tolist() == e.prompt + ans  # left padding: the row ends at the last position
        assert ids[i, :width - n].eq(pad).all() and mask[i, :width - n].eq(0).all() and mask[i, width - n:].eq(1).all()
        answer_start = int(batch["prompt_start"][i] + batch["prompt_len"][i])
        assert answer_start == width - len(ans)
        assert int(batch["prompt_start"][i]) == width - n
        row_t = targets[i].tolist()
        assert row_t[len(row_t) - len(ans):] == ans and set(row_t[:len(row_t) - len(ans)]) <= {-100}
        pos = batch["position_ids"][i]
        assert pos[width - n:].tolist() == list(range(n))
    p = prompt_batch([e.prompt for e in items], pad)
    assert (p["prompt_start"] + p["prompt_len"]).eq(p["input_ids"].shape[1]).all()


def test_bucket_batches_cover_each_index_once_and_are_deterministic():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 200, (403,), generator=g).tolist()
    bb = BucketBatches(lengths, batch_size=8, seed=5, pool=10)
    assert len(bb) == 51
    for epoch in (0, 1, 2):
        batches = bb.epoch(epoch)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(403)) and len(batches) == 51
        assert all(1 <= len(b) <= 8 for b in batches)
    assert bb.epoch(0) == BucketBatches(lengths, 8, seed=5, pool=10).epoch(0)
    assert bb.epoch(0) != bb.epoch(1)
    assert bb.epoch(0) != BucketBatches(lengths, 8, seed=6, pool=10).epoch(0)
    plain = BucketBatches(lengths, 8, seed=5, bucketing=False)
    assert sorted(i for b in plain.epoch(0) for i in b) == list(range(403))

    def spread(batches):
        return statistics.mean(max(lengths[i] for i in b) / min(lengths[i] for i in b) for b in batches)

    for epoch in (0, 1):
        assert spread(plain.epoch(epoch)) > 3 * spread(bb.epoch(epoch))
    # one pool covering the whole epoch sorts every row: consecutive lengths only
    whole = BucketBatches(lengths, 8, seed=5, pool=100).epoch(0)
    assert sorted(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in whole)[-1] <= 8


def test_iterate_over_fractional_totals():
    bb = BucketBatches(list(range(1, 21)), batch_size=4, seed=0)  # 5 batches per epoch
    got = list(bb.iterate(12))  # 2.4 epochs
    assert len(got) == 12
    assert [e for e, _ in got] == [0] * 5 + [1] * 5 + [2] * 2
    assert [b for _, b in got[:5]] == bb.epoch(0)
    assert [b for _, b in got[5:10]] == bb.epoch(1)
    assert [b for _, b in got[10:]] == bb.epoch(2)[:2]
    assert [b for _, b in bb.iterate(3, start_epoch=1)] == bb.epoch(1)[:3]
    assert list(bb.iterate(0)) == []


def test_majority_label():
    def ex(label):
        return Example("q", "p", label, 0)

    assert majority_label([ex(True), ex(True), ex(False)]) is True
    assert majority_label([ex(False), ex(False), ex(True)]) is False
    assert majority_label([ex(False), ex(True)]) is True  # ties: yes
    assert majority_label([ex(False)]) is False
