"""Tests for the routes of multiple-choice scoring that run each distinct context once (heft.choices): packed (the
context and all its choices in one sequence under a 4D mask) and cached (the choices after the context's
keys/values). Each equals the full route within 1e-5 in log-likelihoods, with identical predictions and greedy flags,
for base, LoRA and ReFT models, rows whose choices have different contexts, one- and multi-token choices, several
batch sizes, sdpa and eager attention and several architectures; each context runs once; the next route where one
cannot serve."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from torch import nn

from heft.choices import score_choices
from heft.kvcache import cache_field
from heft.config import LoraConfig, PositionsConfig, ReftConfig
from heft.lora import attach
from heft.model import decoder_layers, hidden_size
from heft.reft import ReftModel
from heft.runtime import Runtime
from heft.tokens import Encoded

from test_choices import CPU, FakeRuntime, make_rows, naive, one_thread, tiny  # noqa: F401 (fixtures)


def with_reft(model: nn.Module, first: int, last: int, first_from: str = "prompt") -> ReftModel:
    """LoReFT on every layer, seeded random weights scaled so the edits matter."""
    cfg = ReftConfig(rank=2, layers="all", positions=PositionsConfig(first, last, first_from=first_from), init="random")
    reft = ReftModel(model, cfg, decoder_layers(model), hidden_size(model))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(reft.interventions.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return reft.eval()


def with_lora(model: nn.Module) -> nn.Module:
    peft_model = attach(model, LoraConfig(r=2, alpha=4, dropout=0.0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return peft_model.eval()


def mixed_rows(rows: list[Encoded], skip: int = 0) -> list[Encoded]:
    """The rows again, some with per-choice contexts (lm-eval's split can differ by choice: here the last context
    token is dropped for odd choices, so two contexts per row), some sharing one context, `skip` content tokens."""
    out = []
    for i, r in enumerate(rows):
        if i % 2:
            prompts = tuple(r.prompt[:-1] if j % 2 else r.prompt for j in range(len(r.answers)))
            out.append(Encoded(prompts[r.label], r.answers, r.label, False, prompts, content_start=skip))
        else:
            out.append(Encoded(r.prompt, r.answers, r.label, False, content_start=skip))
    out.append(Encoded(rows[0].prompt, rows[1].answers, 0, False, content_start=skip))  # rows 0 and last: one context
    return out


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
    import heft.choices as choices

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


def _arch(name: str, **extra: Any) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if name == "gpt2":  # absolute positions: the choice pass's position ids must continue the context's
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0)
    config_cls, model_cls = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                             "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM)}[name]
    if name == "gemma3":
        extra = {"head_dim": 16, **extra}
    return model_cls(config_cls(**common, **extra)).eval()


def random_rows(n: int, seed: int = 0) -> list[Encoded]:
    """Rows of random ids (vocab 64, pad 0 unused): contexts of 3-12 tokens, 2-4 choices of 1-4 tokens."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randrange(3, 13))]
        answers = tuple([rng.randrange(1, 64) for _ in range(rng.randrange(1, 5))] for _ in range(rng.randrange(2, 5)))
        rows.append(Encoded(prompt, answers, i % len(answers), False))
    return mixed_rows(rows, skip=1)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2", "gemma3"])
def test_other_architectures(arch):
    model = _arch(arch)
    rows = random_rows(6)
    assert_same(model, rows, pad_id=0, batch_sizes=(1, 5))
    assert_same(with_reft(model, 2, 2, "content"), rows, pad_id=0, batch_sizes=(5,))


def test_short_sliding_window_takes_the_full_route():
    """Gemma 3's sliding-window layers keep only the window's last keys: longer sequences take the full route."""
    model = _arch("gemma3", sliding_window=4)
    rows = random_rows(4)
    with pytest.raises(ValueError, match="cache cannot be expanded"):
        score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU, route="cached")
    with pytest.raises(ValueError, match="sliding window of 4 tokens"):
        score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU, route="packed")
    got = score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU)
    full = score_choices(model, rows, None, batch_size=4, pad_id=0, rt=CPU, route="full")
    assert [g["lls"] for g in got] == [f["lls"] for f in full]
    roomy = _arch("gemma3", sliding_window=32)  # every sequence fits the window: packed and cached, same numbers
    assert_same(roomy, rows, pad_id=0, batch_sizes=(3,))


def test_eager_attention_takes_a_float_mask():
    """Eager attention adds the mask to the scores: the packed route hands it 0 / the dtype's minimum, not booleans."""
    for arch in ("qwen2", "gpt2"):
        model = _arch(arch)
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
