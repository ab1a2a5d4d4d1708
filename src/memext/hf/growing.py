"""transformers' ``DynamicCache`` without the per-token copy of the whole cache.

``DynamicLayer.update`` concatenates: every decoded token copies each layer's keys and values into
a new tensor one token longer. At 8k tokens on SmolLM2 that is ~380 MB read and written per token,
about 6% of a 2-core CPU decode step (measured: 103 against 97 ms a token). ``GrowingLayer`` keeps
the same tensors in room allocated ahead (the capacity it is given, doubling past it) and writes
each update in place; what attention gets back is a view of the first ``n`` rows, equal element
for element to the concatenation, so outputs do not change.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` that writes into preallocated room (``capacity`` tokens, doubled when
    outgrown). ``keys``/``values`` stay what ``DynamicLayer`` holds, views of the room, so crop,
    reorder and the length queries of the base class keep working: an update after one of those
    replaced the tensors copies them into fresh room first."""

    def __init__(self, capacity: int = 0) -> None:
        super().__init__()
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 tokens, got {capacity}")
        self.capacity = capacity
        self._room: tuple[Tensor, Tensor] | None = None

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.get_seq_length(), key_states.shape[-2]
        if not self._fits(n + t, key_states):
            self._regrow(n, n + t, key_states, value_states)
        assert self._room is not None
        k_room, v_room = self._room
        k_room[..., n : n + t, :] = key_states
        v_room[..., n : n + t, :] = value_states
        self.keys, self.values = k_room[..., : n + t, :], v_room[..., : n + t, :]
        return self.keys, self.values

    def _fits(self, need: int, key_states: Tensor) -> bool:
        room = self._room
        if room is None or room[0].shape[-2] < need:
            return False
        same_kind = (
            room[0].shape[:-2] == key_states.shape[:-2]
            and room[0].dtype == key_states.dtype
            and room[0].device == key_states.device
        )
        # The held keys must still be the room's own rows (crop keeps them; reorder does not).
        held = (
            self.keys is None
            or self.keys.numel() == 0
            or self.keys.data_ptr() == room[0].data_ptr()
        )
        return same_kind and held

    def _regrow(self, n: int, need: int, key_states: Tensor, value_states: Tensor) -> None:
        size = max(self.capacity, need, 2 * n)
        k_room = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
        v_room = value_states.new_empty((*value_states.shape[:-2], size, value_states.shape[-1]))
        if n:
            k_room[..., :n, :] = self.keys
            v_room[..., :n, :] = self.values
        self._room = (k_room, v_room)

    def reset(self) -> None:
        self._room = None
        super().reset()


def growing_cache(config: Any, capacity: int = 0) -> DynamicCache:
    """A ``DynamicCache`` for ``config``'s model whose layers are ``GrowingLayer`` with room for
    ``capacity`` tokens (the prompt plus the tokens to generate, when known)."""
    cache = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        # Sliding or other special layers: keep transformers' own, which know their rules.
        return cache
    cache.layers = [GrowingLayer(capacity) for _ in cache.layers]
    return cache
