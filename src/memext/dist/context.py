"""Context parallelism in the trainer (``train.context_parallel=N``): the N ranks of a context
group read the same rows of every batch, each keeps its zig-zag shard of each sequence
(``cp_common.shard_sequence``), and attention spans the group through ring attention or Ulysses.

``ContextParallel.install(model)`` is the whole change to a ``LongLM``: each block's attention
kernel is wrapped (``ContextKernel``, which calls ``ring_attention`` or ``ulysses_attention`` over
the group with that kernel's settings), and the model's ``sequence_shard`` hook gives rotary the
shard's global positions and the whole sequence's length. ``remove`` undoes both; the wrapper
holds no parameter or buffer and does not register the kernel it wraps, so the model's
``state_dict`` is the same either way and a checkpoint reads into one process as always.

``shard_batch`` cuts a batch's inputs, targets and target weights, and gives its loss the
denominator that makes each rank's loss its share of the mean over the whole sequences: the
rows' tokens (or target weight) over N. DDP over every rank of the (dp, cp) mesh then averages
the gradients into those of the whole batch's mean (``memext.dist.strategy``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from memext.data.mixture import Batch
from memext.dist.cp_common import ring_window, shard_positions, shard_sequence
from memext.dist.ring import ring_attention
from memext.dist.ulysses import ulysses_attention
from memext.nn.attention import AttentionKernel
from memext.nn.transformer import LongLM

METHODS = ("ring", "ulysses")


class ContextKernel(AttentionKernel):
    """A registered kernel run over a context group: q, k, v are this rank's shard (zig-zag) and
    so is the output. ``ring``: the ring's own tiles reproduce ``full`` and undilated
    ``sliding`` (``cp_common.ring_window``); ``ulysses``: the kernel itself, on whole sequences
    of ``n_heads / N`` heads."""

    name = "context_parallel"

    def __init__(self, inner: AttentionKernel, group: dist.ProcessGroup, method: str):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"context parallel: unknown method {method!r}; expected {METHODS}")
        # Not a submodule: the model's state_dict keeps its names (kernels hold no state).
        self.__dict__["inner"] = inner
        self.group, self.method = group, method
        self.window = ring_window(inner) if method == "ring" else None
        self.shared_qk = inner.shared_qk
        self.prefix_exact = inner.prefix_exact
        self.bidirectional = inner.bidirectional

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        if key_padding is not None:
            raise ValueError("context parallel attention takes no key_padding")
        if self.method == "ring":
            return ring_attention(q, k, v, self.group, causal=causal, window=self.window)
        self.inner.train(self.training)
        return ulysses_attention(q, k, v, self.group, kernel=self.inner, causal=causal)

    def extra_repr(self) -> str:
        return f"method={self.method}, inner={self.inner!r}"


@dataclass
class ContextParallel:
    """This rank's place in its context group: ``rank`` of ``size`` ranks of ``group``."""

    group: dist.ProcessGroup
    rank: int
    size: int
    method: str = "ring"

    def positions(self, t: int, device: torch.device) -> tuple[Tensor, int]:
        """The model's ``sequence_shard`` hook: global positions of this rank's ``t`` rows and
        the whole sequence's length."""
        whole = t * self.size
        return shard_positions(whole, self.rank, self.size, device=device), whole

    def shard_batch(self, batch: Batch) -> Batch:
        """This rank's shard of every sequence of ``batch`` (inputs and targets are already
        shifted, so each keeps its pairs), with the loss denominator of the whole sequences
        over the group's ranks."""
        if batch.src is not None:
            raise ValueError("context parallelism splits decoder-only batches, not source/target")
        if batch.denom is not None:  # a data-parallel rank's rows: the whole batch's share
            whole = batch.denom
        elif batch.weights is not None:
            whole = float(batch.weights.float().sum())
        else:
            whole = float(batch.y.numel())

        def cut(x: Tensor) -> Tensor:
            return shard_sequence(x, self.rank, self.size, dim=1)

        return dataclasses.replace(
            batch,
            x=cut(batch.x),
            y=cut(batch.y),
            weights=None if batch.weights is None else cut(batch.weights),
            denom=whole / self.size,
        )

    def install(self, model: torch.nn.Module) -> None:
        """Make ``model`` (a ``LongLM``) read this rank's shards: attention over the group,
        rotary at global positions."""
        if not isinstance(model, LongLM):
            raise ValueError(
                f"context parallelism trains a decoder-only LongLM, not {type(model).__name__}"
            )
        for block in model.blocks:
            attn = block.attn
            if not isinstance(attn.kernel, ContextKernel):
                attn.kernel = ContextKernel(attn.kernel, self.group, self.method)
        model.sequence_shard = self.positions

    def remove(self, model: torch.nn.Module) -> None:
        """The model as it was before ``install``: whole sequences, in one process."""
        for block in model.blocks:
            attn = block.attn
            if isinstance(attn.kernel, ContextKernel):
                attn.kernel = attn.kernel.inner
        model.sequence_shard = None

    @contextlib.contextmanager
    def paused(self, model: torch.nn.Module) -> Iterator[None]:
        """``model`` reads whole sequences in this process for the duration (rank 0's probes)."""
        self.remove(model)
        try:
            yield
        finally:
            self.install(model)
