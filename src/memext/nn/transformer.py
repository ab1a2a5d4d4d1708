"""LongLM: a decoder-only Transformer whose forward carries a ``State`` across calls."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from memext.nn.block import Block
from memext.nn.reversible import reversible_stack
from memext.nn.rotary import Rotary


@dataclass
class State:
    """What a forward pass hands to the next one.

    ``pos``: tokens consumed so far (the position of the next token); ``cache``: a KV-cache policy
    for incremental decoding (``memext.infer.cache``); ``memory``: a memory variant's carried state.
    """

    pos: int = 0
    cache: Any = None
    memory: Any = None


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

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (B, T) int64 -> logits (B, T, vocab) fp32-or-autocast, and the next State."""
        state = state or State()
        t = tokens.shape[1]
        if (state.pos + t > self.max_seq_len and state.cache is None) or t > self.max_seq_len:
            raise ValueError(
                f"sequence of {state.pos + t} tokens exceeds the model's limit "
                f"max_seq_len={self.max_seq_len}"
            )
        positions = torch.arange(state.pos, state.pos + t, device=tokens.device)
        cos, sin = self.rotary(positions)
        x = self.embed(tokens)
        if self.reversible:
            x = reversible_stack(
                self.blocks, x, cos, sin, state.cache, recompute=self.reversible_backward
            )
        else:
            for i, block in enumerate(self.blocks):
                if self.activation_checkpointing and self.training:
                    x = checkpoint(block, x, cos, sin, state.cache, i, use_reentrant=False)
                else:
                    x = block(x, cos, sin, state.cache, i)
        if state.cache is not None:
            state.cache.advance(t)
        logits = self.head(self.norm(x))
        return logits, replace(state, pos=state.pos + t)

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        return n - self.embed.weight.numel() if exclude_embedding else n
