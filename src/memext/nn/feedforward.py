"""SwiGLU feed-forward, optionally applied a chunk of tokens at a time.

The feed-forward acts on each token independently, so it can run over the sequence in pieces of
``chunk`` tokens: the (chunk, hidden) activation replaces the (T, hidden) one and the output is
the same. In an ordinary training step this saves nothing (autograd keeps every chunk's
activations for backward); it pays off in no-grad inference and in the reversible backward
(``memext.nn.reversible``), which recomputes and backpropagates one chunk at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0, chunk: int = 0):
        super().__init__()
        if chunk < 0:
            raise ValueError(f"chunk={chunk} is invalid: expected 0 (all at once) or > 0")
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)  # one matmul for both halves
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.chunk = chunk

    def forward(self, x: Tensor) -> Tensor:
        """x (..., T, d_model) -> (..., T, d_model); chunks run in order along T."""
        if self.chunk and x.shape[-2] > self.chunk:
            return torch.cat([self._ff(c) for c in x.split(self.chunk, dim=-2)], dim=-2)
        return self._ff(x)

    def _ff(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.dropout(self.down(F.silu(gate) * up))
