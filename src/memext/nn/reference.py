"""Naive, obviously-correct twins of the fast paths: dense masks and plain softmax.

Used by the tests and by anyone debugging a kernel; never on a hot path. Every mask is a bool
tensor, True = may attend, shaped (Tq, Tk) or broadcastable to (B, H, Tq, Tk). Queries sit at the
last Tq key positions (the kernels' bottom-right alignment).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _positions(tq: int, tk: int, device: torch.device | None) -> tuple[Tensor, Tensor]:
    q_pos = torch.arange(tq, device=device)[:, None] + (tk - tq)
    k_pos = torch.arange(tk, device=device)[None, :]
    return q_pos, k_pos


def causal_mask(tq: int, tk: int, device: torch.device | None = None) -> Tensor:
    """(Tq, Tk): query i sits at key position i + Tk - Tq and sees every key up to itself."""
    q_pos, k_pos = _positions(tq, tk, device)
    return k_pos <= q_pos


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q kᵀ / sqrt(D) masked) v in the input dtype's math, on (B, H, T, D).

    A query with no visible key gets a row of NaN, exactly as the formula says; kernels must never
    produce one (each variant's rules guarantee at least one visible key).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
