"""Corpus reading, the stdlib corpus, the token-store cache and the batch sampler."""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import memext.data.store as store_mod
from memext.data.corpus import STDLIB_EXCLUDED, _is_validation, read_corpus, stdlib_files
from memext.data.sampling import sample_batch
from memext.data.store import build_store, cache_dir
from memext.errors import MemextError
from memext.tokenizer import ByteTokenizer

BAD = b"\xff\xfe\x80 not utf-8"


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def _names(corpus) -> set[str]:
    return {d.name for d in (*corpus.train, *corpus.validation)}


def test_non_utf8_files_are_skipped_with_a_warning(tmp_path: Path) -> None:
    _write(tmp_path, {"a.txt": b"alpha " * 50, "sub/b.txt": "中文".encode() * 50, "bad.bin": BAD})
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not valid UTF-8: bad\.bin"):
        corpus = read_corpus(str(tmp_path))
    assert corpus.skipped == ("bad.bin",)
    assert _names(corpus) == {"a.txt", "sub/b.txt"}


def test_many_skipped_files_are_counted(tmp_path: Path) -> None:
    _write(tmp_path, {"ok.txt": b"text " * 100, **{f"bad{i}.bin": BAD for i in range(7)}})
    with pytest.warns(UserWarning, match=r"skipped 7 file\(s\).*and 2 more"):
        corpus = read_corpus(str(tmp_path))
    assert len(corpus.skipped) == 7


def test_raw_bytes_keeps_non_utf8_files(tmp_path: Path) -> None:
    _write(tmp_path, {"a.txt": b"alpha " * 50, "bad.bin": BAD})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all
        corpus = read_corpus(str(tmp_path), raw_bytes=True)
    assert corpus.skipped == ()
    docs = {d.name: d.data for d in (*corpus.train, *corpus.validation)}
    assert docs == {"a.txt": b"alpha " * 50, "bad.bin": BAD}


def test_only_non_utf8_files_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, {"x.bin": BAD, "y.bin": BAD})
    with (
        pytest.warns(UserWarning, match="skipped 2"),
        pytest.raises(MemextError, match=r"has no text: all 2 file\(s\) are not valid UTF-8"),
    ):
        read_corpus(str(tmp_path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, "holds no files"),
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p / "*.nothing", "matches no files"),
    ],
    ids=["empty dir", "missing path", "empty glob"],
)
def test_empty_or_missing_sources(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(MemextError, match=message):
        read_corpus(str(make(tmp_path)))


def test_only_empty_files_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path, {"a.txt": b"", "b.txt": b""})
    with pytest.raises(MemextError, match="every file is empty"):
        read_corpus(str(tmp_path))


def test_gz_files_are_read(tmp_path: Path) -> None:
    text = "compressed text, 中文\n".encode() * 40
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(text))
    (tmp_path / "plain.txt").write_bytes(b"plain text\n" * 40)
    corpus = read_corpus(str(tmp_path))
    docs = {d.name: d.data for d in (*corpus.train, *corpus.validation)}
    assert docs["c.txt.gz"] == text
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip at all")
    with pytest.raises(MemextError, match=r"broken\.gz is not a readable \.gz file"):
        read_corpus(str(broken))


def test_single_file_corpus_splits_by_bytes(tmp_path: Path) -> None:
    data = bytes(range(32, 127)) * 20  # 1900 bytes
    path = tmp_path / "one.txt"
    path.write_bytes(data)
    corpus = read_corpus(str(path), val_percent=10.0)
    (train,), (val,) = corpus.train, corpus.validation
    assert len(val.data) == 190
    assert train.data + val.data == data
    assert (train.name, val.name) == ("one.txt", "one.txt#validation")
    (tmp_path / "tiny.txt").write_bytes(b"x")
    with pytest.raises(MemextError, match="too small to split"):
        read_corpus(str(tmp_path / "tiny.txt"))


def test_glob_corpus(tmp_path: Path) -> None:
    _write(tmp_path, {"a.py": b"a = 1\n" * 10, "b.py": b"b = 2\n" * 10, "c.txt": b"no"})
    corpus = read_corpus(str(tmp_path / "*.py"))
    assert {Path(n).name for n in _names(corpus)} == {"a.py", "b.py"}


def test_multi_file_split_is_by_path_hash_and_disjoint(tmp_path: Path) -> None:
    _write(tmp_path, {f"f{i:03d}.txt": f"file {i}\n".encode() * 5 for i in range(200)})
    corpus = read_corpus(str(tmp_path), val_percent=10.0)
    train, val = {d.name for d in corpus.train}, {d.name for d in corpus.validation}
    assert not train & val
    assert len(train) + len(val) == 200
    assert 5 <= len(val) <= 40  # ~10% of 200
    assert read_corpus(str(tmp_path), val_percent=10.0).fingerprint == corpus.fingerprint


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "a.txt": b"alpha " * 40,
            "sub/b.txt": b"beta " * 40,
            ".hidden": b"secret",
            ".git/config": b"[core]\n\tbare = false\n",
            "sub/.venv/lib/x.py": b"x = 1\n",
        },
    )
    assert _names(read_corpus(str(tmp_path))) == {"a.txt", "sub/b.txt"}


def test_split_never_puts_every_file_in_validation(tmp_path: Path) -> None:
    # Two names that both hash into a 50% validation share: one must still be trained on.
    names = [n for n in (f"doc{i}.txt" for i in range(100)) if _is_validation(n, 50.0)][:2]
    _write(tmp_path, {n: n.encode() * 20 for n in names})
    corpus = read_corpus(str(tmp_path), val_percent=50.0)
    train, val = {d.name for d in corpus.train}, {d.name for d in corpus.validation}
    assert train and val and not train & val
    assert train | val == set(names)


def test_stdlib_selection() -> None:
    root, files = stdlib_files()
    root2, files2 = stdlib_files()
    assert (root, files) == (root2, files2)  # deterministic
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert len(rel) > 300
    assert "json/__init__.py" in rel and "os.py" in rel
    for r in rel:
        assert not STDLIB_EXCLUDED.intersection(r.split("/")[:-1]), r
    assert not any(r.startswith(("test/", "idlelib/", "site-packages/")) for r in rel)
    # The excluded folders exist in this Python, so the filter is really exercised.
    assert (root / "site-packages").is_dir()
    assert any((root / d).is_dir() for d in ("test", "idlelib"))


def _corpus(folder: Path, b_text: bytes = b"beta " * 40):
    _write(folder, {"a.txt": b"alpha " * 40, "b.txt": b_text, "c.txt": b"gamma " * 40})
    return read_corpus(str(folder))


def test_build_store_is_built_once_and_cached(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real = store_mod.encode_documents
    monkeypatch.setattr(
        store_mod, "encode_documents", lambda tok, docs: calls.append(1) or real(tok, docs)
    )
    corpus = _corpus(tmp_path / "src")
    tok = ByteTokenizer()
    first = build_store(corpus, tok, root=tmp_path / "cache")
    assert len(calls) == 2  # train and validation
    second = build_store(corpus, tok, root=tmp_path / "cache")
    assert len(calls) == 2  # nothing re-tokenized
    assert second.key == first.key
    assert np.array_equal(second.train, first.train)
    assert np.array_equal(second.validation, first.validation)
    folders = list((tmp_path / "cache" / "tokens").iterdir())
    assert [f.name for f in folders] == [first.key]

    # The stream is the documents' bytes, each followed by <eod>.
    eod = tok.special_id("<eod>")
    expected = [x for d in corpus.train for x in [*d.data, eod]]
    assert first.train.tolist() == expected
    assert first.split("validation") is first.validation


def test_build_store_rebuilds_when_a_source_changes(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    first = build_store(_corpus(tmp_path / "src"), tok, root=tmp_path / "cache")
    changed = _corpus(tmp_path / "src", b_text=b"BETA " * 40)  # same size, new content
    second = build_store(changed, tok, root=tmp_path / "cache")
    assert second.key != first.key
    assert second.corpus_hash != first.corpus_hash
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 2
    all_ids = np.concatenate([second.train, second.validation]).tolist()
    assert all_ids.count(ord("B")) == 40


def test_default_store_root_is_memext_cache(tmp_path: Path) -> None:
    assert cache_dir() == Path(os.environ["MEMEXT_CACHE"])
    assert not str(cache_dir()).startswith(str(Path.home() / ".cache"))
    store = build_store(_corpus(tmp_path / "src"), ByteTokenizer())
    assert (cache_dir() / "tokens" / store.key / "meta.json").is_file()


def test_sample_batch_is_a_function_of_seed_and_step() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    x, y = sample_batch(tokens, 4, 64, seed=3, step=7)
    x2, y2 = sample_batch(tokens, 4, 64, seed=3, step=7)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_batch(tokens, 4, 64, seed=3, step=8)[0])
    assert not torch.equal(x, sample_batch(tokens, 4, 64, seed=4, step=7)[0])
    assert x.shape == y.shape == (4, 64)
    assert x.dtype == y.dtype == torch.int64
    # Targets are the inputs shifted by one, and each row is a contiguous segment.
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y, x + 1)


def test_sample_batch_reaches_the_last_token_and_checks_length() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    x, y = sample_batch(tokens, 1, 9, seed=0, step=0)  # the only possible segment
    assert x.tolist() == [list(range(9))] and y.tolist() == [list(range(1, 10))]
    with pytest.raises(ValueError, match="shorter than seq_len"):
        sample_batch(tokens, 1, 10, seed=0, step=0)
