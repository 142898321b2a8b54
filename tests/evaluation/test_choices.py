"""Tests for multiple-choice scoring (heft.evaluation.choices) against a naive, unbatched, unpadded reference on the
tiny random Llama: log-likelihoods, acc / acc_norm as lm-eval computes them, ReFT edit positions, and
the split of sequences across processes.

Also the routes of multiple-choice scoring that run each distinct context once: packed (the
context and all its choices in one sequence under a 4D mask) and cached (the choices after the context's
keys/values). Each equals the full route within 1e-5 in log-likelihoods, with identical predictions and greedy flags,
for base, LoRA and ReFT models, rows whose choices have different contexts, one- and multi-token choices, several
batch sizes, sdpa and eager attention and several architectures; each context runs once; the next route where one
cannot serve."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from heft.evaluation.choices import choice_accuracy, choose, log_norm, score_choices
from heft.reuse.kv import cache_field
from heft.data.tokens import Encoded
from heft.errors import DataError
from heft.evaluation.stats import wilson_interval

from helpers import CPU, FakeRuntime, _Stop, make_rows, mixed_rows, naive, random_rows, tiny_arch, with_lora, with_reft

pytestmark = pytest.mark.usefixtures("one_thread")


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


# ----------------------------------------------------------------------------- routes that run each context once


def assert_same(model: nn.Module, rows: list[Encoded], pad_id: int, batch_sizes=(1, 3, 50),
                routes=("cached", "packed")) -> list[dict[str, Any]]:
    chars = [[1 + (i + j) % 5 for j in range(len(r.answers))] for i, r in enumerate(rows)]
    full = score_choices(model, rows, chars, batch_size=8, pad_id=pad_id, rt=CPU, route="full")
    for route, bs in [(r, b) for r in routes for b in batch_sizes]:
        got = score_choices(model, rows, chars, batch_size=bs, pad_id=pad_id, rt=CPU, route=route)
        for i, (a, b) in enumerate(zip(got, full)):
            where = f"row {i}, {route} route, batch_size {bs}"
            assert a["lls"] == pytest.approx(b["lls"], abs=1e-5), where
            assert (a["pred"], a["pred_norm"], a["greedy"], a["label"]) == (b["pred"], b["pred_norm"], b["greedy"], b["label"]), where
    assert min(ll for o in full for ll in o["lls"]) < -5  # a random model: real, far-from-zero numbers
    return full


# ----------------------------------------------------------------------------- the tiny Llama


@pytest.mark.parametrize("kind", ["base", "lora", "reft-first-last", "reft-last", "reft-first", "lora+reft"])
@pytest.mark.parametrize("skip", [0, 2], ids=["first_from-prompt", "first_from-content"])
def test_cached_equals_full(tiny, kind, skip):
    model, tok = tiny
    if "lora" in kind:
        model = with_lora(model)
    first, last = {"reft-last": (0, 1), "reft-first": (3, 0)}.get(kind, (2, 2))
    m = with_reft(model, first, last, "content" if skip else "prompt") if "reft" in kind else model
    rows, _ = make_rows(tok, 7)
    full = assert_same(m, mixed_rows(rows, skip), tok.pad_token_id)
    if "reft" in kind:  # the edits matter, so the numbers above pin their positions
        base = score_choices(model, mixed_rows(rows, skip), None, batch_size=8, pad_id=tok.pad_token_id, rt=CPU)
        assert max(abs(x - y) for a, b in zip(full, base) for x, y in zip(a["lls"], b["lls"])) > 1e-3


def test_cached_equals_naive_with_reft(tiny):
    """Against one unpadded pass per (prompt + choice), ReFT editing exactly the prompt."""
    model, tok = tiny
    reft = with_reft(model, 2, 2)
    rows, _ = make_rows(tok, 5)
    got = score_choices(reft, rows, None, batch_size=6, pad_id=tok.pad_token_id, rt=CPU, route="cached")
    for row, out in zip(rows, got):
        ref = [naive(reft, row.prompt, a) for a in row.answers]
        assert out["lls"] == pytest.approx([ll for ll, _ in ref], abs=1e-5)
        assert out["greedy"] == [g for _, g in ref]


def test_choice_pass_is_not_edited_when_its_length_equals_the_context(tiny):
    """ReftModel's hooks match a pass by its length: a choice pass as long as the context must still go unedited."""
    model, tok = tiny
    reft = with_reft(model, 1, 2)
    prompt = tok("Cats sleep .")["input_ids"]
    choice = tok(" it is true .", add_special_tokens=False)["input_ids"]
    assert len(choice) - 1 == len(prompt)  # the choice pass's width is the context pass's
    row = Encoded(prompt, (choice, choice[:2]), 0, False)
    (out,) = score_choices(reft, [row], None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route="cached")
    assert out["lls"][0] == pytest.approx(naive(reft, prompt, choice)[0], abs=1e-5)
    edited_too = naive(reft, prompt, choice, edited=len(prompt) + len(choice))[0]
    assert abs(out["lls"][0] - edited_too) > 1e-3


def test_one_token_choices_only(tiny):
    """No choice pass at all: every score comes from the context's last logits."""
    model, tok = tiny
    rows, _ = make_rows(tok, 6)
    one = [Encoded(r.prompt, tuple(a[:1] for a in r.answers), r.label, False) for r in rows]
    assert_same(model, one, tok.pad_token_id, batch_sizes=(1, 4))
    assert_same(with_reft(model, 2, 2), one, tok.pad_token_id, batch_sizes=(4,))


def test_each_context_runs_once(tiny):
    model, tok = tiny
    rows = mixed_rows(make_rows(tok, 6)[0])
    distinct = {(tuple(r.prompt_for(j)), r.content_start) for r in rows for j in range(len(r.answers))}
    assert len(distinct) < sum(len(r.answers) for r in rows)
    ran = []

    def count(module, args, kwargs):
        if kwargs.get("cache") is None and kwargs.get("past_key_values") is None:
            ran.extend(kwargs["input_ids"].tolist())

    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route="cached")
        contexts = [tuple(t for t in ids if t != tok.pad_token_id) for ids in ran]
        assert sorted(contexts) == sorted(ids for ids, _ in distinct)
        ran.clear()
        score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route="packed")
    finally:
        handle.remove()
    # packed: one sequence per distinct context, the context followed by all its choices
    groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for r in rows:
        for j, a in enumerate(r.answers):
            groups.setdefault(tuple(r.prompt_for(j)), []).append(tuple(a[:-1]))  # the last token is not run
    want = sorted(ctx + sum(groups[ctx], ()) for ctx in {ids for ids, _ in distinct})
    assert sorted(tuple(t for t in ids if t != tok.pad_token_id) for ids in ran) == want


def test_packed_passes_stay_within_the_mask_budget(tiny, monkeypatch):
    """With a mask budget of two longest contexts' worth, a batch_size that would take every context in one pass
    takes several, each within the budget, and the scores are the full route's."""
    import heft.evaluation.choices as choices

    model, tok = tiny
    rows = make_rows(tok, 6)[0]
    longest = max(len(r.prompt) + sum(len(a) - 1 for a in r.answers) for r in rows)
    monkeypatch.setattr(choices, "MASK_CELLS", 2 * longest ** 2)
    assert_same(model, rows, tok.pad_token_id, batch_sizes=(50,), routes=("packed",))
    shapes = []
    handle = model.register_forward_pre_hook(lambda m, a, k: shapes.append(tuple(k["input_ids"].shape)),
                                             with_kwargs=True)
    try:
        score_choices(model, rows, None, batch_size=50, pad_id=tok.pad_token_id, rt=CPU, route="packed")
    finally:
        handle.remove()
    assert len(shapes) > 1 and sum(b for b, _ in shapes) == len(rows)  # without the budget: one pass of all 6
    assert all(b * w * w <= 2 * longest ** 2 for b, w in shapes)


# ----------------------------------------------------------------------------- choosing the route


def test_full_route_under_several_processes(tiny):
    model, tok = tiny
    rows, _ = make_rows(tok, 3)
    for route in ("cached", "packed"):
        with pytest.raises(ValueError, match="one process without FSDP; use route=None"):
            score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=FakeRuntime(0, {}), route=route)


def test_full_route_when_the_cache_cannot_be_expanded(tiny, monkeypatch):
    """A model that returns no cache (or one of another kind) is scored by the full route, with the same numbers."""
    model, tok = tiny
    rows, _ = make_rows(tok, 4)
    expected = score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route="full")

    class NoCache(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: Any) -> Any:
            out = self.inner(**kwargs)
            setattr(out, cache_field(), None)
            return out

    wrapped = NoCache(model)
    got = score_choices(wrapped, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route=None)
    assert [ll for g in got for ll in g["lls"]] == pytest.approx([ll for e in expected for ll in e["lls"]], abs=1e-5)
    with pytest.raises(ValueError, match="cache cannot be expanded"):
        score_choices(wrapped, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route="cached")


# ----------------------------------------------------------------------------- other architectures


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma3"])
def test_other_architectures(arch):
    model = tiny_arch(arch)
    rows = random_rows(6)
    assert_same(model, rows, pad_id=0, batch_sizes=(1, 5))
    assert_same(with_reft(model, 2, 2, "content"), rows, pad_id=0, batch_sizes=(5,))


def test_short_sliding_window_takes_the_full_route():
    """Gemma 3's sliding-window layers keep only the window's last keys: longer sequences take the full route."""
    model = tiny_arch("gemma3", sliding_window=4)
    rows = random_rows(4)
    with pytest.raises(ValueError, match="cache cannot be expanded"):
        score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU, route="cached")
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU, route="packed")
    got = score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU)
    full = score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU, route="full")
    assert [g["lls"] for g in got] == [f["lls"] for f in full]
    roomy = tiny_arch("gemma3", sliding_window=32)  # every sequence fits the window: packed and cached, same numbers
    assert_same(roomy, rows, pad_id=0, batch_sizes=(3,))


def test_eager_attention_takes_a_float_mask():
    """Eager attention adds the mask to the scores: the packed route hands it 0 / the dtype's minimum, not booleans."""
    for arch in ("qwen2", "gpt2"):
        model = tiny_arch(arch)
        model.config._attn_implementation = "eager"
        rows = random_rows(5, seed=1)
        assert_same(model, rows, pad_id=0, batch_sizes=(4,), routes=("packed",))


def test_packed_route_is_refused_where_the_mask_would_not_be_read(tiny):
    model, tok = tiny
    rows, _ = make_rows(tok, 3)
    expected = score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route="full")
    impl = model.config._attn_implementation
    model.config._attn_implementation = "flash_attention_2"  # only the check reads it: no pass runs packed
    try:
        with pytest.raises(ValueError, match="attention implementation 'flash_attention_2'"):
            score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU, route="packed")
    finally:
        model.config._attn_implementation = impl
    got = score_choices(model, rows, None, batch_size=4, pad_id=tok.pad_token_id, rt=CPU)  # packed, automatically
    assert [ll for g in got for ll in g["lls"]] == pytest.approx([ll for e in expected for ll in e["lls"]], abs=1e-5)
