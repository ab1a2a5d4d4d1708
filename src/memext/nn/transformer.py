"""LongLM: a decoder-only Transformer whose forward carries a ``State`` across calls."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memext.nn.block import Block
from memext.nn.memory import Memory, MemoryStep
from memext.nn.reversible import reversible_stack
from memext.nn.rotary import Rotary


@dataclass
class State:
    """What a forward pass hands to the next one.

    ``pos``: tokens consumed so far (the position of the next token); ``cache``: a KV-cache policy
    for incremental decoding (``memext.infer.cache``); ``memory``: a memory variant's carried state
    (a flat dict of tensors, ``memext.nn.memory``); ``aux_loss``: what the memory asks to add to
    the training loss for the call that returned this state (compressive memory's reconstruction).
    """

    pos: int = 0
    cache: Any = None
    memory: Any = None
    aux_loss: Any = None


class LongLM(nn.Module):
    """Embedding, blocks, final norm, head.

    ``reversible``: the blocks are RevNet-coupled (``memext.nn.reversible``) and their backward
    recomputes activations instead of storing them; ``activation_checkpointing`` is then ignored
    (there is nothing left to checkpoint). ``reversible_backward = False`` computes the same
    coupled model with plain autograd, for comparison.
    """

    def __init__(
        self,
        embed: nn.Embedding,
        blocks: list[Block],
        norm: nn.Module,
        head: nn.Linear,
        rotary: Rotary,
        max_seq_len: int,
        reversible: bool = False,
        memory: Memory | None = None,
    ):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head
        self.rotary = rotary
        self.max_seq_len = max_seq_len
        self.activation_checkpointing = False
        self.reversible = reversible
        self.reversible_backward = True
        self.memory = memory if memory is not None else Memory()
        #: Set by ``memext.checkpoint.load`` for models trained in segments: generation then
        #: reads long input segment by segment, as training did.
        self.segment_len: int | None = None
        #: Context parallelism (``memext.dist.context``): when set, each forward reads this rank's
        #: shard of a longer sequence, and ``sequence_shard(t, device)`` gives the shard's global
        #: positions and the whole sequence's length, for rotary and the length limit.
        self.sequence_shard: Callable[[int, torch.device], tuple[Tensor, int]] | None = None
        if reversible and self.memory.name != "none":
            raise ValueError("reversible blocks cannot read memory: choose one of the two")

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (B, T) int64 -> logits (B, T, vocab) fp32-or-autocast, and the next State."""
        state = state or State()
        t = tokens.shape[1]
        positions = None
        if self.sequence_shard is not None:  # context parallel: a shard of the whole sequence
            if state.pos or state.cache is not None or self.memory.name != "none":
                raise ValueError(
                    "context parallelism reads each sequence whole in one forward: no KV cache, "
                    "memory or earlier segments"
                )
            positions, whole = self.sequence_shard(t, tokens.device)
        # Memories and bounded KV caches (window, sinks) read unbounded input: only the chunk
        # must fit. A full cache keeps every position, so the whole sequence must.
        if state.cache is None:
            unbounded = self.memory.unbounded
        else:
            unbounded = getattr(state.cache, "unbounded", False)
        limited = t if unbounded else state.pos + t
        if positions is not None:
            limited = whole
        if limited > self.max_seq_len:
            raise ValueError(
                f"sequence of {limited} tokens exceeds the model's limit "
                f"max_seq_len={self.max_seq_len}"
            )
        if state.cache is not None and self.memory.name != "none":
            raise ValueError(
                f"memory {self.memory.name!r} reads segments without a KV cache: pass cache=None"
            )
        x = self.embed(tokens)
        old = state.memory
        if old is None:
            old = self.memory.init(tokens.shape[0], tokens.device, x.dtype)
        step = MemoryStep(self.memory, old)
        x = self.memory.enter(x, step)
        start = self.memory.position_offset(state.pos)
        if hasattr(state.cache, "position"):  # sinks: positions inside the cache
            start = state.cache.position(state.pos)
        end = start + x.shape[1]
        if positions is None:
            cos, sin = self.rotary(torch.arange(start, end, device=tokens.device), seq_len=end)
        else:  # rotated as one process reading the whole sequence would
            cos, sin = self.rotary(positions, seq_len=whole)
        if self.reversible:
            x = reversible_stack(
                self.blocks, x, cos, sin, state.cache, recompute=self.reversible_backward
            )
        else:
            for i, block in enumerate(self.blocks):
                if self.activation_checkpointing and self.training:
                    x = checkpoint(block, x, cos, sin, state.cache, i, step, use_reentrant=False)
                else:
                    x = block(x, cos, sin, state.cache, i, step)
        x = self.memory.leave(x, step)
        if state.cache is not None:
            state.cache.advance(t)
        logits = self.head(self.norm(x))
        aux = torch.stack(step.aux).sum() if step.aux else None
        # A copy: activation checkpointing re-runs the hooks in backward, writing into step.new.
        return logits, replace(state, pos=state.pos + t, memory=dict(step.new), aux_loss=aux)

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        return n - self.embed.weight.numel() if exclude_embedding else n
