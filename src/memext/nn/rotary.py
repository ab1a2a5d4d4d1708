"""Rotary position embedding (RoPE), in the rotate-half layout that Hugging Face Llama uses.

Scaling rules for reading beyond the training length live in ``memext.nn.rope_scaling``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memext.nn.rope_scaling import build_rule, check_rope_args


class Rotary(nn.Module):
    """Produces (cos, sin) for given positions; ``apply_rotary`` rotates q and k with them.

    ``scaling`` names a rule of ``memext.nn.rope_scaling`` (``factor``, ``original_len``: the
    length the model was trained at; ``alpha``/``beta``: YaRN's ramp ends in rotations, None for
    its defaults, ignored by other rules). cos and sin come multiplied by the rule's attention
    factor (YaRN's temperature), as in transformers.
    """

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        scaling: str = "none",
        factor: float = 1.0,
        original_len: int = 0,
        alpha: float | None = None,
        beta: float | None = None,
    ):
        super().__init__()
        check_rope_args(scaling, head_dim, factor, original_len)
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.factor, self.original_len = factor, original_len
        self._rule = build_rule(scaling, alpha, beta)
        # For a length-dependent rule this is its value at lengths <= original_len (unscaled).
        inv_freq, self.attention_factor = self._compute(None)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._long_inv_freq: Tensor | None = None
        self._long_len = 0

    def _compute(self, seq_len: int | None) -> tuple[Tensor, float]:
        return self._rule.frequencies(
            self.head_dim, self.base, self.factor, self.original_len, seq_len
        )

    def frequencies(self, seq_len: int) -> Tensor:
        """The inverse frequencies used when ``seq_len`` tokens have been read, (head_dim/2,)."""
        if not self._rule.uses_seq_len or seq_len <= self.original_len:
            return self.inv_freq
        stale = self._long_inv_freq is None or self._long_inv_freq.device != self.inv_freq.device
        if stale or self._long_len != seq_len:
            # Recomputed only when the length beyond original_len changes, not every call.
            inv_freq, _ = self._compute(seq_len)
            self._long_inv_freq = inv_freq.to(self.inv_freq.device, self.inv_freq.dtype)
            self._long_len = seq_len
        return self._long_inv_freq

    def forward(self, positions: Tensor, seq_len: int | None = None) -> tuple[Tensor, Tensor]:
        """positions (T,) int -> cos, sin each (T, head_dim) in fp32. ``seq_len``: the length of
        the sequence read so far (``positions[-1] + 1`` when None); rules that depend on it
        (dynamic NTK) use it. Keys already cached keep the rotation they were given, as in
        transformers."""
        inv_freq = self.inv_freq
        if self._rule.uses_seq_len:
            if seq_len is None:
                seq_len = int(positions.max()) + 1 if positions.numel() else 0
            inv_freq = self.frequencies(seq_len)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos, sin

    def extra_repr(self) -> str:
        if self.scaling == "none":
            return f"head_dim={self.head_dim}, base={self.base}"
        return (
            f"head_dim={self.head_dim}, base={self.base}, scaling={self.scaling!r}, "
            f"factor={self.factor}, original_len={self.original_len}"
        )


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D); cos/sin (T, D). Computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)
