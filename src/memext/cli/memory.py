"""A retrieval memory of documents and answers from it: `memext memory add/search/delete`, `ask`.

`memory add` writes; `memory search` and `ask` open the store read-only and refuse a missing
one, so a mistyped `--store` is an error rather than an empty store that answers from nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memext.cli.common import MODEL_HELP, DeviceOpt, EncoderOpt, default, err, out, user_errors
from memext.errors import MemextError
from memext.pipelines.ask import ask as run_ask
from memext.pipelines.store import RetrievalStore, StoreError, require_store

StoreOpt = Annotated[Path, typer.Option("--store", help="The store's SQLite file.")]
ModeOpt = Annotated[str, typer.Option(help="embedding, bm25 or hybrid.")]


def _open_store(store: Path, encoder: Path | None, *, readonly: bool = False) -> RetrievalStore:
    from memext.pipelines import Encoder

    if readonly:
        require_store(store)  # before the encoder loads: a mistyped path fails at once
    return RetrievalStore(store, encoder=Encoder(encoder), readonly=readonly)


@user_errors
def memory_add(
    files: Annotated[list[Path], typer.Argument(help="UTF-8 text files; each is one document.")],
    store: StoreOpt,
    encoder: EncoderOpt = None,
    overlap: Annotated[int, typer.Option(help="Tokens shared by neighbouring chunks.")] = 32,
) -> None:
    """Chunk, embed and store documents; a file added again replaces its earlier version.

    A document's id is its path relative to the store's folder, so `a.md` and `./a.md` are one
    document. Each file is stored in its own transaction: when some files fail, the others are
    kept, every failure is reported on a line of its own, and the exit code is 2.
    """
    failed: list[Path] = []
    with _open_store(store, encoder) as db:
        done: set[str] = set()
        for f in files:
            doc = db.document_id(f)
            if doc in done:  # the same file named twice
                continue
            done.add(doc)
            try:
                r = db.add_file(f, overlap=overlap)
            except StoreError:
                raise  # the store itself failed: the next file would fail too
            except MemextError as e:
                why = str(e) if str(f) in str(e) else f"{f}: {e}"
                err.print(f"[bold red]error:[/] {why}", highlight=False, soft_wrap=True)
                failed.append(f)
                continue
            out.print(
                f"{f}: {r.new} new chunk(s), {r.removed} stale removed, {r.chunks} in all",
                highlight=False,
            )
        out.print(f"{store}: {len(db)} chunks", highlight=False)
    if failed:
        kept = len(done) - len(failed)
        raise MemextError(
            f"{len(failed)} file(s) not added (each named above); the {kept} other(s) are stored"
        )


@user_errors
def memory_delete(
    files: Annotated[
        list[Path], typer.Argument(help="Documents to remove, by path (the file may be gone).")
    ],
    store: StoreOpt,
) -> None:
    """Remove documents from a store, all or none: a path it does not hold is refused."""
    with RetrievalStore(store, create=False) as db:
        docs: list[str] = []
        missing: list[str] = []
        for f in files:
            doc = db.document_id(f)
            if db.has_document(doc):
                docs.append(doc)
            elif db.has_document(str(f)):  # an id as typed, from a store of an older memext
                docs.append(str(f))
            else:
                missing.append(str(f))
        if missing:
            raise MemextError(
                f"{store} holds no document {', '.join(missing)}, so nothing was removed "
                "(`memext memory search` shows the ids it holds)"
            )
        n = db.delete(*dict.fromkeys(docs))
        out.print(
            f"{store}: removed {len(set(docs))} document(s), {n} chunk(s); {len(db)} left",
            highlight=False,
        )


@user_errors
def memory_search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    store: StoreOpt,
    encoder: EncoderOpt = None,
    k: Annotated[int, typer.Option("-k", help="How many chunks.")] = default(
        RetrievalStore.search, "k"
    ),
    mode: ModeOpt = default(run_ask, "mode"),  # text queries search as `ask` does
) -> None:
    """The chunks most relevant to a query."""
    with _open_store(store, encoder, readonly=True) as db:
        for hit in db.search(query, k=k, mode=mode):
            text = " ".join(hit.text.split())
            out.print(f"{hit.score:8.4f}  {hit.doc_id}  {text[:100]}", highlight=False)


@user_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    store: StoreOpt,
    model: Annotated[Path, typer.Option(help=MODEL_HELP)],
    encoder: EncoderOpt = None,
    k: Annotated[int, typer.Option("-k", help="Chunks to consider.")] = default(run_ask, "k"),
    mode: ModeOpt = default(run_ask, "mode"),
    max_new_tokens: Annotated[int, typer.Option(help="Length of the answer.")] = default(
        run_ask, "max_new_tokens"
    ),
    device: DeviceOpt = default(run_ask, "device"),
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Ask in the model's chat template, as a user turn (default: when its tokenizer "
            "has one, as instruct models do).",
        ),
    ] = default(run_ask, "chat"),
    context_tokens: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="The prompt's budget in tokens, when less than the model's window (a small "
            "model reads a short prompt better).",
        ),
    ] = default(run_ask, "context_tokens"),
) -> None:
    """Answer from a store: the most relevant chunks that fit the model's window (or
    --context-tokens), then generate greedily; an instruct model reads it in its chat template."""
    from memext.runtime import resolve_device

    where = str(resolve_device(device))  # a bad --device fails before anything loads
    with _open_store(store, encoder, readonly=True) as db:
        r = run_ask(
            db,
            model,
            question,
            k=k,
            mode=mode,
            max_new_tokens=max_new_tokens,
            device=where,
            chat=chat,
            context_tokens=context_tokens,
        )
    err.print(
        f"{len(r['used'])} chunk(s), {r['prompt_tokens']} of {r['window']} tokens"
        + (f" (budget {context_tokens})" if context_tokens else "")
        + ": "
        + ", ".join(u["doc_id"] for u in r["used"]),
        highlight=False,
    )
    out.print(r["answer"], highlight=False)
