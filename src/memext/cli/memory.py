"""A retrieval memory of documents and answers from it: `memext memory add/search`, `ask`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memext.cli.common import DeviceOpt, EncoderOpt, default, err, out, user_errors
from memext.errors import MemextError
from memext.pipelines.ask import ask as run_ask
from memext.pipelines.store import RetrievalStore

StoreOpt = Annotated[Path, typer.Option("--store", help="The store's SQLite file.")]
ModeOpt = Annotated[str, typer.Option(help="embedding, bm25 or hybrid.")]


def _open_store(store: Path, encoder: Path | None):
    from memext.pipelines import Encoder

    return RetrievalStore(store, encoder=Encoder(encoder))


@user_errors
def memory_add(
    files: Annotated[list[Path], typer.Argument(help="UTF-8 text files; each is one document.")],
    store: StoreOpt,
    encoder: EncoderOpt = None,
    overlap: Annotated[int, typer.Option(help="Tokens shared by neighbouring chunks.")] = 32,
) -> None:
    """Chunk, embed and store documents (re-adding one changes nothing)."""
    with _open_store(store, encoder) as db:
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as e:
                raise MemextError(f"cannot read {f}: {e}") from None
            new = db.add_text(str(f), data, overlap=overlap, metadata={"path": str(f)})
            out.print(f"{f}: {new} new chunk(s)")
        out.print(f"{store}: {len(db)} chunks")


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
    with _open_store(store, encoder) as db:
        for hit in db.search(query, k=k, mode=mode):
            text = " ".join(hit.text.split())
            out.print(f"{hit.score:8.4f}  {hit.doc_id}  {text[:100]}", highlight=False)


@user_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    store: StoreOpt,
    model: Annotated[Path, typer.Option(help="A memext run or a local HF causal-LM dir.")],
    encoder: EncoderOpt = None,
    k: Annotated[int, typer.Option("-k", help="Chunks to consider.")] = default(run_ask, "k"),
    mode: ModeOpt = default(run_ask, "mode"),
    max_new_tokens: Annotated[int, typer.Option(help="Length of the answer.")] = default(
        run_ask, "max_new_tokens"
    ),
    device: DeviceOpt = default(run_ask, "device"),
) -> None:
    """Answer from a store: the most relevant chunks that fit the model's window, then generate."""
    with _open_store(store, encoder) as db:
        r = run_ask(
            db, model, question, k=k, mode=mode, max_new_tokens=max_new_tokens, device=device
        )
    err.print(
        f"{len(r['used'])} chunk(s), {r['prompt_tokens']} of {r['window']} tokens: "
        + ", ".join(u["doc_id"] for u in r["used"]),
        highlight=False,
    )
    out.print(r["answer"], highlight=False)
