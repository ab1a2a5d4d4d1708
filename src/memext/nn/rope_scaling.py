"""Rotary scaling: how a model trained on sequences of ``original_len`` reads longer ones.

A rule (a ``RopeRule``, registered in ``ROPE_SCALING``) maps (head_dim d, base b, factor s,
original_len L, seq_len n) and its own settings (YaRN's alpha, beta) to the inverse frequencies
θ_i, i = 0 .. d/2 - 1, and an attention factor that multiplies cos and sin (so it scales every
q·k logit by its square, the way Hugging Face applies YaRN's temperature). Unscaled,
θ_i = b^(-2i/d). Each rule also writes itself as a transformers ``rope_parameters`` dict.

- ``none``: θ unchanged.
- ``linear`` (Position Interpolation, Chen et al. 2023): θ_i / s, i.e. position p reads as p / s.
- ``ntk`` (NTK-aware, bloc97): the base becomes b · s^(d/(d-2)). The highest frequency (i = 0)
  stays, the lowest is divided by exactly s, and the rest move geometrically in between.
- ``dynamic`` (dynamic NTK, emozilla): no change while n <= L; above it ``ntk`` with the factor
  s · n / L - (s - 1), which grows from 1 at n = L. Follows transformers' ``dynamic`` type.
- ``yarn`` (Peng et al. 2023, "NTK-by-parts" + temperature): pair i turns r_i = L θ_i / 2π times
  over the original length. Pairs turning more than ``beta`` times keep θ_i, pairs turning fewer
  than ``alpha`` times take θ_i / s, and a linear ramp in i blends the two in between (its ends
  rounded outwards to whole pairs). Attention factor 0.1 · ln(s) + 1 for s > 1. Follows
  transformers' ``yarn`` type with beta_slow = alpha, beta_fast = beta.

A new rule is a ``RopeRule`` subclass with ``@register_rope_scaling("name")``: its settings are
``__init__`` keywords named like ``ModelConfig`` fields, checked by a class method ``check``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from memext.registry import Registry, SettingError, check_int


def unscaled_inv_freq(head_dim: int, base: float) -> Tensor:
    """b^(-2i/d) in float64; ``Rotary``'s unscaled buffer is exactly this rounded to float32."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


class RopeRule:
    """The ``none`` rule, and the base of every other: plain RoPE."""

    name = "none"
    #: Its frequencies depend on the length read so far, so they cannot be computed once.
    uses_seq_len = False
    #: It stretches positions past ``original_len``, so it needs that length (> 0).
    scales = True
    #: The smallest head_dim its formula allows.
    min_head_dim = 2

    def frequencies(
        self, head_dim: int, base: float, factor: float, original_len: int, seq_len: int | None
    ) -> tuple[Tensor, float]:
        """(inv_freq float64 (head_dim/2,), attention factor)."""
        return unscaled_inv_freq(head_dim, base), 1.0

    def hf_parameters(
        self, base: float, factor: float, original_len: int, head_dim: int | None
    ) -> dict[str, Any]:
        """The transformers 5.x ``config.rope_parameters`` that computes this rule; only the keys
        transformers reads for that ``rope_type`` (others make it warn)."""
        return {"rope_type": "default", "rope_theta": float(base)}

    def hf_max_positions(self, factor: float, original_len: int) -> int:
        """What transformers' ``config.max_position_embeddings`` must say under this rule."""
        return max(original_len, math.floor(factor * original_len))


ROPE_SCALING: Registry[type[RopeRule]] = Registry("rope scaling")
register_rope_scaling = ROPE_SCALING.register


@register_rope_scaling("none")
class NoScaling(RopeRule):
    scales = False

    def hf_max_positions(self, factor: float, original_len: int) -> int:
        return original_len


@register_rope_scaling("linear")
class Linear(RopeRule):
    def frequencies(
        self, head_dim: int, base: float, factor: float, original_len: int, seq_len: int | None
    ) -> tuple[Tensor, float]:
        return unscaled_inv_freq(head_dim, base) / factor, 1.0

    def hf_parameters(
        self, base: float, factor: float, original_len: int, head_dim: int | None
    ) -> dict[str, Any]:
        return {"rope_type": "linear", "rope_theta": float(base), "factor": float(factor)}


def _ntk_base(head_dim: int, base: float, factor: float) -> float:
    # The exponent d/(d-2) makes the lowest frequency b^(-(d-2)/d) come out divided by exactly s.
    return base * factor ** (head_dim / (head_dim - 2))


@register_rope_scaling("ntk")
class NTK(RopeRule):
    min_head_dim = 4  # d/(d-2)

    def frequencies(
        self, head_dim: int, base: float, factor: float, original_len: int, seq_len: int | None
    ) -> tuple[Tensor, float]:
        return unscaled_inv_freq(head_dim, _ntk_base(head_dim, base, factor)), 1.0

    def hf_parameters(
        self, base: float, factor: float, original_len: int, head_dim: int | None
    ) -> dict[str, Any]:
        # transformers has no static NTK type, but NTK is exactly plain RoPE with a larger base.
        if head_dim is None:
            raise ValueError(
                "rope scaling 'ntk' maps to transformers' default type with a larger rope_theta, "
                "which depends on head_dim: pass head_dim"
            )
        return {"rope_type": "default", "rope_theta": _ntk_base(head_dim, base, factor)}


@register_rope_scaling("dynamic")
class Dynamic(RopeRule):
    uses_seq_len = True
    min_head_dim = 4

    def frequencies(
        self, head_dim: int, base: float, factor: float, original_len: int, seq_len: int | None
    ) -> tuple[Tensor, float]:
        if seq_len is None or seq_len <= original_len:
            # Exactly unscaled: s·L/L - (s-1) need not round to 1.
            return unscaled_inv_freq(head_dim, base), 1.0
        effective = factor * seq_len / original_len - (factor - 1)
        return unscaled_inv_freq(head_dim, _ntk_base(head_dim, base, effective)), 1.0

    def hf_parameters(
        self, base: float, factor: float, original_len: int, head_dim: int | None
    ) -> dict[str, Any]:
        return {"rope_type": "dynamic", "rope_theta": float(base), "factor": float(factor)}

    def hf_max_positions(self, factor: float, original_len: int) -> int:
        # transformers' dynamic type reads the original length from max_position_embeddings.
        return original_len


def _pair_turning(rotations: float, head_dim: int, base: float, original_len: int) -> float:
    """The (fractional) pair index i whose wavelength 2π b^(2i/d) fits ``rotations`` times in
    ``original_len``."""
    return head_dim * math.log(original_len / (2 * math.pi * rotations)) / (2 * math.log(base))


@register_rope_scaling("yarn")
class YaRN(RopeRule):
    """``yarn_alpha``/``yarn_beta``: the ramp's ends, in rotations over the original length."""

    def __init__(self, yarn_alpha: float = 1.0, yarn_beta: float = 32.0) -> None:
        self.check(yarn_alpha, yarn_beta)
        self.alpha, self.beta = yarn_alpha, yarn_beta

    @classmethod
    def check(cls, yarn_alpha: float, yarn_beta: float) -> None:
        for setting, value in (("yarn_alpha", yarn_alpha), ("yarn_beta", yarn_beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise SettingError(cls.name, setting, value, "a number > 0")
        if yarn_alpha >= yarn_beta:
            accepted = f"< yarn_beta={yarn_beta}: the ramp needs 0 < alpha < beta (rotations)"
            raise SettingError(cls.name, "yarn_alpha", yarn_alpha, accepted)

    def frequencies(
        self, head_dim: int, base: float, factor: float, original_len: int, seq_len: int | None
    ) -> tuple[Tensor, float]:
        theta = unscaled_inv_freq(head_dim, base)
        # Many turns (small i) = beta's end, few turns = alpha's end. The bounds are rounded
        # outwards and clipped to [0, d - 1] as the YaRN reference code and transformers do; an
        # empty ramp becomes a step (pair `start` kept, later pairs interpolated). A reversed one
        # (original_len under 2π·alpha, or so long that every pair turns over beta times) is
        # where transformers' ramp turns upside down; here it stays that step.
        start = max(math.floor(_pair_turning(self.beta, head_dim, base, original_len)), 0)
        stop = min(math.ceil(_pair_turning(self.alpha, head_dim, base, original_len)), head_dim - 1)
        width = max(stop - start, 1e-3)
        pairs = torch.arange(head_dim // 2, dtype=torch.float64)
        interpolated = ((pairs - start) / width).clamp(0.0, 1.0)
        inv_freq = theta * (1.0 - interpolated) + (theta / factor) * interpolated
        temperature = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        return inv_freq, temperature

    def hf_parameters(
        self, base: float, factor: float, original_len: int, head_dim: int | None
    ) -> dict[str, Any]:
        return {
            "rope_type": "yarn",
            "rope_theta": float(base),
            "factor": float(factor),
            "original_max_position_embeddings": int(original_len),
            "beta_fast": float(self.beta),
            "beta_slow": float(self.alpha),
        }


def build_rule(
    name: str, alpha: float | None = None, beta: float | None = None, *, strict: bool = False
) -> RopeRule:
    """Rule ``name`` with YaRN's ramp ends where given (None: the rule's own default).

    ``strict``: a rule without a ramp refuses them (a user asked for them by hand); otherwise
    they are ignored there, as a config's yarn fields are under another rule.
    """
    given = {k: v for k, v in (("yarn_alpha", alpha), ("yarn_beta", beta)) if v is not None}
    return ROPE_SCALING.build(name, **given) if strict else ROPE_SCALING.build(name, given)


def check_rope_args(name: str, head_dim: int | None, factor: float, original_len: int) -> None:
    """Refuse the arguments every rule shares when rule ``name`` cannot use them, with a
    ``SettingError`` naming the argument and its value; ``head_dim=None`` skips its checks."""
    rule = ROPE_SCALING.lookup(name)
    if head_dim is not None and (head_dim < rule.min_head_dim or head_dim % 2):
        accepted = f"an even number >= {rule.min_head_dim} for rope scaling {name!r}"
        raise SettingError("rotary", "head_dim", head_dim, accepted)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise SettingError("rotary", "rope_factor", factor, "a number > 0")
    if not math.isfinite(factor):  # --factor inf: the new length would overflow
        raise SettingError("rotary", "rope_factor", factor, "a finite number > 0")
    check_int("rotary", "rope_original_len", original_len, 0)
    if rule.scales and original_len == 0:
        accepted = f"the length the model was trained at (> 0) when rope_scaling={name!r}"
        raise SettingError("rotary", "rope_original_len", original_len, accepted)


def rope_frequencies(
    name: str,
    head_dim: int,
    base: float,
    *,
    factor: float = 1.0,
    original_len: int = 0,
    seq_len: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
) -> tuple[Tensor, float]:
    """(inv_freq float64 (head_dim/2,), attention factor) of rule ``name``, arguments checked;
    ``alpha``/``beta``: YaRN's ramp ends (None: its defaults; other rules ignore them)."""
    check_rope_args(name, head_dim, factor, original_len)
    return build_rule(name, alpha, beta).frequencies(head_dim, base, factor, original_len, seq_len)


def hf_rope_parameters(
    name: str,
    factor: float,
    original_len: int,
    alpha: float | None = None,
    beta: float | None = None,
    base: float = 10000.0,
    head_dim: int | None = None,
) -> dict[str, Any]:
    """The transformers 5.x ``config.rope_parameters`` dict that computes rule ``name`` (see
    ``RopeRule.hf_parameters``; ``ntk`` needs ``head_dim``, the rotary dimension). For
    ``dynamic`` transformers takes the original length from ``config.max_position_embeddings``,
    not from this dict: the caller sets it to ``RopeRule.hf_max_positions`` (``memext.hf`` does)."""
    check_rope_args(name, head_dim, factor, original_len)
    return build_rule(name, alpha, beta).hf_parameters(base, factor, original_len, head_dim)
