"""Read and extend models: `memext generate`, `stream` and `extend`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.table import Table

from memext.cli.common import (
    CacheOpt,
    CacheOptsOpt,
    DeviceOpt,
    ModelArg,
    cache_options,
    default,
    err,
    out,
    user_errors,
)
from memext.cli.run import run_and_print_suite
from memext.errors import MemextError
from memext.evals.streaming import streaming_perplexity
from memext.extend import extend_model, extend_run
from memext.infer.generate import generate_ids


@user_errors
def generate(
    run_dir: ModelArg,
    prompt: Annotated[str | None, typer.Option(help="The prompt text.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from this file.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = default(
        generate_ids, "temperature"
    ),
    top_k: Annotated[
        int, typer.Option(min=0, help="Keep the k most likely tokens; 0 = all.")
    ] = default(generate_ids, "top_k"),
    top_p: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass; 1 = all.")
    ] = default(generate_ids, "top_p"),
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop at this string (repeatable).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    cache: CacheOpt = default(generate_ids, "cache"),
    cache_opt: CacheOptsOpt = None,
    chunk: Annotated[
        int | None, typer.Option(min=1, help="Read the prompt this many tokens per forward.")
    ] = None,
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Wrap the prompt in the model's chat template as a user turn (default: when its "
            "tokenizer has one, as instruct models do).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Continue a prompt with a model (KV-cached; window/sinks read input of any length); an
    instruct model answers it in its chat template."""
    from memext.adapters import open_model
    from memext.runtime import resolve_device

    if (prompt is None) == (prompt_file is None):
        raise MemextError("give exactly one of --prompt and --prompt-file")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise MemextError(f"prompt file {str(prompt_file)!r} does not exist")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MemextError(f"prompt file {str(prompt_file)!r} is not valid UTF-8") from None
    model = open_model(run_dir, resolve_device(device))
    for piece in model.generate(
        prompt,
        max_new_tokens,
        stop=stop or (),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        cache=cache,
        cache_options=cache_options(cache_opt),
        chunk=chunk,
        chat=chat,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


SINKS = 4  # StreamingLLM's number of attention-sink tokens


def stream_defaults(max_seq_len: int, cache: str) -> dict[str, int]:
    """Sizes for the options ``cache`` takes that a stream needs: the model's whole window,
    its first ``SINKS`` tokens kept as sinks. ``--cache-opt`` overrides them."""
    from memext.infer.cache import CACHES

    defaults = {"sinks": SINKS, "window": max_seq_len - (SINKS if cache == "sinks" else 0)}
    return {k: v for k, v in defaults.items() if k in CACHES.takes(cache)}


@user_errors
def stream(
    run_dir: Annotated[Path, typer.Argument(help="A memext run directory (so far).")],
    text: Annotated[
        str,
        typer.Option(help="Text to read: 'stdlib' (its validation split), a file or directory."),
    ] = "stdlib",
    tokens: Annotated[
        int, typer.Option(min=2, help="Tokens to feed (at most the text's).")
    ] = 100_000,
    cache: CacheOpt = "sinks",
    cache_opt: Annotated[
        list[str] | None,
        typer.Option(
            "--cache-opt",
            help=f"A cache policy option KEY=VALUE (repeatable); sinks={SINKS} and window = the "
            "model's max_seq_len (less the sinks) unless given.",
        ),
    ] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Tokens per forward.")] = 256,
    every: Annotated[
        int, typer.Option(min=1, help="Measure cache bytes and peak memory every N tokens.")
    ] = default(streaming_perplexity, "every"),
    device: DeviceOpt = "auto",
    output: Annotated[Path | None, typer.Option("--out", help="Results JSON.")] = None,
) -> None:
    """Streaming perplexity: feed a long text through a KV-cache policy in chunks, measuring that
    memory stays flat."""
    from memext.adapters import detect_kind
    from memext.checkpoint import load, run_tokenizer
    from memext.config import DataConfig
    from memext.data import prepare_data
    from memext.io import atomic_write_text
    from memext.runtime import resolve_device

    kind = detect_kind(run_dir)
    if kind != "memext":
        raise MemextError(
            f"{str(run_dir)!r} is a {kind} model: memext stream reads memext runs so far "
            f"(`memext generate {run_dir} --cache sinks` reads long prompts through a cache)"
        )
    model, cfg = load(run_dir, resolve_device(device))
    if model.segment_len:
        raise MemextError(
            f"{str(run_dir)!r} reads long input in {model.segment_len}-token segments through "
            f"its memory ({cfg.model.memory}), not through a KV cache, so there is no cache "
            f"policy to stream; `memext eval {run_dir}` measures how far its memory reaches"
        )
    options = {**stream_defaults(model.max_seq_len, cache), **cache_options(cache_opt)}
    tok = run_tokenizer(run_dir)
    store, _ = prepare_data(DataConfig(corpus=text), tok, log=lambda m: err.print(m))
    ids = store.validation if text == "stdlib" else np.concatenate([store.train, store.validation])
    if ids.size < 2:
        raise MemextError(f"the text {text!r} holds {ids.size} tokens: nothing to score")
    ids = ids[:tokens]
    r = streaming_perplexity(
        model,
        ids,
        cache,
        chunk,
        cache_options=options,
        byte_lengths=tok.byte_lengths(),
        every=every,
    )
    table = Table(title=f"streaming {ids.size:,} tokens through {cache} — {run_dir}")
    for col in ("tokens read", "nats/token so far", "cache bytes", "chunk peak bytes"):
        table.add_column(col, justify="right")
    for c in r["checkpoints"]:
        table.add_row(
            f"{c['tokens']:,}",
            f"{c['nats_per_token']:.4f}",
            f"{c['cache_nbytes']:,}",
            f"{c['chunk_peak_bytes']:,}",
        )
    out.print(table)
    out.print(
        f"bits/byte {r['bits_per_byte']:.4f}, perplexity {r['perplexity']:.3f}, "
        f"{r['tokens_per_s']:,.0f} tokens/s"
    )
    if output is not None:
        atomic_write_text(output, json.dumps({"run": str(run_dir), "text": text, **r}, indent=2))
        out.print(f"results: {output}")


@user_errors
def extend(
    src: ModelArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the extended copy goes.")],
    scaling: Annotated[
        str, typer.Option(help="Rotary scaling rule by name, see `memext info`.")
    ] = "yarn",
    factor: Annotated[float, typer.Option(help="New length / original length.")] = 4.0,
    original_len: Annotated[
        int | None,
        typer.Option(help="The length the model was trained at (default: read from SRC)."),
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="YaRN's alpha (beta_slow).")] = None,
    beta: Annotated[float | None, typer.Option(help="YaRN's beta (beta_fast).")] = None,
    steps: Annotated[
        int, typer.Option(min=0, help="Fine-tune this many steps at the new length (memext runs).")
    ] = default(extend_run, "steps"),
    lr: Annotated[
        float | None, typer.Option(help="Fine-tuning learning rate (default: the source's final).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = default(
        extend_run, "overwrite"
    ),
    device: DeviceOpt = "auto",
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate the copy (memext runs).")
    ] = True,
) -> None:
    """Write a context-extended copy of a model: rotary scaled by FACTOR, optionally fine-tuned."""
    from memext.adapters import detect_kind
    from memext.runtime import resolve_device

    dev = resolve_device(device)
    probes = ()  # what a memext run's fine-tuning measures as it trains
    if detect_kind(src) == "memext" and steps:
        from memext.checkpoint import load_config
        from memext.evals.probes import training_probes

        probes = training_probes(load_config(src))
    kind = extend_model(
        src,
        out_dir,
        scaling,
        factor,
        original_len=original_len,
        alpha=alpha,
        beta=beta,
        steps=steps,
        lr=lr,
        overwrite=overwrite,
        device=str(dev),
        log=lambda m: err.print(m, highlight=False),
        probes=probes,
    )
    out.print(f"extended {src} x{factor:g} ({scaling}) -> {out_dir}")
    if evaluate and kind == "memext":
        run_and_print_suite(out_dir, "default", None, None, dev, None)
