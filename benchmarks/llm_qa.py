"""Questions about facts inserted into long kernel documents, answered by one reader four ways
(issue 18 item 7.1).

Each question inserts an invented fact at a random sentence boundary of a document longer than
the reader's window (``memext.data.inserted_facts``: the entity and value occur nowhere else)
and asks for its value. One reader (default SmolLM2-135M-Instruct, greedy, in its chat
template) and one prompt template (``memext.pipelines.ask.prompt_text``: header, context,
question) read it four ways:

- ``retrieval`` (a): ``memext ask``'s pipeline: the document chunked and embedded
  (all-MiniLM-L6-v2) into a store, the best chunks for the question (hybrid search) that fit
  ``--context-tokens``;
- ``truncated`` (b): the document's beginning, as much as the window holds beside the question
  and the answer's room;
- ``memory`` (c): the whole document through the ``retrieval`` KV-cache policy (issue 18 item
  4: sinks + a local window + the top-k blocks of the evicted keys and values), read in
  ``--chunk``-token pieces;
- ``full`` (d): the whole document in one pass, only where it fits the window; otherwise the row
  says it does not fit (every document here is longer than the window, so by default none does;
  where a document fits, (d) reads the same prompt as (b)).

Scores (``InsertedFact.score``): exact match and token F1, SQuAD-style, of the reply's first
line less the words of the question and of the fact's wording (SmolLM2 answers "The X is
48213."); the strict exact match of the whole first line and whether the value occurs in the
reply are recorded beside them. Rows are appended to ``--rows`` as they finish, one JSON line
each, so an interrupted run resumes where it stopped (same settings only).

    python benchmarks/llm_qa.py                                     # 20 questions, ~45 min CPU
    python benchmarks/llm_qa.py --questions 2 --max-tokens 9000 --configs retrieval,truncated \\
        --out /tmp/qa.json --rows /tmp/qa.rows.jsonl                # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from memext.data.inserted_facts import InsertedFact, fact_questions
from memext.errors import MemextError
from memext.pipelines.ask import ask, prompt_reader, prompt_text
from memext.runtime import resolve_device, write_result

CONFIGS = ("retrieval", "truncated", "memory", "full")
LABELS = {
    "retrieval": "(a) retrieval + reader",
    "truncated": "(b) truncated to the window",
    "memory": "(c) retrieval KV cache",
    "full": "(d) full document",
}
DATA = Path("../shared/data/linux_docs_subsystems.jsonl.gz")


def read_documents(path: Path, split: str = "all") -> list[dict[str, Any]]:
    """The JSON lines of ``path`` (gzip or plain), with ``id`` and ``text``; ``split``: only
    those of that split (``all``: every one)."""
    if not path.is_file():
        raise MemextError(f"{path}: no such file (the kernel documents: {DATA})")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if split == "all" or r.get("split") == split]


def long_documents(
    rows: Sequence[dict[str, Any]],
    count: Callable[[str], int],
    min_tokens: int,
    max_tokens: int,
) -> list[tuple[str, str, int]]:
    """(id, text, tokens) of the documents with ``min_tokens`` < tokens <= ``max_tokens``, in
    the data's order."""
    out = []
    for r in rows:
        n = count(r["text"])
        if min_tokens < n <= max_tokens:
            out.append((str(r["id"]), r["text"], n))
    return out


def truncated_context(text: str, question: str, read: Callable[[str], list[int]], budget: int):
    """The longest beginning of ``text`` whose prompt (``prompt_text``) reads as at most
    ``budget`` tokens (binary search over characters: exact whatever the tokenizer merges)."""
    if len(read(prompt_text(text, question))) <= budget:
        return text
    lo, hi = 0, len(text)  # prompt of text[:lo] fits, of text[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(read(prompt_text(text[:mid], question))) <= budget:
            lo = mid
        else:
            hi = mid
    return text[:lo]


def retrieval_options(args: argparse.Namespace) -> dict[str, Any]:
    """(c)'s cache options; ``reps`` and ``score`` only where they differ from the policy's
    defaults, so that rows measured before they were options keep their settings key."""
    options = {k: getattr(args, k) for k in ("sinks", "window", "block", "topk")}
    changed = {"reps": args.reps != 4, "score": args.score != "free"}
    return options | {k: getattr(args, k) for k, differs in changed.items() if differs}


def settings_key(settings: dict[str, Any]) -> str:
    """What a row was measured under: rows of other settings are never mixed into a table."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def answer(
    model: Any,
    store: Any,
    item: InsertedFact,
    index: int,
    config: str,
    s: dict[str, Any],
) -> dict[str, Any]:
    """One reading of one question: the reply, its scores, the prompt's length, whether the
    fact was in what the reader saw (None for ``memory``: its cache chooses) and the seconds."""
    read = prompt_reader(model, s["chat"])
    budget = model.window - s["new_tokens"]
    whole = prompt_text(item.text, item.question)
    started, cpu = time.perf_counter(), time.process_time()
    row: dict[str, Any] = {"config": config}
    if config == "retrieval":
        doc = f"q{index:04d}/"
        store.add_text(doc + item.doc_id, item.text)
        r = ask(
            store,
            model,
            item.question,
            k=s["k"],
            mode=s["mode"],
            max_new_tokens=s["new_tokens"],
            chat=s["chat"],
            context_tokens=s["context_tokens"],
            doc_prefix=doc,
        )
        reply, prompt, row["chunks"] = r["answer"], r["prompt"], len(r["used"])
    else:
        if config == "full" and len(read(whole)) > budget:
            return row | {
                "skipped": f"does not fit: {len(read(whole))} prompt tokens > "
                f"{budget} (the window {model.window} less {s['new_tokens']} new tokens)"
            }
        if config == "truncated":
            prompt = prompt_text(
                truncated_context(item.text, item.question, read, budget), item.question
            )
        else:
            prompt = whole
        policy = "retrieval" if config == "memory" else "full"
        options = s["cache_options"] if config == "memory" else {}
        reply = "".join(
            model.generate(
                prompt,
                s["new_tokens"],
                temperature=0.0,
                chat=s["chat"],
                cache=policy,
                cache_options=options,
                chunk=s["chunk"] if config == "memory" else None,
            )
        )
    seen = None if config == "memory" else item.fact in prompt
    return (
        row
        | {
            "reply": reply,
            "prompt_tokens": len(read(prompt)),
            "fact_seen": seen,
            "seconds": time.perf_counter() - started,
            # CPU time of this process: on a shared machine, what the reading itself cost
            "cpu_seconds": time.process_time() - cpu,
        }
        | item.score(reply)
    )


def append_row(path: Path, row: dict[str, Any]) -> None:
    """One line, one write, flushed to disk: a kill leaves at most a torn last line, which
    ``done_rows`` skips."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def done_rows(path: Path, key: str) -> list[dict[str, Any]]:
    """The rows of ``path`` measured under settings ``key`` (others, and a torn line, left)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("key") == key:
            rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]], configs: Sequence[str]) -> list[dict[str, Any]]:
    """Per configuration: questions answered, mean exact match, F1, strict exact match and
    contains (x 100), how often the fact was in the prompt, and seconds per question."""
    table = []
    for config in configs:
        ran = [r for r in rows if r["config"] == config and "skipped" not in r]
        entry: dict[str, Any] = {
            "config": config,
            "label": LABELS[config],
            "n": len(ran),
            "skipped": sum(r["config"] == config and "skipped" in r for r in rows),
        }
        for name in ("em", "f1", "em_strict", "contains"):
            entry[name] = 100 * sum(r[name] for r in ran) / len(ran) if ran else None
        seen = [r["fact_seen"] for r in ran if r.get("fact_seen") is not None]
        entry["fact_seen"] = sum(seen) / len(seen) if seen else None
        for name in ("seconds", "cpu_seconds"):
            entry[name] = sum(r[name] for r in ran) / len(ran) if ran else None
        table.append(entry)
    return table


def print_table(table: Sequence[dict[str, Any]]) -> None:
    def num(v: float | None, form: str = "{:.1f}") -> str:
        return "-" if v is None else form.format(v)

    print(
        f"\n{'configuration':<30} {'n':>3} {'EM':>6} {'F1':>6} {'strict':>6} {'contains':>8} "
        f"{'fact in':>7} {'s/q':>6} {'cpu s/q':>7}"
    )
    for e in table:
        print(
            f"{e['label']:<30} {e['n']:>3} {num(e['em']):>6} {num(e['f1']):>6} "
            f"{num(e['em_strict']):>6} {num(e['contains']):>8} "
            f"{num(e['fact_seen'], '{:.2f}'):>7} {num(e['seconds']):>6} {num(e['cpu_seconds']):>7}"
        )
        if e["skipped"]:
            print(f"{'':<30} {e['skipped']} question(s) skipped: the document does not fit")


def run(
    model: Any,
    encoder: Any,
    items: Sequence[InsertedFact],
    tokens: Sequence[int],
    configs: Sequence[str],
    s: dict[str, Any],
    rows_path: Path | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every question through every configuration, resuming from ``rows_path``'s rows of the
    same settings; returns all rows (one per question and configuration)."""
    from memext.pipelines.store import RetrievalStore

    key = settings_key(s)
    # Rows of questions past this run's count (an earlier, longer run) are not this run's.
    rows = [r for r in done_rows(rows_path, key) if r["q"] < len(items)] if rows_path else []
    done = {(r["q"], r["config"]) for r in rows}
    if done:
        log(f"resuming: {len(done)} row(s) of these settings in {rows_path}")
    # Only (a) reads a store; the other readings need no encoder.
    with contextlib.ExitStack() as stack:
        store = None
        if "retrieval" in configs:
            store = stack.enter_context(RetrievalStore(":memory:", encoder=encoder))
        for i, (item, n) in enumerate(zip(items, tokens, strict=True)):
            for config in configs:
                if (i, config) in done:
                    continue
                got = answer(model, store, item, i, config, s)
                row = {"key": key, "q": i, "doc_tokens": n} | item.meta() | got
                rows.append(row)
                if rows_path:
                    append_row(rows_path, row)
                shown = {
                    k: row.get(k)
                    for k in (
                        "q",
                        "config",
                        "doc_tokens",
                        "depth",
                        "em",
                        "f1",
                        "scored",
                        "seconds",
                        "cpu_seconds",
                        "skipped",
                    )
                }
                log(json.dumps({k: v for k, v in shown.items() if v is not None}))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="A model path or name (the reader).")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--split", default="all", help="train, validation or all.")
    p.add_argument("--questions", type=int, default=20)
    p.add_argument(
        "--min-tokens",
        type=int,
        default=None,
        help="Documents longer than this (default: the reader's window).",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=16384,
        help="Documents at most this long (the memory reading's time grows with it).",
    )
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="The chat template (default: when the tokenizer has one).",
    )
    p.add_argument("--k", type=int, default=8, help="(a): chunks considered.")
    p.add_argument("--mode", default="hybrid", help="(a): embedding, bm25 or hybrid.")
    p.add_argument("--context-tokens", type=int, default=1024, help="(a): the prompt's budget.")
    p.add_argument("--encoder", type=Path, default=None, help="(a): default all-MiniLM-L6-v2.")
    p.add_argument("--sinks", type=int, default=4, help="(c)")
    p.add_argument("--window", type=int, default=256, help="(c): the local window.")
    p.add_argument("--block", type=int, default=64, help="(c)")
    p.add_argument("--topk", type=int, default=4, help="(c)")
    p.add_argument("--reps", type=int, default=4, help="(c): representative keys per block.")
    p.add_argument(
        "--score", choices=("free", "rope"), default="free", help="(c): how blocks are scored."
    )
    p.add_argument("--chunk", type=int, default=256, help="(c): prompt tokens per forward.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_qa.json"))
    p.add_argument(
        "--rows",
        type=Path,
        default=None,
        help="Rows as they finish, for resuming (default: OUT with .rows.jsonl).",
    )
    args = p.parse_args()
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        p.error(f"--configs: unknown {unknown}; expected some of {', '.join(CONFIGS)}")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    from memext.adapters import open_model
    from memext.pipelines import Encoder

    model = open_model(args.model, device)
    min_tokens = model.window if args.min_tokens is None else args.min_tokens
    started = time.perf_counter()
    docs = long_documents(
        read_documents(args.data, args.split),
        lambda t: len(model.tokenizer.encode(t)),
        min_tokens,
        args.max_tokens,
    )
    if not docs:
        raise SystemExit(
            f"no document of {args.data} has {min_tokens} < tokens <= "
            f"{args.max_tokens}: widen --min-tokens/--max-tokens"
        )
    # The documents in a seeded order, so --questions N takes N different ones.
    order = sorted(docs, key=lambda d: hashlib.sha256(f"{args.seed}:{d[0]}".encode()).digest())
    items = fact_questions([(d, t) for d, t, _ in order], args.questions, args.seed)
    tokens = [order[i % len(order)][2] for i in range(args.questions)]
    reuse = "" if args.questions <= len(docs) else f" (documents reused: only {len(docs)})"
    print(
        f"{len(docs)} document(s) with {min_tokens} < tokens <= {args.max_tokens}; "
        f"{args.questions} question(s){reuse}; configurations {', '.join(configs)}"
    )
    s = {
        "model": str(args.model),
        "chat": args.chat,
        "new_tokens": args.new_tokens,
        "k": args.k,
        "mode": args.mode,
        "context_tokens": args.context_tokens,
        "encoder": None if args.encoder is None else str(args.encoder),
        "cache_options": retrieval_options(args),
        "chunk": args.chunk,
        "seed": args.seed,
    }
    rows_path = args.rows or args.out.with_suffix(".rows.jsonl")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    encoder = Encoder(args.encoder, progress=False) if "retrieval" in configs else None
    rows = run(model, encoder, items, tokens, configs, s, rows_path)
    table = summarize(rows, configs)
    print_table(table)
    em = {e["config"]: e["em"] for e in table}
    gaps = {}
    for c in ("retrieval", "memory"):
        if em.get(c) is not None and em.get("truncated") is not None:
            gaps[f"{c}-truncated"] = em[c] - em["truncated"]
            print(
                f"{LABELS[c]} - {LABELS['truncated']}: {gaps[f'{c}-truncated']:+.1f} EM points "
                "(target: >= +30 for (a) or (c))"
            )
    documents = {
        "eligible": len(docs),
        "min_tokens": min_tokens,
        "max_tokens": args.max_tokens,
        "split": args.split,
    }
    fields = {
        "settings": s,
        "documents": documents,
        "window": model.window,
        "table": table,
        "em_gaps": gaps,
        "seconds": time.perf_counter() - started,
        "rows": rows,
    }
    write_result(args.out, "benchmarks/llm_qa.py", args, device, fields)
    print(f"wrote {args.out} (rows: {rows_path})")


if __name__ == "__main__":
    main()
