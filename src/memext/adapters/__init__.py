"""Model adapters: every model memext can read behind one contract (``base.ModelAdapter``), each
kind registered by name in ``MODEL_KINDS``. ``open_model(path)`` finds the kind that claims a
path and opens it; evaluation, generation, ``memext info``/``extend`` and the pipelines all
come through here.

Kinds are tried in registration order and the first that claims a path wins; a kind's claim
should be specific enough that no other kind's path satisfies it (a memext run holds a
``config.json`` too, but no ``model_type`` in it). A new kind (a GGUF file, a known
model by name) is a module beside these with ``@register_model_kind`` and its name in the import
line below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memext.adapters.base import (
    MODEL_KINDS,
    ModelAdapter,
    Whole,
    files_fingerprint,
    register_model_kind,
)
from memext.errors import MemextError

# Importing a kind registers it (the order is the order kinds are asked to claim a path).
from memext.adapters import memext_run, hf_dir  # noqa: F401  isort: skip
from memext.adapters.hf_dir import HFAdapter
from memext.adapters.memext_run import READ_RULE, MemextAdapter


def detect_kind(path: str | Path) -> str:
    """The name of the first kind that claims ``path``; a MemextError naming what each kind
    reads when none does."""
    for name, kind in MODEL_KINDS.items():
        if kind.claims(path):
            return name
    if not Path(path).exists():
        raise MemextError(
            f"{str(path)!r} does not exist (give a memext run or a local HF model dir)"
        )
    raise MemextError(
        f"{str(path)!r} is neither a memext run (config + weights) nor a Hugging Face model "
        f"directory (config.json); model kinds: {', '.join(MODEL_KINDS.names())}"
    )


def model_kind(name: str) -> Any:
    """The class registered as kind ``name``; an unknown name is a MemextError with the kinds
    there are and the closest one."""
    try:
        return MODEL_KINDS.lookup(name)
    except ValueError as e:
        raise MemextError(str(e)) from None


def open_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    kind: str | None = None,
    memory: bool = True,
) -> ModelAdapter:
    """The model at ``path`` as an adapter: of ``kind``, or of the kind that claims it.
    ``memory=False`` (memext runs only) empties a memory model's memory before each segment."""
    name = kind or detect_kind(path)
    cls = model_kind(name)
    if kind is not None and not cls.claims(path):
        found = detect_kind(path)  # says what nothing claims
        raise MemextError(f"{str(path)!r} holds a model of kind {found!r}, not {name!r}")
    if memory:
        return cls(path, device)
    # A kind that can read without its memory takes ``memory`` (its signature says so).
    if "memory" not in MODEL_KINDS.takes(name):
        raise MemextError(
            f"{str(path)!r} is a {name} model: only memext runs have a memory to switch off"
        )
    return cls(path, device, memory=False)


__all__ = [
    "MODEL_KINDS",
    "READ_RULE",
    "HFAdapter",
    "MemextAdapter",
    "ModelAdapter",
    "Whole",
    "detect_kind",
    "files_fingerprint",
    "model_kind",
    "open_model",
    "register_model_kind",
]
