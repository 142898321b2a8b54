"""What the two speed paths share: per-row tensors kept across a stage's epochs, and the step they hand the loop.

Kept values must not depend on where a run was stopped. A row's keys/values (heft.reuse.token_prefix) or stream
(heft.reuse.layer_prefix) come out of a padded batch, and a batch of another width or other rows rounds them
differently. So kept rows are computed in fixed groups (rows of similar length, in a fixed order), never in the
training batch that happens to need them first; and which rows are kept is fixed too: the first rows of that
order whose values fit in `prefix_cache_gb`. Rows past the budget are computed in each training batch that holds
them, which is the same batch whether or not the run was resumed. A resumed run therefore reads the very same
numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator

import torch
from torch import nn

from heft.data.tokens import Encoded, train_batch
from heft.training.runtime import model_forward

logger = logging.getLogger(__name__)

GROUP_ROWS = 16  # rows per pass that fills the store


def groups(lengths: list[int]) -> list[list[int]]:
    """Row indices with a non-zero length, sorted by (length, index) and cut into groups of GROUP_ROWS."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: (lengths[i], i))
    return [order[j:j + GROUP_ROWS] for j in range(0, len(order), GROUP_ROWS)]


class RowStore(dict):
    """Row index -> the row's kept tensor. The kept rows are fixed once the size of a token's values is known
    (`decide`): the first rows of `groups` whose values fit in the budget; `keep` stores only those."""

    def __init__(self, budget_gb: float, desc: str, what: str, groups: list[list[int]], lengths: list[int]):
        super().__init__()
        self.budget, self.desc, self.what = int(budget_gb * 1e9), desc, what
        self.order = [i for g in groups for i in g]
        self.lengths = lengths
        self.kept: frozenset[int] | None = None  # None until `decide`
        self.bytes = 0

    @property
    def full(self) -> bool:
        """Whether some rows are past the budget (computed in each batch that holds them)."""
        return self.kept is not None and len(self.kept) < len(self.order)

    def decide(self, bytes_per_token: int) -> None:
        """Fix the kept rows (once): the longest start of the fixed order whose values fit in the budget."""
        if self.kept is not None:
            return
        kept, used = [], 0
        for i in self.order:
            used += self.lengths[i] * bytes_per_token
            if used > self.budget:
                break
            kept.append(i)
        self.kept = frozenset(kept)
        if self.full:
            logger.info("%s: the %s holds %d of %d rows within prefix_cache_gb (%g GB); the others are recomputed "
                        "(without gradients) each time they come up", self.desc, self.what, len(kept), len(self.order),
                        self.budget / 1e9)

    def kept_share(self) -> float:
        """Share of the rows' tokens whose values are kept (0 until `decide`)."""
        total = sum(self.lengths[i] for i in self.order)
        return sum(self.lengths[i] for i in self.kept or ()) / total if total else 0.0

    def keep(self, fresh: dict[int, torch.Tensor]) -> None:
        for i, t in fresh.items():
            if self.kept is not None and i in self.kept and i not in self:
                self[i] = t
                self.bytes += t.numel() * t.element_size()


@dataclass
class Step:
    """One micro-batch as the chosen path runs it: `forward(model)` gives the logits the loss needs, compared with
    `targets`; `hold` is entered before the forward and left after the backward."""
    forward: Callable[[nn.Module], torch.Tensor]
    targets: torch.Tensor
    hold: ContextManager = field(default_factory=contextlib.nullcontext)


def full_step(rows: list[Encoded], idx: list[int], pad_id: int, device: torch.device,
              around: Callable[[int], ContextManager] | None = None) -> Step:
    """Rows `idx` as one left-padded micro-batch through the model's own forward, with the logits the loss needs;
    `around(width)`, if given: what to hold over its forward and backward."""
    cpu_batch = train_batch([rows[i] for i in idx], pad_id)
    keep = int(cpu_batch.pop("logits_to_keep"))
    batch = {k: v.to(device, non_blocking=True) for k, v in cpu_batch.items()}
    hold = around(batch["input_ids"].shape[1]) if around is not None else contextlib.nullcontext()
    return Step(lambda model: model_forward(model, batch, keep), batch["targets"], hold)


@contextlib.contextmanager
def frozen_pass(model: nn.Module) -> Iterator[None]:
    """Around a pass of the frozen model whose output is kept or reused: no gradients, and eval mode, so the pass
    draws no random numbers (dropout is refused on these paths, but some models draw them in training mode anyway,
    such as OPT's layerdrop) and the training run's random stream is the full path's."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)
