"""The Python API (heft.load / score / generate / train) on the tiny model: the same numbers as the run's own
evaluation, HF-style calls with the ReFT edits on each row's prompt, batches equal to one row at a time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config, write_jsonl

import heft

ROWS = [{"question": f"Question: {q} ?\nAnswer:", "choices": c, "label": y} for q, c, y in [
    ("do cats sleep", ["yes", "no", "cats sleep"], 2),
    ("do bees make honey", ["no", "honey", "bees make honey", "yes"], 2),
    ("can penguins fly", ["yes", "no", "penguins cannot fly"], 2),
    ("is the sky blue", ["no", "yes", "the sky is blue", "false"], 1),
    ("do snakes have legs", ["legs", "no", "snakes have no legs"], 2),
    ("is paris the capital of france", ["no", "paris", "paris is the capital"], 2),
]] * 2


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """LoRA then ReFT (HEFT) on local multiple-choice rows, trained through heft.train."""
    root = tmp_path_factory.mktemp("api")
    files = (write_jsonl(root / "train.jsonl", ROWS), write_jsonl(root / "eval.jsonl", ROWS[:6]))
    cfg = tiny_config(tiny_model_dir, files, [{"method": "lora", "epochs": 1, "batch_size": 4},
                                               {"method": "reft", "epochs": 1, "batch_size": 4}],
                      data={"format": "multiple_choice", "dev_size": 0})
    out = heft.train(cfg, root / "run")
    assert out == root / "run" and (out / "metrics.json").is_file()
    return out


def test_score_equals_the_runs_own_evaluation(run):
    model, tok = heft.load(run)
    saved = [json.loads(x) for x in (run / "predictions.jsonl").read_text().splitlines()]
    got = heft.score(model, tok, [r["question"] for r in ROWS[:6]], [r["choices"] for r in ROWS[:6]], batch_size=5)
    for g, s in zip(got, saved):
        assert g["pred"] == s["pred"] and g["pred_norm"] == s["pred_norm"]
        assert g["lls"] == pytest.approx(s["lls"], abs=1e-5)


def test_forward_puts_the_edits_on_each_rows_prompt(run):
    """A plain HF-style forward on a left-padded batch: logits equal each row run alone (its prompt = its tokens)."""
    model, tok = heft.load(run)
    assert model.reft is not None
    texts = ["Question: do cats sleep ?", "Question: is the sky blue over the desert ?"]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        together = model(**batch).logits
        for i, text in enumerate(texts):
            alone = model(**tok([text], return_tensors="pt")).logits[0]
            n = alone.shape[0]
            torch.testing.assert_close(together[i, -n:], alone, atol=1e-5, rtol=1e-4)
        plain = model.reft.model(**tok([texts[0]], return_tensors="pt")).logits[0]
    assert not torch.allclose(plain, model(**tok([texts[0]], return_tensors="pt")).logits[0])  # the edits are on


def test_generate_in_batches_equals_one_at_a_time(run):
    model, tok = heft.load(run)
    prompts = ["Question: do cats sleep ?\nAnswer:", "Question: can penguins fly over the river in winter ?\nAnswer:",
               "Question: is it ?\nAnswer:"]
    together = heft.generate(model, tok, prompts, max_new_tokens=5, batch_size=3)
    alone = [heft.generate(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert together == alone
    ids = tok([prompts[0]], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)  # the HF way
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == alone[0]


def test_import_heft_stays_light():
    code = "import sys, heft; assert 'torch' not in sys.modules; print(callable(heft.load))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"


def test_api_names_survive_the_subpackages():
    """`heft.train`, `heft.load`, `heft.score`, `heft.generate` stay the API functions once heft's subpackages are
    imported (a subpackage named like one of them would replace the attribute on import)."""
    import importlib
    import pkgutil

    import heft
    import heft.api

    for info in pkgutil.walk_packages(heft.__path__, "heft."):
        if info.ispkg:
            importlib.import_module(info.name)
    for name in ("train", "load", "score", "generate"):
        assert getattr(heft, name) is getattr(heft.api, name), name
