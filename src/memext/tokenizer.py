"""Tokenizers: lossless byte-level by default, an optional BPE trained locally with `tokenizers`.

Both reserve the same named special tokens (``SPECIAL_TOKENS``), looked up by name with
``special_id``, so document boundaries, memory tokens and task separators mean the same thing
whichever tokenizer a run uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from memext.errors import MemextError

SPECIAL_TOKENS = ("<bos>", "<eod>", "<sep>", "<pad>", "<mem>", "<mask>", "<unused0>", "<unused1>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, data: str | bytes) -> list[int]: ...
    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def special_id(self, token: str) -> int: ...
    def byte_lengths(self) -> np.ndarray: ...
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """Ids 0-255 are the byte values; 256-263 are the special tokens. Lossless for any bytes."""

    name = "byte"
    vocab_size = 256 + len(SPECIAL_TOKENS)

    def encode(self, data: str | bytes) -> list[int]:
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        return list(raw)

    def encode_array(self, raw: bytes) -> np.ndarray:
        return np.frombuffer(raw, dtype=np.uint8).astype(np.uint16)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return bytes(i for i in ids if i < 256)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def special_id(self, token: str) -> int:
        return 256 + SPECIAL_TOKENS.index(token)

    def byte_lengths(self) -> np.ndarray:
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        lengths[:256] = 1
        return lengths

    def fingerprint(self) -> str:
        return "byte-v1"


def _byte_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level alphabet: printable stand-in character -> byte value."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class BPETokenizer:
    """A byte-level BPE from the `tokenizers` library, with the same named special tokens."""

    name = "bpe"

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise MemextError(f"tokenizer file {str(self.path)!r} does not exist")
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on bad files
            raise MemextError(f"{str(self.path)!r} is not a tokenizer.json: {e}") from None
        # Text that happens to spell a special token ("<eod>" in a source file) is ordinary
        # text: encode it as bytes, or it would silently become a special id and vanish on decode.
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size()
        alphabet = _byte_alphabet()
        vocab = self._tok.get_vocab()
        self._bytes = [b""] * self.vocab_size
        kind = type(self._tok.model).__name__
        try:
            if kind != "BPE":
                raise KeyError(kind)
            for token, idx in vocab.items():
                if token not in SPECIAL_TOKENS:
                    self._bytes[idx] = bytes(alphabet[c] for c in token)
        except KeyError:  # a token outside the byte-level alphabet: another kind of tokenizer
            raise MemextError(
                f"{str(self.path)!r} is not a byte-level BPE tokenizer.json (its model is "
                f"{kind}); memext reads the ones `memext tokenizer train` writes"
            ) from None

    def encode(self, data: str | bytes) -> list[int]:
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise MemextError(
                    "the BPE tokenizer reads UTF-8 text only; use the byte tokenizer for raw bytes"
                ) from None
        return self._tok.encode(data, add_special_tokens=False).ids

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def special_id(self, token: str) -> int:
        return self._tok.token_to_id(token)

    def byte_lengths(self) -> np.ndarray:
        return np.array([len(b) for b in self._bytes], dtype=np.int64)

    def fingerprint(self) -> str:
        return "bpe-" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path) -> BPETokenizer:
    """Train a byte-level BPE on ``texts`` and save it as a tokenizer.json at ``out``."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from memext.io import atomic_write_text

    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size={vocab_size} is invalid: expected > {256 + len(SPECIAL_TOKENS)}"
        )
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    atomic_write_text(out, json.dumps(json.loads(tok.to_str()), ensure_ascii=False))
    return BPETokenizer(out)


def load_tokenizer(spec: str) -> ByteTokenizer | BPETokenizer:
    """'byte', or the path of a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return BPETokenizer(spec)


def encode_documents(tok: Tokenizer, docs: Sequence[bytes]) -> np.ndarray:
    """Concatenate documents into one id stream, each followed by the end-of-document id."""
    eod = tok.special_id("<eod>")
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    parts = []
    for d in docs:
        ids = tok.encode_array(d) if isinstance(tok, ByteTokenizer) else np.asarray(tok.encode(d))
        parts.append(ids.astype(dtype))
        parts.append(np.array([eod], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
