"""The `memext` command line: thin commands over the library, one module per command group.

The group modules (`run`, `distill`, `generate`, `bench`, `memory`, `classify`, `compress`) define plain
functions and
this module registers them on the app, all in one place: the order of `memext --help` reads
here, and no group module imports the package that imports it.
"""

from __future__ import annotations

from typing import Annotated

import typer

import memext
from memext.cli import bench, classify, compress, distill, generate, memory, run

app = typer.Typer(
    help="memext: extend the memory of language models, and measure how far it reaches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
bench_app = typer.Typer(help="Benchmarks: speed and memory, against peers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
memory_app = typer.Typer(
    help="A persistent retrieval memory of documents (SQLite; embeddings, BM25, hybrid).",
    no_args_is_help=True,
)
app.add_typer(memory_app, name="memory")
classify_app = typer.Typer(
    help="Long-document classification on a pretrained encoder (chunks -> aggregator -> head).",
    no_args_is_help=True,
)
app.add_typer(classify_app, name="classify")
compress_app = typer.Typer(
    help="Make a model smaller: weight-only quantization (int8, int4), attention-head pruning.",
    no_args_is_help=True,
)
app.add_typer(compress_app, name="compress")

app.command(epilog=run.fields_epilog())(run.train)
app.command()(distill.distill)
app.command("eval")(run.eval_)
app.command()(run.report)
app.command()(generate.generate)
app.command()(generate.stream)
app.command()(generate.extend)
app.command()(run.info)
app.command("config")(run.config_)
tokenizer_app.command("train")(run.tokenizer_train)
bench_app.command("attention")(bench.bench_attention)
bench_app.command("seq2seq")(bench.bench_seq2seq)
memory_app.command("add")(memory.memory_add)
memory_app.command("search")(memory.memory_search)
memory_app.command("delete")(memory.memory_delete)
app.command()(memory.ask)
classify_app.command("train")(classify.classify_train)
classify_app.command("eval")(classify.classify_eval)
classify_app.command("predict")(classify.classify_predict)
compress_app.command("quantize")(compress.compress_quantize)
compress_app.command("prune")(compress.compress_prune)


def version_callback(value: bool) -> None:
    if value:
        print(f"memext {memext.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    pass


def main() -> None:
    app()
