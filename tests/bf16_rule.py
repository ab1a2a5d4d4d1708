"""The one rule every bf16 test follows: a tolerance is a multiple of the reference's own bf16
error, measured in the test on the machine it runs on, never a constant fitted to one CPU.

Given the truth (the reference in fp32 or fp64), the reference run in bf16 (``low``) and the
code under test in bf16 (``fast``), the yardstick is ``||low - truth||``: what the naive
reference itself loses by running in bf16 here, with this CPU's bf16 kernels (AVX512_BF16, AMX
or emulated) and this torch. The check is ``||fast - x|| <= k * ||low - truth|| + floor``, ``x``
being the truth (a different algorithm must be about as accurate as the reference: flash-
attention's rule, k = 2) or ``low`` (code that replays the reference's own bf16 operations may
depart from it by no more than its whole bf16 error, k = 1).

Errors are norm-wise (Frobenius), not element-wise. The largest element-wise error of a bf16
result is a count of ulps of its largest entries: a kernel that is 3 ulps off where the
reference is 1 ulp off gives a ratio of 3 with the same arithmetic, and which entry lands on
which side of a rounding boundary changes with the seed and the CPU. (Measured, torch 2.13 on an
AVX512_BF16 CPU: the element-wise dV ratio of CPU flash attention against the naive bf16
reference went from 1.0 to 3.0 over seeds; its norm-wise ratio stayed at or below 1.17.)

``floor`` only matters where the yardstick is zero (a result that bf16 leaves exact): then
``fast`` may still differ by fp32 rounding, which ``FLOOR`` times the truth's norm covers
(2**-17: a few fp32 ulps, far below a bf16 ulp at 2**-8).
"""

from __future__ import annotations

import torch

FLOOR = 2.0**-17


def norm_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| (Frobenius), computed in fp64."""
    return (x.detach().double() - ref.detach().double()).norm().item()


def assert_within_reference_error(
    name: str,
    fast: torch.Tensor,
    low: torch.Tensor,
    truth: torch.Tensor,
    k: float,
    *,
    against: str = "truth",
) -> None:
    """``||fast - x|| <= k * ||low - truth|| + FLOOR * ||truth||``, ``x`` = ``truth`` or ``low``."""
    yardstick = norm_err(low, truth)
    target = truth if against == "truth" else low
    err = norm_err(fast, target)
    bound = k * yardstick + FLOOR * truth.detach().double().norm().item()
    assert err <= bound, (
        f"{name}: bf16 error {err:.3g} against the {against} exceeds {k} x the reference's own "
        f"bf16 error {yardstick:.3g} (+ floor)"
    )
