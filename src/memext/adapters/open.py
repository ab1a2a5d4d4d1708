"""Opening models: which kind claims a path (``detect_kind``), a kind by name (``model_kind``),
where a model's results go (``model_home``) and ``open_model``. A module of its own so that a kind
which opens another model (``quantized`` opens its base) imports it without a cycle through the
package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from memext.adapters.base import MODEL_KINDS, ModelAdapter, Reading
from memext.adapters.known import KNOWN_MODELS
from memext.errors import MemextError

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
