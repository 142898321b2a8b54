"""Chat runs (`data.format: chat`) end to end on the tiny Llama with a chat template: `heft predict`, `heft.generate`,
`heft.score` and the lm-eval bridge give a request the prompt the run trained and evaluated on (the template's own
ids with its trailing newline, the system message the run's rows share, ReFT's first group from the user's content),
so they answer as the run's own evaluation did."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml
from conftest import FACTS, tiny_config, write_jsonl
from helpers import chat_model_dir

from heft import api
from heft.cli import main
from heft.data.rows import Example, parse_general
from heft.data.tokens import Encoded, PromptFormat
from heft.evaluation.choices import score_choices
from heft.evaluation.generate import generate_texts

pytestmark = pytest.mark.usefixtures("one_thread")

SYSTEM = "Please answer the question with yes or no ."
QUESTIONS = [q for _, q, _ in FACTS]


def _row(question: str, answer: bool) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question},
                         {"role": "assistant", "content": "yes" if answer else "no"}]}


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory) -> Path:
    """LoRA then ReFT (first group from the user's content) on chat rows that share a system message."""
    root = tmp_path_factory.mktemp("chat")
    rows = [_row(q, a) for _, q, a in FACTS]
    files = (write_jsonl(root / "train.jsonl", rows * 2), write_jsonl(root / "eval.jsonl", rows))
    cfg = tiny_config(chat_model_dir(tiny_model_dir, root / "model"), files,
                      [{"method": "lora", "epochs": 2, "lr": 5e-3, "batch_size": 4},
                       {"method": "reft", "epochs": 1, "batch_size": 4}],
                      data={"format": "chat", "dev_size": 0}, eval={"max_new_tokens": 4},
                      reft={"positions": {"first": 2, "last": 2, "first_from": "content"}})
    return api.train(cfg, root / "run")


def _saved_texts(run: Path) -> list[str]:
    return [json.loads(x)["text"] for x in (run / "predictions.jsonl").read_text().splitlines()]


def test_the_run_folder_records_its_prompt_format(chat_run):
    meta = json.loads((chat_run / "meta.json").read_text())
    assert meta["prompt"] == {"format": "chat", "system": SYSTEM, "mixed_system": False}
    model, _ = api.load(chat_run)
    assert model.prompt == PromptFormat("chat", SYSTEM)


def test_predict_answers_as_the_runs_own_evaluation(chat_run, capsys):
    saved = _saved_texts(chat_run)
    assert all(saved)  # the trained run answers every row with text (an empty answer would prove nothing)
    for i in (0, 4):
        for flags in ([], ["--generate"]):
            assert main(["predict", str(chat_run), "--question", QUESTIONS[i], *flags]) == 0
            assert capsys.readouterr().out == saved[i] + "\n"
    model, tok = api.load(chat_run)
    assert main(["predict", str(chat_run), "--question", QUESTIONS[0], "--choices", "yes", "no"]) == 0
    (best,) = api.score(model, tok, QUESTIONS[:1], [["yes", "no"]])
    marks = [line[0] for line in capsys.readouterr().out.splitlines()]
    assert marks == ["*" if k == best["pred"] else " " for k in range(2)]
    assert main(["predict", str(chat_run), "--question", QUESTIONS[0], "--system", ""]) == 0  # no system message
    model.prompt = model.prompt.with_system("")
    assert "Instruction" not in tok.convert_ids_to_tokens(model.encode(QUESTIONS[0]).prompt)
    assert capsys.readouterr().out == api.generate(model, tok, QUESTIONS[:1], max_new_tokens=4)[0] + "\n"


def test_generate_and_score_use_the_runs_prompt(chat_run):
    """heft.generate on text and on messages equals the run's evaluation; the prompt and ReFT's start equal the
    run's own encoding of that row; a raw prompt (no template) answers differently, so the equality is no accident."""
    model, tok = api.load(chat_run)
    saved = _saved_texts(chat_run)
    assert api.generate(model, tok, QUESTIONS, max_new_tokens=4, batch_size=5) == saved
    user = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    with_system = [[{"role": "system", "content": SYSTEM}, *m] for m in user]
    assert api.generate(model, tok, messages=user, max_new_tokens=4) == saved[:3]
    assert api.generate(model, tok, messages=with_system, max_new_tokens=4) == saved[:3]
    enc = model.session.encoder()
    for (_, q, a), m in zip(FACTS, user):
        row = enc.encode(parse_general(_row(q, a), "eval.jsonl", "chat", "local"))
        got = model.encode(m)
        assert got.prompt == row.prompt and got.content_start == row.content_start > 0
    raw = [enc.encode(Example("", "", 0, 0, context=q, target="", gold="", delimiter="")) for q in QUESTIONS]
    assert generate_texts(model.top, raw, tok, batch_size=16, max_new_tokens=4, rt=model.session.rt) != saved
    # scoring: each choice is the assistant's whole turn, as the run trained on its answers
    choices = [["yes", "no"]] * 3
    got = api.score(model, tok, messages=user, choices=choices)
    assert got == api.score(model, tok, QUESTIONS[:3], choices)
    trained = [[enc.encode(parse_general(_row(q, a), "train.jsonl", "chat", "local")) for a in (True, False)]
               for q in QUESTIONS[:3]]  # the rows the run trained on, answered yes and no
    rows = [Encoded(y.prompt, (y.answers[0], n.answers[0]), 0, False, content_start=y.content_start) for y, n in trained]
    ref = score_choices(model.top, rows, None, batch_size=1, pad_id=tok.pad_token_id, rt=model.session.rt)
    for g, r in zip(got, ref):
        assert g["lls"] == pytest.approx(r["lls"], abs=1e-5)


def test_a_folder_without_a_recorded_prompt_format_warns(chat_run, caplog):
    with caplog.at_level(logging.WARNING, logger="heft.api"):
        assert api.run_prompt({}, "chat", chat_run) == PromptFormat("chat")
    assert "written before heft recorded the system message of its chat rows" in caplog.text
    assert api.run_prompt({}, "completion", chat_run) == PromptFormat("completion")


def test_lm_eval_renders_the_runs_chat_prompt(chat_run, tmp_path, caplog):
    """The bridge's chat prompt is the run's (system message added, template ids kept with their newline), so lm-eval's
    chat-templated generation answers as the run's evaluation; `heft lm-eval` turns the template on for a chat run."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from heft.evaluation.harness import HeftLM

    lm = HeftLM(run=str(chat_run), batch_size=4)
    model, _ = api.load(chat_run)
    saved = _saved_texts(chat_run)
    texts = [lm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS[:3]]
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(t, {"max_gen_toks": 4}), idx=0,
                     metadata=("t", i, 1)) for i, t in enumerate(texts)]
    assert lm.generate_until(reqs) == saved[:3]
    e = lm.encode_request(texts[0], "yes")
    want = model.encode(QUESTIONS[0])
    assert e.prompt == want.prompt and e.content_start == want.content_start
    assert e.answers == ([lm.tokenizer.convert_tokens_to_ids("yes")],)
    with caplog.at_level(logging.WARNING, logger="heft.evaluation.harness"):
        lm.encode_request(QUESTIONS[0], " yes")  # plain text: lm-eval without --apply_chat_template
    assert "trained on chat prompts (data.format: chat), but lm-eval sent a context without its chat template" \
        in caplog.text

    data = write_jsonl(tmp_path / "chat.jsonl", [{"question": q, "answer": "yes" if a else "no"} for _, q, a in FACTS])
    (tmp_path / "task.yaml").write_text(yaml.safe_dump({
        "task": "heft_chat_local", "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "output_type": "generate_until", "validation_split": "validation", "doc_to_text": "{{question}}",
        "doc_to_target": "{{answer}}", "generation_kwargs": {"until": ["\n\n"], "max_gen_toks": 4, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    out = tmp_path / "results.json"
    assert main(["lm-eval", str(chat_run), "--tasks", "heft_chat_local", "--include-path", str(tmp_path),
                 "--output", str(out)]) == 0
    samples = sorted(json.loads(out.read_text())["samples"]["heft_chat_local"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == saved
