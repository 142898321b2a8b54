"""Multiple-choice scoring by log-likelihood, as lm-evaluation-harness 0.4.x scores `multiple_choice` tasks.

For a row with context c and choices a_1..a_N (token ids after the prompt), each choice's score is

    ll_j = sum_t log p(a_j,t | c, a_j,<t)

and the harness's two accuracies are

    acc       pred      = argmax_j ll_j
    acc_norm  pred_norm = argmax_j ll_j / chars_j      chars_j: characters of choice j's *text*

(the harness's `completion_len`: `len()` of each `doc_to_choice` string, without the space it puts
between context and choice), ties going to the first maximum (numpy's argmax). `greedy` says whether
every choice token is the model's argmax (the harness's `is_greedy`).

Three routes give the same numbers (within floating-point rounding) and are chosen automatically, the first
that can run:

- packed (one process, transformers' sdpa or eager attention, no sliding window shorter than a packed sequence):
  each distinct context runs once, in one sequence with all its choices after it. A 4D attention mask lets each
  choice token see the context and the earlier tokens of its own choice only, and the choices' position ids
  continue the context's, so every choice is scored exactly as if it followed the context alone. No padding
  between choices, no cache to copy, a choice's last token is not run (it predicts nothing scored), and the
  vocabulary head runs only at the positions that predict a choice token. ReFT edits the context's prompt
  positions (the ReftModel's prompt_start/prompt_len). A batch holds whole contexts with at most `batch_size`
  choices between them, left-padded, longest first, and at most 16 M cells of attention mask (contexts x width^2).
- cached (one process, a model whose keys/values cache can be expanded): each distinct context (the same
  token ids and content start; with lm-eval's tokenization the choices of one row may have different
  context ids) runs once, left-padded with other contexts into a batch, keeping its keys and values. The
  logits of its last position score every choice's first token; the cache is then expanded to the
  context's choices (`Cache.reorder_cache`) and one pass over the choice tokens alone, right-padded,
  scores the rest. ReFT edits go on the context pass only (through the ReftModel, which edits that pass's
  prompt positions); the choice pass runs through the model underneath, whose hooks find no edit to make.
  A batch holds whole contexts with at most `batch_size` choices between them (at least one context).
- full (several processes, FSDP, caches that cannot be expanded, or `route="full"`): every (prompt + choice)
  sequence is scored in one forward pass: sequences of all rows and all choices are sorted by length and
  batched together, left-padded by `heft.data.tokens.train_batch`, so only the logits of the last (longest
  choice + 1) positions are computed. ReFT edits go on the prompt positions only (train_batch's
  `prompt_start`/`prompt_len`), so every choice of a row sees the same edited context, as in training.
  Under several processes each scores an interleaved share of the sequences and the log-likelihoods are
  gathered; under FSDP the shares are padded so every process runs the same passes.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from heft.training import sharding
from heft.data.tokens import Encoded, prompt_batch, train_batch
from heft.errors import DataError
from heft.reuse.kv import cache_field, regroupable
from heft.methods.reft import ReftModel
from heft.training.runtime import Runtime, gather_rows, model_forward, share_rows
from heft.evaluation.stats import wilson_interval

logger = logging.getLogger(__name__)


def choose(lls: Sequence[float], chars: Sequence[int] | None = None) -> int:
    """The index of the best choice: argmax of `lls`, or of `lls / chars` (acc_norm); first maximum wins.

    Same answer as lm-eval's `np.argmax(lls)` / `np.argmax(lls / completion_len)`, NaN included (numpy
    returns the first NaN)."""
    values = [ll / c for ll, c in zip(lls, chars)] if chars is not None else list(lls)
    for j, v in enumerate(values):
        if math.isnan(v):
            return j
    return max(range(len(values)), key=values.__getitem__)  # max() keeps the first of equal keys


def log_norm(logits: torch.Tensor, chunk: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `logits` (..., V): its logsumexp and its argmax (the first maximum), each shaped (...), from one max
    and one exp pass over `chunk` rows at a time, so each chunk stays in cache while it is reduced (on a (224, 49152)
    block on 2 CPU cores, 19 ms against 37 ms for `torch.logsumexp` plus `argmax` over the whole; equal to them up
    to rounding). A row's log-probability of token t is then `logits[row, t] - lse[row]`; like `torch.logsumexp`, a
    row whose maximum is not finite is not shifted."""
    flat = logits.reshape(-1, logits.shape[-1])  # a view where `logits` is contiguous
    lse = flat.new_empty(flat.shape[0])
    top = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for s in range(0, flat.shape[0], chunk):
        x = flat[s:s + chunk]
        m, top[s:s + chunk] = x.max(-1)
        m = m.masked_fill(~m.isfinite(), 0.0)
        lse[s:s + chunk] = m + (x - m[:, None]).exp_().sum(-1).log()
    return lse.view(logits.shape[:-1]), top.view(logits.shape[:-1])


def _check(rows: list[Encoded], choice_chars: list[list[int]] | None) -> None:
    if choice_chars is not None and len(choice_chars) != len(rows):
        raise DataError(f"choice_chars: {len(choice_chars)} lists for {len(rows)} rows; give one list per row")
    for i, r in enumerate(rows):
        n = len(r.answers)
        if not r.prompt or any(not p for p in r.prompts):
            raise DataError(f"row {i}: empty prompt; the first choice token needs at least one context token "
                            "(lm-eval uses the end-of-text token)")
        if n < 1 or any(len(a) == 0 for a in r.answers):
            raise DataError(f"row {i}: every choice needs at least one token, got lengths {[len(a) for a in r.answers]}")
        if not 0 <= r.label < n:
            raise DataError(f"row {i}: label {r.label} is not one of its {n} choices (0..{n - 1})")
        if choice_chars is not None:
            c = choice_chars[i]
            if len(c) != n or any(not isinstance(x, int) or x <= 0 for x in c):
                raise DataError(f"choice_chars[{i}]: {c!r}; give {n} positive character counts, one per choice")


Scores = dict[tuple[int, int], tuple[float, bool]]  # (row, choice) -> (log-likelihood, greedy)
Context = tuple[list[int], int, list[tuple[int, int]]]  # (context ids, content start, the (row, choice) pairs after it)


@torch.no_grad()
def score_choices(model: nn.Module, rows: list[Encoded], choice_chars: list[list[int]] | None, *, batch_size: int,
                  pad_id: int, rt: Runtime, desc: str = "eval", route: str | None = None) -> list[dict[str, Any]]:
    """Per row, in the order of `rows`: {label, pred, pred_norm, lls, greedy}.

    `rows[i].answers` holds row i's choices (any number, at least one token each) and `rows[i].label` the
    index of the right one. `choice_chars[i][j]` is the length in characters of choice j's text (lm-eval:
    the choice string without its leading space), which acc_norm divides by; with None, `pred_norm` is
    None. `lls[j]` is the summed log-likelihood of choice j's tokens given the prompt, `greedy[j]` whether
    each of them is the argmax. `route`: "packed", "cached" or "full" takes that route (ValueError where it
    cannot run); None chooses (see the module docstring).
    """
    _check(rows, choice_chars)
    model.eval()
    if route not in (None, "packed", "cached", "full"):
        raise ValueError(f"score_choices(route={route!r}): one of 'packed', 'cached', 'full' or None")
    usable = rt.num_processes == 1 and not sharding.is_sharded(model)
    if route in ("packed", "cached") and not usable:
        raise ValueError(f"score_choices(route={route!r}): runs in one process without FSDP; use route=None to "
                         "choose automatically")
    got: Scores | None = None
    contexts = _contexts(rows) if usable and route != "full" else []
    if route in (None, "packed") and usable:
        lengths = _packed_lengths(contexts, rows)
        why = why_not_packed(model, max(lengths))
        if why is None:
            got = _score_packed(model, rows, contexts, lengths, batch_size=batch_size, pad_id=pad_id, rt=rt, desc=desc)
        elif route == "packed":
            raise ValueError(f"score_choices(route='packed'): {why}; use route=None to choose automatically")
    if got is None and route in (None, "cached") and usable:
        got = _score_cached(model, rows, contexts, batch_size=batch_size, pad_id=pad_id, rt=rt, desc=desc)
        if got is None and route == "cached":
            raise ValueError("score_choices(route='cached'): this model's keys/values cache cannot be expanded to "
                             "the choices; use route=None to choose automatically")
    if got is None:
        got = _score_full(model, rows, batch_size=batch_size, pad_id=pad_id, rt=rt, desc=desc)
    out = []
    for i, r in enumerate(rows):
        lls = [got[i, j][0] for j in range(len(r.answers))]
        out.append({"label": int(r.label), "pred": choose(lls),
                    "pred_norm": choose(lls, choice_chars[i]) if choice_chars is not None else None,
                    "lls": lls, "greedy": [got[i, j][1] for j in range(len(r.answers))]})
    return out


def _score_full(model: nn.Module, rows: list[Encoded], *, batch_size: int, pad_id: int, rt: Runtime,
                desc: str) -> Scores:
    """Every (prompt + choice) sequence in full, shared across processes (see the module docstring)."""
    device = rt.device
    seqs = [(i, j) for i, r in enumerate(rows) for j in range(len(r.answers))]  # one per (row, choice)
    plen = [len(rows[i].prompt_for(j)) for i, j in seqs]
    clen = [len(rows[i].answers[j]) for i, j in seqs]
    # longest first (a batch that does not fit shows at once), then by choice length: similar widths and keeps
    order = sorted(range(len(seqs)), key=lambda s: (-(plen[s] + clen[s]), -clen[s], s))
    order, real = share_rows(order, model, rt)  # this process's share of the sequences, gathered below
    out: list[tuple[float, bool] | None] = [None] * len(seqs)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", mininterval=2.0,
                      disable=not rt.main):
        idx = order[start:start + batch_size]
        items = [Encoded(rows[seqs[s][0]].prompt_for(seqs[s][1]), rows[seqs[s][0]].answers, seqs[s][1], False,
                         content_start=rows[seqs[s][0]].content_start) for s in idx]
        batch = {k: v.to(device) for k, v in train_batch(items, pad_id).items()}
        keep = int(batch.pop("logits_to_keep"))
        with rt.autocast():
            kept = model_forward(model, batch, keep).float()  # (B, keep, V)
        logits = kept[:, :-1]  # (B, keep-1, V): the last position predicts nothing
        lse, best = (v[:, :-1] for v in log_norm(kept))  # on the contiguous whole: no copy; one position wasted
        tgt = batch["targets"]  # (B, keep-1), -100 where no choice token
        is_tok = tgt != -100
        tok_lp = logits.gather(2, tgt.clamp(min=0)[:, :, None])[:, :, 0] - lse
        ll = torch.where(is_tok, tok_lp, 0.0).sum(1).cpu()  # (B,); where, not *: a pad position may hold NaN
        top = ((best == tgt) | ~is_tok).all(1).cpu()  # (B,)
        for k, s in enumerate(idx):
            if start + k >= real:
                break  # padding (FSDP): scored by another process
            out[s] = (float(ll[k]), bool(top[k]))
    return dict(zip(seqs, gather_rows(out, rt)))


# ----------------------------------------------------------------------------- the packed route


def _packed_lengths(contexts: list[Context], rows: list[Encoded]) -> list[int]:
    """Each context's packed sequence length: the context, then every choice but its last token (which predicts
    nothing that is scored, and nothing attends to it)."""
    return [len(ids) + sum(len(rows[i].answers[j]) - 1 for i, j in pairs) for ids, _, pairs in contexts]


def why_not_packed(model: nn.Module, longest: int) -> str | None:
    """Why the packed route cannot run `model` on packed sequences of up to `longest` tokens (None: it can). It hands
    the model a custom 4D attention mask, which transformers' own sdpa and eager attention take as is (flash
    attention and remote code may not), and which replaces a sliding window: so only where no sequence is longer
    than the window."""
    inner = getattr(model, "module", model)
    plain = inner.model if isinstance(inner, ReftModel) else inner
    config = getattr(plain, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} (needs sdpa or eager to take a custom mask)"
    base = plain.get_base_model() if hasattr(plain, "get_base_model") else plain  # PEFT's wrapper
    if not type(base).__module__.startswith("transformers."):
        return f"{type(base).__name__} is not a transformers model (remote code may not read a custom mask)"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) and longest >= window:
        return f"a sliding window of {window} tokens, shorter than the longest packed sequence ({longest})"
    return None


MASK_CELLS = 1 << 24  # a packed pass's (contexts x width x width) attention mask: 16 M cells (64 MB as a float mask)


def _context_batches(contexts: list[Context], order: list[int], batch_size: int,
                     widths: list[int] | None = None) -> list[list[int]]:
    """Contexts in `order`, grouped into batches of whole contexts with at most `batch_size` choices between them
    (at least one context a batch). With `widths` (each context's packed length; `order` longest first), a batch
    also stays within MASK_CELLS cells of its (contexts, width, width) attention mask, so long contexts do not
    multiply into gigabytes of mask."""
    batches: list[list[int]] = []
    count = 0
    for c in order:
        n = len(contexts[c][2])
        fits = not batches or widths is None or (len(batches[-1]) + 1) * widths[batches[-1][0]] ** 2 <= MASK_CELLS
        if batches and count + n <= batch_size and fits:
            batches[-1].append(c)
            count += n
        else:
            batches.append([c])
            count = n
    return batches


def _pack(contexts: list[Context], rows: list[Encoded], cs: list[int],
          lengths: list[int], pad_id: int) -> dict[str, Any]:
    """One left-padded batch of packed sequences, context then each of its choices, and where each choice token is
    predicted: `src` (P, 2) batch row and position of each predicting position (a context's last position once,
    though it predicts the first token of all its choices), `at` (token,) the index in `src` of the position that
    predicts it, `tgt` its id, `seg` its (row, choice) pair's index in `pairs`."""
    width = max(lengths[c] for c in cs)
    ids = torch.full((len(cs), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(cs), width), dtype=torch.long)
    allow = torch.zeros((len(cs), width, width), dtype=torch.bool)  # allow[b, q, k]: query q may attend to key k
    allow[:, torch.arange(width), torch.arange(width)] = True  # padding attends to itself: no all-masked row
    start, plen, src, at_src, tgt, seg, pairs = [], [], [], [], [], [], []
    for b, c in enumerate(cs):
        ctx, skip, ctx_pairs = contexts[c]
        p, n = width - lengths[c], len(ctx)
        ids[b, p:p + n] = torch.tensor(ctx)
        pos[b, p:p + n] = torch.arange(n)
        allow[b, p:p + n, p:p + n] = torch.ones(n, n, dtype=torch.bool).tril()
        start.append(p + skip)
        plen.append(n - skip)
        at = p + n
        last = len(src)  # the context's last position, which predicts every choice's first token
        src.append((b, p + n - 1))
        for i, j in ctx_pairs:
            a = rows[i].answers[j]
            m = len(a) - 1  # a choice's last token predicts nothing scored and nothing attends to it: not run
            ids[b, at:at + m] = torch.tensor(a[:-1], dtype=torch.long)
            pos[b, at:at + m] = torch.arange(n, n + m)
            allow[b, at:at + m, p:p + n] = True  # the whole context
            allow[b, at:at + m, at:at + m] = torch.ones(m, m, dtype=torch.bool).tril()  # itself, causally
            at_src += [last] + list(range(len(src), len(src) + m))
            src += [(b, at + t) for t in range(m)]
            tgt += a
            seg += [len(pairs)] * len(a)
            pairs.append((i, j))
            at += m
    return {"input_ids": ids, "position_ids": pos, "allow": allow[:, None], "prompt_start": torch.tensor(start),
            "prompt_len": torch.tensor(plen), "src": torch.tensor(src), "at": torch.tensor(at_src),
            "tgt": torch.tensor(tgt), "seg": torch.tensor(seg), "pairs": pairs}


def _score_packed(model: nn.Module, rows: list[Encoded], contexts: list[Context],
                  lengths: list[int], *, batch_size: int, pad_id: int, rt: Runtime, desc: str) -> Scores:
    """Each distinct context once, in one sequence with all its choices after it; a 4D mask lets each choice see the
    context and itself only, and its position ids continue the context's, so every choice token's logits are the
    ones it gets after its context alone. Several contexts a pass, left-padded, longest first."""
    device = rt.device
    inner = getattr(model, "module", model)
    plain = inner.model if isinstance(inner, ReftModel) else inner
    eager = plain.config._attn_implementation == "eager"
    head = plain.get_output_embeddings() if hasattr(plain, "get_output_embeddings") else None
    dtype = next(plain.parameters()).dtype
    batches = _context_batches(contexts, sorted(range(len(contexts)), key=lambda c: (-lengths[c], c)), batch_size,
                               lengths)
    out: Scores = {}
    for cs in tqdm(batches, desc=desc, unit="batch", mininterval=2.0, disable=not rt.main):
        pk = _pack(contexts, rows, cs, lengths, pad_id)
        allow = pk["allow"].to(device)
        mask = torch.where(allow, 0.0, torch.finfo(dtype).min).to(dtype) if eager else allow
        width = pk["input_ids"].shape[1]
        keep = width - int(pk["src"][:, 1].min())  # hidden states from the earliest predicting position on
        kwargs: dict[str, Any] = dict(attention_mask=mask, position_ids=pk["position_ids"].to(device),
                                      logits_to_keep=keep, use_cache=False)
        if isinstance(inner, ReftModel):  # the edits go on each context's prompt positions
            kwargs.update(prompt_start=pk["prompt_start"].to(device), prompt_len=pk["prompt_len"].to(device))
        src, tgt, seg = pk["src"].to(device), pk["tgt"].to(device), pk["seg"].to(device)
        at = (src[:, 0], src[:, 1] - (width - keep))  # the predicting positions among the kept ones
        # The vocabulary head on exactly those positions: a pre-hook hands it (1, P, d) instead of (B, keep, d), so
        # whatever the model does after its head (softcapping, scaling) still applies.
        take = lambda _, args: (args[0][at][None], *args[1:])  # noqa: E731
        handle = head.register_forward_pre_hook(take) if head is not None else None
        try:
            with rt.autocast():
                logits = model(input_ids=pk["input_ids"].to(device), **kwargs).logits
        finally:
            if handle is not None:
                handle.remove()
        lp = (logits[0] if head is not None else logits[at]).float()  # (P, V)
        lse, best = log_norm(lp)
        row = pk["at"].to(device)  # (tokens,) each choice token's predicting position
        tok_ll = lp[row, tgt] - lse[row]
        ll = torch.zeros(len(pk["pairs"]), device=device).index_add_(0, seg, tok_ll)
        miss = torch.zeros(len(pk["pairs"]), device=device).index_add_(0, seg, (best[row] != tgt).float())
        for p, v, m in zip(pk["pairs"], ll.cpu().tolist(), miss.cpu().tolist()):
            out[p] = (float(v), m == 0)
    return out


# ----------------------------------------------------------------------------- the cached route


def _contexts(rows: list[Encoded]) -> list[Context]:
    """Distinct contexts: (context ids, content start, the (row, choice) pairs that follow it), first seen first.

    Keyed by ids and content start (where ReFT's first group starts), so rows that share a context (lm-eval's
    requests arrive one choice a row) share its pass too, and a row whose choices have different context ids
    (lm-eval's split of context + choice) gets one pass per distinct context."""
    seen: dict[tuple[tuple[int, ...], int], list[tuple[int, int]]] = {}
    for i, r in enumerate(rows):
        for j in range(len(r.answers)):
            seen.setdefault((tuple(r.prompt_for(j)), r.content_start), []).append((i, j))
    return [(list(ids), skip, pairs) for (ids, skip), pairs in seen.items()]


def _score_cached(model: nn.Module, rows: list[Encoded], contexts: list[Context], *, batch_size: int, pad_id: int,
                  rt: Runtime, desc: str) -> Scores | None:
    """Each distinct context once, its choices after its cached keys/values; None when the model's cache cannot
    be expanded (found on the first context pass, before anything is scored)."""
    device = rt.device
    inner = getattr(model, "module", model)
    plain = inner.model if isinstance(inner, ReftModel) else inner  # runs a pass with no edits
    field = cache_field()
    longest = max(len(ids) + len(rows[i].answers[j]) for ids, _, pairs in contexts for i, j in pairs)
    width = [max(len(rows[i].answers[j]) for i, j in pairs) for _, _, pairs in contexts]
    order = sorted(range(len(contexts)), key=lambda c: (-len(contexts[c][0]), -width[c], c))
    batches = _context_batches(contexts, order, batch_size)
    out: Scores = {}
    for cs in tqdm(batches, desc=desc, unit="batch", mininterval=2.0, disable=not rt.main):
        batch = {k: v.to(device) for k, v in prompt_batch([contexts[c][0] for c in cs], pad_id,
                                                          [contexts[c][1] for c in cs]).items()}
        kwargs: dict[str, Any] = dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                                      logits_to_keep=1, use_cache=True)
        if isinstance(inner, ReftModel):  # the edits go on this pass's prompt positions, and only on this pass
            kwargs.update(prompt_start=batch["prompt_start"], prompt_len=batch["prompt_len"])
        with rt.autocast():
            res = model(input_ids=batch["input_ids"], **kwargs)
        past = getattr(res, field, None)
        if not out and not regroupable(past, longest):
            logger.info("%s: this model's keys/values cache cannot be expanded to the choices; scoring every "
                        "context + choice in full", desc)
            return None
        pairs = [p for c in cs for p in contexts[c][2]]  # (row, choice), context by context
        owner = torch.tensor([b for b, c in enumerate(cs) for _ in contexts[c][2]], device=device)  # (N,)
        answers = [rows[i].answers[j] for i, j in pairs]
        # the first choice token, from the logits of the context's last position
        last = res.logits[:, -1].float()  # (C, V)
        first = torch.tensor([a[0] for a in answers], device=device)  # (N,)
        lse, best = log_norm(last)
        ll = last[owner, first] - lse[owner]  # (N,)
        top = best[owner] == first  # (N,)
        multi = [n for n, a in enumerate(answers) if len(a) > 1]  # choices with tokens after the first
        if multi:
            w = max(len(answers[n]) for n in multi) - 1
            ids = torch.full((len(multi), w), pad_id, dtype=torch.long)
            mask = torch.zeros((len(multi), w), dtype=torch.long)
            tgt = torch.full((len(multi), w), -100, dtype=torch.long)
            for m, n in enumerate(multi):  # right-padded: token t predicts token t + 1 of the same choice
                a = answers[n]
                ids[m, :len(a) - 1] = torch.tensor(a[:-1])
                mask[m, :len(a) - 1] = 1
                tgt[m, :len(a) - 1] = torch.tensor(a[1:])
            ids, mask, tgt = ids.to(device), mask.to(device), tgt.to(device)
            sel = owner[torch.tensor(multi, device=device)]  # (M,) the context row of each choice
            past.reorder_cache(sel)  # (C, ...) -> (M, ...): each choice gets its context's keys and values
            ctx_len = batch["attention_mask"].sum(1)[sel]  # (M,) real context tokens
            with rt.autocast():
                logits = plain(input_ids=ids, attention_mask=torch.cat([batch["attention_mask"][sel], mask], 1),
                               position_ids=ctx_len[:, None] + torch.arange(w, device=device)[None, :],
                               use_cache=True, logits_to_keep=w, **{field: past}).logits.float()  # (M, w, V)
            is_tok = tgt != -100
            lse, best = log_norm(logits)  # (M, w) each
            tok_lp = logits.gather(2, tgt.clamp(min=0)[:, :, None])[:, :, 0] - lse
            rest = torch.zeros(len(answers), device=device)
            rest[torch.tensor(multi, device=device)] = torch.where(is_tok, tok_lp, 0.0).sum(1)
            rest_top = torch.ones(len(answers), dtype=torch.bool, device=device)
            rest_top[torch.tensor(multi, device=device)] = ((best == tgt) | ~is_tok).all(1)
            ll, top = ll + rest, top & rest_top
        for p, v, g in zip(pairs, ll.cpu().tolist(), top.cpu().tolist()):
            out[p] = (float(v), bool(g))
    return out


def choice_accuracy(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """lm-eval's acc and acc_norm with counts and the 95% Wilson interval of acc; acc_norm is None when
    the rows were scored without character lengths."""
    n = len(preds)
    correct = sum(1 for p in preds if p["pred"] == p["label"])
    has_norm = all(p.get("pred_norm") is not None for p in preds)
    correct_norm = sum(1 for p in preds if p["pred_norm"] == p["label"]) if has_norm else None
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n if n else 0.0,
            "acc_norm": (correct_norm / n if n else 0.0) if correct_norm is not None else None,
            "n": n, "correct": correct, "correct_norm": correct_norm, "ci95": [lo, hi]}
