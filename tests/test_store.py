"""Retrieval memory: persistence, idempotent adds, deletes, a killed writer, model checks,
faiss against exact search, BM25 and hybrid ranking."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memext.errors import MemextError
from memext.pipelines.chunking import chunk_text
from memext.pipelines.lexical import BM25, reciprocal_rank_fusion, top_fused
from memext.pipelines.store import Item, RetrievalStore

DIM = 8


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def items(n: int, doc: str = "doc", seed: int = 0) -> list[Item]:
    vectors = unit(np.random.default_rng(seed), n)
    return [Item(doc, f"{doc} chunk {i}", vectors[i], {"i": i, "tag": "é"}) for i in range(n)]


def open_store(path: Path | str, **kw) -> RetrievalStore:
    return RetrievalStore(path, model="toy", dim=DIM, **kw)


def test_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "memory.sqlite"
    q = unit(np.random.default_rng(9), 1)[0]
    with open_store(path) as store:
        assert store.add(items(20)) == 20
        before = store.search(q, k=5)
    with RetrievalStore(path) as store:  # model and dimension come from the file
        assert (store.model, store.dim, len(store)) == ("toy", DIM, 20)
        assert store.search(q, k=5) == before
        assert before[0].metadata["tag"] == "é" and before[0].doc_id == "doc"
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_readding_is_idempotent(tmp_path: Path) -> None:
    with open_store(tmp_path / "m.sqlite") as store:
        assert store.add(items(10)) == 10
        assert store.add(items(10)) == 0
        assert store.add(items(12)) == 2  # only the two new chunks
        assert len(store) == 12
        # the same text in another document is another chunk
        assert store.add(items(3, doc="other")) == 3 and len(store) == 15


def test_delete_removes_a_document_everywhere(tmp_path: Path) -> None:
    with open_store(tmp_path / "m.sqlite") as store:
        store.add(items(10, "a", seed=1) + items(10, "b", seed=2))
        q = items(10, "a", seed=1)[3].vector
        assert store.search(q, k=1)[0].text == "a chunk 3"
        assert store.delete("a") == 10 and store.delete("a") == 0
        assert len(store) == 10
        assert {h.doc_id for h in store.search(q, k=20)} == {"b"}
        store.add(items(2, "c", seed=3))  # appended after a delete: found too
        assert store.search(items(2, "c", seed=3)[1].vector, k=1)[0].text == "c chunk 1"
        assert store.add(items(10, "a", seed=1)) == 10  # a deleted document can come back


def test_exact_search_is_cosine_top_k(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, DIM)).astype(np.float32) * 3  # not unit: cosine anyway
    with open_store(":memory:") as store:
        store.add(Item("d", f"t{i}", v) for i, v in enumerate(vectors))
        q = rng.standard_normal(DIM).astype(np.float32)
        cos = vectors @ q / np.linalg.norm(vectors, axis=1) / np.linalg.norm(q)
        hits = store.search(q, k=7)
        assert [h.text for h in hits] == [f"t{i}" for i in np.argsort(-cos)[:7]]
        np.testing.assert_allclose([h.score for h in hits], np.sort(cos)[::-1][:7], rtol=1e-5)
        assert len(store.search(q, k=100)) == 50


def test_faiss_index_equals_exact_search(tmp_path: Path) -> None:
    import faiss  # noqa: F401  (the dev extra brings it: a missing one is an install error)

    rng = np.random.default_rng(1)
    path = tmp_path / "m.sqlite"
    with open_store(path) as exact, open_store(path, index="faiss") as approx:
        exact.add(Item("d", f"t{i}", v) for i, v in enumerate(unit(rng, 300)))
        for q in unit(rng, 20):
            want, got = exact.search(q, k=10), approx.search(q, k=10)
            assert [h.id for h in got] == [h.id for h in want]
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
        # HNSW keeps every vector plus its graph; the exact index only the float32 matrix.
        assert exact.index_nbytes() == 300 * exact.dim * 4
        assert approx.index_nbytes() > exact.index_nbytes()
        exact.add(items(5, "late"))  # the index takes rows added since it was built
        q = items(5, "late")[2].vector
        assert approx.search(q, k=1)[0].text == "late chunk 2"


def test_refuses_another_model_or_dimension(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    open_store(path).close()
    with pytest.raises(MemextError, match="holds embeddings of 'toy' \\(dim 8\\)"):
        RetrievalStore(path, model="other", dim=DIM)
    with pytest.raises(MemextError, match="holds embeddings of 'toy'"):
        RetrievalStore(path, model="toy", dim=16)
    with open_store(path) as store:
        with pytest.raises(MemextError, match=r"shape \(16,\)"):
            store.add([Item("d", "x", np.ones(16, dtype=np.float32))])
        with pytest.raises(MemextError, match="NaN"):
            store.add([Item("d", "x", np.full(DIM, np.nan, dtype=np.float32))])
        with pytest.raises(MemextError, match="need an encoder"):
            store.add([Item("d", "x")])
        with pytest.raises(MemextError, match="needs an encoder"):
            store.search("text query", k=1)
        with pytest.raises(MemextError, match="needs the query as text"):
            store.search(np.ones(DIM), mode="bm25")
        with pytest.raises(MemextError, match="mode='fuzzy' is invalid"):
            store.search("x", mode="fuzzy")  # type: ignore[arg-type]
    with pytest.raises(MemextError, match="is a new store: pass encoder="):
        RetrievalStore(tmp_path / "new.sqlite")
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(MemextError, match="not a memext retrieval store"):
        open_store(tmp_path / "junk.sqlite")


def test_sees_what_another_connection_wrote(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    with open_store(path) as reader, open_store(path) as writer:
        assert reader.search(np.ones(DIM), k=3) == []
        writer.add(items(4))
        assert len(reader.search(np.ones(DIM), k=10)) == 4
        writer.delete("doc")
        assert reader.search(np.ones(DIM), k=10) == []


WRITER = """
import sys
import numpy as np
from memext.pipelines.store import Item, RetrievalStore

store = RetrievalStore(sys.argv[1], model="toy", dim=8)
rng = np.random.default_rng(0)
batch = 0
while True:
    rows = [Item(f"batch-{batch}", f"row {r}", rng.standard_normal(8)) for r in range(50)]
    store.add(rows)
    store.add(rows[:25])  # a retried half batch: changes nothing
    print(batch, flush=True)
    batch += 1
"""


def test_a_killed_writer_loses_no_committed_batch(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        committed = [int(proc.stdout.readline()) for _ in range(5)]  # type: ignore[union-attr]
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # mid-write, most likely: it writes without pause
        proc.wait()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    counts = dict(db.execute("SELECT doc_id, COUNT(*) FROM chunks GROUP BY doc_id"))
    assert all(counts.get(f"batch-{b}") == 50 for b in committed)  # every reported batch
    assert set(counts.values()) == {50}  # and no partial one
    texts = db.execute("SELECT COUNT(*), COUNT(DISTINCT doc_id || text) FROM chunks").fetchone()
    assert texts[0] == texts[1]  # no duplicates
    with RetrievalStore(path) as store:  # reopens and searches
        assert len(store) == sum(counts.values())
        assert len(store.search(np.ones(DIM), k=3)) == 3


# --- lexical and hybrid -----------------------------------------------------------------------
CORPUS = {
    "python": "Python is a programming language with readable code.",
    "pasta": "Cook the pasta in salted water and add a fresh tomato sauce.",
    "paris": "The Eiffel tower stands in Paris, the capital of France.",
    "gpu": "Training neural networks is faster on a GPU.",
    "garden": "Water your tomato plants every morning in summer.",
}


@pytest.fixture
def toy_store() -> RetrievalStore:
    store = open_store(":memory:")
    vectors = np.eye(len(CORPUS), DIM, dtype=np.float32)  # one direction per document
    store.add(Item(doc, text, v) for (doc, text), v in zip(CORPUS.items(), vectors, strict=True))
    return store


def test_bm25_finds_the_document_with_the_words(toy_store: RetrievalStore) -> None:
    assert toy_store.search("tomato sauce for pasta", k=1, mode="bm25")[0].doc_id == "pasta"
    assert toy_store.search("eiffel tower", k=1, mode="bm25")[0].doc_id == "paris"
    assert [h.doc_id for h in toy_store.search("tomato", k=5, mode="bm25")] in (
        ["pasta", "garden"],
        ["garden", "pasta"],
    )  # only matching documents, never the rest
    assert toy_store.search("zebra", mode="bm25") == []
    assert toy_store.search("tomato", k=5, mode="bm25", doc_prefix="gar")[0].doc_id == "garden"


def _lucene_bm25(docs: list[list[str]], query: list[str], k1: float, b: float) -> np.ndarray:
    """The textbook formula, one loop per (text, query word): the reference for bm25s."""
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    out = np.zeros(n)
    for i, doc in enumerate(docs):
        for term in query:
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            if tf:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                out[i] += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avg))
    return out


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from(["ab", "cd", "ef", "gh", "ij"]), max_size=8),
        min_size=1,
        max_size=6,
    ),
    st.lists(st.sampled_from(["ab", "cd", "ef", "zz"]), min_size=1, max_size=4),
)
def test_bm25_equals_the_lucene_formula(docs: list[list[str]], query: list[str]) -> None:
    bm25 = BM25([" ".join(d) for d in docs])
    scores = bm25.scores(" ".join(query))
    matched = scores > 0
    want = _lucene_bm25(docs, query, BM25.K1, BM25.B)  # all 0 when no text has a word
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)  # bm25s keeps float32
    assert matched.tolist() == [bool(set(query) & set(d)) for d in docs]


def _rrf_reference(rankings: list[list[int]], k: int) -> dict[int, float]:
    """Reciprocal-rank fusion as the paper writes it: sum 1 / (k + rank) over the rankings."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for r, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + r)
    return fused


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30), st.data())
def test_fusion_and_its_top_k_equal_the_reference(n: int, data: st.DataObject) -> None:
    rankings = [
        data.draw(st.permutations(range(n)).map(lambda p: p[: data.draw(st.integers(0, n))]))
        for _ in range(data.draw(st.integers(1, 3)))
    ]
    k_rrf = data.draw(st.sampled_from([0, 1, 60]))
    fused = reciprocal_rank_fusion([np.array(r, dtype=np.int64) for r in rankings], n, k_rrf)
    want = _rrf_reference(rankings, k_rrf)
    np.testing.assert_allclose(fused, [want.get(i, 0.0) for i in range(n)], rtol=1e-12)
    k = data.draw(st.integers(1, n + 2))
    best = sorted(want.items(), key=lambda kv: (-fused[kv[0]], kv[0]))[:k]
    assert top_fused(fused, k).tolist() == [i for i, _ in best]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=40), st.data())
def test_top_fused_breaks_ties_by_position(scores: list[float], data: st.DataObject) -> None:
    # Few distinct scores, so ties straddle the k-th place (where a partial sort is arbitrary).
    k = data.draw(st.integers(1, len(scores) + 1))
    want = sorted((i for i, v in enumerate(scores) if v > 0), key=lambda i: (-scores[i], i))
    assert top_fused(np.array(scores), k).tolist() == want[:k]


def test_hybrid_fuses_the_two_rankings(toy_store: RetrievalStore) -> None:
    near_gpu = np.eye(len(CORPUS), DIM, dtype=np.float32)[3] + 0.1  # embedding says "gpu"
    hits = toy_store.search("tomato pasta", k=5, mode="hybrid", query_vector=near_gpu)
    # pasta: BM25 first + embedding some rank; gpu: embedding first, no BM25 rank
    assert hits[0].doc_id == "pasta"
    by_vector = [h.id for h in toy_store.search(near_gpu, k=5)]
    by_words = [h.id for h in toy_store.search("tomato pasta", k=5, mode="bm25")]
    fused = _rrf_reference([by_vector, by_words], k=60)
    assert [(h.id, h.score) for h in hits] == sorted(fused.items(), key=lambda kv: -kv[1])
    both = toy_store.search("Eiffel", k=1, mode="hybrid", query_vector=np.eye(5, DIM)[2])
    assert both[0].doc_id == "paris" and both[0].score == pytest.approx(2 / 61)


def test_store_with_an_encoder_chunks_and_embeds(tmp_path: Path) -> None:
    from memext.pipelines.encoder import Encoder
    from tiny_bert import write_tiny_bert

    encoder = Encoder(write_tiny_bert(tmp_path / "bert"), cache=False, progress=False)
    text = "the cat sat on the mat. " * 20 + "\n\nthe passkey number is 42."
    with RetrievalStore(tmp_path / "m.sqlite", encoder=encoder) as store:
        n = store.add_text("story", text, overlap=4, metadata={"source": "test"})
        assert n == len(store) > 1
        last = store.search("the passkey number is 42.", k=1, mode="bm25")[0]
        assert last.metadata["source"] == "test" and text[last.metadata["start"] :].startswith(
            last.text
        )
        # a chunk's own text is its own nearest neighbour (cosine 1)
        hit = store.search(last.text, k=1)[0]
        assert hit.id == last.id and hit.score == pytest.approx(1.0, abs=1e-5)
        assert store.add_text("story", text, overlap=4) == 0
    with pytest.raises(MemextError, match="holds embeddings of"):
        RetrievalStore(tmp_path / "m.sqlite", model="sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(MemextError, match="empty"):
        RetrievalStore(tmp_path / "m.sqlite", encoder=encoder).add_text("x", "")


# --- documents: one encoder, replaced whole, one id per file ---------------------------------


@pytest.fixture(scope="module")
def bert_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny encoders in folders of the same name, and a copy of the first under
    another name."""
    import shutil

    from tiny_bert import write_tiny_bert

    root = tmp_path_factory.mktemp("encoders")
    first = write_tiny_bert(root / "a" / "bert", seed=0)
    other = write_tiny_bert(root / "b" / "bert", seed=1)
    copy = Path(shutil.copytree(first, root / "copy-of-bert"))
    return {"first": first, "other": other, "copy": copy}


def _encoder(path: Path):
    from memext.pipelines.encoder import Encoder

    return Encoder(path, cache=False, progress=False)


def test_a_store_refuses_another_encoder_of_the_same_name(
    tmp_path: Path, bert_dirs: dict[str, Path]
) -> None:
    """The store records the encoder's fingerprint: a different model in a folder of the same
    name (same dimension) is refused; the same files in a folder of another name are accepted."""
    path = tmp_path / "m.sqlite"
    with RetrievalStore(path, encoder=_encoder(bert_dirs["first"])) as store:
        store.add_text("story", "the cat sat on the mat.")
    with pytest.raises(MemextError, match=r"another model \('bert', [0-9a-f]{12}, dim 32\)"):
        RetrievalStore(path, encoder=_encoder(bert_dirs["other"]))
    with pytest.raises(MemextError, match="another model"):
        RetrievalStore(path, encoder=_encoder(bert_dirs["other"]), readonly=True)
    with RetrievalStore(path, encoder=_encoder(bert_dirs["copy"]), readonly=True) as store:
        assert store.search("the cat", k=1, mode="bm25")[0].doc_id == "story"


def test_a_store_from_before_fingerprints_adopts_its_encoder_once(
    tmp_path: Path, bert_dirs: dict[str, Path]
) -> None:
    """An old store records only the model's name: an encoder of that name opens it (it can
    be read without writing), the first writable open records the fingerprint with a warning,
    and from then on another model of that name is refused."""
    path = tmp_path / "old.sqlite"
    RetrievalStore(path, model="bert", dim=32).close()  # what an older memext wrote
    with RetrievalStore(path, encoder=_encoder(bert_dirs["first"]), readonly=True):
        pass
    with pytest.warns(UserWarning, match="recorded only its model's name, 'bert'"):
        RetrievalStore(path, encoder=_encoder(bert_dirs["first"])).close()
    with pytest.raises(MemextError, match="another model"):
        RetrievalStore(path, encoder=_encoder(bert_dirs["other"]))
    with pytest.raises(MemextError, match="holds embeddings of 'bert'"):
        RetrievalStore(tmp_path / "old.sqlite", model="other", dim=32)


def _texts(store: RetrievalStore, doc: str) -> list[str]:
    rows = store.db.execute("SELECT text FROM chunks WHERE doc_id = ? ORDER BY id", (doc,))
    return [r[0] for r in rows]


def test_readding_an_edited_document_replaces_its_chunks(
    tmp_path: Path, bert_dirs: dict[str, Path]
) -> None:
    old = "\n\n".join(f"paragraph {i}: the cat sat on the mat." for i in range(12))
    new = old.replace("paragraph 3: the cat sat on the mat.", "paragraph 3: the dog ate bread.")
    with RetrievalStore(tmp_path / "m.sqlite", encoder=_encoder(bert_dirs["first"])) as store:
        store.add_text("notes", old)
        store.add_text("other", "the cat sat on the mat.")
        before = {r[1]: r[0] for r in store.db.execute("SELECT id, text FROM chunks")}
        store.search("cat", k=1)  # loads the vectors: the refresh after a delete must reload
        r = store.replace("notes", [new[:50], new[50:]])
        texts = _texts(store, "notes")
        enc = store.encoder
        assert enc is not None
        wanted = [c.text for c in chunk_text(new, enc.tokenizer, enc.max_tokens)]
        assert sorted(texts) == sorted(wanted) and len(wanted) > 3
        assert not any("paragraph 3: the cat" in t for t in texts)
        assert r.removed >= 1 and r.new >= 1 and r.chunks == len(texts)
        # unchanged chunks keep their rows; the other document is untouched
        after = {r[1]: r[0] for r in store.db.execute("SELECT id, text FROM chunks")}
        assert all(after[t] == before[t] for t in after if t in before)
        assert _texts(store, "other") == ["the cat sat on the mat."]
        hits = store.search("paragraph 3", k=len(store), mode="hybrid")
        assert not any("paragraph 3: the cat" in h.text for h in hits)
        assert len(hits) == len(store) == len(texts) + 1
        # the same text again changes nothing
        assert store.replace("notes", [new]) == type(r)("notes", r.chunks, 0, 0)


def test_a_file_is_one_document_however_its_path_is_spelled(
    tmp_path: Path, bert_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The doc id is the file's path relative to the store's folder: `a.md`, `./a.md`, an
    absolute path and another working directory all name one document."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("the cat sat on the mat. " * 30)
    monkeypatch.chdir(docs)
    with RetrievalStore(tmp_path / "m.sqlite", encoder=_encoder(bert_dirs["first"])) as store:
        first = store.add_file("a.md", overlap=2)
        assert first.doc_id == "docs/a.md" and first.new == first.chunks == len(store)
        for spelling in ("./a.md", str(docs / "a.md"), "../docs/./a.md"):
            assert store.add_file(spelling, overlap=2).new == 0
        monkeypatch.chdir(tmp_path)
        assert store.document_id("docs/a.md") == "docs/a.md"
        assert store.add_file("docs/a.md", overlap=2).new == 0 and len(store) == first.chunks
        hit = store.search("the cat", k=1)[0]
        assert hit.metadata["path"] == str(docs / "a.md")
    elsewhere = tmp_path / "stores" / "x.sqlite"
    with RetrievalStore(elsewhere, encoder=_encoder(bert_dirs["first"])) as store:
        assert store.document_id(docs / "a.md") == "../docs/a.md"


def test_a_long_file_is_streamed_to_the_chunks_of_the_whole_text(
    tmp_path: Path, bert_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read in pieces, chunked in small windows and staged in batches, a file is stored as the
    chunks (texts, offsets and vectors) of its whole text."""
    from memext.pipelines import chunking, documents, store_write

    text = "".join(
        f"Paragraph {i}: the man is eating bread. 中文的字 {'abc' * (i % 7)}.\n\n"
        for i in range(60)
    )
    (tmp_path / "long.txt").write_text(text)
    encoder = _encoder(bert_dirs["first"])
    with RetrievalStore(tmp_path / "whole.sqlite", encoder=encoder) as whole:
        whole.add_text("long.txt", text, overlap=3)
        expected = whole.db.execute("SELECT text, vector, metadata FROM chunks ORDER BY id")
        expected = expected.fetchall()
    monkeypatch.setattr(chunking, "WINDOW", 97)
    monkeypatch.setattr(store_write, "STAGE_BATCH", 5)
    real = documents.text_pieces
    monkeypatch.setattr(documents, "text_pieces", lambda p, **kw: real(p, **kw, block=41))
    with RetrievalStore(tmp_path / "streamed.sqlite", encoder=encoder) as streamed:
        r = streamed.add_file(tmp_path / "long.txt", overlap=3)
        got = streamed.db.execute("SELECT text, vector, metadata FROM chunks ORDER BY id")
        got = [(t, v, json.dumps({**json.loads(m), "path": None})) for t, v, m in got]
    assert r.chunks == len(expected) > 10
    assert [g[0] for g in got] == [e[0] for e in expected]
    # batches pad to other lengths, which moves the last bits of a vector
    vectors = [np.frombuffer(x[1], dtype=np.float32) for x in (*got, *expected)]
    np.testing.assert_allclose(vectors[: len(got)], vectors[len(got) :], atol=1e-5)
    assert [json.loads(g[2]) | {"path": None} for g in got] == [
        json.loads(e[2]) | {"path": None} for e in expected
    ]


def test_a_failed_readd_leaves_the_document_as_it_was(
    tmp_path: Path, bert_dirs: dict[str, Path]
) -> None:
    """Bytes that are not UTF-8 near the end of an edited file: the error names the file and
    the byte, and the store keeps the earlier version whole."""
    f = tmp_path / "a.txt"
    f.write_text("the cat sat on the mat. " * 40)
    with RetrievalStore(tmp_path / "m.sqlite", encoder=_encoder(bert_dirs["first"])) as store:
        store.add_file(f)
        before = _texts(store, "a.txt")
        f.write_bytes(b"the dog ate bread. " * 40 + b"\xff")
        with pytest.raises(MemextError, match=rf"{f}: not valid UTF-8 \(byte 760"):
            store.add_file(f)
        f.write_text("   \n")
        with pytest.raises(MemextError, match="only whitespace"):
            store.add_file(f)
        assert _texts(store, "a.txt") == before
        with pytest.raises(MemextError, match=r"cannot read .*gone.txt"):
            store.add_file(tmp_path / "gone.txt")


def test_read_only_and_existing_only_stores(tmp_path: Path, bert_dirs: dict[str, Path]) -> None:
    """A mistyped path is refused, never created; a read-only store writes nothing."""
    missing = tmp_path / "typo" / "m.sqlite"
    for kw in ({"readonly": True}, {"create": False}):
        with pytest.raises(MemextError, match=r"no retrieval store at .*typo/m.sqlite"):
            RetrievalStore(missing, encoder=_encoder(bert_dirs["first"]), **kw)
    assert not (tmp_path / "typo").exists()
    path = tmp_path / "m.sqlite"
    with open_store(path) as store:
        store.add(items(4))
    with RetrievalStore(path, readonly=True) as store:
        assert len(store) == 4 and store.search(items(1)[0].vector, k=1)[0].text == "doc chunk 0"
        with pytest.raises(MemextError, match="read-only"):
            store.add(items(6))
        with pytest.raises(MemextError, match="read-only"):
            store.delete("doc")
    with RetrievalStore(path, create=False) as store:
        assert store.has_document("doc") and store.delete("doc", "nothing") == 4
    with pytest.raises(MemextError, match="is a folder"):
        RetrievalStore(tmp_path, readonly=True)
