"""Tokenizers: byte-level is lossless for any bytes; the BPE is lossless for any UTF-8 text."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memext.errors import MemextError
from memext.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    encode_documents,
    load_tokenizer,
    train_bpe,
)

TEXTS = {
    "ascii": "def f(x):\n    return x + 1  # ~!@#$%^&*()\t\r\n",
    "chinese": "长上下文的语言模型，记忆超过注意力窗口。",
    "mixed": "naïve café — 中文 and emoji 🙂 ∑ x²",
    "special-token spelling": "a literal <eod> and <pad> in the text must stay text",
    "empty": "",
}


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_byte_tokenizer_round_trips_text(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert tok.decode(ids) == text


def test_byte_tokenizer_round_trips_invalid_utf8() -> None:
    tok = ByteTokenizer()
    raw = b"\xff\xfe\x80abc"
    ids = tok.encode(raw)
    assert ids == [0xFF, 0xFE, 0x80, 97, 98, 99]
    assert tok.decode_bytes(ids) == raw
    assert tok.decode(ids) == "\ufffd\ufffd\ufffdabc"  # decode() replaces, decode_bytes() does not
    assert tok.encode_array(raw).tolist() == ids


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200))
def test_byte_tokenizer_is_lossless_for_any_bytes(raw: bytes) -> None:
    tok = ByteTokenizer()
    assert tok.decode_bytes(tok.encode(raw)) == raw


def test_byte_tokenizer_special_ids() -> None:
    tok = ByteTokenizer()
    ids = [tok.special_id(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert all(256 <= i < tok.vocab_size for i in ids)
    assert tok.vocab_size == 264
    # Special ids carry no bytes: decoding drops them and byte_lengths counts them as 0.
    assert tok.decode_bytes([104, tok.special_id("<eod>"), 105]) == b"hi"
    lengths = tok.byte_lengths()
    assert lengths[:256].tolist() == [1] * 256
    assert lengths[ids].tolist() == [0] * len(ids)


def test_encode_documents_appends_eod() -> None:
    tok = ByteTokenizer()
    eod = tok.special_id("<eod>")
    stream = encode_documents(tok, [b"ab", b"\xff"])
    assert stream.dtype == np.uint16
    assert stream.tolist() == [97, 98, eod, 255, eod]
    assert encode_documents(tok, []).size == 0


# --- BPE ------------------------------------------------------------------------------------------
def _training_text() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code = (stdlib / "json" / "__init__.py").read_text(encoding="utf-8")[:6000]
    chinese = "语言模型的记忆可以超过注意力窗口。长文本需要长记忆。" * 20
    return [code, chinese, "naïve café résumé " * 30]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> BPETokenizer:
    return train_bpe(_training_text(), 360, tmp_path_factory.mktemp("bpe") / "tokenizer.json")


def test_bpe_learns_merges(bpe: BPETokenizer) -> None:
    assert bpe.vocab_size == 360
    text = _training_text()[0][:2000]
    assert len(bpe.encode(text)) < 0.8 * len(text.encode("utf-8"))  # merges compress


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_bpe_round_trips_text(bpe: BPETokenizer, text: str) -> None:
    raw = text.encode("utf-8")
    ids = bpe.encode(text)
    assert bpe.decode_bytes(ids) == raw
    assert bpe.decode(ids) == text
    assert bpe.encode(raw) == ids  # bytes input that is valid UTF-8 means the same text
    assert int(bpe.byte_lengths()[ids].sum()) == len(raw)


@settings(max_examples=40, deadline=None)
@given(st.text(max_size=80))
def test_bpe_is_lossless_for_any_text(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert bpe.decode_bytes(ids) == text.encode("utf-8")
    assert int(bpe.byte_lengths()[ids].sum()) == len(text.encode("utf-8"))


def test_bpe_special_ids(bpe: BPETokenizer) -> None:
    ids = [bpe.special_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert bpe.byte_lengths()[ids].tolist() == [0] * len(ids)
    assert bpe.decode_bytes([*bpe.encode("ab"), bpe.special_id("<eod>")]) == b"ab"


def test_bpe_refuses_invalid_utf8(bpe: BPETokenizer) -> None:
    with pytest.raises(MemextError, match="UTF-8 text only"):
        bpe.encode(b"\xff\xfe\x80abc")


def test_bpe_reload_and_fingerprint(bpe: BPETokenizer) -> None:
    again = load_tokenizer(str(bpe.path))
    assert isinstance(again, BPETokenizer)
    text = TEXTS["mixed"]
    assert again.encode(text) == bpe.encode(text)
    assert again.fingerprint() == bpe.fingerprint() != ByteTokenizer().fingerprint()


def test_bpe_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=264 is invalid"):
        train_bpe(["abc"], 264, tmp_path / "t.json")
    with pytest.raises(MemextError, match="does not exist"):
        BPETokenizer(tmp_path / "missing.json")
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    with pytest.raises(MemextError, match=r"is not a tokenizer\.json"):
        BPETokenizer(junk)
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
