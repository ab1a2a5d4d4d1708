"""Reversible (RevNet-coupled) residual blocks, as in Reformer.

The residual stream is duplicated into two streams, ``x1 = x2 = x``, and each ``Block``'s two
branches are coupled across them::

    y1 = x1 + attn(norm(x2))        x2 = y2 - ffn(norm(y1))
    y2 = x2 + ffn(norm(y1))         x1 = y1 - attn(norm(x2))

The right-hand column is the inverse: a block's inputs follow from its outputs. After the last
block the streams are merged as ``(y1 + y2) / 2`` (before the final norm; the mean keeps the
scale of one stream, and at init both streams carry the embedding).

Memory: an ordinary stack keeps every block's activations for backward, so activation memory
grows linearly with depth. ``ReversibleStack`` runs the blocks without building a graph and keeps
only the last ``(y1, y2)``. Its backward walks the blocks from last to first: it recomputes each
branch with grad enabled, backpropagates through it, and subtracts the branch's output to recover
the block's inputs, so only one block's activations are alive at any time; peak activation memory
does not depend on depth. The feed-forward acts token by token, so its recompute and backward run
``ffn.chunk`` tokens at a time (``SwiGLU(chunk=...)``), and only one chunk's hidden activation is
alive. The price, as with activation checkpointing: every branch's forward runs twice (in forward,
and recomputed in backward). And inversion is exact only up to floating-point rounding: the
recovered inputs are off by about the stream's ulp times the branches' gain, which compounds
from block to block. At moderate weights this is negligible (measured, 4 blocks of width 32:
~1e-8 at init std 0.02, ~1e-5 at std 0.2), but very large weights (std 0.5: ~1e-2) make it
visible, a known weakness of reversible networks.

Randomness (dropout, random LSH rotations) is replayed: the RNG state is saved before each branch
in forward and restored when that branch is recomputed, as ``torch.utils.checkpoint`` does; so is
the autocast state. Activation checkpointing has nothing left to save here, so ``LongLM`` ignores
``activation_checkpointing`` for reversible models.

Without grad (evaluation, generation with a KV cache) the coupled blocks simply run forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from memext.nn.block import Block


def couple(
    block: Block,
    x1: Tensor,
    x2: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache: Any = None,
    layer: int = 0,
) -> tuple[Tensor, Tensor]:
    """One coupled block: (x1, x2) -> (y1, y2)."""
    y1 = x1 + block.attn_branch(x2, cos, sin, cache, layer)
    y2 = x2 + block.ffn_branch(y1)
    return y1, y2


def invert(
    block: Block, y1: Tensor, y2: Tensor, cos: Tensor, sin: Tensor, layer: int = 0
) -> tuple[Tensor, Tensor]:
    """The inverse of ``couple`` (without a cache): (y1, y2) -> (x1, x2), up to rounding."""
    x2 = y2 - block.ffn_branch(y1)
    x1 = y1 - block.attn_branch(x2, cos, sin, None, layer)
    return x1, x2


def merge(y1: Tensor, y2: Tensor) -> Tensor:
    """The two streams back into one residual stream, for the final norm."""
    return (y1 + y2) / 2


def reversible_stack(
    blocks: Sequence[Block],
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    cache: Any = None,
    *,
    recompute: bool = True,
) -> Tensor:
    """Run ``blocks`` coupled on the duplicated stream ``x`` (B, T, D) -> merged (B, T, D).

    With grad enabled, no cache and ``recompute``, the backward inverts the blocks instead of
    storing their activations. ``recompute=False`` computes the same function with plain autograd
    (activations stored): the twin that tests compare the custom backward against.
    """
    params = [p for block in blocks for p in block.parameters() if p.requires_grad]
    if recompute and cache is None and torch.is_grad_enabled() and (x.requires_grad or params):
        y1, y2 = ReversibleStack.apply(x, cos, sin, blocks, *params)
        return merge(y1, y2)
    x1 = x2 = x
    for i, block in enumerate(blocks):
        x1, x2 = couple(block, x1, x2, cos, sin, cache, i)
    return merge(x1, x2)


class _Replay:
    """The RNG state of one moment of the forward pass, to re-enter in backward."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def restored(self) -> Iterator[None]:
        # fork_rng puts the global RNG back afterwards, so backward does not shift later draws.
        devices = [self.device] if self.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng, self.device)
            yield


def _autocast_state(device_type: str) -> dict[str, Any]:
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


class ReversibleStack(torch.autograd.Function):
    """The whole coupled stack as one autograd node that stores only its outputs.

    ``apply(x, cos, sin, blocks, *params)`` -> (y1, y2). ``params`` are the blocks' trainable
    parameters, passed as inputs so their gradients are returned through autograd (they then
    accumulate into ``.grad`` as usual, and ``torch.autograd.grad`` sees them too). ``cos`` and
    ``sin`` are treated as constants.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, cos: Tensor, sin: Tensor, blocks: Sequence[Block], *params):
        ctx.blocks = blocks
        ctx.params = params
        ctx.amp = _autocast_state(x.device.type)
        ctx.replays = []
        x1 = x2 = x
        for i, block in enumerate(blocks):
            before_attn = _Replay(x.device)
            y1 = x1 + block.attn_branch(x2, cos, sin, None, i)
            before_ffn = _Replay(x.device)
            x2 = x2 + block.ffn_branch(y1)
            x1 = y1
            ctx.replays.append((before_attn, before_ffn))
        ctx.save_for_backward(x1, x2, cos, sin)
        return x1, x2

    @staticmethod
    def backward(ctx: Any, dy1: Tensor, dy2: Tensor):
        y1, y2, cos, sin = ctx.saved_tensors
        position = {id(p): j for j, p in enumerate(ctx.params)}
        param_grads: list[Tensor | None] = [None] * len(ctx.params)
        for i in reversed(range(len(ctx.blocks))):
            block = ctx.blocks[i]
            owned = [p for p in block.parameters() if id(p) in position]
            before_attn, before_ffn = ctx.replays[i]
            chunk = getattr(block.ffn, "chunk", 0)
            # y2 = x2 + g(y1): recover x2, and y1's gradient gains g's contribution.
            x2, dy1_g, grads = _undo_branch(
                block.ffn_branch, y1, y2, dy2, owned, chunk, before_ffn, ctx.amp
            )
            dy1 = dy1 + dy1_g
            _accumulate(param_grads, position, owned, grads)
            # y1 = x1 + f(x2): recover x1, and x2's gradient gains f's contribution.

            def attn(t: Tensor, block: nn.Module = block, i: int = i) -> Tensor:
                return block.attn_branch(t, cos, sin, None, i)

            x1, dx2_f, grads = _undo_branch(attn, x2, y1, dy1, owned, 0, before_attn, ctx.amp)
            dy2 = dy2 + dx2_f
            _accumulate(param_grads, position, owned, grads)
            y1, y2 = x1, x2
        # x1 = x2 = x: the duplicated input's gradient is the sum of both streams'.
        return (dy1 + dy2, None, None, None, *param_grads)


def _undo_branch(
    branch: Callable[[Tensor], Tensor],
    inp: Tensor,
    out: Tensor,
    grad_out: Tensor,
    params: list[nn.Parameter],
    chunk: int,
    replay: _Replay,
    amp: dict[str, Any],
) -> tuple[Tensor, Tensor, list[Tensor | None]]:
    """For ``out = res + branch(inp)``: returns ``res``, d(loss)/d(inp) through the branch given
    d(loss)/d(out) = ``grad_out``, and the gradients of ``params``.

    ``chunk`` > 0 runs a token-wise branch that many positions (dim -2) at a time, in the same
    order as the forward pass so the replayed RNG gives the same dropout masks.
    """
    res = torch.empty_like(out)
    d_inp = torch.empty_like(inp)
    total: list[Tensor | None] = [None] * len(params)
    n = inp.shape[-2]
    step = chunk if chunk > 0 else n
    with replay.restored(), torch.autocast(**amp):
        for start in range(0, n, step):
            size = min(step, n - start)
            piece = inp.narrow(-2, start, size).detach().requires_grad_()
            with torch.enable_grad():
                y = branch(piece)
            grads = torch.autograd.grad(
                y, [piece, *params], grad_out.narrow(-2, start, size), allow_unused=True
            )
            res.narrow(-2, start, size).copy_(out.narrow(-2, start, size) - y.detach())
            d_inp.narrow(-2, start, size).copy_(grads[0])
            for j, g in enumerate(grads[1:]):
                if g is not None:
                    total[j] = g if total[j] is None else total[j] + g
    return res, d_inp, total


def _accumulate(
    into: list[Tensor | None],
    position: dict[int, int],
    params: list[nn.Parameter],
    grads: list[Tensor | None],
) -> None:
    for p, g in zip(params, grads, strict=True):
        if g is not None:
            j = position[id(p)]
            into[j] = g if into[j] is None else into[j] + g
