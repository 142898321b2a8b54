"""Frozen-layer reuse in training: the decoder layers below the lowest adapted one run once per row, not every epoch.

When every weight that trains sits in decoder layer k or above (LoRA on `lora.layers: [15, ...]`) or edits the
output of layer k - 1 or above (ReFT interventions on `reft.layers: [14, ...]`), the residual stream entering layer
k depends only on frozen weights and the row's tokens. So for each row

    stream = the hidden states entering layer k       computed once, without gradients, kept per row
    layers k..N, the head and the loss                 forward and backward every step, from that stream

Each step the layers below k are bypassed: they return the cached stream (re-padded left like `train_batch`)
instead of computing it, and the ReFT hook on layer k - 1, if any, edits that stream as it would have edited the
layer's own output. The decoder-layer list and everything the model computes around it (masks, rotary or absolute
positions, per-layer attention kinds such as Gemma 3's sliding and global layers) stay as they are. The backward
already stops at the lowest adapted layer, so what is saved is the lower layers' forward: by the arithmetic
(forward about a third of a step) ~1.2x with the upper half adapted.

Exact: the loss and the gradients equal the full path's within floating-point rounding (tests/reuse/test_layer_prefix.py).
Streams are computed in eval mode (no random numbers drawn) and kept in fixed groups (heft.reuse.kept), so a resumed
run reads the same numbers as an uninterrupted one. The same modes and budget as the token prefix
(heft.reuse.token_prefix): `cache` keeps the streams of the rows that fit in `prefix_cache_gb`, `recompute` runs the
lower layers again (without gradients) every step.

`lowest_layer` says whether the shape of a stage allows it: every trained weight inside the decoder layers or ReFT's
interventions, above layer 0. Whether it is taken is heft.reuse.plan's choice: not under FSDP, with compiled layers,
or with dropout below layer k, and only once `check` has seen the bypass reproduce the model's logits on the stage's
first batch (an architecture whose layers pass something else between them fails it). A stage the token prefix
serves (ReFT on the last positions only) takes the token prefix, which saves far more.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from heft.data.tokens import Encoded, train_batch
from heft.methods.model import decoder_layers
from heft.methods.reft import ReftModel
from heft.reuse.kept import RowStore, Step, frozen_pass, full_step, groups
from heft.training.runtime import Runtime, model_forward


class _Reached(Exception):
    """Raised by the capture hook once the stream entering layer k is in hand: the layers above need not run."""


def _length(row: Encoded) -> int:
    return len(row.prompt_for(row.label)) + len(row.answers[row.label])


def reach(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], layers_path: str | None = None
          ) -> tuple[int, list[nn.Module] | None, str | None]:
    """(r, decoder layers, None): r is the first decoder layer whose computation training can change (a layer
    holding a trained weight, or the one above ReFT's lowest edit; the depth when ReFT edits only the last layer's
    output), so gradients flow down to it and no further. (0, layers or None, why) when a trained weight sits
    outside the decoder layers, or they cannot be found."""
    inner = getattr(model, "module", model)
    plain = inner.model if isinstance(inner, ReftModel) else inner
    try:
        layers = list(decoder_layers(plain, layers_path))
    except Exception as e:  # an architecture heft cannot map without model.layers_path
        return 0, None, f"the decoder layers were not found ({e})"
    where = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    mine = {id(p) for p in inner.interventions.parameters()} if isinstance(inner, ReftModel) else set()
    r = len(layers)
    if isinstance(inner, ReftModel):  # an edit on layer l's output: layers 0..l compute what they always did
        r = min(inner.layer_ids) + 1
    for name, p in trainable:
        if id(p) in mine:
            continue
        if id(p) not in where:
            return 0, layers, f"a trained weight is outside the decoder layers ({name})"
        r = min(r, where[id(p)])
    return r, layers, None


def lowest_layer(model: nn.Module, trainable: list[tuple[str, nn.Parameter]],
                 layers_path: str | None = None) -> tuple[int, str | None]:
    """(k, None) where k > 0 is the first decoder layer whose computation training can change, so the layers below it
    could be bypassed; (0, why not) when the stage's shape does not allow it."""
    r, layers, why = reach(model, trainable, layers_path)
    if why is not None:
        return 0, why
    k = min(r, len(layers) - 1)  # ReFT on the last layer's output only: that layer still runs, unedited
    if k <= 0:
        return 0, "the lowest decoder layer is adapted"
    return k, None


class FrozenLayers:
    """Bypasses a training stage's decoder layers below k with each row's stream entering layer k (kept or
    recomputed)."""

    def __init__(self, model: nn.Module, k: int, rows: list[Encoded], pad_id: int, rt: Runtime, *, keep: bool,
                 budget_gb: float, desc: str, layers_path: str | None = None):
        inner = getattr(model, "module", model)
        self.inner = inner  # forward passes of the check go here (never through DDP's synchronisation)
        self.plain = inner.model if isinstance(inner, ReftModel) else inner  # no ReFT edit outside ReftModel.forward
        self.layers = decoder_layers(self.plain, layers_path)
        self.k, self.rows, self.pad_id, self.rt, self.desc = k, rows, pad_id, rt, desc
        self.keep = keep
        lengths = [_length(r) for r in rows]
        self.groups = groups(lengths)
        self.group_of = {i: g for g, members in enumerate(self.groups) for i in members}
        self.store = RowStore(budget_gb, desc, "layer cache", self.groups, lengths)
        self.returns: int | None = None  # layer k - 1's output: a tensor (None) or a tuple of this length
        self.checked = False

    def describe(self) -> str:
        which = "decoder layer 0 of {n} is" if self.k == 1 else "decoder layers 0..{k} of {n} are"
        how = (f"run once per row without gradients, then bypassed: the stream entering layer {self.k} is kept across "
               f"epochs (up to {self.store.budget / 1e9:g} GB)" if self.keep
               else "run without gradients each step (frozen_prefix: recompute)")
        return which.format(k=self.k - 1, n=len(self.layers)) + " frozen and unedited: " + how

    def capture(self, idx: list[int]) -> dict[int, torch.Tensor]:
        """The stream entering layer k for rows `idx`, one (tokens, d) tensor per row, computed without gradients in
        the model's present mode; layers k.. do not run."""
        batch = train_batch([self.rows[i] for i in idx], self.pad_id)
        grabbed: list[torch.Tensor] = []

        def enter(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            grabbed.append(args[0] if args else kwargs["hidden_states"])
            raise _Reached

        def leave(module: nn.Module, args: Any, output: Any) -> None:
            self.returns = len(output) if isinstance(output, tuple) else None

        handles = [self.layers[self.k].register_forward_pre_hook(enter, with_kwargs=True),
                   self.layers[self.k - 1].register_forward_hook(leave)]
        try:
            with torch.no_grad(), self.rt.autocast():
                self.plain(input_ids=batch["input_ids"].to(self.rt.device),
                           attention_mask=batch["attention_mask"].to(self.rt.device),
                           position_ids=batch["position_ids"].to(self.rt.device), use_cache=False, logits_to_keep=1)
        except _Reached:
            pass
        finally:
            for h in handles:
                h.remove()
        if not grabbed:
            raise RuntimeError(f"decoder layer {self.k} never ran in a forward pass of the model")
        h, width = grabbed[0], grabbed[0].shape[1]
        return {i: h[b, width - _length(self.rows[i]):].clone() for b, i in enumerate(idx)}  # left-padded rows

    def _frozen(self, idx: list[int]) -> dict[int, torch.Tensor]:
        with frozen_pass(self.plain):
            return self.capture(idx)

    def _fill(self, g: int) -> dict[int, torch.Tensor]:
        """Capture group g, fix the kept rows if this is the first capture, and keep the group's kept rows."""
        fresh = self._frozen(self.groups[g])
        some = next(iter(fresh.values()))
        self.store.decide(some.shape[-1] * some.element_size())
        self.store.keep(fresh)
        return fresh

    def _streams(self, idx: list[int]) -> list[torch.Tensor]:
        """Rows `idx`'s streams: kept rows' from the store (their group captured when first needed), the others
        captured now, in this batch."""
        if self.keep and self.store.kept is None:
            self._fill(0)
        kept = (self.store.kept or frozenset()) if self.keep else frozenset()
        for g in dict.fromkeys(self.group_of[i] for i in idx if i in kept and i not in self.store):
            self._fill(g)
        need = [i for i in idx if i not in kept]
        fresh = self._frozen(need) if need else {}
        return [self.store[i] if i in kept else fresh[i] for i in idx]

    @contextlib.contextmanager
    def bypass(self, idx: list[int], width: int, streams: list[torch.Tensor] | None = None) -> Iterator[None]:
        """While inside, layers 0..k-1 return rows `idx`'s streams (kept or captured now, unless given), left-padded
        to `width` tokens, instead of computing them; hold it over the backward too (a checkpointed layer reruns its
        forward there)."""
        streams = self._streams(idx) if streams is None else streams
        h = streams[0].new_zeros(len(idx), width, streams[0].shape[-1])  # pads: zeros, which no real token attends to
        for b, s in enumerate(streams):
            h[b, width - s.shape[0]:] = s
        out = h if self.returns is None else (h, *([None] * (self.returns - 1)))

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            return out

        saved = [layer.__dict__.get("forward") for layer in self.layers[:self.k]]
        for layer in self.layers[:self.k]:
            layer.forward = passthrough  # hooks on the layer (ReFT's on layer k - 1) still run on what it returns
        try:
            yield
        finally:
            for layer, before in zip(self.layers[:self.k], saved):
                if before is None:
                    del layer.forward
                else:
                    layer.forward = before

    def step(self, idx: list[int]) -> Step:
        """Rows `idx` as one training micro-batch: the model's own forward, the layers below k bypassed."""
        return full_step(self.rows, idx, self.pad_id, self.rt.device, lambda width: self.bypass(idx, width))

    def check(self, idx: list[int], batch: dict[str, torch.Tensor], keep: int) -> str | None:
        """None when the bypass gives the model's own logits on this batch (eval mode, no gradients); else why not.
        The streams are this batch's own, captured now: what is checked is that the layers pass nothing else
        between them, not how bf16 rounds a differently padded batch."""
        was = self.inner.training
        self.inner.eval()
        try:
            with torch.no_grad(), self.rt.autocast():
                full = model_forward(self.inner, batch, keep).float()
                own = self.capture(idx)
                with self.bypass(idx, batch["input_ids"].shape[1], [own[i] for i in idx]):
                    mine = model_forward(self.inner, batch, keep).float()
        finally:
            self.inner.train(was)
        self.checked = True
        if self.keep:  # the kept rows follow from a token's size, the same in every pass
            self.store.decide(own[idx[0]].shape[-1] * own[idx[0]].element_size())
        gap = float((mine - full).abs().max())
        if not gap <= 1e-3 * (1.0 + float(full.abs().max())):
            return (f"bypassing layers 0..{self.k - 1} changed the logits by up to {gap:.3g} on the first batch "
                    "(this architecture passes more than the hidden states between its layers)")
        return None
