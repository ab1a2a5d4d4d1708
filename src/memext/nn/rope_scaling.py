"""Rotary scaling: how a model trained on sequences of ``original_len`` reads longer ones.

A rule maps (head_dim d, base b, factor s, original_len L, seq_len n, alpha, beta) to the inverse
frequencies θ_i, i = 0 .. d/2 - 1, and an attention factor that multiplies cos and sin (so it
scales every q·k logit by its square, the way Hugging Face applies YaRN's temperature).
Unscaled, θ_i = b^(-2i/d). Rules register by name with ``@register_rope_scaling``.

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

``hf_rope_parameters`` writes the same rule as a transformers 5.x ``rope_parameters`` dict.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


class RopeRule(Protocol):
    def __call__(
        self,
        head_dim: int,
        base: float,
        *,
        factor: float,
        original_len: int,
        seq_len: int | None,
        alpha: float,
        beta: float,
    ) -> tuple[Tensor, float]: ...


@dataclass(frozen=True)
class RopeScaling:
    """A registered rule. ``uses_seq_len``: its frequencies depend on the length read so far, so
    they cannot be computed once at construction."""

    name: str
    compute: RopeRule
    uses_seq_len: bool = False


ROPE_SCALING: dict[str, RopeScaling] = {}


def register_rope_scaling(
    name: str, *, uses_seq_len: bool = False
) -> Callable[[RopeRule], RopeRule]:
    def deco(fn: RopeRule) -> RopeRule:
        if name in ROPE_SCALING:
            raise ValueError(f"rope scaling {name!r} is registered twice")
        ROPE_SCALING[name] = RopeScaling(name, fn, uses_seq_len)
        return fn

    return deco


def get_rope_scaling(name: str) -> RopeScaling:
    """The rule registered as ``name``, or a ValueError listing the names (with a close match)."""
    if name not in ROPE_SCALING:
        raise ValueError(f"unknown rope scaling {name!r}: expected {accepted_names(name)}")
    return ROPE_SCALING[name]


def accepted_names(wrong: str | None = None) -> str:
    """'one of a, b, c' plus a did-you-mean hint for ``wrong`` when a registered name is close."""
    text = "one of " + ", ".join(sorted(ROPE_SCALING))
    close = difflib.get_close_matches(wrong, ROPE_SCALING, n=1) if wrong else []
    return text + (f" (did you mean {close[0]!r}?)" if close else "")


def check_rope_args(
    name: str, head_dim: int | None, factor: float, original_len: int, alpha: float, beta: float
) -> None:
    """Refuse arguments no rule can use, with a ValueError naming the argument and its value.
    ``head_dim=None`` skips the checks on it."""
    get_rope_scaling(name)
    if head_dim is not None and (head_dim < 2 or head_dim % 2):
        raise ValueError(f"rotary head_dim={head_dim} is invalid: expected an even number >= 2")
    if not factor > 0:
        raise ValueError(f"rope scaling factor={factor!r} is invalid: expected a number > 0")
    if name == "none":
        return
    if original_len <= 0:
        raise ValueError(
            f"rope scaling {name!r} needs original_len > 0 (the length the model was trained "
            f"at), got {original_len}"
        )
    if name in ("ntk", "dynamic") and head_dim is not None and head_dim <= 2:
        raise ValueError(f"rope scaling {name!r} needs head_dim > 2 (d/(d-2)), got {head_dim}")
    if name == "yarn" and not 0 < alpha < beta:
        raise ValueError(
            f"yarn needs 0 < alpha < beta (rotation counts), got alpha={alpha}, beta={beta}"
        )


def unscaled_inv_freq(head_dim: int, base: float) -> Tensor:
    """b^(-2i/d) in float64; ``Rotary``'s unscaled buffer is exactly this rounded to float32."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


@register_rope_scaling("none")
def _none(head_dim: int, base: float, **_: Any) -> tuple[Tensor, float]:
    return unscaled_inv_freq(head_dim, base), 1.0


@register_rope_scaling("linear")
def _linear(head_dim: int, base: float, *, factor: float, **_: Any) -> tuple[Tensor, float]:
    return unscaled_inv_freq(head_dim, base) / factor, 1.0


def _ntk_base(head_dim: int, base: float, factor: float) -> float:
    # The exponent d/(d-2) makes the lowest frequency b^(-(d-2)/d) come out divided by exactly s.
    return base * factor ** (head_dim / (head_dim - 2))


@register_rope_scaling("ntk")
def _ntk(head_dim: int, base: float, *, factor: float, **_: Any) -> tuple[Tensor, float]:
    return unscaled_inv_freq(head_dim, _ntk_base(head_dim, base, factor)), 1.0


@register_rope_scaling("dynamic", uses_seq_len=True)
def _dynamic(
    head_dim: int,
    base: float,
    *,
    factor: float,
    original_len: int,
    seq_len: int | None,
    **_: Any,
) -> tuple[Tensor, float]:
    if seq_len is None or seq_len <= original_len:
        # Exactly unscaled: s·L/L - (s-1) need not round to 1.
        return unscaled_inv_freq(head_dim, base), 1.0
    effective = factor * seq_len / original_len - (factor - 1)
    return unscaled_inv_freq(head_dim, _ntk_base(head_dim, base, effective)), 1.0


def _pair_turning(rotations: float, head_dim: int, base: float, original_len: int) -> float:
    """The (fractional) pair index i whose wavelength 2π b^(2i/d) fits ``rotations`` times in
    ``original_len``."""
    return head_dim * math.log(original_len / (2 * math.pi * rotations)) / (2 * math.log(base))


@register_rope_scaling("yarn")
def _yarn(
    head_dim: int,
    base: float,
    *,
    factor: float,
    original_len: int,
    alpha: float,
    beta: float,
    **_: Any,
) -> tuple[Tensor, float]:
    theta = unscaled_inv_freq(head_dim, base)
    # Many turns (small i) = beta's end, few turns = alpha's end. The bounds are rounded outwards
    # and clipped to [0, d - 1] as the YaRN reference code and transformers do; an empty ramp
    # becomes a step (pair `start` kept, later pairs interpolated). A reversed one (original_len
    # under 2π·alpha, or so long that every pair turns over beta times) is where transformers'
    # ramp turns upside down; here it stays that step.
    start = max(math.floor(_pair_turning(beta, head_dim, base, original_len)), 0)
    stop = min(math.ceil(_pair_turning(alpha, head_dim, base, original_len)), head_dim - 1)
    width = max(stop - start, 1e-3)
    pairs = torch.arange(head_dim // 2, dtype=torch.float64)
    interpolated = ((pairs - start) / width).clamp(0.0, 1.0)
    inv_freq = theta * (1.0 - interpolated) + (theta / factor) * interpolated
    temperature = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, temperature


def rope_frequencies(
    name: str,
    head_dim: int,
    base: float,
    *,
    factor: float = 1.0,
    original_len: int = 0,
    seq_len: int | None = None,
    alpha: float = 1.0,
    beta: float = 32.0,
) -> tuple[Tensor, float]:
    """(inv_freq float64 (head_dim/2,), attention factor) of rule ``name``, arguments checked."""
    check_rope_args(name, head_dim, factor, original_len, alpha, beta)
    return get_rope_scaling(name).compute(
        head_dim,
        base,
        factor=factor,
        original_len=original_len,
        seq_len=seq_len,
        alpha=alpha,
        beta=beta,
    )


def hf_rope_parameters(
    name: str,
    factor: float,
    original_len: int,
    alpha: float = 1.0,
    beta: float = 32.0,
    base: float = 10000.0,
    head_dim: int | None = None,
) -> dict[str, Any]:
    """The transformers 5.x ``config.rope_parameters`` dict that computes rule ``name``.

    Only the keys transformers reads for that ``rope_type`` are written (others make it warn).
    ``ntk`` has no static type in transformers, but it is exactly unscaled RoPE with a larger
    base, so it maps to ``rope_type="default"`` with ``rope_theta = b · s^(d/(d-2))``; that needs
    ``head_dim`` (the rotary dimension). ``dynamic`` in transformers takes the original length
    from ``config.max_position_embeddings``, not from this dict: the caller must leave that at
    ``original_len`` (``memext.hf`` does).
    """
    check_rope_args(name, head_dim, factor, original_len, alpha, beta)
    if name == "none":
        return {"rope_type": "default", "rope_theta": float(base)}
    if name == "ntk":
        if head_dim is None:
            raise ValueError(
                "rope scaling 'ntk' maps to transformers' default type with a larger rope_theta, "
                "which depends on head_dim: pass head_dim"
            )
        return {"rope_type": "default", "rope_theta": _ntk_base(head_dim, base, factor)}
    params: dict[str, Any] = {"rope_type": name, "rope_theta": float(base), "factor": float(factor)}
    if name == "yarn":
        params.update(
            original_max_position_embeddings=int(original_len),
            beta_fast=float(beta),
            beta_slow=float(alpha),
        )
    elif name not in ("linear", "dynamic"):
        raise ValueError(f"rope scaling {name!r} has no transformers rope_parameters mapping")
    return params
