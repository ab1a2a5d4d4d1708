"""`memext eval`: any model the adapters read, graded by a suite into one results format.

There is one evaluation path: a suite (``memext.evals.suite``) over a ``ModelAdapter``. Without
a suite named, ``default`` runs: bits-per-byte by length and, for models that read in segments,
memory reach, with the grid and options of ``longctx``, so its figures are the report card's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memext.adapters import Reading
from memext.errors import MemextError
from memext.evals.suite import get_suite, run_suite

#: Suite tasks whose ``max_tokens`` option ``max_tokens=`` sets.
_TEXT_TASKS = ("bpb", "reach")


def evaluate_model(
    path: str | Path,
    suite: str = "default",
    lengths: list[int] | None = None,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    out_file: str | Path | None = None,
    memory: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    reading: Reading | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run ``suite`` (a name or a .yaml file) on the model at ``path`` and write its results
    (default: ``HOME/eval/SUITE.json``; ``SUITE-no-memory.json`` with ``memory=False``;
    ``SUITE-POLICY-OPTIONS.json`` read through a KV-cache policy, ``reading``; HOME is the run or
    model directory, or for a GGUF file or a known model its converted directory in the cache:
    ``memext.adapters.model_home``). ``lengths`` replaces the suite's; ``max_tokens`` the scored
    tokens of its text tasks."""
    from memext.adapters import model_home, open_model

    if max_tokens is not None and max_tokens < 1:  # 0 is not "the default": None is
        raise MemextError(f"--max-tokens={max_tokens} is invalid: expected a number >= 1")
    spec = get_suite(suite)
    if lengths:
        spec = dataclasses.replace(spec, lengths=tuple(lengths))
    if max_tokens is not None:
        tasks = {
            name: {**opts, "max_tokens": max_tokens} if name in _TEXT_TASKS else opts
            for name, opts in spec.tasks.items()
        }
        spec = dataclasses.replace(spec, tasks=tasks)
    adapter = open_model(path, device, memory=memory, reading=reading)
    name = spec.name if memory else f"{spec.name}-no-memory"
    if reading is not None and not reading.plain:
        name += f"-{reading.slug()}"
    target = (
        Path(out_file) if out_file else model_home(path, adapter.kind) / "eval" / f"{name}.json"
    )
    log(f"suite {spec.name} on {adapter.name} ({adapter.kind}) -> {target}")
    results = run_suite(adapter, spec, target, progress=progress, log=log)
    return results, target
