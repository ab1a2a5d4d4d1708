"""A memext run directory as a ``ModelAdapter`` (kind ``memext``)."""

from __future__ import annotations

import dataclasses
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
from memext.curriculum import trained_length
from memext.data.sampling import segments
from memext.errors import MemextError

#: How a memext run reads long input; changing it must change the fingerprint (suite cell cache).
READ_RULE = "segments-from-end"


@register_model_kind("memext")
class MemextAdapter:
    """A memext run. ``memory=False`` reads a memory model's segments with its memory emptied
    before each one: the same weights seeing only the current segment (its attention window),
    the baseline that shows what the memory adds."""

    kind = "memext"

    def __init__(
        self,
        path: str | Path,
        device: torch.device | str = "cpu",
        memory: bool = True,
        reading: Reading | None = None,
    ) -> None:
        from memext.checkpoint import load, load_config, run_tokenizer, weights_files

        if load_config(path).model.arch == "seq2seq":
            # The contract is a decoder's (forward(tokens, state)); refused before loading.
            raise MemextError(
                f"{str(path)!r} is an encoder-decoder run (model.arch=seq2seq): the model "
                "commands other than eval, report and generate do not read encoder-decoders; "
                "`memext eval` scores it on held-out pairs of its tasks (ROUGE, BLEU, chrF by "
                "source length, against a prefix baseline), `memext report` draws them and "
                "`memext generate` writes its targets"
            )
        self.path = str(path)
        self.reading = reading or Reading()
        name = Path(path).resolve().name + ("" if memory else " (no memory)")
        self.name = reading_name(name, self.reading)
        self.memory = memory
        self.device = torch.device(device)
        self.model, self.cfg = load(path, self.device)
        self.tokenizer = run_tokenizer(path)
        self._weights = weights_files(path)  # one file, or a sharded checkpoint's
        self.trained_length = trained_length(self.cfg)
        self.segment_len = self.model.segment_len
        # A memory model reads any length in segments; a plain one is bounded by its rotary table.
        self.max_context = None if self.segment_len else self.model.max_seq_len
        # Memory models read any length, but one call still attends over at most max_seq_len.
        self.window = self.model.max_seq_len
        self.params = sum(p.numel() for p in self.model.parameters())
        if not self.reading.plain:
            self._check_reading()

    def _check_reading(self) -> None:
        """Refuse a reading this run cannot do, before anything is run."""
        from memext.infer.generate import new_state

        if self.segment_len:
            raise MemextError(
                f"{self.name} reads in segments through its memory, without a KV cache: "
                "--cache, --cache-opt and --chunk apply to models without memory"
            )
        try:
            new_state(self.model, 1, 1, str(self.reading.cache), **dict(self.reading.options))
        except (TypeError, ValueError) as e:
            raise MemextError(f"--cache {self.reading.cache}: {e}") from None

    @staticmethod
    def claims(path: str | Path) -> bool:
        from memext.checkpoint import is_memext_run

        return Path(path).is_dir() and is_memext_run(Path(path))

    @staticmethod
    def summary(path: str | Path) -> list[str]:
        """What ``memext info`` prints: config, size and training progress, without the weights
        (a run still training, or one whose weights are missing, is described too)."""
        from memext.checkpoint import load_config, read_metrics, weights_path
        from memext.model import build_model

        cfg = load_config(path)
        m = cfg.model
        size = build_model(m, seed=None).num_params() / 1e6
        lines = [
            f"model: {m.n_layers} layers x d_model {m.d_model}, {m.n_heads} heads, attention "
            f"{m.attention}, {size:.2f}M parameters (without embeddings)",
            f"data: corpus {cfg.data.corpus!r}, tokenizer {cfg.data.tokenizer!r}",
        ]
        metrics = read_metrics(path)
        steps = [r for r in metrics if "loss" in r]
        vals = [r for r in metrics if "val_bits_per_byte" in r]
        weights = weights_path(path)
        # Every stage's steps: a curriculum run of 1,000 + 800 steps once read "1800 of 1000".
        total = cfg.train.total_steps
        state = f"step {steps[-1]['step']} of {total}" if steps else "not started"
        lines.append(
            f"training: {state}; checkpoint {'present' if weights.exists() else 'missing'}"
        )
        if steps:
            lines.append(
                f"last loss {steps[-1]['loss']:.4f}, "
                f"{steps[-1].get('tokens_per_s', 0):,.0f} tokens/s"
            )
        if vals:
            lines.append(  # the trainer's one-pass check, not the suite's figure
                f"last validation bits/byte {vals[-1]['val_bits_per_byte']:.4f} "
                f"(training check, one pass; step {vals[-1]['step']})"
            )
        return lines

    @torch.no_grad()
    def forward(self, tokens: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        return self.model(tokens.to(self.device), state)

    @torch.no_grad()
    def logits(self, tokens: Tensor, positions: Positions = None) -> Tensor:
        tokens = tokens.to(self.device)
        rows = None if positions is None else as_rows(positions, tokens.shape[1], self.device)
        first = None if rows is None or not rows.numel() else int(rows[0])
        return self._read(tokens, rows, first)

    @torch.no_grad()
    def log_probs(self, tokens: Tensor, positions: Positions, targets: Tensor) -> Tensor:
        tokens = tokens.to(self.device)
        rows = as_rows(positions, tokens.shape[1], self.device)
        return target_log_probs(self._read(tokens, rows, None), targets)

    def _read(self, tokens: Tensor, rows: Tensor | None, first: int | None) -> Tensor:
        """The logits at ``rows`` (None: all) of ``tokens`` read the run's way: one pass, its
        memory's segments, or a KV-cache policy (``Reading``; one token per forward from
        ``first`` on). Each forward's logits are cut to its rows before the next runs."""
        if self.reading.plain and not self.segment_len:
            out = self.model(tokens)[0]
            return out if rows is None else out[:, rows]
        if self.reading.plain:
            # Cut from the end, as training and ``evaluate_samples`` cut: the last segment is
            # whole, so a question and its answer are never split by a segment boundary.
            cuts, state = segments(tokens.shape[1], self.segment_len), None
        else:
            from memext.infer.generate import new_state
            from memext.infer.prefill import prompt_tail

            cache, options = str(self.reading.cache), dict(self.reading.options)
            state = new_state(self.model, tokens.shape[0], tokens.shape[1], cache, **options)
            if rows is None:  # every position scored: all but the first read one by one
                first = 0
            tail = prompt_tail(getattr(state.cache, "policy", None))
            cuts = self.reading.cuts(tokens.shape[1], first, tail)
        out = []
        for start, end in cuts:
            step, state = self.model(tokens[:, start:end], state)
            if not self.memory:
                state = None
            out.append(step if rows is None else step[:, within(rows, start, end)])
        return torch.cat(out, dim=1)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        *,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        **sampling: Any,
    ) -> Iterator[str]:
        """``generate_text`` on the run's model: KV-cached, or segment by segment through its
        memory (memory models always read with their memory: ``memory=False`` is a reading rule
        of the evaluation, not of generation). A memext run has no chat template: ``chat=True``
        is refused."""
        from memext.infer.generate import generate_text

        if chat:
            raise MemextError(
                f"{self.name} is a memext run, which has no chat template: drop --chat"
            )

        return generate_text(
            self.model, self.tokenizer, prompt, max_new_tokens, stop=stop, **sampling
        )

    def validation(self) -> tuple[np.ndarray, str, str]:
        from memext.data import prepare_data

        store, _ = prepare_data(self.cfg.data, self.tokenizer, log=lambda m: None)
        return store.validation, self.cfg.data.corpus, store.corpus_hash

    def describe(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.cfg),
            "segment_len": self.segment_len,
            "memory": self.memory,
            "reading": self.reading.describe(),
        }

    def fingerprint(self) -> str:
        # The reading rule is part of the identity: cached suite cells read another way are stale.
        read = READ_RULE + ("" if self.memory else "-no-memory")
        read += "" if self.reading.plain else f"-{self.reading.slug()}"
        return f"{files_fingerprint(self._weights)}-{read}"
