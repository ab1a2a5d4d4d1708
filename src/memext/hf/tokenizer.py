"""A local Hugging Face tokenizer behind memext's ``Tokenizer`` protocol, so memext's data
pipeline and tasks run on Hugging Face models. Offline only."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from memext.errors import MemextError


class HFTokenizer:
    """``encode`` adds no special tokens; ``<eod>`` maps to the end-of-sequence token.

    ``byte_lengths``: each id's UTF-8 length when decoded alone (special tokens: 0). For byte-level
    BPEs this is exact; for SentencePiece vocabularies a token's leading space may be dropped when
    decoded alone, so bits-per-byte is then approximate.
    """

    def __init__(self, path: str | Path):
        from memext.hf.model import _transformers

        try:
            self.hf = _transformers().AutoTokenizer.from_pretrained(
                str(path), local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise MemextError(f"{path}: no tokenizer this memext can load offline: {e}") from None
        self.vocab_size = len(self.hf)
        self._path = Path(path)

    def encode(self, data: str | bytes) -> list[int]:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        return list(self.hf.encode(text, add_special_tokens=False))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode_chat(self, prompt: str) -> list[int]:
        """``prompt`` as one user turn in the tokenizer's chat template, ready for the reply
        (the ids transformers' ``apply_chat_template`` gives)."""
        if not self.has_chat_template:
            raise MemextError(f"the tokenizer in {self._path} has no chat template")
        text = self.hf.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8")

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def special_id(self, token: str) -> int:
        if token == "<eod>" and self.hf.eos_token_id is not None:
            return int(self.hf.eos_token_id)
        ids = self.hf.convert_tokens_to_ids([token])
        if not ids or ids[0] is None or ids[0] == self.hf.unk_token_id:
            raise MemextError(f"the tokenizer in {self._path} has no {token!r} token")
        return int(ids[0])

    def byte_lengths(self) -> np.ndarray:
        special = set(self.hf.all_special_ids)
        return np.array(
            [0 if i in special else len(self.decode([i]).encode()) for i in range(self.vocab_size)],
            dtype=np.int64,
        )

    def fingerprint(self) -> str:
        vocab = json.dumps(sorted(self.hf.get_vocab().items()), ensure_ascii=False)
        return "hf-" + hashlib.sha256(vocab.encode()).hexdigest()[:16]
