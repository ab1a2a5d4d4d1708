"""Naive, obviously-correct twins of the fast paths: dense masks and plain softmax.

Used by the tests and by anyone debugging a kernel; never on a hot path.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> Tensor:
    """(Tq, Tk) bool, True = may attend; query i sits at key position i + Tk - Tq."""
    q_pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    k_pos = torch.arange(tk, device=device)[None, :]
    return k_pos <= q_pos


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(D) masked) v in the input dtype's math, on (B, H, T, D)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
