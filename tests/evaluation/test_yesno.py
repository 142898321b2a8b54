"""Tests for scoring and the training loss against naive, unbatched, unpadded references on the tiny
random Llama, plus the Wilson interval and accuracy counting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from heft.config.schema import PositionsConfig, ReftConfig
from heft.data.rows import read_rows
from heft.data.tokens import Encoded, Encoder, train_batch
from heft.evaluation.evaluate import accuracy
from heft.evaluation.yesno import score, single_token_split
from heft.evaluation.stats import wilson_interval
from heft.methods.model import decoder_layers, hidden_size
from heft.methods.reft import ReftModel
from heft.training.runtime import Runtime, model_forward
from heft.training.loop import answer_loss

CPU = Runtime(torch.device("cpu"))


@pytest.fixture
def tiny(tiny_model_dir):
    """(fresh frozen model, tokenizer) from the fixture folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def examples(boolq_files):
    return read_rows(boolq_files[1])[:7]


def with_reft(model: nn.Module) -> ReftModel:
    """ReFT on every layer, 2 first + 2 last prompt positions, seeded random (non-identity) weights."""
    reft = ReftModel(model, ReftConfig(rank=2, positions=PositionsConfig(first=2, last=2)), decoder_layers(model),
                     hidden_size(model))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(reft.interventions.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return reft.eval()


@torch.no_grad()
def full_logits(model: nn.Module, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """(T, V) logits of prompt + answer alone: no padding, no batch, every position, edits on the prompt only."""
    ids = torch.tensor([prompt + answer])
    if isinstance(model, ReftModel):
        return model(ids, torch.tensor([0]), torch.tensor([len(prompt)])).logits[0].float()
    return model(input_ids=ids).logits[0].float()


def naive_lp(model: nn.Module, prompt: list[int], answer: list[int]) -> float:
    """sum_j log p(answer_j | prompt, answer_<j) from one plain full forward pass."""
    logp = torch.log_softmax(full_logits(model, prompt, answer), dim=-1)
    return sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(answer))


def check_against_naive(model: nn.Module, rows: list[Encoded], batch_size: int, pad_id: int) -> None:
    got = score(model, rows, batch_size=batch_size, pad_id=pad_id, rt=CPU)
    assert len(got) == len(rows)
    for i, (row, out) in enumerate(zip(rows, got)):
        lp_no, lp_yes = (naive_lp(model, row.prompt, a) for a in row.answers)
        assert out["lp_no"] == pytest.approx(lp_no, abs=1e-4), f"row {i}"
        assert out["lp_yes"] == pytest.approx(lp_yes, abs=1e-4), f"row {i}"
        assert out["pred"] == (lp_yes > lp_no)
        assert out["p_yes"] == pytest.approx(1 / (1 + math.exp(lp_no - lp_yes)), abs=1e-5)
        assert out["label"] == bool(row.label)


def multi_token(rows: list[Encoded], tok) -> list[Encoded]:
    """The same prompts with answers of several tokens that differ before their last token."""
    choices = [("no , false", "yes true"), ("no . it is false", "yes , it is true ."), ("false", "the answer is true")]
    out = []
    for i, r in enumerate(rows):
        no, yes = (tok(t, add_special_tokens=False)["input_ids"] for t in choices[i % len(choices)])
        out.append(Encoded(r.prompt, (no, yes), r.label, r.truncated))
    return out


# ----------------------------------------------------------------------------- score vs a naive reference


@pytest.mark.parametrize("reft", [False, True], ids=["base", "reft"])
def test_score_single_token_path_equals_naive(tiny, examples, reft):
    model, tok = tiny
    rows = [Encoder(tok, "passage", 64).encode(e) for e in examples]
    assert all(single_token_split(r) is not None for r in rows)  # ` no` / ` yes`: the fast path
    assert len({len(r.prompt) for r in rows}) > 2  # different lengths, so batches are padded
    check_against_naive(with_reft(model) if reft else model, rows, batch_size=3, pad_id=tok.pad_token_id)


@pytest.mark.parametrize("reft", [False, True], ids=["base", "reft"])
def test_score_multi_token_path_equals_naive(tiny, examples, reft):
    model, tok = tiny
    rows = multi_token([Encoder(tok, "passage", 64).encode(e) for e in examples], tok)
    assert all(single_token_split(r) is None for r in rows)  # the general path
    assert len({len(a) for r in rows for a in r.answers}) > 2
    check_against_naive(with_reft(model) if reft else model, rows, batch_size=3, pad_id=tok.pad_token_id)


@pytest.mark.parametrize("reft", [False, True], ids=["base", "reft"])
def test_score_shared_answer_prefix_equals_naive(tiny, examples, reft):
    """`question-only` answers share `the correct answer is` and differ in the last token.

    The fast path scores only the deciding token, so only the difference lp_yes - lp_no is comparable
    with the full sums; with ReFT the edited positions must be the prompt's, as in training.
    """
    model, tok = tiny
    rows = [Encoder(tok, "question-only", 128).encode(e) for e in examples]
    assert all(single_token_split(r) is not None and len(r.answers[0]) > 1 for r in rows)
    m = with_reft(model) if reft else model
    got = score(m, rows, batch_size=3, pad_id=tok.pad_token_id, rt=CPU)
    for i, (row, out) in enumerate(zip(rows, got)):
        lp_no, lp_yes = (naive_lp(m, row.prompt, a) for a in row.answers)
        assert out["lp_yes"] - out["lp_no"] == pytest.approx(lp_yes - lp_no, abs=1e-4), f"row {i}"
        assert out["pred"] == (lp_yes > lp_no)


# ----------------------------------------------------------------------------- Wilson interval and accuracy


def test_wilson_interval_known_values():
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(81, 100) == pytest.approx((0.7222, 0.8749), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_accuracy_counts_unparsed_predictions_as_wrong():
    preds = [{"pred": True, "label": True}, {"pred": None, "label": False}, {"pred": False, "label": False},
             {"pred": None, "label": True}, {"pred": True, "label": False}]
    acc = accuracy(preds)
    assert (acc["correct"], acc["n"]) == (2, 5)
    assert acc["accuracy"] == pytest.approx(0.4)
    assert acc["ci95"] == pytest.approx(list(wilson_interval(2, 5)))
    assert accuracy([]) == {"accuracy": 0.0, "ci95": [0.0, 1.0], "n": 0, "correct": 0}


# ----------------------------------------------------------------------------- the training loss


@pytest.mark.parametrize("reft", [False, True], ids=["base", "reft"])
def test_answer_loss_equals_naive_cross_entropy(tiny, examples, reft):
    model, tok = tiny
    rows = multi_token([Encoder(tok, "passage", 64).encode(e) for e in examples[:5]], tok)
    rows = [Encoded(r.prompt, r.answers, i % 2, False) for i, r in enumerate(rows)]  # both labels
    assert len({len(r.prompt) for r in rows}) > 2 and len({len(r.answers[r.label]) for r in rows}) > 2
    m = with_reft(model) if reft else model

    batch = train_batch(rows, tok.pad_token_id)
    keep = int(batch.pop("logits_to_keep"))
    assert keep == 1 + max(len(r.answers[r.label]) for r in rows)
    assert int((batch["targets"] != -100).sum()) == sum(len(r.answers[r.label]) for r in rows)
    with torch.no_grad():
        loss = answer_loss(model_forward(m, batch, keep), batch["targets"])

    token_nll = []  # every answer token of every example, each example alone and unpadded
    for r in rows:
        answer = r.answers[r.label]
        logits = full_logits(m, r.prompt, answer)
        token_nll.append(F.cross_entropy(logits[len(r.prompt) - 1:-1], torch.tensor(answer), reduction="none"))
    naive = torch.cat(token_nll).mean()
    assert float(loss) == pytest.approx(float(naive), abs=1e-5)
    assert float(loss) > 1.0  # a random model: the loss is far from zero


def test_head_logits_are_fp32_under_bf16_autocast(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from heft.methods.model import fp32_output_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 9, 12, 7]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        coarse = model(input_ids=ids, logits_to_keep=1).logits
    fp32_output_head(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = model.model(input_ids=ids).last_hidden_state[:, -1:]
        fine = model(input_ids=ids, logits_to_keep=1).logits
    assert coarse.dtype == torch.bfloat16 and fine.dtype == torch.float32
    expected = hidden.float() @ model.lm_head.weight.float().T
    assert torch.equal(fine, expected)
    assert len(torch.unique(fine)) > len(torch.unique(coarse.float()))  # finer resolution, fewer ties
