"""A local Hugging Face causal-LM directory as a ``ModelAdapter`` (kind ``hf``; offline, its own
tokenizer). Needs the ``hf`` extra (transformers >= 5), imported when a model is opened."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memext.adapters.base import (
    Positions,
    Reading,
    as_rows,
    files_fingerprint,
    reading_name,
    register_model_kind,
    target_log_probs,
    within,
)
from memext.errors import MemextError


@register_model_kind("hf")
class HFAdapter:
    """A Hugging Face causal LM. ``reading``: one pass (the default) or through a memext KV-cache
    policy (``Reading``), which the suite's scores then measure."""

    kind = "hf"

    def __init__(
        self, path: str | Path, device: torch.device | str = "cpu", reading: Reading | None = None
    ) -> None:
        from memext.hf.model import HFCausalLM, context_length, load_causal_lm
        from memext.hf.tokenizer import HFTokenizer

        self.path = str(path)
        self.reading = reading or Reading()
        self.name = reading_name(Path(path).resolve().name, self.reading)
        self.device = torch.device(device)
        self.tokenizer = HFTokenizer(path)
        loaded = load_causal_lm(path, use_cache=False)
        self.trained_length = context_length(loaded.config)
        # Read past the configured length too: how a model fares there is what the suite measures.
        self.model = HFCausalLM(loaded.model, max_seq_len=2**62, use_cache=False).to(self.device)
        self.max_context = None
        # A prompt's budget: what the model was configured to attend over.
        self.window = self.trained_length
        self.segment_len = None  # one pass, whatever the length
        self.params = sum(p.numel() for p in self.model.parameters())
        self._dir = Path(path)
        self._split: bool | None = None  # whether the head is a plain projection (_separable)
        if not self.reading.plain:
            try:  # a bad option, or a policy this model's rotary cannot take: refused now
                self._policy_cache(1)
            except (TypeError, ValueError) as e:
                raise MemextError(f"--cache {self.reading.cache}: {e}") from None

    @staticmethod
    def claims(path: str | Path) -> bool:
        # A Hugging Face config names its model_type; a memext run's config.json does not.
        try:
            config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and "model_type" in config

    @staticmethod
    def summary(path: str | Path) -> list[str]:
        """The config's architecture and length, without loading the weights."""
        from memext.hf.model import context_length, load_config

        c = load_config(path)
        files = [f.name for f in Path(path).iterdir() if f.is_file()]
        return [
            f"model: Hugging Face {c.model_type} ({', '.join(c.architectures or ['?'])}), "
            f"{c.num_hidden_layers} layers x hidden {c.hidden_size}, "
            f"{c.num_attention_heads} heads, vocabulary {c.vocab_size}",
            f"context: {context_length(c)} tokens (rope {_rope(c)})",
            f"files: {', '.join(sorted(files))}",
        ]

    @torch.no_grad()
    def forward(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        # Without a KV cache, as the suite reads: each call attends to its own tokens, at
        # positions continuing from ``state.pos``.
        return self.model(tokens.to(self.device), state)

    @torch.no_grad()
    def logits(self, tokens: Tensor, positions: Positions = None) -> Tensor:
        tokens = tokens.to(self.device)
        if positions is None and self.reading.plain:
            return self.model(tokens)[0]  # transformers' own logits, every row
        rows = as_rows(positions, tokens.shape[1], self.device)
        first = int(rows[0]) if rows.numel() else None
        out = self._read(tokens, rows, first)
        return self._head()(out) if self._separable() else out

    @torch.no_grad()
    def log_probs(self, tokens: Tensor, positions: Positions, targets: Tensor) -> Tensor:
        tokens = tokens.to(self.device)
        out = self._read(tokens, as_rows(positions, tokens.shape[1], self.device), None)
        return target_log_probs(out, targets, self._head() if self._separable() else None)

    def _head(self) -> Any:
        return self.model.model.get_output_embeddings()

    def _separable(self) -> bool:
        """Whether the logits are the head applied to the base model's last hidden state (a
        Llama's are; a model that caps or scales them after the head is not): then a reading
        keeps hidden states (d wide) and projects only the rows scored. Checked once, on a probe."""
        if self._split is None:
            lm = self.model.model
            x = torch.arange(1, 9, device=self.device)[None] % self.tokenizer.vocab_size
            whole = lm(input_ids=x, use_cache=False).logits
            hidden = lm.base_model(input_ids=x, use_cache=False).last_hidden_state
            split = self._head()(hidden)
            self._split = split.shape == whole.shape and torch.allclose(
                split, whole, rtol=1e-4, atol=1e-5
            )
        return self._split

    def _policy_cache(self, length: int) -> Any:
        from memext.hf.cache import PolicyCache

        options = self.reading.build_options(length)
        return PolicyCache(self.model.model.config, str(self.reading.cache), **options)

    def _read(self, tokens: Tensor, rows: Tensor, first: int | None) -> Tensor:
        """The rows ``rows`` of ``tokens`` read the adapter's way (``Reading``; ``first``: the
        position from which on it reads one token per forward): the base model's hidden states
        (B, P, d), or the logits when the head is not separable."""
        if self.reading.plain:
            return self._forward(tokens, rows, None)
        cache = self._policy_cache(tokens.shape[1]).attach(self.model.model)
        try:
            pieces = []
            for a, b in self.reading.cuts(tokens.shape[1], first, cache.tail):
                pieces.append(self._forward(tokens[:, a:b], within(rows, a, b), cache))
        finally:
            cache.detach()  # the query hooks stay on the model otherwise, one set per input
        return torch.cat(pieces, dim=1)

    def _forward(self, ids: Tensor, keep: Tensor, cache: Any) -> Tensor:
        """Rows ``keep`` of one forward of ``ids``: without a cache from position 0 (the plain
        reading, as ``HFCausalLM`` reads), or after what ``cache`` holds, under its policy."""
        from memext.hf.cache import read_chunk

        lm, split = self.model.model, self._separable()
        model, kwargs = (lm.base_model, {}) if split else (lm, {"logits_to_keep": keep})
        if cache is None:
            out = model(input_ids=ids, use_cache=False, **kwargs)
        else:
            out = read_chunk(model, ids, cache, **kwargs)
        return out.last_hidden_state[:, keep] if split else out.logits

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """memext's sampling (``sample_next``) over the transformers model with a KV cache:
        transformers' own for ``cache="full"``, else memext's policy as a ``PolicyCache``.
        ``chat``: the prompt as a user turn in the chat template (None: when there is one)."""
        from memext.infer.generate import text_pieces

        ids = self._generate_ids(self.prompt_ids(prompt, chat), max_new_tokens, **sampling)
        return text_pieces(self.tokenizer, ids, stop)

    def prompt_ids(self, prompt: str, chat: bool | None = None) -> list[int]:
        """The ids ``generate`` reads for ``prompt``: in the chat template with ``chat`` (None:
        when the tokenizer has one), else the plain text."""
        templated = self.tokenizer.has_chat_template
        if chat and not templated:
            raise MemextError(
                f"{self.name}: its tokenizer has no chat template, so --chat cannot apply; "
                "drop it (the prompt is read as plain text)"
            )
        use = templated if chat is None else chat
        return self.tokenizer.encode_chat(prompt) if use else self.tokenizer.encode(prompt)

    @torch.no_grad()
    def _generate_ids(
        self,
        prompt: list[int],
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        cache: str = "full",
        cache_options: dict[str, Any] | None = None,
        chunk: int | None = None,
    ) -> Iterator[int]:
        from memext.hf.model import cache_kwargs
        from memext.infer.generate import sample_next

        if not prompt:
            raise ValueError("the prompt is empty: give at least one token")
        lm = self.model.model
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        ids = torch.tensor([prompt], device=self.device)
        unhook: Any = None
        try:
            if cache == "full" and not cache_options and not chunk:
                from memext.hf.growing import growing_cache

                # transformers' DynamicCache with its room allocated once (memext.hf.growing).
                past: Any = growing_cache(lm.config, len(prompt) + max_new_tokens)
                out = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(lm, past))
                logits = out.logits[:, -1]
            else:  # memext's policy, its exact band over the prompt, ``chunk`` tokens per forward
                from memext.hf.cache import PolicyCache, prefill
                from memext.infer.cache import CACHES

                # As ``new_state``: the model supplies what the policy takes from it (its length).
                given = {"max_len": len(prompt) + max_new_tokens}
                taken = {k: v for k, v in given.items() if k in CACHES.takes(cache)}
                past = PolicyCache(lm.config, cache, **{**taken, **(cache_options or {})})
                unhook = past.detach
                logits, past = prefill(lm, ids, past, chunk or len(prompt))
            pos = len(prompt)
            # Once, not per token: it inspects the forward's signature.
            past_kw = cache_kwargs(lm, past)
            for i in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, gen)
                yield int(nxt)
                if i + 1 < max_new_tokens:  # the last token needs no forward pass
                    where = torch.tensor([[pos]], device=self.device)
                    out = lm(
                        input_ids=nxt[:, None],
                        position_ids=where,
                        use_cache=True,
                        **past_kw,
                    )
                    logits, pos = out.logits[:, -1], pos + 1
        finally:
            # ``prefill`` hooks the query projections for a policy that reads queries; left
            # there, each later forward of this model would run one dead hook per generation.
            if unhook is not None:
                unhook()

    def validation(self) -> tuple[np.ndarray, str, str]:
        from memext.config import DataConfig
        from memext.data import prepare_data

        store, _ = prepare_data(DataConfig(), self.tokenizer, log=lambda m: None)
        return store.validation, DataConfig().corpus, store.corpus_hash

    def describe(self) -> dict[str, Any]:
        return {"config": self.model.config.to_dict(), "reading": self.reading.describe()}

    def fingerprint(self) -> str:
        # The reading is part of the identity: cells read through another policy are stale.
        files = files_fingerprint([f for f in self._dir.iterdir() if f.is_file()])
        return files if self.reading.plain else f"{files}-{self.reading.slug()}"


def _rope(config: Any) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    return str(params.get("rope_type", "default"))
