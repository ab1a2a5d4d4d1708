"""Memory beyond the attention window, behind one small contract, registered by the name
``ModelConfig.memory`` uses.

A memory variant is an ``nn.Module`` (it may own parameters: a compressor, a gate, memory-token
embeddings) whose *state* is a flat ``dict[str, Tensor]`` carried in ``State.memory`` from one
forward pass to the next. A flat dict of tensors is what safetensors saves, so pausing a long
document and resuming it is ``save_state`` / ``load_state`` (``memext.checkpoint``).

Hooks, each with a do-nothing default so a variant overrides only what it changes:

- ``init(batch, device, dtype)``: the empty state.
- ``enter(x, step)`` / ``leave(x, step)``: around the whole stack of blocks (RMT adds and removes
  memory tokens here).
- ``position_offset(pos)``: the rotary position of the first token of this call.
- ``attend(layer, q, k, v, kernel, step, q_raw, k_raw)``: one layer's attention; read memory,
  call the kernel, write what the next segment should see into ``step.new``. ``q_raw``/``k_raw``
  are the projections before rotary (position-free, for retrieval).
- ``detach(state)``: cut gradients (truncated backprop across segments).
- ``reset(state, rows)``: forget the rows of the batch that start a new document.

Every variant with an empty memory computes exactly what the plain model computes (a test).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from memext.registry import Registry

MemoryState = dict[str, Tensor]


@dataclass
class MemoryStep:
    """One forward pass's view of memory: the variant, the state read (``old``), the state being
    written (``new``, filled by the hooks) and auxiliary losses (``aux``) for the training loss."""

    memory: Memory
    old: MemoryState
    new: MemoryState = field(default_factory=dict)
    aux: list[Tensor] = field(default_factory=list)

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kernel: nn.Module,
        q_raw: Tensor,
        k_raw: Tensor,
    ) -> Tensor:
        return self.memory.attend(layer, q, k, v, kernel, self, q_raw, k_raw)


class Memory(nn.Module):
    """The ``none`` variant and the base of every other: no memory at all."""

    name = "none"
    #: False when the model's position limit applies to the whole stream (no memory), True when
    #: only one call's length is limited (the stream is read in segments).
    unbounded = False
    #: False when the memory's parameters or state are shaped by the full head count (a
    #: per-head gate, a convolution over all heads' features), so layers whose heads were
    #: pruned (``model.heads``) cannot use it.
    prunable = True

    def init(self, batch: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        return {}

    def position_offset(self, pos: int) -> int:
        return pos

    def enter(self, x: Tensor, step: MemoryStep) -> Tensor:
        return x

    def leave(self, x: Tensor, step: MemoryStep) -> Tensor:
        return x

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kernel: nn.Module,
        step: MemoryStep,
        q_raw: Tensor,
        k_raw: Tensor,
    ) -> Tensor:
        return kernel(q, k, v, causal=True)

    def detach(self, state: MemoryState) -> MemoryState:
        return {name: t.detach() for name, t in state.items()}

    def reset(self, state: MemoryState, rows: Tensor) -> MemoryState:
        """Forget everything in the batch rows where ``rows`` (B,) bool is True."""
        return state


MEMORY: Registry[type[Memory]] = Registry("memory")
register_memory = MEMORY.register
register_memory("none")(Memory)


def build_memory(name: str, config: Mapping[str, Any] | None = None, /, **settings: Any) -> Memory:
    """The memory registered as ``name``, built like ``build_attention``: the values of
    ``config`` its ``__init__`` names, overridden by ``settings``, each of which it must take."""
    return MEMORY.build(name, config, **settings)


def keep_rows(mask: Tensor, rows: Tensor) -> Tensor:
    """A validity mask (B, M) with the ``rows`` (B,) bool cleared: helper for ``reset``."""
    return mask & ~rows.to(mask.device)[:, None]


# Variants register themselves on import.
from memext.nn.memory import compressive, knn, tokens, xl  # noqa: E402, F401
