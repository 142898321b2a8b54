"""Tests for multiple-choice scoring (heft.choices) against a naive, unbatched, unpadded reference on the
tiny random Llama: log-likelihoods, acc / acc_norm as lm-eval computes them, ReFT edit positions, and
the split of sequences across processes."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from heft.choices import choice_accuracy, choose, log_norm, score_choices
from heft.config import PositionsConfig, ReftConfig
from heft.tokens import Encoded
from heft.errors import DataError
from heft.evaluate import wilson_interval
from heft.model import decoder_layers, hidden_size
from heft.reft import ReftModel
from heft.runtime import Runtime

from conftest import FACTS

CPU = Runtime(torch.device("cpu"))

# choices of 1 to 4 tokens in the fixture tokenizer's vocabulary; rows take 2, 3 or 4 of them
CHOICES = ["yes", "no", "it is true", "the answer is false", "false", "cats sleep", "true ."]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny model's ops are too small to share, and with more threads than free
    cores each op can stall for a second waiting for its threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny(tiny_model_dir):
    """(fresh frozen fp32 model in eval mode, tokenizer) from the fixture folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def make_rows(tok: Any, n: int) -> tuple[list[Encoded], list[list[str]]]:
    """`n` rows with prompts of different lengths and 2, 3 or 4 choices of 1-4 tokens; also the choice texts."""
    rows, texts = [], []
    for i in range(n):
        passage, question, _ = FACTS[i % len(FACTS)]
        prompt = tok(f"{passage} {'It is noted here .' * (i % 3)} Question : {question} ? Answer :")["input_ids"]
        k = 2 + i % 3
        choice_texts = [CHOICES[(i + j) % len(CHOICES)] for j in range(k)]  # lm-eval's doc_to_choice strings
        answers = tuple(tok(" " + t, add_special_tokens=False)["input_ids"] for t in choice_texts)
        rows.append(Encoded(prompt, answers, i % k, False))
        texts.append(choice_texts)
    assert len({len(r.prompt) for r in rows}) > 2 and {len(r.answers) for r in rows} == {2, 3, 4}
    assert {len(a) for r in rows for a in r.answers} == {1, 2, 3, 4}
    return rows, texts


def with_reft(model: nn.Module, first: int = 2, last: int = 2) -> ReftModel:
    """ReFT on every layer with seeded random (non-identity) weights, scaled up so the edits matter."""
    reft = ReftModel(model, ReftConfig(rank=2, layers="all", positions=PositionsConfig(first, last), init="random"),
                     decoder_layers(model), hidden_size(model))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(reft.interventions.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return reft.eval()


@torch.no_grad()
def naive(model: nn.Module, prompt: list[int], choice: list[int], edited: int | None = None) -> tuple[float, bool]:
    """(sum of log p(choice tokens | prompt), every choice token the argmax) from one unpadded full pass.

    ReFT edits the first `edited` tokens as the prompt (default: the prompt itself)."""
    ids = torch.tensor([prompt + choice])
    if isinstance(model, ReftModel):
        logits = model(ids, torch.tensor([0]), torch.tensor([len(prompt) if edited is None else edited])).logits[0]
    else:
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)[len(prompt) - 1:-1]  # (len(choice), V)
    target = torch.tensor(choice)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("reft", [False, True], ids=["base", "reft"])
def test_lls_equal_naive(tiny, reft):
    model, tok = tiny
    rows, texts = make_rows(tok, 6)
    m = with_reft(model) if reft else model
    chars = [[len(t) for t in ts] for ts in texts]
    ref = [[naive(m, row.prompt, a) for a in row.answers] for row in rows]
    for batch_size in (1, 7):  # one sequence a pass; several rows' choices of different lengths in a pass
        got = score_choices(m, rows, chars, batch_size=batch_size, pad_id=tok.pad_token_id, rt=CPU)
        assert len(got) == len(rows)
        for i, (row, r, out) in enumerate(zip(rows, ref, got)):
            where = f"row {i}, batch_size {batch_size}"
            assert len(out["lls"]) == len(out["greedy"]) == len(row.answers), where
            assert out["lls"] == pytest.approx([ll for ll, _ in r], abs=1e-5), where
            assert out["greedy"] == [g for _, g in r], where
            assert out["label"] == row.label
            assert out["pred"] == choose([ll for ll, _ in r])
            assert out["pred_norm"] == choose(out["lls"], chars[i])
        assert min(ll for o in got for ll in o["lls"]) < -10  # a random model: real, far-from-zero numbers


def test_reft_edits_only_prompt_positions(tiny):
    """Edits on the prompt give the naive lls; the same edits reaching into the choice tokens would not,
    and without edits the lls differ too, so the exactness test above pins the ReFT positions."""
    model, tok = tiny
    rows, _ = make_rows(tok, 4)
    base = score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU)
    reft = with_reft(model)
    got = score_choices(reft, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU)
    for row, b, out in zip(rows, base, got):
        for a, ll_base, ll in zip(row.answers, b["lls"], out["lls"]):
            assert ll == pytest.approx(naive(reft, row.prompt, a)[0], abs=1e-5)
            assert abs(ll - ll_base) > 1e-3  # the edits change the scores
            if len(a) >= 2:  # editing the choice's own tokens changes its later tokens' log-probs
                assert abs(ll - naive(reft, row.prompt, a, edited=len(row.prompt) + len(a))[0]) > 1e-3


def test_every_choice_sees_the_same_edited_context(tiny):
    """With only the last prompt token edited, the first choice token's log-prob is the same in every
    sequence of a row: one context, edited once, whatever follows it."""
    model, tok = tiny
    reft = with_reft(model, first=0, last=1)
    prompt = tok("Cats are small animals . Question : do cats sleep ? Answer :")["input_ids"]
    yes = tok(" yes", add_special_tokens=False)["input_ids"]
    answers = tuple(yes + tok(t, add_special_tokens=False)["input_ids"] for t in ("", " true", " it is true"))
    row = Encoded(prompt, answers, 0, False)
    (out,) = score_choices(reft, [row], None, batch_size=3, pad_id=tok.pad_token_id, rt=CPU)
    one = naive(reft, prompt, yes)[0]
    assert out["lls"][0] == pytest.approx(one, abs=1e-5)
    assert all(ll < one for ll in out["lls"][1:])  # longer choices add negative log-probs to the same start
    assert one != pytest.approx(naive(model, prompt, yes)[0], abs=1e-3)  # the edit matters


# ----------------------------------------------------------------------------- acc and acc_norm


def test_choose_follows_lm_eval():
    # acc: argmax ll; acc_norm: argmax ll / characters, so a longer text is penalised less per character
    lls, chars = [-4.0, -6.0, -9.0], [4, 12, 9]  # ll/chars = -1.0, -0.5, -1.0
    assert choose(lls) == 0
    assert choose(lls, chars) == 1
    assert choose([-3.0, -2.0, -2.0]) == 1  # ties: the first maximum, as numpy's argmax
    assert choose([-2.0, -4.0], [1, 2]) == 0  # -2.0 vs -2.0: first
    assert choose([-1.0, float("nan"), float("nan")]) == 1  # numpy's argmax returns the first NaN
    assert choose([-5.0]) == 0


def test_pred_norm_divides_by_caller_characters(tiny):
    """Giving the worst choice a huge character count makes it acc_norm's pick; acc keeps the argmax."""
    model, tok = tiny
    rows, _ = make_rows(tok, 3)
    plain = score_choices(model, rows, None, batch_size=8, pad_id=tok.pad_token_id, rt=CPU)
    assert all(o["pred_norm"] is None for o in plain)
    worst = [min(range(len(o["lls"])), key=o["lls"].__getitem__) for o in plain]
    chars = [[10**6 if j == w else 1 for j in range(len(r.answers))] for r, w in zip(rows, worst)]
    got = score_choices(model, rows, chars, batch_size=8, pad_id=tok.pad_token_id, rt=CPU)
    for o, p, w in zip(got, plain, worst):
        assert o["lls"] == p["lls"]
        assert o["pred"] == max(range(len(o["lls"])), key=o["lls"].__getitem__) != w
        assert o["pred_norm"] == w


def test_choice_accuracy_counts():
    preds = [{"label": 0, "pred": 0, "pred_norm": 1}, {"label": 2, "pred": 2, "pred_norm": 2},
             {"label": 1, "pred": 0, "pred_norm": 1}, {"label": 3, "pred": 1, "pred_norm": 0}]
    acc = choice_accuracy(preds)
    assert acc == {"accuracy": 0.5, "acc_norm": 0.5, "n": 4, "correct": 2, "correct_norm": 2,
                   "ci95": pytest.approx(list(wilson_interval(2, 4)))}
    no_norm = choice_accuracy([{**p, "pred_norm": None} for p in preds])
    assert no_norm["acc_norm"] is None and no_norm["correct_norm"] is None and no_norm["correct"] == 2
    assert choice_accuracy([])["n"] == 0


# ----------------------------------------------------------------------------- bad input and processes


def test_bad_rows_are_named(tiny):
    model, tok = tiny
    rows, _ = make_rows(tok, 3)
    kw = dict(batch_size=2, pad_id=tok.pad_token_id, rt=CPU)
    with pytest.raises(DataError, match=r"row 1: label 7 is not one of its 3 choices \(0\.\.2\)"):
        score_choices(model, [rows[0], Encoded(rows[1].prompt, rows[1].answers, 7, False)], None, **kw)
    with pytest.raises(DataError, match=r"row 0: every choice needs at least one token"):
        score_choices(model, [Encoded(rows[0].prompt, ([5], []), 0, False)], None, **kw)
    with pytest.raises(DataError, match=r"choice_chars\[2\]: \[3, 4\]; give 4 positive character counts"):
        score_choices(model, rows, [[1, 2], [1, 2, 3], [3, 4]], **kw)


class _Stop(Exception):
    pass


class FakeRuntime(Runtime):
    """Process `rank` of two on CPU; `gather_objects` hands over what the other process gave."""

    def __init__(self, rank: int, exchange: dict[int, list[Any]]):
        super().__init__(torch.device("cpu"), accelerator=SimpleNamespace(num_processes=2, process_index=rank))
        self.rank, self.exchange = rank, exchange

    def gather_objects(self, items: list[Any]) -> list[Any]:
        self.exchange[self.rank] = items
        if 1 - self.rank not in self.exchange:
            raise _Stop  # the first process to arrive: its share is recorded, the other one merges
        return self.exchange[0] + self.exchange[1]


def test_two_processes_score_disjoint_shares_and_agree(tiny):
    model, tok = tiny
    rows, texts = make_rows(tok, 5)
    chars = [[len(t) for t in ts] for ts in texts]
    kw = dict(batch_size=3, pad_id=tok.pad_token_id)
    single = score_choices(model, rows, chars, rt=CPU, **kw)
    exchange: dict[int, list[Any]] = {}
    with pytest.raises(_Stop):
        score_choices(model, rows, chars, rt=FakeRuntime(1, exchange), **kw)
    merged = score_choices(model, rows, chars, rt=FakeRuntime(0, exchange), **kw)
    n_seqs = sum(len(r.answers) for r in rows)
    shares = [{i for i, _ in exchange[r]} for r in (0, 1)]
    assert not shares[0] & shares[1] and len(shares[0] | shares[1]) == n_seqs
    assert abs(len(shares[0]) - len(shares[1])) <= 1
    for a, b in zip(merged, single):
        assert a["lls"] == pytest.approx(b["lls"], abs=1e-5)
        assert (a["pred"], a["pred_norm"], a["label"], a["greedy"]) == (b["pred"], b["pred_norm"], b["label"], b["greedy"])
    assert not any(math.isnan(ll) for o in merged for ll in o["lls"])


@pytest.mark.parametrize("rows", [0, 1, 15, 16, 17, 40])
def test_log_norm_equals_logsumexp_and_argmax_across_chunk_edges(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 301, generator=g) * 8
    if rows > 3:
        x[1, 7] = x[1, 200] = x[1].max() + 1  # a tie: the first maximum wins, as argmax
        x[2] = float("-inf")  # nothing finite: logsumexp gives -inf, not NaN
        x[3, 5] = float("inf")
    lse, best = log_norm(x)
    assert lse.shape == best.shape == (rows,)
    torch.testing.assert_close(lse, torch.logsumexp(x, -1), rtol=1e-6, atol=1e-5, equal_nan=True)
    assert torch.equal(best, x.argmax(-1))
    if rows > 3:
        assert best[1] == 7 and lse[2] == float("-inf") and lse[3] == float("inf")
