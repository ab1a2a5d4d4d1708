"""Fault injection on the retrieval store and the embedding cache.

A store that is foreign, corrupt, truncated or locked is refused through every command in one
line that names it and the fix, with exit code 2, and the file is left exactly as it was. A
corrupt embedding cache (a file the user never named) is warned about and rebuilt, and an
unusable one skipped: neither ever fails a command.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from memext.cli import app
from memext.errors import MemextError
from memext.pipelines import store_db
from memext.pipelines.encoder import Encoder
from memext.pipelines.store import Item, RetrievalStore, StoreError, store_error
from tiny_bert import write_tiny_bert

runner = CliRunner()


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("enc") / "bert")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny memext run for `ask` (random weights: only the store's errors matter here)."""
    from memext import build_model
    from memext import checkpoint as ckpt
    from memext.config import Config, EvalConfig, ModelConfig

    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, max_seq_len=256)
    run = tmp_path_factory.mktemp("run")
    Config(model=cfg, eval=EvalConfig(lengths=(128,))).save(run / ckpt.CONFIG)
    ckpt.save_weights(build_model(cfg, seed=0), run / ckpt.WEIGHTS, {"step": "0"})
    return run


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own; the embedding cache file inside it."""
    monkeypatch.setenv("MEMEXT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "embeddings" / "embeddings.sqlite"


def error_line(result: Any) -> str:
    """The one `error:` line of a failed command (and no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def commands(store: Path, bert: Path, doc: Path, run: Path | None = None) -> dict[str, list[str]]:
    """Every command that reads or writes a store, on ``store``."""
    args = ["--store", str(store)]
    enc = ["--encoder", str(bert)]
    return {
        "add": ["memory", "add", str(doc), *args, *enc],
        "search": ["memory", "search", "cat", *args, *enc],
        "delete": ["memory", "delete", str(doc), *args],
        "ask": ["ask", "Who?", *args, *enc, "--model", str(run or store.parent / "no-model")],
    }


def filled_store(path: Path, n: int = 3000) -> Path:
    rng = np.random.default_rng(0)
    with RetrievalStore(path, model="bert", dim=32) as store:
        store.add(
            Item(f"d{i % 7}", f"text {i} " * 20, rng.standard_normal(32).astype(np.float32))
            for i in range(n)
        )
    return path


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _zeroed(data: bytes) -> bytes:
    return data[:8192] + bytes(len(data) - 8192)


@pytest.mark.parametrize("damage", [_truncated, _zeroed], ids=["truncated", "zeroed"])
def test_a_corrupt_store_is_refused_in_one_line_and_left_alone(
    tmp_path: Path, bert: Path, run_dir: Path, damage: Any
) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("the cat sat on the mat.")
    store = filled_store(tmp_path / "m.sqlite")
    store.write_bytes(damage(store.read_bytes()))
    before = store.read_bytes()
    for name, args in commands(store, bert, doc, run_dir).items():
        line = error_line(runner.invoke(app, args))
        assert f"retrieval store {store}: it is corrupt" in line, name
        assert "memext memory add" in line, name  # the fix
    assert store.read_bytes() == before
    with pytest.raises(StoreError, match="malformed"), RetrievalStore(store, readonly=True) as s:
        s.search(np.ones(32), k=3)


def test_a_foreign_file_is_refused_and_left_alone(tmp_path: Path, bert: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("the cat sat on the mat.")
    notes = tmp_path / "notes.txt"  # a --store pointed at the user's own file
    notes.write_bytes(b"my notes, not a database " * 200)
    other = tmp_path / "other.sqlite"  # someone else's SQLite database
    sqlite3.connect(other).execute("CREATE TABLE people (name TEXT)").connection.commit()
    for store, says in ((notes, "corrupt or not a memext"), (other, "not a memext retrieval")):
        before = store.read_bytes()
        for name, args in commands(store, bert, doc).items():
            assert says in error_line(runner.invoke(app, args)), name
        assert store.read_bytes() == before


def test_a_locked_store_says_who_holds_it(
    tmp_path: Path, bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        store_db, "BUSY_TIMEOUT", 0.05
    )  # where it is read; store.py only re-exports it
    store = filled_store(tmp_path / "m.sqlite", n=10)
    doc = tmp_path / "a.txt"
    doc.write_text("the cat sat on the mat.")
    holder = sqlite3.connect(store, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer, mid-transaction
    try:
        line = error_line(runner.invoke(app, commands(store, bert, doc)["add"]))
        assert f"retrieval store {store}: another process held its write lock" in line
        with RetrievalStore(store, readonly=True) as s:  # readers are not blocked (WAL)
            assert len(s) == 10
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with RetrievalStore(store, model="bert", dim=32) as s:
        assert len(s) == 10  # nothing was lost or half-written


@pytest.mark.parametrize(
    ("kind", "name", "says"),
    [
        (sqlite3.OperationalError, "SQLITE_FULL", "the disk is full"),
        (sqlite3.OperationalError, "SQLITE_READONLY", "is read-only"),
        (sqlite3.OperationalError, "SQLITE_BUSY", "write lock"),
        (sqlite3.OperationalError, "SQLITE_CANTOPEN", "cannot open it"),
        (sqlite3.OperationalError, "SQLITE_IOERR_WRITE", "the disk failed"),
        (sqlite3.DatabaseError, "SQLITE_CORRUPT", "it is corrupt"),
        (sqlite3.DatabaseError, "SQLITE_NOTADB", "not a memext retrieval store"),
    ],
)
def test_each_sqlite_failure_names_the_store_and_the_fix(
    kind: type[sqlite3.Error], name: str, says: str
) -> None:
    e = kind("what sqlite said")
    e.sqlite_errorname = name  # type: ignore[attr-defined]
    error = store_error("notes.sqlite", e)
    assert isinstance(error, MemextError)
    assert str(error).startswith("retrieval store notes.sqlite: ") and says in str(error)
    assert "\n" not in str(error) and "(sqlite: what sqlite said)" in str(error)


# --- the embedding cache ----------------------------------------------------------------------


def _cached_rows(path: Path) -> int:
    return sqlite3.connect(path).execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]


def test_a_foreign_cache_file_is_rebuilt(cache: Path, bert: Path) -> None:
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"garbage, not a database " * 100)
    want = Encoder(bert, cache=False, progress=False).embed(["the cat sat", "on the mat"])
    with pytest.warns(UserWarning, match=r"embeddings.sqlite was corrupt .*rebuilt it empty"):
        got = Encoder(bert, progress=False).embed(["the cat sat", "on the mat"])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert _cached_rows(cache) == 2  # rebuilt, and in use again


def test_a_cache_damaged_inside_is_rebuilt(cache: Path, bert: Path) -> None:
    """Pages damaged past the header: the cache opens, then a read finds the damage."""
    texts = [f"the cat {'sat ' * (i % 9)}on the mat {i}" for i in range(400)]
    encoder = Encoder(bert, progress=False)
    encoder.embed(texts)
    encoder.close()  # the last connection out moves the WAL into the file
    cache.write_bytes(_zeroed(cache.read_bytes()))
    want = Encoder(bert, cache=False, progress=False).embed(texts[:3])
    with pytest.warns(UserWarning, match="was corrupt"):
        got = Encoder(bert, progress=False).embed(texts[:3])
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert _cached_rows(cache) == 3


def test_an_unusable_cache_is_skipped(cache: Path, bert: Path) -> None:
    cache.mkdir(parents=True)  # a folder where the file should be: SQLite cannot open it
    with pytest.warns(UserWarning, match="cannot be used .*embedding without it"):
        got = Encoder(bert, progress=False).embed(["the cat sat"])
    assert got.shape == (1, 32) and cache.is_dir()


def test_commands_survive_a_corrupt_cache(cache: Path, bert: Path, tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_text("the cat sat on the mat. " * 10)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"garbage, not a database " * 100)
    store = tmp_path / "m.sqlite"
    with pytest.warns(UserWarning, match="was corrupt"):
        added = runner.invoke(app, commands(store, bert, doc)["add"])
    assert added.exit_code == 0 and "Traceback" not in added.output, added.output
    # A new file (inode): SQLite would share this process's view of the old one with the
    # connection the first command left open.
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache}{suffix}").unlink(missing_ok=True)
    cache.write_bytes(b"garbage again " * 100)
    with pytest.warns(UserWarning, match="was corrupt"):
        found = runner.invoke(app, commands(store, bert, doc)["search"])
    assert found.exit_code == 0 and "a.txt" in found.output, found.output
