"""Representation fine-tuning (ReFT) on the residual stream, written natively for heft.

ReFT (Wu et al., 2024, arXiv 2404.03592) freezes the model and learns an edit Phi(h) of the hidden
state h (the output of a decoder layer) at a few chosen token positions:

    LoReFT  Phi(h) = h + R^T (W h + b - R h)    R: (r, d) with orthonormal rows, W: (r, d), b: (r,)
    NoReFT  the same with R unconstrained
    DiReFT  Phi(h) = h + W2^T (W1 h + b)        W1, W2: (r, d), no orthogonality (ReFT paper eq. 3)

R is kept orthonormal by construction: the trainable tensor is an unconstrained (r, d) matrix A and
R = rows of Q from the QR decomposition of A^T (signs fixed so that A = R gives back R). Unlike
`torch.nn.utils.parametrizations.orthogonal`, whose Householder map collapses R to zero after one
AdamW step with weight decay, this stays orthonormal under any optimiser; weight decay is never
applied to A anyway (see `no_decay_names`).

Positions: for each example, the first `f` and the last `l` *prompt* tokens (never answer tokens),
computed from per-example prompt start and length, so left or right padding both work. Where a
prompt is shorter than f + l the last group keeps its tokens and the first group gets what is
left, so no token is edited twice. The edit is applied with gather/scatter_add over (B, f + l)
positions: no Python loop over examples and no host sync.

Interventions live in an `nn.ModuleDict` inside `ReftModel`, which wraps the base model so that
`.to()`, `state_dict()` and DDP see them; forward hooks attach them and `remove()` takes them off,
after which the model computes exactly what it computed before.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from heft import __version__
from heft.run import atomic
from heft.training import sharding
from heft.config.schema import PositionsConfig, ReftConfig
from heft.errors import CheckpointError, ConfigError
from heft.methods.model import check_layer_ids

logger = logging.getLogger(__name__)

REFT_WEIGHTS = "reft.safetensors"
REFT_CONFIG = "reft_config.json"


def orthonormal_rows(a: torch.Tensor) -> torch.Tensor:
    """(..., r, d) -> (..., r, d) with orthonormal rows spanning the same space as `a`'s rows (fp32, autocast
    off); a stack of matrices is one batched QR."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        q, t = torch.linalg.qr(a.float().mT, mode="reduced")  # q: (..., d, r), t: (..., r, r) upper triangular
        sign = torch.where(torch.diagonal(t, dim1=-2, dim2=-1) >= 0, 1.0, -1.0)  # (..., r)
        return (q * sign[..., None, :]).mT


def _offset(b: torch.Tensor, x: torch.Tensor, relative: bool) -> torch.Tensor:
    """The edit's input-independent term: b, or with `reft.offset: relative` b times each state's RMS (..., 1).
    The mean square is clamped at the smallest normal float before the root: an all-zero state (a padding slot's
    embedding) would otherwise send NaN back through sqrt's gradient, even where the edit is masked out."""
    if not relative:
        return b
    return b * x.float().pow(2).mean(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny).sqrt()


def _compute_input(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """h in the parameters' dtype (fp32 interventions on a bf16 model). `ReftModel` runs the edits with autocast
    off: a few rows times a (d, r) matrix are cheaper in fp32 than through autocast's casts to bf16 and back, and
    under autocast the residual stream the edits read is already fp32, so this is no copy at all."""
    return h.to(weight.dtype)


def _maybe_dropout(dropout: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    return dropout(x) if dropout.p > 0 else x  # p = 0 (the default): not even an identity call per edit


class LoReFT(nn.Module):
    """h + R^T (W h + b - R h); `orthogonal=False` gives NoReFT."""

    def __init__(self, d: int, r: int, init: str = "identity", dropout: float = 0.0, orthogonal: bool = True,
                 offset: str = "absolute"):
        super().__init__()
        self.orthogonal = orthogonal
        self.relative = offset == "relative"
        self.rotation = nn.Parameter(orthonormal_rows(torch.randn(r, d)))  # (r, d)
        proj = nn.Linear(d, r)  # default init, as in pyreft, for init="random"
        if init == "identity":
            proj.weight.data.copy_(self.R().detach())  # exactly R(): the edit is exactly 0
            proj.bias.data.zero_()
        self.weight = nn.Parameter(proj.weight.data.clone())  # (r, d)
        self.bias = nn.Parameter(proj.bias.data.clone())  # (r,)
        self.dropout = nn.Dropout(dropout)

    def R(self) -> torch.Tensor:
        return orthonormal_rows(self.rotation) if self.orthogonal else self.rotation

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        """The edit Phi(h) - h for h of shape (..., d): R^T ((W - R) h + b), one matmul each way (`ReftModel`
        computes the same for all of a layer's interventions at once, see `ReftModel._factors`)."""
        R = self.R()
        x = _compute_input(h, self.weight)
        low = x @ (self.weight - R.to(self.weight.dtype)).T + _offset(self.bias, x, self.relative)  # (..., r)
        return _maybe_dropout(self.dropout, low @ R.to(low.dtype))  # (..., d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h).to(h.dtype)

    @torch.no_grad()
    def consolidate(self) -> None:
        """Store R itself in `rotation`, so saved files hold R and reloading reproduces outputs exactly."""
        if self.orthogonal:  # whole tensors: under FSDP `rotation` is sharded across processes (a collective)
            sharding.assign(self.rotation, orthonormal_rows(sharding.full(self.rotation)))


class DiReFT(nn.Module):
    """h + W2^T (W1 h + b)."""

    def __init__(self, d: int, r: int, init: str = "identity", dropout: float = 0.0, offset: str = "absolute"):
        super().__init__()
        self.relative = offset == "relative"
        down = nn.Linear(d, r)
        self.weight = nn.Parameter(down.weight.data.clone())  # W1: (r, d)
        self.bias = nn.Parameter(down.bias.data.clone())  # b: (r,)
        up = torch.empty(r, d)
        if init == "identity":
            nn.init.zeros_(up)  # zero edit at init, gradients still flow into W2
        else:
            nn.init.kaiming_uniform_(up, a=5**0.5)
        self.up = nn.Parameter(up)  # W2: (r, d)
        self.dropout = nn.Dropout(dropout)

    def delta(self, h: torch.Tensor) -> torch.Tensor:
        x = _compute_input(h, self.weight)
        return _maybe_dropout(self.dropout, (x @ self.weight.T + _offset(self.bias, x, self.relative)) @ self.up)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.delta(h).to(h.dtype)

    def consolidate(self) -> None:
        pass


def check_fits(cfg: ReftConfig, num_layers: int, d: int) -> list[int]:
    """The edited layer indices, after checking rank and layers against the model."""
    if cfg.rank > d:
        raise ConfigError(f"reft.rank: {cfg.rank} is larger than the model's hidden size {d}; use a rank <= {d}")
    return check_layer_ids("reft.layers", list(range(num_layers)) if cfg.layers == "all" else list(cfg.layers),
                           num_layers)


def make_intervention(cfg: ReftConfig, d: int) -> nn.Module:
    """One intervention of the configured kind for hidden size d."""
    if cfg.kind == "direft":
        return DiReFT(d, cfg.rank, cfg.init, cfg.dropout, cfg.offset)
    return LoReFT(d, cfg.rank, cfg.init, cfg.dropout, orthogonal=cfg.kind == "loreft", offset=cfg.offset)


def no_decay_names(module: nn.Module) -> set[str]:
    """Parameter names that must not get weight decay: biases and the orthonormal map's raw matrix."""
    return {n for n, _ in module.named_parameters() if n.endswith("bias") or n.endswith("rotation")}


# ----------------------------------------------------------------------------- positions


def prompt_positions(
    prompt_start: torch.Tensor, prompt_len: torch.Tensor, pos: PositionsConfig
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Indices (B, k) and validity masks (B, k) of the first/last prompt positions of each example.

    `prompt_start`, `prompt_len`: (B,) long tensors. Invalid slots (short prompts) point at
    position 0 and are masked out.
    """
    n_last = torch.clamp(prompt_len, max=pos.last)  # (B,)
    n_first = torch.clamp(prompt_len - n_last, max=pos.first)  # (B,) the last group wins overlaps
    out = {}
    if pos.first > 0:
        j = torch.arange(pos.first, device=prompt_len.device)  # (f,)
        valid = j[None, :] < n_first[:, None]  # (B, f)
        out["first"] = ((prompt_start[:, None] + j[None, :]) * valid, valid)
    if pos.last > 0:
        j = torch.arange(pos.last, device=prompt_len.device)  # (l,)
        valid = j[None, :] < n_last[:, None]  # (B, l)
        idx = prompt_start[:, None] + (prompt_len - n_last)[:, None] + j[None, :]
        out["last"] = (idx * valid, valid)
    return out


@dataclass
class _Context:
    """Where to intervene during one forward pass (or the prompt pass of one `generate`): the edited positions of
    every group side by side, `idx` (B, k), each intervention group's column range in them, and `mask` (B, k, G*r):
    the rank columns of its group's block for each edited position, zero where the position is not valid."""

    idx: torch.Tensor
    mask: torch.Tensor
    slices: list[tuple[int, int]]
    seq_len: int
    passes_allowed: int | None = None  # generation: only the first model pass (the prompt) is edited
    passes: int = 0
    factors: dict[int, tuple[torch.Tensor, ...]] | None = None  # per layer (down, bias, up), made once per pass


# ----------------------------------------------------------------------------- the wrapped model


class ReftModel(nn.Module):
    """A causal LM with ReFT interventions hooked onto the outputs of chosen decoder layers."""

    def __init__(self, model: nn.Module, cfg: ReftConfig, decoder_layers: nn.ModuleList, hidden_size: int):
        super().__init__()
        self.model = model
        self.cfg = cfg
        n = len(decoder_layers)
        self.layer_ids = check_fits(cfg, n, hidden_size)
        self.num_layers = n
        self.hidden_size = hidden_size
        groups = ["both"] if cfg.tied else [g for g in ("first", "last") if getattr(cfg.positions, g) > 0]
        self.groups = groups
        self.interventions = nn.ModuleDict(
            {f"L{i}_{g}": make_intervention(cfg, hidden_size) for i in self.layer_ids for g in groups}
        )
        self._ctx: _Context | None = None
        self._handles = [decoder_layers[i].register_forward_hook(self._make_hook(i)) for i in self.layer_ids]

    def _make_hook(self, layer: int):
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            ctx = self._ctx
            h = output[0] if isinstance(output, tuple) else output  # (B, T, d)
            if ctx is None or h.shape[1] != ctx.seq_len:
                return output
            if ctx.passes_allowed is not None:
                if ctx.passes >= ctx.passes_allowed:
                    return output
                if layer == self.layer_ids[-1]:  # the highest edited layer runs last: this pass is done
                    ctx.passes += 1
            h = self._edit(layer, h, ctx)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    def _edit(self, layer: int, h: torch.Tensor, ctx: _Context) -> torch.Tensor:
        """h (B, T, d) with `layer`'s edits at the context's positions: one gather, two matmuls and one scatter for
        all position groups (their positions never overlap)."""
        with torch.autocast(device_type=h.device.type, enabled=False):  # see _compute_input
            if ctx.factors is None:  # the first edited layer of this pass
                ctx.factors = self._factors()
            down, bias, up = ctx.factors[layer]
            first = self._first  # offset and dropout are the same for every intervention (one config)
            idx_d = ctx.idx[:, :, None].expand(-1, -1, h.shape[-1])  # (B, k, d)
            x = _compute_input(h.gather(1, idx_d), down)
            low = (x @ down.mT + _offset(bias, x, first.relative)) * ctx.mask  # (B, k, G*r)
            delta = _maybe_dropout(first.dropout, low @ up)  # (B, k, d)
            return h.scatter_add(1, idx_d, delta.to(h.dtype))

    def _factors(self) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every edited layer's interventions as one low-rank map, (down (G*r, d), bias (G*r,), up (G*r, d)) with
        the position groups' rank blocks side by side: the edit of a row of group g is
        `((x @ down.T + bias) * mask_g) @ up`, mask_g selecting g's block. LoReFT: down = W - R, up = R (every R
        from one batched QR); DiReFT: down = W1, up = W2. Built once per forward pass from stacked parameters, so
        a step runs a few batched operations here and two matmuls per layer, not a dozen small ones per
        intervention (what made the bf16 step sit above the frozen floor, docs/benchmarks.md section 1)."""
        mods = [self.interventions[f"L{i}_{g}"] for i in self.layer_ids for g in self.groups]
        weight, bias = torch.stack([m.weight for m in mods]), torch.stack([m.bias for m in mods])  # (n, r, d), (n, r)
        if isinstance(mods[0], LoReFT):
            rot = torch.stack([m.rotation for m in mods])
            R = (orthonormal_rows(rot) if mods[0].orthogonal else rot).to(weight.dtype)
            down, up = weight - R, R
        else:
            down, up = weight, torch.stack([m.up for m in mods])
        n_layers, (r, d) = len(self.layer_ids), weight.shape[1:]
        width = len(self.groups) * r
        return dict(zip(self.layer_ids, zip(down.reshape(n_layers, width, d).unbind(0),
                                            bias.reshape(n_layers, width).unbind(0),
                                            up.reshape(n_layers, width, d).unbind(0))))

    def _set(self, seq_len: int, prompt_start: torch.Tensor, prompt_len: torch.Tensor, passes: int | None) -> None:
        groups = prompt_positions(prompt_start, prompt_len, self.cfg.positions)
        names = list(groups)  # "first", "last": the order of self.groups when untied
        bounds = [0]
        for g in names:
            bounds.append(bounds[-1] + groups[g][0].shape[1])
        slices = [(0, bounds[-1])] if self.groups == ["both"] else list(zip(bounds, bounds[1:]))
        idx = torch.cat([groups[g][0] for g in names], dim=1)
        valid = torch.cat([groups[g][1] for g in names], dim=1)[:, :, None]
        r = self.cfg.rank
        block = torch.zeros(idx.shape[1], len(slices) * r, dtype=self._dtype, device=idx.device)  # (k, G*r)
        for g, (a, b) in enumerate(slices):
            block[a:b, g * r:(g + 1) * r] = 1.0
        self._ctx = _Context(idx, valid * block, slices, seq_len, passes)

    @property
    def _first(self) -> nn.Module:
        return next(iter(self.interventions.values()))

    @property
    def _dtype(self) -> torch.dtype:
        return self._first.weight.dtype

    # -- API
    def forward(self, input_ids: torch.Tensor, prompt_start: torch.Tensor, prompt_len: torch.Tensor, **kwargs: Any) -> Any:
        """Run the model with the edits at each example's prompt positions. Extra kwargs go to the model."""
        self._set(input_ids.shape[1], prompt_start, prompt_len, None)
        try:
            return self.model(input_ids=input_ids, **kwargs)
        finally:
            self._ctx = None

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_start: torch.Tensor,
                 prompt_len: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """`model.generate` with the edits applied on the prompt pass only (generated tokens are not edited)."""
        self._set(input_ids.shape[1], prompt_start, prompt_len, 1)
        try:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self._ctx = None

    def remove(self) -> nn.Module:
        """Take the hooks off and return the untouched base model."""
        for h in self._handles:
            h.remove()
        self._handles = []
        return self.model

    def consolidate(self) -> None:
        """Store each R itself (see LoReFT.consolidate); under FSDP a collective, called on every process."""
        sharding.reshard(self)  # the sharded parameters are the ones training updated
        for m in self.interventions.values():
            m.consolidate()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The consolidated interventions' whole tensors, fp32 on CPU, as `save` writes them (a collective under FSDP)."""
        self.consolidate()
        return {k: v.float() for k, v in sharding.full_cpu(self.interventions.state_dict()).items()}

    def reft_config_dict(self) -> dict[str, Any]:
        return {
            "kind": self.cfg.kind, "rank": self.cfg.rank, "layers": self.layer_ids,
            "positions": {"first": self.cfg.positions.first, "last": self.cfg.positions.last,
                          "first_from": self.cfg.positions.first_from},
            "tied": self.cfg.tied, "init": self.cfg.init, "dropout": self.cfg.dropout,
            "offset": "relative" if any(m.relative for m in self.interventions.values()) else "absolute",
            "hidden_size": self.hidden_size, "num_layers": self.num_layers, "heft_version": __version__,
        }

    def save(self, folder: Path, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write `reft.safetensors` (only the interventions' tensors) and `reft_config.json`.

        Under FSDP every process calls `tensors()` and passes its result here on the main process.
        """
        tensors = self.tensors() if tensors is None else tensors
        folder.mkdir(parents=True, exist_ok=True)
        tmp = atomic.atomic_file(folder / REFT_WEIGHTS)
        try:
            save_file(tensors, str(tmp), metadata={"format": "heft-reft"})
            atomic.user_mode(tmp)  # safetensors writes 0600 files whatever the umask
            os.replace(tmp, folder / REFT_WEIGHTS)
        finally:
            tmp.unlink(missing_ok=True)
        atomic.write_json(folder / REFT_CONFIG, self.reft_config_dict())

    def load_weights(self, folder: Path) -> None:
        """Load weights saved by `save`, after checking they fit this model."""
        meta = read_reft_config(folder)
        for key, mine in (("hidden_size", self.hidden_size), ("num_layers", self.num_layers)):
            if meta.get(key) != mine:
                raise CheckpointError(f"{folder / REFT_CONFIG}: saved for {key}={meta.get(key)}, but the base model has {key}={mine}")
        try:
            tensors = load_file(str(folder / REFT_WEIGHTS))
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{folder / REFT_WEIGHTS}: cannot read the ReFT weights ({e}); the file is corrupt or truncated") from None
        expected = self.interventions.state_dict()
        missing, extra = set(expected) - set(tensors), set(tensors) - set(expected)
        if missing or extra:
            raise CheckpointError(f"{folder / REFT_WEIGHTS}: tensors do not match the config (missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]})")
        for k, v in tensors.items():
            if v.shape != expected[k].shape:
                raise CheckpointError(f"{folder / REFT_WEIGHTS}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        self.interventions.load_state_dict(tensors)
        saved = meta.get("offset", "absolute")  # folders written before heft had `reft.offset` trained plain LoReFT
        if saved != self.cfg.offset:
            logger.info("%s: these interventions were trained with reft.offset: %s; using it (the config says %s)",
                        folder, saved, self.cfg.offset)
            for m in self.interventions.values():
                m.relative = saved == "relative"


def read_reft_config(folder: Path) -> dict[str, Any]:
    """The saved `reft_config.json`, with a clear error when it is missing or unreadable."""
    path = folder / REFT_CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {folder} does not hold a ReFT stage") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is corrupt or truncated") from None


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The saved intervention tensors of a ReFT stage folder."""
    try:
        return load_file(str(folder / REFT_WEIGHTS))
    except Exception as e:  # safetensors raises several types for missing/truncated/corrupt files
        raise CheckpointError(f"{folder / REFT_WEIGHTS}: cannot read the ReFT weights ({e})") from None


def edit_norms(tensors: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per intervention, the size of its learned edit A h + c: `{layer, group, gain: ||A||_F, offset: ||c||}`.

    LoReFT / NoReFT: A = R^T (W - R), c = R^T b; DiReFT: A = W2^T W1, c = W2^T b. With identity init both
    start at 0. Keys are those `ReftModel` saves: `L{layer}_{group}.{tensor}`."""
    out = []
    for key in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        w, b = tensors[f"{key}.weight"].double(), tensors[f"{key}.bias"].double()
        up = tensors[f"{key}.rotation"] if f"{key}.rotation" in tensors else tensors[f"{key}.up"]
        up = up.double()
        a = up.T @ (w - up) if f"{key}.rotation" in tensors else up.T @ w
        layer, group = key[1:].split("_", 1)
        out.append({"layer": int(layer), "group": group, "gain": float(torch.linalg.matrix_norm(a)),
                    "offset": float(torch.linalg.vector_norm(up.T @ b))})
    return sorted(out, key=lambda r: (r["layer"], r["group"]))
