"""Tests for heft.methods.reft: the intervention math, positions, hooks, generation, saving, LoRA merging and
decoder-layer discovery. Tiny random models only, fixed non-identity inits, real numbers checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from heft.config.schema import LoraConfig, PositionsConfig, ReftConfig
from heft.config.load import from_dict
from heft.data.tokens import prompt_batch
from heft.errors import CheckpointError, ConfigError
from heft.methods.lora import attach
from heft.methods.model import decoder_layers, hidden_size
from heft.methods.reft import REFT_WEIGHTS, DiReFT, LoReFT, ReftModel, no_decay_names, prompt_positions
from heft.training.runtime import model_forward
from heft.training.loop import param_groups

from conftest import tiny_config

D = 64  # hidden size of the fixture model


# ----------------------------------------------------------------------------- helpers


def load_tiny(folder: Path) -> nn.Module:
    """A fresh, frozen copy of the fixture Llama (hooks and adapters never leak between tests)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.requires_grad_(False)
    return model.eval()


def make_reft(model: nn.Module, seed: int = 0, scale: float = 0.5, **fields) -> ReftModel:
    """A ReftModel with every intervention tensor set to seeded random values (never the identity init)."""
    fields.setdefault("positions", PositionsConfig(first=2, last=2))
    fields.setdefault("rank", 2)
    reft = ReftModel(model, ReftConfig(**fields), decoder_layers(model), hidden_size(model))
    randomize(reft.interventions, seed, scale)
    return reft.eval()


@torch.no_grad()
def randomize(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _, p in sorted(module.named_parameters()):
        p.copy_(torch.randn(p.shape, generator=gen) * scale)


PROMPTS = [[5, 17, 9, 30, 41, 12, 8, 23, 60, 7], [11, 4, 19, 33, 52], [70, 3, 44]]  # lengths 10, 5, 3


def logits_of(model: nn.Module, prompts: list[list[int]], keep: int = 0) -> torch.Tensor:
    """Logits (B, T or keep, V) of a left-padded prompt batch, through heft's `model_forward`."""
    with torch.no_grad():
        return model_forward(model, prompt_batch(prompts, pad_id=1), keep)


def selected(groups: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    """Per example, the sorted list of valid positions over all groups (duplicates kept, to detect them)."""
    batch = next(iter(groups.values()))[0].shape[0]
    out: list[list[int]] = [[] for _ in range(batch)]
    for idx, valid in groups.values():
        for b in range(batch):
            out[b] += idx[b][valid[b]].tolist()
    return [sorted(x) for x in out]


# ----------------------------------------------------------------------------- 1. the math


def test_loreft_noreft_direft_match_the_formulas():
    torch.manual_seed(0)
    h = torch.randn(3, 5, 16)  # (B, T, d)

    lo = LoReFT(16, 4, init="identity")
    randomize(lo, seed=1)  # W, b and the raw rotation all random: rotation is NOT orthonormal now
    R = lo.R()
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
    assert not torch.allclose(R, lo.rotation)  # LoReFT orthonormalises the raw matrix
    expected = h + (h @ lo.weight.T + lo.bias - h @ R.T) @ R
    assert torch.allclose(lo(h), expected, atol=1e-5)
    assert (lo(h) - h).abs().max() > 0.1

    no = LoReFT(16, 4, init="identity", orthogonal=False)
    randomize(no, seed=2)
    assert torch.equal(no.R(), no.rotation)  # NoReFT uses the raw matrix
    A = no.rotation
    expected = h + (h @ no.weight.T + no.bias - h @ A.T) @ A
    assert torch.allclose(no(h), expected, atol=1e-5)

    di = DiReFT(16, 4, init="identity")
    randomize(di, seed=3)
    expected = h + (h @ di.weight.T + di.bias) @ di.up  # h + W2^T (W1 h + b), row-vector form
    assert torch.allclose(di(h), expected, atol=1e-5)
    assert (di(h) - h).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["loreft", "noreft", "direft"])
def test_identity_init_edits_nothing_and_random_init_does(kind):
    """`init: identity` promises an exactly zero edit (so a finished LoRA stage stays intact)."""
    torch.manual_seed(0)
    h = torch.randn(2, 7, D)

    def build(init: str) -> nn.Module:
        return DiReFT(D, 4, init) if kind == "direft" else LoReFT(D, 4, init, orthogonal=kind == "loreft")

    for seed in range(5):
        torch.manual_seed(seed)
        ident = build("identity")
        worst = ident.delta(h).abs().max().item()
        assert worst == 0.0, f"{kind} identity init (seed {seed}): max |edit| = {worst:.3g}, expected exactly 0"
        assert torch.equal(ident(h), h)
    torch.manual_seed(0)
    assert build("random").delta(h).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["loreft", "noreft", "direft"])
def test_relative_offset_is_b_times_the_state_rms_and_scales_with_the_state(kind):
    """`reft.offset: relative`: the input-independent term is b * rms(h), so the whole edit is homogeneous in h
    (a model whose states are 40x larger gets a 40x larger edit from the same parameters); `absolute` is not."""
    torch.manual_seed(0)
    h = torch.randn(2, 5, D)

    def build(offset: str) -> nn.Module:
        torch.manual_seed(3)
        m = DiReFT(D, 4, "identity", offset=offset) if kind == "direft" else LoReFT(D, 4, "identity", orthogonal=kind == "loreft", offset=offset)
        randomize(m, seed=4)
        return m

    rel, ab = build("relative"), build("absolute")
    rms = h.pow(2).mean(-1, keepdim=True).sqrt()
    if kind == "direft":
        expected = (h @ rel.weight.T + rel.bias * rms) @ rel.up
    else:
        R = rel.R()
        expected = (h @ rel.weight.T + rel.bias * rms - h @ R.T) @ R
    assert torch.allclose(rel.delta(h), expected, atol=1e-5)
    assert torch.allclose(rel.delta(40 * h), 40 * rel.delta(h), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ab.delta(40 * h), 40 * ab.delta(h), rtol=1e-2, atol=1e-2)
    zero = LoReFT(D, 4, "identity", offset="relative") if kind != "direft" else DiReFT(D, 4, "identity", offset="relative")
    assert zero.delta(h).abs().max().item() == 0.0  # identity init still edits nothing


def test_saved_offset_wins_over_the_config_and_old_folders_mean_absolute(tiny_model_dir, tmp_path):
    """The weights were trained with one offset: loading them under a config with the other (or a folder
    written before the field existed, which means `absolute`) uses the saved one, so outputs are unchanged."""
    import json

    cfg = dict(layers=(0, 2), kind="loreft", rank=3)
    reft = make_reft(load_tiny(tiny_model_dir), seed=7, offset="relative", **cfg)
    reft.save(tmp_path / "reft")
    want = logits_of(reft, PROMPTS)
    other = load_tiny(tiny_model_dir)
    fresh = ReftModel(other, ReftConfig(positions=PositionsConfig(2, 2), offset="absolute", **cfg), decoder_layers(other), D)
    fresh.load_weights(tmp_path / "reft")
    assert torch.equal(logits_of(fresh, PROMPTS), want)

    meta_path = tmp_path / "reft" / "reft_config.json"
    meta = json.loads(meta_path.read_text())
    del meta["offset"]  # as heft wrote it before the field existed
    meta_path.write_text(json.dumps(meta))
    third = load_tiny(tiny_model_dir)
    again = ReftModel(third, ReftConfig(positions=PositionsConfig(2, 2), offset="relative", **cfg), decoder_layers(third), D)
    again.load_weights(tmp_path / "reft")
    assert all(not m.relative for m in again.interventions.values())


# ----------------------------------------------------------------------------- 2. R stays orthonormal


@pytest.mark.parametrize("weight_decay", [0.1, 0.0])
def test_rotation_stays_orthonormal_under_adamw(weight_decay):
    torch.manual_seed(0)
    m = LoReFT(32, 4, init="random")
    h, target = torch.randn(8, 6, 32), torch.randn(8, 6, 32)
    # Weight decay on every tensor, the rotation included: the hardest case for the constraint.
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=weight_decay)
    R0 = m.R().detach().clone()
    for _ in range(20):
        loss = (m(h) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert m.rotation.grad is not None and m.rotation.grad.abs().max() > 0
        opt.step()
        R = m.R().detach()
        assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)
        assert R.abs().max() > 0.1
    assert (m.R().detach() - R0).abs().max() > 1e-2  # R actually trained


def test_no_decay_names_are_rotations_and_biases(tiny_model_dir):
    reft = make_reft(load_tiny(tiny_model_dir), layers=(0, 3))
    names = {n for n, _ in reft.interventions.named_parameters()}
    assert len(names) == 2 * 2 * 3  # 2 layers x (first, last) x (rotation, weight, bias)
    expected = {n for n in names if n.endswith((".rotation", ".bias"))}
    assert no_decay_names(reft.interventions) == expected
    assert len(expected) == 8 and all(not n.endswith(".weight") for n in expected)
    assert no_decay_names(DiReFT(8, 2)) == {"bias"}

    named = list(reft.interventions.named_parameters())
    decay, rest = param_groups(named, 0.1, no_decay_names(reft.interventions))
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 4
    assert rest["weight_decay"] == 0.0 and {id(p) for p in rest["params"]} == {id(p) for n, p in named if n in expected}


# ----------------------------------------------------------------------------- 3. hooks come off cleanly


def test_remove_restores_outputs_bit_for_bit(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    before = logits_of(model, PROMPTS)
    reft = make_reft(model)
    with_reft = logits_of(reft, PROMPTS)
    assert (with_reft - before).abs().max() > 1e-2
    assert reft.remove() is model
    assert torch.equal(logits_of(model, PROMPTS), before)
    assert not any(layer._forward_hooks for layer in decoder_layers(model))


# ----------------------------------------------------------------------------- 4. positions


def _pos(starts, lens, first, last):
    return prompt_positions(torch.tensor(starts), torch.tensor(lens), PositionsConfig(first=first, last=last))


@pytest.mark.parametrize(
    "starts, lens, first, last, expected",
    [
        # left padding, width 10: prompts end at position 9
        ([4, 7], [6, 3], 2, 2, [[4, 5, 8, 9], [7, 8, 9]]),
        # right padding: prompts start at 0 (answers and pads follow)
        ([0, 0], [6, 3], 2, 2, [[0, 1, 4, 5], [0, 1, 2]]),
        # prompt shorter than first + last: the last group keeps its tokens, the first gets the rest
        ([2], [3], 3, 2, [[2, 3, 4]]),
        ([0], [4], 7, 7, [[0, 1, 2, 3]]),
        # empty and one-token prompts
        ([5], [0], 2, 2, [[]]),
        ([5], [1], 2, 2, [[5]]),
        ([5], [1], 2, 0, [[5]]),
        # only one group
        ([3], [6], 0, 2, [[7, 8]]),
        ([3], [6], 2, 0, [[3, 4]]),
        # a batch with different lengths and starts
        ([0, 3, 8, 9], [10, 7, 2, 1], 3, 2, [[0, 1, 2, 8, 9], [3, 4, 5, 8, 9], [8, 9], [9]]),
    ],
)
def test_prompt_positions_by_hand(starts, lens, first, last, expected):
    groups = _pos(starts, lens, first, last)
    assert set(groups) == {g for g, n in (("first", first), ("last", last)) if n > 0}
    for g, n in (("first", first), ("last", last)):
        if n:
            idx, valid = groups[g]
            assert idx.shape == valid.shape == (len(starts), n)
            assert torch.all(idx[~valid] == 0)  # invalid slots point at 0 (masked out)
    got = selected(groups)
    assert got == expected
    for b, positions in enumerate(got):
        assert len(set(positions)) == len(positions)  # no position twice
        assert all(starts[b] <= p < starts[b] + lens[b] for p in positions)  # nothing outside the prompt


def test_prompt_positions_exact_tensors_for_a_short_prompt():
    first_idx, first_valid = _pos([7], [3], 2, 2)["first"]
    last_idx, last_valid = _pos([7], [3], 2, 2)["last"]
    assert first_idx.tolist() == [[7, 0]] and first_valid.tolist() == [[True, False]]
    assert last_idx.tolist() == [[8, 9]] and last_valid.tolist() == [[True, True]]


def test_edits_land_exactly_on_the_selected_positions(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    layers = decoder_layers(model)
    reft = make_reft(model, layers=(1,), positions=PositionsConfig(first=2, last=3))
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    for i in (0, 1):  # registered after ReftModel's hook, so it sees the edited output
        layers[i].register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[0] if isinstance(out, tuple) else out))
    batch = prompt_batch(PROMPTS, pad_id=1)  # left-padded to width 10
    with torch.no_grad():
        edited = reft(batch["input_ids"], batch["prompt_start"], batch["prompt_len"],
                      attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"]).logits
    (h1_edit, h1_plain), (h0_edit, h0_plain) = seen[1], seen[0]
    assert torch.equal(h0_edit, h0_plain)  # the layer below is untouched
    changed = (h1_edit - h1_plain).abs().amax(-1) > 0  # (B, T)
    # lengths 10, 5, 3 at width 10; first 2 + last 3 prompt tokens
    want = [[0, 1, 7, 8, 9], [5, 6, 7, 8, 9], [7, 8, 9]]
    assert [torch.nonzero(row).flatten().tolist() for row in changed] == want
    # Downstream, a causal model sees the edit only from the first edited position on.
    diff = (edited - plain).abs().amax(-1) > 0
    assert [int(torch.nonzero(row)[0]) for row in diff] == [0, 5, 7]


@pytest.mark.parametrize("kind,offset,tied", [("loreft", "absolute", False), ("noreft", "absolute", False),
                                               ("direft", "relative", False), ("loreft", "relative", True)])
def test_fused_edits_equal_each_intervention_alone_with_gradients(tiny_model_dir, kind, offset, tied):
    """ReftModel edits a layer with one low-rank map for all its position groups (and every R from one batched
    QR); that equals applying each group's intervention module on its own positions, one row at a time:
    outputs and every parameter's gradient."""
    model = load_tiny(tiny_model_dir)
    reft = make_reft(model, kind=kind, offset=offset, tied=tied, layers=(0, 2), positions=PositionsConfig(first=2, last=3))
    batch = prompt_batch(PROMPTS, pad_id=1)
    kw = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"])

    def run(forward) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        reft.interventions.zero_grad(set_to_none=True)
        logits = forward()
        (logits[:, -1].float().logsumexp(-1).sum() + logits[:, -3:].float().pow(2).mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in reft.interventions.named_parameters()}

    fused, fused_grads = run(lambda: reft(batch["input_ids"], batch["prompt_start"], batch["prompt_len"], **kw).logits)

    groups = prompt_positions(batch["prompt_start"], batch["prompt_len"], reft.cfg.positions)
    base = reft.remove()

    def by_hand(layer: int):
        def hook(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).clone()
            for g, (idx, valid) in groups.items():
                name = f"L{layer}_{'both' if tied else g}"
                for b in range(h.shape[0]):
                    for j in range(idx.shape[1]):
                        if valid[b, j]:
                            p = int(idx[b, j])
                            h[b, p] = reft.interventions[name](h[b, p].clone()[None])[0]
            return (h, *output[1:]) if isinstance(output, tuple) else h
        return hook

    handles = [decoder_layers(base)[i].register_forward_hook(by_hand(i)) for i in (0, 2)]
    plain, plain_grads = run(lambda: base(input_ids=batch["input_ids"], **kw).logits)
    for h in handles:
        h.remove()
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    assert fused_grads.keys() == plain_grads.keys()
    for n in fused_grads:
        torch.testing.assert_close(fused_grads[n], plain_grads[n], atol=1e-5, rtol=1e-4, msg=lambda m, n=n: f"{n}: {m}")
    assert max(g.abs().max() for g in fused_grads.values()) > 1e-3  # the check has gradients to compare


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir):
    """The edits (and the per-pass factors they share) survive activation checkpointing's recomputation."""
    grads = []
    for checkpointing in (False, True):
        model = load_tiny(tiny_model_dir)
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        reft = make_reft(model).train()
        batch = prompt_batch(PROMPTS, pad_id=1)
        logits = reft(batch["input_ids"], batch["prompt_start"], batch["prompt_len"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], use_cache=False).logits
        logits[:, -1].logsumexp(-1).sum().backward()
        grads.append({n: p.grad for n, p in reft.interventions.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


# ----------------------------------------------------------------------------- 5. padding


def test_left_padded_batch_equals_each_prompt_alone(tiny_model_dir):
    reft = make_reft(load_tiny(tiny_model_dir), positions=PositionsConfig(first=2, last=2))
    batched = logits_of(reft, PROMPTS, keep=1)[:, -1]  # rows 1 and 2 are left-padded
    for i, p in enumerate(PROMPTS):
        alone = logits_of(reft, [p], keep=1)[0, -1]
        assert torch.allclose(batched[i], alone, atol=1e-5), f"prompt {i}: {(batched[i] - alone).abs().max():.3g}"
    assert (batched[1] - logits_of(reft.model, [PROMPTS[1]], keep=1)[0, -1]).abs().max() > 1e-2  # ReFT matters


# ----------------------------------------------------------------------------- 6. generation


def test_generate_edits_only_the_prompt_pass(tiny_model_dir):
    reft = make_reft(load_tiny(tiny_model_dir), scale=1.0)
    calls: list[tuple[int, ...]] = []
    original_edit = reft._edit

    def watched(layer, h, ctx):  # layer 3's edits: the batch, the last group's positions, the hidden size
        if layer == 3:
            a, b = ctx.slices[-1]
            calls.append((h.shape[0], b - a, h.shape[-1]))
        return original_edit(layer, h, ctx)

    reft._edit = watched
    b = prompt_batch(PROMPTS, pad_id=1)  # left-padded, as heft's `generate` builds it
    new = 5
    out = reft.generate(b["input_ids"], b["attention_mask"], b["prompt_start"], b["prompt_len"],
                        max_new_tokens=new, do_sample=False, pad_token_id=1)
    assert out.shape == (3, 10 + new)
    assert calls == [(3, 2, D)]  # one edited pass: the prompt

    # Reference: greedy decoding by hand without a cache, the prompt positions edited on every pass.
    seq, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        for _ in range(new):
            logits = reft(seq, b["prompt_start"], b["prompt_len"], attention_mask=mask,
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    assert torch.equal(out, seq)

    plain = reft.model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=new,
                                do_sample=False, pad_token_id=1)
    assert not torch.equal(plain, out)

    # A one-token prompt: every cached decoding pass has the prompt's length too, and still is not edited.
    calls.clear()
    one = torch.tensor([[PROMPTS[0][0]]])
    reft.generate(one, torch.ones_like(one), torch.tensor([0]), torch.tensor([1]), max_new_tokens=4,
                  do_sample=False, pad_token_id=1)
    assert calls == [(1, 2, D)]


# ----------------------------------------------------------------------------- 7. save and load


def test_save_then_load_gives_identical_logits(tiny_model_dir, tmp_path):
    cfg = dict(layers=(0, 2), kind="loreft", rank=3)
    reft = make_reft(load_tiny(tiny_model_dir), seed=7, **cfg)
    reft.save(tmp_path / "reft")
    want = logits_of(reft, PROMPTS)  # after save: saving consolidates R

    with safe_open(str(tmp_path / "reft" / REFT_WEIGHTS), "pt") as f:
        names = set(f.keys())
    assert names == {f"L{i}_{g}.{t}" for i in (0, 2) for g in ("first", "last") for t in ("rotation", "weight", "bias")}

    other = load_tiny(tiny_model_dir)
    fresh = ReftModel(other, ReftConfig(positions=PositionsConfig(2, 2), **cfg), decoder_layers(other), D)
    randomize(fresh.interventions, seed=99)
    assert not torch.allclose(logits_of(fresh, PROMPTS), want, atol=1e-3)
    fresh.load_weights(tmp_path / "reft")
    assert torch.equal(logits_of(fresh, PROMPTS), want)


def test_loading_checks_the_base_model_and_the_file(tiny_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ReftConfig(rank=2, layers=(0, 1), positions=PositionsConfig(2, 2))
    make_reft(load_tiny(tiny_model_dir), layers=(0, 1)).save(tmp_path / "ok")

    def tiny_llama(width: int, depth: int) -> nn.Module:
        return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=width, intermediate_size=64, num_hidden_layers=depth,
                                            num_attention_heads=4, num_key_value_heads=2))

    for width, depth, field in ((32, 4, "hidden_size"), (64, 2, "num_layers")):
        other = tiny_llama(width, depth)
        with pytest.raises(CheckpointError, match=field):
            ReftModel(other, cfg, decoder_layers(other), width).load_weights(tmp_path / "ok")

    data = (tmp_path / "ok" / REFT_WEIGHTS).read_bytes()
    for cut in (6, len(data) // 2, len(data) - 4):
        bad = tmp_path / f"cut{cut}"
        shutil.copytree(tmp_path / "ok", bad)
        (bad / REFT_WEIGHTS).write_bytes(data[:cut])
        model = load_tiny(tiny_model_dir)
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            ReftModel(model, cfg, decoder_layers(model), D).load_weights(bad)


def test_bad_rank_or_layers_raise_config_errors(tiny_model_dir, boolq_files):
    model = load_tiny(tiny_model_dir)
    with pytest.raises(ConfigError, match="reft.rank"):
        ReftModel(model, ReftConfig(rank=D + 1), decoder_layers(model), D)
    with pytest.raises(ConfigError, match=r"reft.layers: \[4\]"):
        ReftModel(model, ReftConfig(layers=(1, 4)), decoder_layers(model), D)
    assert not any(layer._forward_hooks for layer in decoder_layers(model))  # a failed attach leaves no hook
    with pytest.raises(ConfigError, match="reft.layers"):
        from_dict(tiny_config(tiny_model_dir, boolq_files, [{"method": "reft"}], reft={"layers": [-1]}))


# ----------------------------------------------------------------------------- 8. LoRA merged under ReFT


def test_merged_lora_plus_reft_equals_unmerged(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    base = logits_of(model, PROMPTS)
    peft_model = attach(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.eval()
    reft = make_reft(peft_model)
    with_lora = logits_of(reft.model, PROMPTS)
    assert (with_lora - base).abs().max() > 1e-2  # the adapter does something
    unmerged = logits_of(reft, PROMPTS)
    assert (unmerged - with_lora).abs().max() > 1e-2  # and so does ReFT

    reft.model = peft_model.merge_and_unload()
    merged = logits_of(reft, PROMPTS)
    assert torch.allclose(merged, unmerged, atol=1e-5), f"max diff {(merged - unmerged).abs().max():.3g}"


# ----------------------------------------------------------------------------- 9. decoder layers of many families


def _arch(name: str) -> nn.Module:
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if name == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=2, n_positions=64,
                                                bos_token_id=1, eos_token_id=2))
    if name == "opt":
        return tf.OPTForCausalLM(tf.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                              num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
                                              pad_token_id=0, bos_token_id=1, eos_token_id=2))
    config_cls, model_cls, extra = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16}),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
    }[name]
    return model_cls(config_cls(**common, **extra))


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt"]
LAYER_ATTR = {"gpt2": lambda m: m.transformer.h, "opt": lambda m: m.model.decoder.layers}


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_found_and_reft_runs(arch):
    model = _arch(arch).eval()
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers == 3
    assert layers is LAYER_ATTR.get(arch, lambda m: m.model.layers)(model)
    assert hidden_size(model) == 32

    ids = torch.tensor([[3, 9, 14, 5, 22, 7]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        reft = ReftModel(model, ReftConfig(rank=2, layers=(0, 2), positions=PositionsConfig(1, 2)), layers, 32)
        randomize(reft.interventions, seed=1)
        edited = reft(ids, torch.tensor([0]), torch.tensor([6])).logits
        assert (edited - before).abs().max() > 1e-3
        reft.remove()
        assert torch.equal(model(input_ids=ids).logits, before)


def test_decoder_layers_through_peft_and_layers_path(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    inner = model.model.layers
    peft_model = attach(model, LoraConfig(r=2, alpha=4, dropout=0.0))
    assert decoder_layers(peft_model) is inner and len(inner) == 4
    assert decoder_layers(peft_model, "model.layers") is inner
    with pytest.raises(ConfigError, match="model.layers_path"):
        decoder_layers(peft_model, "model.blocks")
    with pytest.raises(ConfigError, match="model.layers_path"):
        decoder_layers(peft_model, "model.embed_tokens")  # exists, but is not a list of layers


def test_unknown_architecture():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
            self.heads = nn.ModuleList([nn.Linear(4, 2), nn.ReLU()])

    toy = Toy()
    with pytest.raises(ConfigError, match="model.layers_path"):
        decoder_layers(toy)
    assert decoder_layers(toy, "blocks") is toy.blocks

    class ToyWithConfig(Toy):  # one ModuleList of identical blocks of the configured depth: accepted
        config = type("Cfg", (), {"num_hidden_layers": 3})()

    configured = ToyWithConfig()
    assert decoder_layers(configured) is configured.blocks


def test_saved_fp32_interventions_load_onto_a_bf16_model(tiny_model_dir, tmp_path):
    """Interventions saved from an fp32 run load onto the same base in bf16 and edit its bf16 stream."""
    from transformers import AutoModelForCausalLM

    from heft.config.schema import PositionsConfig, ReftConfig
    from heft.methods.model import decoder_layers, hidden_size
    from heft.methods.reft import ReftModel

    cfg = ReftConfig(rank=2, positions=PositionsConfig(2, 2), init="random")
    torch.manual_seed(3)
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ReftModel(fp32, cfg, decoder_layers(fp32), hidden_size(fp32)).save(tmp_path)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    ids = torch.tensor([[5, 9, 12, 7, 3, 8]])
    plain = bf16(input_ids=ids).logits
    reft = ReftModel(bf16, cfg, decoder_layers(bf16), hidden_size(bf16))
    reft.load_weights(tmp_path)
    edited = reft(ids, torch.tensor([0]), torch.tensor([6])).logits
    assert edited.dtype == plain.dtype == torch.bfloat16
    assert not torch.equal(edited, plain)
    assert all(p.dtype == torch.float32 for p in reft.interventions.parameters())  # kept in fp32


def test_generation_through_heft_loader_keeps_the_prompt_edits(tiny_model_dir):
    """heft's loader turns the model config's KV cache off (training); generation must turn it back on, or every
    step re-runs the whole sequence and the prompt-pass-only edits vanish after the first generated token."""
    from heft.config.schema import ModelConfig
    from heft.data.tokens import Encoded
    from heft.evaluation.generate import generate_texts
    from heft.methods.model import load_model
    from heft.training.runtime import Runtime

    model, tok = load_model(ModelConfig(name_or_path=str(tiny_model_dir), dtype="float32"), torch.device("cpu"))
    assert model.config.use_cache is False
    torch.manual_seed(0)
    reft = ReftModel(model, ReftConfig(rank=2, layers="all", positions=PositionsConfig(2, 2), init="random"),
                     decoder_layers(model), hidden_size(model))
    b = prompt_batch(PROMPTS, pad_id=tok.pad_token_id)
    want = reft.generate(b["input_ids"], b["attention_mask"], b["prompt_start"], b["prompt_len"], max_new_tokens=6,
                         do_sample=False, pad_token_id=tok.pad_token_id, use_cache=True)
    texts = generate_texts(reft, [Encoded(p, ([0],), 0, False) for p in PROMPTS], tok, batch_size=3, max_new_tokens=6,
                           rt=Runtime(torch.device("cpu")))
    assert texts == [tok.decode(s[b["input_ids"].shape[1]:], skip_special_tokens=True) for s in want]


# ----------------------------------------------------------------------------- hidden-state scale


def _scaled_copy(folder: Path, out: Path, c: float) -> Path:
    """The fixture model with every residual-stream state multiplied by c and the same logits: the embedding and
    each block's output projections (o_proj, down_proj) scaled by c, so each RMSNorm sees the same input. The
    situation of Gemma (states ~40x SmolLM2's) with everything else equal."""
    model = load_tiny(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(c)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(c)
            layer.mlp.down_proj.weight.mul_(c)
    model.save_pretrained(out)
    for f in folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("offset", ["relative", "absolute"])
def test_reft_trains_the_same_on_a_model_with_40x_larger_states(tiny_model_dir, boolq_files, tmp_path, offset):
    """With `reft.offset: relative` a ReFT stage is invariant to the scale of the hidden states:
    the same losses, gradient norms (so the same clipped steps) and predictions on a model whose states are 40x
    larger. Plain LoReFT (`absolute`) is not: its offset b moves a 40x larger state 40x less."""
    import json

    from heft.run.pipeline import train_run

    big = _scaled_copy(tiny_model_dir, tmp_path / "big", 40.0)
    stage = {"method": "reft", "epochs": 2, "lr": 2e-2, "batch_size": 8, "max_grad_norm": 1.0}
    runs = {}
    for name, folder in (("small", tiny_model_dir), ("big", big)):
        cfg = from_dict(tiny_config(folder, boolq_files, [stage], reft={"offset": offset}, seed=3))
        out = tmp_path / f"{offset}-{name}"
        train_run(cfg, out)
        log = [json.loads(x) for x in (out / "stages" / "00-reft" / "train_log.jsonl").read_text().splitlines()]
        preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
        runs[name] = (torch.tensor([r["loss"] for r in log]), torch.tensor([r["grad_norm"] for r in log]),
                      torch.tensor([p["p_yes"] for p in preds]))
    (loss_s, norm_s, p_s), (loss_b, norm_b, p_b) = runs["small"], runs["big"]
    if offset == "relative":
        assert torch.allclose(loss_s, loss_b, rtol=1e-3, atol=1e-4), (loss_s, loss_b)
        assert torch.allclose(norm_s, norm_b, rtol=1e-3, atol=1e-4)
        assert torch.allclose(p_s, p_b, atol=1e-3)
    else:
        assert not torch.allclose(loss_s, loss_b, rtol=1e-3, atol=1e-4)
