"""Retrieval memory on real documents: BM25 vs embeddings vs hybrid, and search cost at scale.

Quality: the sections of ``../shared/data/linux_docs_subsystems.jsonl.gz`` (``--split``;
reStructuredText, a heading is a title line over an underline of one repeated punctuation
character at least as long). Every section body, its heading removed, is chunked to the
encoder's limit (all-MiniLM-L6-v2, 256 tokens) and stored in a ``RetrievalStore``; the queries
are the headings that occur once in the split (case and spacing ignored) over bodies of at least
``--min-words`` words. A hit is right when its chunk comes from the heading's own section:
recall@1/5/10 and MRR (over the top 100) for ``bm25``, ``embedding`` and ``hybrid``.

Scale: stores of ``--sizes`` chunks (real chunk texts cycled, random unit vectors: exact search
costs the same for any values, and HNSW finds random vectors harder than real ones): median and
p95 search latency per mode (the query's embedding given, so the encoder is not timed; its cost
is printed apart), the SQLite file's size and the faiss HNSW index's.

    python benchmarks/retrieval.py                       # quality on validation + 10k/100k scale
    python benchmarks/retrieval.py --sizes 10000 --queries 20 --out /tmp/r.json   # quicker
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.pipelines.chunking import chunk_text
from memext.pipelines.encoder import Encoder
from memext.pipelines.store import Item, RetrievalStore
from memext.runtime import command_line, provenance

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MODES = ("bm25", "embedding", "hybrid")
_UNDERLINE = re.compile(r"""^([=\-~^"'`#*+_:.])\1*\s*$""")


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, body) of every reStructuredText section, body without its heading lines."""
    lines = text.splitlines()
    heads: list[tuple[int, int, str]] = []  # (first line of the heading, first body line, title)
    i = 0
    while i + 1 < len(lines):
        title, under = lines[i].strip(), lines[i + 1]
        heading = (
            title
            and not lines[i][:1].isspace()
            and not _UNDERLINE.match(title)
            and _UNDERLINE.match(under)
            and len(under.strip()) >= len(title)
        )
        if heading:
            over = i > 0 and lines[i - 1].strip() == under.strip()
            heads.append((i - over, i + 2, title))
            i += 2
            continue
        i += 1
    out = []
    for n, (_, body_start, title) in enumerate(heads):
        end = heads[n + 1][0] if n + 1 < len(heads) else len(lines)
        out.append((title, "\n".join(lines[body_start:end]).strip()))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA / "linux_docs_subsystems.jsonl.gz")
    p.add_argument("--split", default="validation")
    p.add_argument("--min-words", type=int, default=30)
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--queries", type=int, default=50, help="timed queries per mode and size")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    docs = _documents(args.data, args.split)
    encoder = Encoder(progress=True)

    # --- the corpus: every section's chunks; the queries: unique headings over long bodies
    chunks: list[Item] = []
    titles: dict[str, list[str]] = {}
    long_bodies: set[str] = set()
    for doc_id, text in docs:
        for n, (title, body) in enumerate(sections(text)):
            if not body.strip():
                continue
            section = f"{doc_id}#{n}"
            titles.setdefault(" ".join(title.lower().split()), []).append(section)
            if len(body.split()) >= args.min_words:
                long_bodies.add(section)
            for c in chunk_text(body, encoder.tokenizer, encoder.max_tokens, 0):
                chunks.append(Item(section, c.text, None, {"chunk": c.index}))
    queries = [(t, s[0]) for t, s in titles.items() if len(s) == 1 and s[0] in long_bodies]
    n_sections = sum(len(s) for s in titles.values())
    print(
        f"{len(docs)} documents, {n_sections} sections, {len(chunks)} chunks, "
        f"{len(queries)} queries",
        flush=True,
    )

    t0 = time.perf_counter()
    vectors = encoder.embed([c.text for c in chunks])
    embed_s = time.perf_counter() - t0
    chunks = [Item(c.doc_id, c.text, v, c.metadata) for c, v in zip(chunks, vectors, strict=True)]
    query_vectors = encoder.embed([q for q, _ in queries])
    # Timed apart without the embedding cache, which a rerun would otherwise hit.
    timed = [q for q, _ in queries[:200]]
    uncached = Encoder(cache=False, progress=False)
    t0 = time.perf_counter()
    uncached.embed(timed)
    query_embed_ms = 1000 * (time.perf_counter() - t0) / len(timed)

    results: dict[str, Any] = {
        "data": args.data.name,
        "split": args.split,
        "documents": len(docs),
        "sections": n_sections,
        "chunks": len(chunks),
        "queries": len(queries),
        "min_words": args.min_words,
        "encoder": encoder.name,
        "max_tokens": encoder.max_tokens,
        "query_embedding_ms": round(query_embed_ms, 2),
        "provenance": provenance(torch.device("cpu")),
        "command": command_line("benchmarks/retrieval.py", args, ("out",)),
    }
    print(
        f"embedded in {embed_s:.0f} s; a query's embedding {query_embed_ms:.1f} ms "
        f"(uncached, batches of {uncached.batch_size})",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        with RetrievalStore(Path(tmp) / "quality.db", model=encoder.name, dim=encoder.dim) as st:
            st.add(chunks)
            results["quality"] = {
                mode: _quality(st, queries, query_vectors, mode) for mode in MODES
            }
        for mode, row in results["quality"].items():
            print(f"  {mode:9} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)

        texts = [c.text for c in chunks]
        results["scale"] = {}
        for size in [int(s) for s in args.sizes.split(",")]:
            results["scale"][str(size)] = row = _scale(Path(tmp), size, texts, queries, args)
            print(f"  {size:>7} chunks: {row}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _documents(path: Path, split: str) -> list[tuple[str, str]]:
    """(id, text) of the split's documents."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip())
        return [(r["id"], r["text"]) for r in rows if r["split"] == split]


def _quality(
    store: RetrievalStore, queries: list[tuple[str, str]], vectors: np.ndarray, mode: str
) -> dict[str, float]:
    """recall@1/5/10 and MRR (first right chunk in the top 100; 0 beyond)."""
    ranks = []
    for (query, section), v in zip(queries, vectors, strict=True):
        hits = store.search(query, 100, mode=mode, query_vector=v)  # type: ignore[arg-type]
        rank = next((r for r, h in enumerate(hits, 1) if h.doc_id == section), None)
        ranks.append(rank)
    out = {
        f"recall@{k}": float(np.mean([r is not None and r <= k for r in ranks])) for k in (1, 5, 10)
    }
    out["mrr"] = float(np.mean([1 / r if r else 0.0 for r in ranks]))
    return out


def _scale(
    tmp: Path, size: int, texts: list[str], queries: list[tuple[str, str]], args: Any
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    dim = 384
    path = tmp / f"scale-{size}.db"
    with RetrievalStore(path, model="random-unit", dim=dim) as store:
        for start in range(0, size, 10_000):
            n = min(10_000, size - start)
            v = rng.standard_normal((n, dim)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            store.add(
                Item(f"d{start + i}", texts[(start + i) % len(texts)], v[i]) for i in range(n)
            )
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        row: dict[str, Any] = {"sqlite_bytes": path.stat().st_size}
        row["sqlite_bytes_per_chunk"] = round(row["sqlite_bytes"] / size, 1)
        qs = [queries[i % len(queries)][0] for i in range(args.queries)]
        qv = rng.standard_normal((args.queries, dim)).astype(np.float32)
        t0 = time.perf_counter()
        store.search(qs[0], 1, mode="bm25")  # loads the vectors and builds BM25
        row["load_and_bm25_build_s"] = round(time.perf_counter() - t0, 2)
        for mode in MODES:
            row[f"{mode}_ms"] = _latency(
                lambda q, v, m=mode: store.search(q, 10, mode=m, query_vector=v), qs, qv
            )
    with RetrievalStore(path, index="faiss") as store:
        t0 = time.perf_counter()
        store.search(qv[0], 1)
        row["faiss_build_s"] = round(time.perf_counter() - t0, 2)
        row["faiss_ms"] = _latency(lambda q, v: store.search(v, 10), qs, qv)
        found = [{h.id for h in store.search(v, 10)} for v in qv]
        row["faiss_index_bytes"] = store.index_nbytes()
    with RetrievalStore(path) as store:
        exact = [{h.id for h in store.search(v, 10)} for v in qv]
    overlap = [len(a & b) / 10 for a, b in zip(exact, found, strict=True)]
    row["faiss_recall@10_vs_exact"] = float(np.mean(overlap))
    return row


def _latency(search: Any, qs: list[str], qv: np.ndarray) -> dict[str, float]:
    times = []
    for q, v in zip(qs, qv, strict=True):
        t0 = time.perf_counter()
        search(q, v)
        times.append(1000 * (time.perf_counter() - t0))
    return {
        "median": round(statistics.median(times), 3),
        "p95": round(float(np.percentile(times, 95)), 3),
    }


if __name__ == "__main__":
    main()
