"""The model-adapter contract and the registry of model kinds.

A ``ModelAdapter`` is a model memext can read, whatever holds it (a memext run, a local Hugging
Face directory, a GGUF file, a known model by name). It gives evaluation, generation and the
pipelines one interface:

- ``forward(tokens, state)`` -> ``(logits, state)``: one call, as ``LongLM.forward``;
- ``logits(tokens, positions=None)``: every position of a (B, T) batch, or only ``positions``
  (a 1-D increasing index shared by the batch: (B, P, vocab)), read however the model reads long
  input (one pass, segment by segment through its memory, or through a KV-cache policy: its
  ``reading``); what the suite grades. With ``positions`` the vocabulary projection is computed
  for those rows only, so a 32k-token input scored on five answer tokens never holds 32k rows
  of logits;
- ``log_probs(tokens, positions, targets)``: (B, P) log-probabilities of ``targets`` (B, P) at
  ``positions``, the projection computed a few hundred rows at a time (bits-per-byte);
- ``generate(prompt, max_new_tokens, ..., chat=None)``: text pieces continuing a prompt; ``chat``
  wraps the prompt in the tokenizer's chat template as a user turn (None: when it has one; a
  model without a template refuses ``chat=True``);
- ``tokenizer``; ``trained_length`` (the longest sequence it was trained on); ``max_context``
  (the longest input it reads at all; None: any length); ``window`` (the most tokens it attends
  over in one call: a prompt's budget); ``segment_len`` (the segment it reads long input in,
  carrying its memory; None: one pass); ``reading`` (a ``Reading``: one pass, or through a KV-cache
  policy); ``fingerprint()`` (the identity of its weights and of how it reads them: cached results
  of another identity are stale).

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from memext.errors import MemextError
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

    reading: Reading

    def logits(self, tokens: Tensor, positions: Positions = None) -> Tensor:
        """(B, T) -> (B, T, vocab), the whole input read the model's way; with ``positions``,
        (B, P, vocab) at those positions only."""
        ...

    def log_probs(self, tokens: Tensor, positions: Positions, targets: Tensor) -> Tensor:
        """(B, P): the log-probability of ``targets[:, j]`` at position ``positions[j]``."""
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
    (``logits``); no state is carried out, because each call is a complete input. The evaluators
    also find ``logits_at`` and ``log_probs`` here and use them, so that only the scored positions
    are projected on the vocabulary."""

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, None]:
        return self.adapter.logits(tokens), None

    def logits_at(self, tokens: Tensor, positions: Positions) -> Tensor:
        return self.adapter.logits(tokens, positions)

    def log_probs(self, tokens: Tensor, positions: Positions, targets: Tensor) -> Tensor:
        return self.adapter.log_probs(tokens, positions, targets)


# --- scoring only what is scored -------------------------------------------------------------

#: Positions of an input to score: None (all), or increasing indices shared by the batch.
Positions = Tensor | Sequence[int] | None

#: Rows projected on the vocabulary at a time by ``target_log_probs``: with SmolLM2's 49,152
#: tokens, a batch of 4 holds 4 x 256 x 49,152 x 4 B = 201 MB of logits at once.
PIECE = 256


def as_rows(positions: Positions, length: int, device: torch.device | str = "cpu") -> Tensor:
    """``positions`` as a 1-D int64 tensor on ``device`` (None: every position of ``length``),
    checked to increase strictly and to lie in [0, length): the readers cut them by forward."""
    if positions is None:
        return torch.arange(length, device=device)
    rows = torch.as_tensor(positions, dtype=torch.int64).reshape(-1).to(device)
    if rows.numel() and (
        int(rows[0]) < 0 or int(rows[-1]) >= length or bool((rows[1:] <= rows[:-1]).any())
    ):
        raise ValueError(
            f"positions must increase strictly within [0, {length}), got {rows.tolist()[:8]}..."
        )
    return rows


def within(rows: Tensor, start: int, end: int) -> Tensor:
    """The rows in [start, end), as indices into that span (one forward's share of them)."""
    return rows[(rows >= start) & (rows < end)] - start


def target_log_probs(
    scores: Tensor, targets: Tensor, head: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """(B, P) log-probabilities of ``targets`` (B, P) from logits ``scores`` (B, P, vocab), or
    from hidden states (B, P, d) through ``head`` (the vocabulary projection), ``PIECE`` rows at
    a time, so at most B x PIECE x vocab logits are alive."""
    out = []
    for a in range(0, scores.shape[1], PIECE):
        piece = scores[:, a : a + PIECE]
        logits = (head(piece) if head is not None else piece).float()
        picked = logits.gather(-1, targets[:, a : a + PIECE, None].to(logits.device))[..., 0]
        out.append(picked - logits.logsumexp(-1))
    return torch.cat(out, dim=1) if out else scores.new_zeros(targets.shape, dtype=torch.float)


# --- how an adapter reads its input --------------------------------------------------------------

#: Options a reading supplies itself: the input's length, the model's rotary.
_SUPPLIED = ("max_len", "rotary")


@dataclass(frozen=True)
class Reading:
    """How an adapter reads each input it is given (``logits``, ``log_probs``).

    The default (``cache`` None) is the model's own way: one pass, or a memory model's segments.
    With ``cache``, through memext's KV-cache policy of that name (``memext.infer.cache.CACHES``)
    with ``options``, as generation reads a prompt: the input before the first position asked
    for in forwards of ``chunk`` tokens (None: one forward), then every later position one token
    per forward, as greedy decoding reads the tokens it emits. So an answer scored teacher-forced
    is scored as greedy decoding under the policy would emit it, also under a policy that chooses
    what to attend to by each forward's queries (``retrieval``). ``log_probs`` reads the whole
    input in ``chunk``-token forwards (a stream's reading: bits-per-byte of text under the policy).
    """

    cache: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    chunk: int | None = None

    @classmethod
    def of(
        cls,
        cache: str | None = None,
        options: dict[str, Any] | None = None,
        chunk: int | None = None,
    ) -> Reading:
        """A reading from command-line values, checked: a known policy, options it takes (not
        those the reading supplies), a positive chunk. Options or a chunk without a policy read
        through ``full``."""
        from memext.infer.cache import CACHES

        options = dict(options or {})
        if cache is None and (options or chunk is not None):
            cache = "full"
        if cache is None:
            return cls()
        try:
            CACHES.lookup(cache)
            CACHES.check_names(cache, options)
        except ValueError as e:
            raise MemextError(f"--cache {cache}: {e}") from None
        supplied = sorted(set(options) & set(_SUPPLIED))
        if supplied:
            raise MemextError(
                f"--cache-opt {', '.join(supplied)}: the reading supplies it (the input's "
                "length, the model's rotary); leave it out"
            )
        if chunk is not None and chunk < 1:
            raise MemextError(f"--chunk={chunk} is invalid: expected a number of tokens >= 1")
        return cls(cache, tuple(sorted(options.items())), chunk)

    @property
    def plain(self) -> bool:
        return self.cache is None

    def label(self) -> str:
        """Short, for a model's name: ``retrieval, chunk 256``."""
        if self.cache is None:
            return "one pass"
        return self.cache + (f", chunk {self.chunk}" if self.chunk else "")

    def describe(self) -> str:
        """Everything, for a results file and the report: ``retrieval(sinks=4, window=256),
        chunk 256, answer positions one token per forward``."""
        if self.cache is None:
            return "the model's own (one pass, or its memory's segments)"
        opts = ", ".join(f"{k}={v}" for k, v in self.options)
        chunk = f"chunk {self.chunk}" if self.chunk else "the prompt in one forward"
        return f"{self.cache}({opts}), {chunk}, answer positions one token per forward"

    def slug(self) -> str:
        """For file names and fingerprints: ``retrieval-sinks4-window256-chunk256``."""
        if self.cache is None:
            return ""
        parts = [self.cache, *(f"{k}{v}" for k, v in self.options)]
        parts += [f"chunk{self.chunk}"] if self.chunk else []
        return "-".join(str(p).replace("/", "_") for p in parts)

    def build_options(self, length: int) -> dict[str, Any]:
        """The policy's options for an input of ``length`` tokens: ``max_len`` when the policy
        takes it, then the reading's own."""
        from memext.infer.cache import CACHES

        given = {"max_len": length} if "max_len" in CACHES.takes(str(self.cache)) else {}
        return {**given, **dict(self.options)}

    def cuts(self, length: int, first: int | None, tail: int = 0) -> list[tuple[int, int]]:
        """[start, end) spans of the forwards reading ``length`` tokens whose first scored
        position is ``first`` (None: none scored one by one): [0, first] in ``chunk``-token
        forwards (its last ``tail`` tokens alone, as ``prefill`` reads a prompt), then one token
        per forward."""
        from memext.infer.prefill import spans

        prefix = length if first is None else min(first + 1, length)
        cuts = spans(prefix, self.chunk or prefix, tail)
        return cuts + [(p, p + 1) for p in range(prefix, length)]


def reading_name(name: str, reading: Reading) -> str:
    """A model's name with its reading when that is not the model's own: ``smollm2 (retrieval,
    chunk 256)``; the report labels its columns by it."""
    return name if reading.plain else f"{name} ({reading.label()})"
