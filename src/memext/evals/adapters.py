"""Model adapters: one interface that the evaluation suite grades, for memext runs and local
Hugging Face causal LMs.

An adapter gives the suite a tokenizer, the length the model was trained at, the longest input it
accepts (None: any length), the validation text for bits-per-byte, and ``logits(tokens)``: the
logits at every position of a (B, T) batch, read however the model reads long input (one pass,
or segment by segment through its memory).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from memext.errors import MemextError
from memext.evals.tasks import segments
from memext.tokenizer import Tokenizer


class ModelAdapter(Protocol):
    name: str
    kind: str
    path: str
    tokenizer: Tokenizer
    trained_length: int
    max_context: int | None
    params: int
    device: torch.device

    def logits(self, tokens: Tensor) -> Tensor: ...

    def validation(self) -> tuple[np.ndarray, str, str]:
        """Validation token ids, the corpus name and its hash."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def fingerprint(self) -> str: ...


def _files_fingerprint(files: list[Path]) -> str:
    """Identity of weights by name, size and modification time (hashing GBs would be slow)."""
    h = hashlib.sha256()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


#: How a memext run reads long input; changing it must change the fingerprint (suite cell cache).
READ_RULE = "segments-from-end"


class MemextAdapter:
    """A memext run. ``memory=False`` reads a memory model's segments with its memory emptied
    before each one: the same weights seeing only the current segment (its attention window),
    the baseline that shows what the memory adds."""

    kind = "memext"

    def __init__(
        self, run_dir: str | Path, device: torch.device | str = "cpu", memory: bool = True
    ):
        from memext.checkpoint import WEIGHTS, load, run_tokenizer

        self.path = str(run_dir)
        self.name = Path(run_dir).resolve().name + ("" if memory else " (no memory)")
        self.memory = memory
        self.device = torch.device(device)
        self.model, self.cfg = load(run_dir, self.device)
        self.tokenizer = run_tokenizer(run_dir)
        self._weights = Path(run_dir) / WEIGHTS
        t = self.cfg.train
        self.trained_length = max((t.seq_len, *t.curriculum))
        self.segment_len = self.model.segment_len
        # A memory model reads any length in segments; a plain one is bounded by its rotary table.
        self.max_context = None if self.segment_len else self.model.max_seq_len
        self.params = sum(p.numel() for p in self.model.parameters())

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        tokens = tokens.to(self.device)
        if not self.segment_len:
            return self.model(tokens)[0]
        # Cut from the end, as training and ``evaluate_samples`` cut: the last segment is whole,
        # so a question and its answer are never split by a segment boundary.
        out, state = [], None
        for start, end in segments(tokens.shape[1], self.segment_len):
            step, state = self.model(tokens[:, start:end], state)
            if not self.memory:
                state = None
            out.append(step)
        return torch.cat(out, dim=1)

    def validation(self) -> tuple[np.ndarray, str, str]:
        from memext.data import prepare_data

        store, _ = prepare_data(self.cfg.data, self.tokenizer, log=lambda m: None)
        return store.validation, self.cfg.data.corpus, store.corpus_hash

    def describe(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.cfg),
            "segment_len": self.segment_len,
            "memory": self.memory,
        }

    def fingerprint(self) -> str:
        # The reading rule is part of the identity: cached suite cells read another way are stale.
        read = READ_RULE + ("" if self.memory else "-no-memory")
        return f"{_files_fingerprint([self._weights])}-{read}"


class HFAdapter:
    kind = "hf"

    def __init__(self, model_dir: str | Path, device: torch.device | str = "cpu"):
        from memext.hf.model import HFCausalLM, context_length, load_causal_lm
        from memext.hf.tokenizer import HFTokenizer

        self.path = str(model_dir)
        self.name = Path(model_dir).resolve().name
        self.device = torch.device(device)
        self.tokenizer = HFTokenizer(model_dir)
        loaded = load_causal_lm(model_dir, use_cache=False)
        self.trained_length = context_length(loaded.config)
        # Read past the configured length too: how a model fares there is what the suite measures.
        self.model = HFCausalLM(loaded.model, max_seq_len=2**62, use_cache=False).to(self.device)
        self.max_context = None
        self.params = sum(p.numel() for p in self.model.parameters())
        self._dir = Path(model_dir)

    @torch.no_grad()
    def logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens.to(self.device))[0]

    def validation(self) -> tuple[np.ndarray, str, str]:
        from memext.config import DataConfig
        from memext.data import prepare_data

        store, _ = prepare_data(DataConfig(), self.tokenizer, log=lambda m: None)
        return store.validation, DataConfig().corpus, store.corpus_hash

    def describe(self) -> dict[str, Any]:
        return {"config": self.model.config.to_dict()}

    def fingerprint(self) -> str:
        files = [f for f in self._dir.iterdir() if f.is_file()]
        return _files_fingerprint(files)


def load_adapter(
    path: str | Path, device: torch.device | str = "cpu", memory: bool = True
) -> ModelAdapter:
    """A memext run directory or a local Hugging Face causal-LM directory; ``memory=False``
    (memext runs only) empties a memory model's memory before each segment."""
    from memext.checkpoint import is_memext_run

    path = Path(path)
    if not path.is_dir():
        raise MemextError(f"{path}: not a directory (give a memext run or a local HF model dir)")
    if is_memext_run(path):
        return MemextAdapter(path, device, memory)
    if not memory:
        raise MemextError(f"{path}: only memext runs have a memory to switch off")
    if (path / "config.json").is_file():
        return HFAdapter(path, device)
    raise MemextError(
        f"{path}: neither a memext run (config + weights) nor a Hugging Face model directory "
        "(config.json)"
    )
