"""The two kinds of model a stream reads, behind what ``memext.evals.streaming`` needs of them.

A memext ``LongLM`` reads through memext's cache (``memext.infer.cache``, ``new_state``); a
Hugging Face causal LM (``memext.hf.model.HFCausalLM``, what the ``hf``, ``gguf`` and ``known``
adapters hold) through the same policy as a ``transformers.Cache``
(``memext.hf.cache.PolicyCache``), every chunk under the policy's exact band, as
``memext.hf.cache.prefill`` reads a prompt. ``StreamNet`` gives either a cached reader and a
fresh forward; ``stream_policy`` builds and checks the policy a stream reads through.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memext.infer.cache import CACHES, CachePolicy
from memext.infer.generate import new_state
from memext.nn.transformer import LongLM


class _Reader:
    """A stream's forward through a live cache: ``read(inputs (1, T)) -> logits (1, T, vocab)``."""

    def read(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def store_nbytes(self) -> int | None:
        return None

    def close(self) -> None:
        return None


class _MemextReader(_Reader):
    def __init__(self, model: LongLM, cache: str, options: dict[str, Any], n_inputs: int):
        self.model = model
        self.state = new_state(model, 1, n_inputs, cache, **options)

    def read(self, inputs: Tensor) -> Tensor:
        logits, self.state = self.model(inputs, self.state)
        return logits

    def nbytes(self) -> int:
        return self.state.cache.nbytes()

    def store_nbytes(self) -> int | None:
        store = getattr(self.state.cache, "store_nbytes", None)
        return store() if store is not None else None


class _HFReader(_Reader):
    def __init__(self, lm: Any, cache: str, options: dict[str, Any], n_inputs: int):
        from memext.hf.cache import PolicyCache

        self.lm = lm
        self.cache = PolicyCache(lm.config, cache, **_with_length(cache, options, n_inputs))
        self.cache.attach(lm)  # a policy that chooses by queries (retrieval) gets them

    def read(self, inputs: Tensor) -> Tensor:
        from memext.hf.cache import read_chunk

        # At the positions after what the cache holds, under the policy's band (which
        # transformers' own causal mask cannot express).
        return read_chunk(self.lm, inputs, self.cache).logits

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def store_nbytes(self) -> int | None:
        return self.cache.store_nbytes() if self.cache.reads_queries else None

    def close(self) -> None:
        self.cache.detach()


class StreamNet:
    """What the measurements need of a model: a cached reader and a fresh forward."""

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self.device = next(model.parameters()).device
        self.hf: Any = None
        if isinstance(model, LongLM):
            if model.segment_len:
                raise ValueError(
                    f"the model reads long input in {model.segment_len}-token segments through "
                    "its memory, not through a KV cache: there is no cache policy to stream"
                )
            return
        from memext.hf.model import HFCausalLM

        if not isinstance(model, HFCausalLM):
            raise TypeError(
                "streaming reads a memext LongLM or a Hugging Face causal LM (HFCausalLM), got "
                f"{type(model).__name__}"
            )
        self.hf = model.model

    def reader(self, cache: str, options: dict[str, Any], n_inputs: int) -> _Reader:
        if self.hf is not None:
            return _HFReader(self.hf, cache, options, n_inputs)
        return _MemextReader(self.module, cache, options, n_inputs)

    def last_logits(self, tokens: Tensor, k: int) -> Tensor:
        """(B, T) read from scratch (positions 0..T-1, no cache) -> logits of the last k."""
        if self.hf is not None:
            return self.hf(input_ids=tokens, use_cache=False, logits_to_keep=k).logits
        return self.module(tokens)[0][:, -k:]


def _with_length(cache: str, options: dict[str, Any], n_inputs: int) -> dict[str, Any]:
    # As ``new_state``: the stream supplies what the policy takes from it (its length).
    given = {"max_len": n_inputs}
    return {**{k: v for k, v in given.items() if k in CACHES.takes(cache)}, **options}


def stream_policy(cache: str, options: dict[str, Any], n_inputs: int) -> CachePolicy:
    """The policy a stream of ``n_inputs`` reads through: ``cache`` with ``options`` and what the
    stream supplies (``max_len``), checked as the stream checks it; a ValueError if refused."""
    return CACHES.build(cache, **_with_length(cache, options, n_inputs))


def tokens_seen(policy: CachePolicy) -> int | None:
    """The most tokens one query sees under ``policy`` (sinks + window): the window of the
    recomputation it is compared with. None for a policy that keeps no fixed number (``full``)
    or is no layout (``retrieval``)."""
    try:
        layout = policy.layout()
    except NotImplementedError:
        return None
    return None if layout.window is None else layout.sinks + layout.window
