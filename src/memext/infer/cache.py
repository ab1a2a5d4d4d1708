"""KV caches for incremental decoding.

Contract, shared by every cache policy: ``update(layer, k, v) -> (k_all, v_all)`` appends the new
keys/values of one layer and returns everything that layer's queries may attend to;
``advance(t)`` is called once per forward after all layers; ``seq_len`` is what is held.
"""

from __future__ import annotations

import torch
from torch import Tensor


class FullCache:
    """Keeps every key and value, preallocated to ``max_len`` positions."""

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.seq_len = 0

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.seq_len + k.shape[-2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        self.k[layer, :, :, self.seq_len : end] = k
        self.v[layer, :, :, self.seq_len : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.seq_len += t
