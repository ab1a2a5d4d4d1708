"""Probes: what the trainer measures while it trains, without knowing how.

The trainer sits below ``evals/`` (imports point down), so it cannot call an evaluation itself.
Whoever starts training passes probes instead: ``memext train`` passes
``memext.evals.probes.training_probes(cfg)`` (validation bits-per-byte, the per-stage report
and the held-out task probes of ``eval.probes``). A probe is any object with a moment ``at`` and
a call that measures the model at that moment:

- ``at = "eval"``: every ``train.eval_every`` steps and at the end. The values of all eval probes
  form one ``metrics.jsonl`` row (with ``step``), one printed line and the progress bar's
  postfix.
- ``at = "stage"``: when a curriculum stage ends. Their values join the stage's row, which also
  names the stage (``stage``, ``stage_seq_len``, ``rope_scaling``, ``rope_factor``).

A probe returns a flat mapping of metric name to value (a number, or a mapping of numbers such as
bits-per-byte by length); it must leave the model as it found it (``evaluate_*`` restore train
mode) and draw no global random numbers, so a resumed run stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from memext.config import Config
from memext.curriculum import Stage
from memext.tokenizer import Tokenizer

Moment = Literal["eval", "stage"]


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may read: the model being trained (in train mode), where training stands,
    and the run's data."""

    model: torch.nn.Module
    step: int  # optimizer steps taken
    stage: Stage  # the curriculum stage of the step just taken
    cfg: Config
    tokenizer: Tokenizer
    validation: np.ndarray  # the validation split's token ids
    byte_lengths: np.ndarray  # UTF-8 bytes of each token id (bits-per-byte)
    device: torch.device


class Probe(Protocol):
    """A measurement taken during training (see the module docstring)."""

    at: Moment

    def __call__(self, ctx: ProbeContext) -> Mapping[str, Any]: ...


def run_probes(probes: Sequence[Probe], at: Moment, ctx: ProbeContext) -> dict[str, Any]:
    """Every probe of moment ``at``, their values merged in order (a later name wins)."""
    values: dict[str, Any] = {}
    for probe in probes:
        if probe.at == at:
            values |= probe(ctx)
    return values


def format_values(values: Mapping[str, Any]) -> str:
    """``name value, ...`` for a printed line; a mapping as ``name  key: value  key: value``."""
    parts = []
    for name, value in values.items():
        if isinstance(value, Mapping):
            cells = "  ".join(f"{k}: {_number(v)}" for k, v in value.items())
            parts.append(f"{name}  {cells}")
        else:
            parts.append(f"{name} {_number(value)}")
    return ", ".join(parts)


def _number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
