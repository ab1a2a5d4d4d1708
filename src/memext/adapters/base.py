"""The model-adapter contract and the registry of model kinds.

A ``ModelAdapter`` is a model memext can read, whatever holds it (a memext run, a local Hugging
Face directory, a GGUF file, a known model by name). It gives evaluation, generation and the
pipelines one interface:

- ``forward(tokens, state)`` -> ``(logits, state)``: one call, as ``LongLM.forward``;
- ``logits(tokens)``: every position of a (B, T) batch, read however the model reads long input
  (one pass, or segment by segment through its memory): what the suite grades;
- ``generate(prompt, max_new_tokens, ..., chat=None)``: text pieces continuing a prompt; ``chat``
  wraps the prompt in the tokenizer's chat template as a user turn (None: when it has one; a
  model without a template refuses ``chat=True``);
- ``tokenizer``; ``trained_length`` (the longest sequence it was trained on); ``max_context``
  (the longest input it reads at all; None: any length); ``window`` (the most tokens it attends
  over in one call: a prompt's budget); ``segment_len`` (the segment it reads long input in,
  carrying its memory; None: one pass); ``fingerprint()`` (the identity of its weights and of how
  it reads them: cached results of another identity are stale).

A kind is a class registered in ``MODEL_KINDS`` by name; its class method ``claims(path)`` says
whether a path holds a model of that kind (without loading it), and ``summary(path)`` describes
one cheaply (``memext info``). Optional class methods: ``home(path)``, the folder its evaluation
results go in (default: ``path`` itself; a GGUF file or a known model uses its converted
directory in the cache), and ``hf_dir(path)``, the Hugging Face directory it reads (a kind that
converts into one; ``memext extend`` writes an extended copy of it). Adding a kind is one module
under ``memext/adapters/`` and its name in the package's import line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from memext.registry import Registry
from memext.tokenizer import Tokenizer


@runtime_checkable
class ModelAdapter(Protocol):
    kind: ClassVar[str]
    name: str
    path: str
    tokenizer: Tokenizer
    trained_length: int
    max_context: int | None
    window: int
    segment_len: int | None
    params: int
    device: torch.device

    def forward(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        """One call: tokens (B, T) -> logits (B, T, vocab) and the state to pass next."""
        ...

    def logits(self, tokens: Tensor) -> Tensor:
        """(B, T) -> (B, T, vocab), the whole input read the model's way."""
        ...

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """Text pieces continuing ``prompt`` (in the chat template with ``chat``); ``sampling``:
        ``generate_ids``' options."""
        ...

    def validation(self) -> tuple[np.ndarray, str, str]:
        """Validation token ids, the corpus name and its hash."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def fingerprint(self) -> str: ...


MODEL_KINDS: Registry[Any] = Registry("model kind")
register_model_kind = MODEL_KINDS.register


def models_dir() -> Path:
    """``$MEMEXT_CACHE/models``: converted GGUF files and known models."""
    from memext.data.store import cache_dir

    return cache_dir() / "models"


def files_fingerprint(files: list[Path]) -> str:
    """Identity of weights by name, size and modification time (hashing GBs would be slow)."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


class Whole(torch.nn.Module):
    """An adapter as the model memext's evaluators call (``evaluate_samples``, ``score_length``:
    ``model(tokens)`` / ``model(tokens, state)``), reading each input whole the adapter's way
    (``logits``); no state is carried out, because each call is a complete input."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, None]:
        return self.adapter.logits(tokens), None
