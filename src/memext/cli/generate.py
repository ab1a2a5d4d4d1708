"""Read and extend models: `memext generate`, `stream` and `extend`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
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
from memext.evals.stream_readers import stream_policy, tokens_seen
from memext.evals.stream_text import stream_text
from memext.evals.streaming import (
    against_recompute,
    sliding_recompute_perplexity,
    streaming_perplexity,
)
from memext.extend import extend_model, extend_run
from memext.infer.generate import generate_ids
from memext.infer.seq2seq import beam_decode


@user_errors
def generate(
    ctx: typer.Context,
    run_dir: ModelArg,
    prompt: Annotated[str | None, typer.Option(help="The prompt text.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from this file.")
    ] = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tokens to write at most (an encoder-decoder run: by default its decoder's "
            "limit, max_target_len - 1).",
        ),
    ] = 200,
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
    beams: Annotated[
        int,
        typer.Option(min=1, help="Encoder-decoder runs: beam search with N beams; 1 = greedy."),
    ] = 1,
    length_penalty: Annotated[
        float,
        typer.Option(
            help="Beam search: a target's score is its log-probability / length**P (0: the "
            "log-probability alone; above 0 favours longer targets)."
        ),
    ] = default(beam_decode, "length_penalty"),
    encode_chunk: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Encoder-decoder runs: encode the source in chunks of N tokens (at most the "
            "model's max_seq_len), so a source longer than that can be read.",
        ),
    ] = None,
    cross_topk: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Encoder-decoder runs: each cross-attention query reads its N best encoder "
            "states only.",
        ),
    ] = None,
    trained_len: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Encoder-decoder runs with --encode-chunk: scale the cross-attention logits by "
            "log(states) / log(N + global slots) (default N: the run's trained length; 0: off).",
        ),
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Continue a prompt with a model (KV-cached; window/sinks read input of any length); an
    instruct model answers it in its chat template. An encoder-decoder run (model.arch=seq2seq)
    writes the target of the prompt as its source, greedily or by beam search (--beams)."""
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
    given = _given(ctx)
    if _is_seq2seq(run_dir):
        sampling = [
            flag
            for flag, samples in (
                ("--temperature", "temperature" in given and temperature > 0),
                ("--top-k", top_k > 0),
                ("--top-p", top_p < 1),
                ("--seed", seed is not None),
                ("--chat", bool(chat)),
                ("--chunk", chunk is not None),
            )
            if samples
        ]
        if sampling:
            raise MemextError(
                f"{str(run_dir)!r} is an encoder-decoder run: it decodes greedily or by beam "
                "search (--beams), without sampling options: "
                f"{', '.join(sampling)}; it reads the whole source at once (--encode-chunk for "
                "one longer than max_seq_len)"
            )
        _generate_seq2seq(
            run_dir,
            prompt,
            max_new_tokens if "max_new_tokens" in given else None,
            beams=beams,
            length_penalty=length_penalty,
            stop=stop or [],
            cache=cache,
            options=cache_options(cache_opt),
            encode_chunk=encode_chunk,
            cross_topk=cross_topk,
            trained_len=trained_len,
            device=resolve_device(device),
        )
        return
    seq2seq_only = [
        f"--{name.replace('_', '-')}"
        for name in ("beams", "length_penalty", "encode_chunk", "cross_topk", "trained_len")
        if name in given
    ]
    if seq2seq_only:
        raise MemextError(
            f"{str(run_dir)!r} is a decoder-only model, given an encoder-decoder (seq2seq) "
            f"option: {', '.join(seq2seq_only)}; it continues the prompt (greedily with "
            "--temperature 0)"
        )
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


def _given(ctx: typer.Context) -> set[str]:
    """The options given on the command line, not left at their defaults."""
    # By name: typer runs its own copy of click, whose ParameterSource is not click's class.
    sources = {name: getattr(ctx.get_parameter_source(name), "name", None) for name in ctx.params}
    return {name for name, source in sources.items() if source not in (None, "DEFAULT")}


def _is_seq2seq(path: Path) -> bool:
    """Whether ``path`` is a memext run of an encoder-decoder; read from its config alone."""
    from memext.checkpoint import is_memext_run, load_config

    return path.is_dir() and is_memext_run(path) and load_config(path).model.arch == "seq2seq"


def _generate_seq2seq(
    run_dir: Path,
    text: str,
    max_new_tokens: int | None,
    *,
    beams: int,
    length_penalty: float,
    stop: list[str],
    cache: str,
    options: dict[str, Any],
    encode_chunk: int | None,
    cross_topk: int | None,
    trained_len: int | None,
    device: torch.device,
) -> None:
    """Print the target an encoder-decoder run writes for the source ``text``, cut before the
    first ``stop`` string; everything the run's config can refuse is refused before loading."""
    from memext.checkpoint import load, load_config, run_tokenizer
    from memext.curriculum import trained_length
    from memext.infer.cache import CACHES
    from memext.infer.seq2seq import greedy_decode

    run_cfg = load_config(run_dir)
    cfg = run_cfg.model
    tok = run_tokenizer(run_dir)
    ids = tok.encode(text)
    if not ids:
        raise MemextError("the source is empty: an encoder-decoder needs at least one token")
    limit = cfg.max_target_len - 1  # the start token takes one position
    if max_new_tokens is not None and max_new_tokens > limit:
        raise MemextError(
            f"--max-new-tokens {max_new_tokens} exceeds the decoder's limit: max_target_len="
            f"{cfg.max_target_len} holds the start token and {limit} more"
        )
    if encode_chunk is not None and encode_chunk > cfg.max_seq_len:
        raise MemextError(
            f"--encode-chunk {encode_chunk} exceeds the model's max_seq_len={cfg.max_seq_len}: "
            "each chunk is read as a whole source"
        )
    if encode_chunk is None and len(ids) > cfg.max_seq_len:
        raise MemextError(
            f"the source is {len(ids)} tokens, more than the model's max_seq_len="
            f"{cfg.max_seq_len}: give --encode-chunk {cfg.max_seq_len} (or fewer) to read it in "
            "chunks (retrieval cross-attention; --cross-topk N narrows what each query reads)"
        )
    if trained_len is not None and encode_chunk is None:
        raise MemextError("--trained-len scales a chunked reading: give --encode-chunk too")
    if trained_len is None and encode_chunk is not None:
        trained_len = trained_length(run_cfg)  # as `memext eval` reads past max_seq_len
    CACHES.lookup(cache)  # an unknown policy is refused before the model loads
    model, _ = load(run_dir, device)
    src = torch.tensor([ids], dtype=torch.long, device=device)
    bos, eos = tok.special_id("<bos>"), tok.special_id("<eod>")
    decoding = dict(
        max_new_tokens=max_new_tokens or limit,
        cache=cache,
        encode_chunk=encode_chunk,
        cross_topk=cross_topk,
        trained_len=trained_len or None,
        cache_options=options,
    )
    if beams == 1:
        (out,) = greedy_decode(model, src, bos, eos, **decoding)
    else:
        best = beam_decode(
            model, src, bos, eos, beams=beams, length_penalty=length_penalty, **decoding
        )[0]
        out = best.tokens
        err.print(
            f"beam search, {beams} beams: log-probability {best.logprob:.3f}, score "
            f"{best.score:.3f} ({len(out)} tokens{', ended' if best.ended else ''})",
            highlight=False,
        )
    target = tok.decode(out)
    for s in stop:
        target = target.split(s, 1)[0]
    sys.stdout.write(target + "\n")


SINKS = 4  # StreamingLLM's number of attention-sink tokens
# The most tokens a stream's default cache holds. On CPU the attention over the cache grows with
# it: at 2048 it is about a third of SmolLM2-135M's work per token, at its 8192 context two
# thirds (and a recomputation reference costs the square). StreamingLLM's caches are 1-4k.
STREAM_CONTEXT = 2048


def stream_defaults(context: int, cache: str) -> dict[str, int]:
    """Sizes for the options ``cache`` takes that a stream needs: the model's window
    (``context``) up to ``STREAM_CONTEXT`` tokens, its first ``SINKS`` kept as sinks.
    ``--cache-opt`` overrides them."""
    from memext.infer.cache import CACHES

    size = min(context, STREAM_CONTEXT)
    defaults = {"sinks": SINKS, "window": size - (SINKS if cache == "sinks" else 0)}
    return {k: v for k, v in defaults.items() if k in CACHES.takes(cache)}


@user_errors
def stream(
    model_path: ModelArg,
    text: Annotated[
        list[str] | None,
        typer.Option(
            help="Text to read: 'stdlib' (its validation split), a file, directory or glob. "
            "Repeatable: read in order, sharing --tokens equally. Default: stdlib."
        ),
    ] = None,
    tokens: Annotated[
        int, typer.Option(min=2, help="Tokens to feed (at most the texts').")
    ] = 100_000,
    cache: CacheOpt = "sinks",
    cache_opt: Annotated[
        list[str] | None,
        typer.Option(
            "--cache-opt",
            help=f"A cache policy option KEY=VALUE (repeatable); sinks={SINKS} and window = the "
            f"model's context up to {STREAM_CONTEXT} tokens (less the sinks) unless given.",
        ),
    ] = None,
    chunk: Annotated[int, typer.Option(min=1, help="Tokens per forward.")] = 256,
    every: Annotated[
        int,
        typer.Option(min=1, help="Report perplexity, cache bytes and peak memory every N tokens."),
    ] = default(streaming_perplexity, "every"),
    chunk_peak: Annotated[
        bool,
        typer.Option(
            "--chunk-peak/--no-chunk-peak",
            help="Measure each checkpoint chunk's allocator peak (on CPU under the profiler, "
            "which keeps memory of its own: the RSS column is the stream's own only without).",
        ),
    ] = default(streaming_perplexity, "chunk_peak"),
    recompute: Annotated[
        int,
        typer.Option(
            min=0,
            help="Also score the stream's last N tokens by recomputing each from scratch over "
            "the tokens a query sees (sinks + window), on the same positions.",
        ),
    ] = 0,
    recompute_window: Annotated[
        int | None,
        typer.Option(min=1, help="The recomputation's window (default: sinks + window)."),
    ] = None,
    recompute_stride: Annotated[
        int,
        typer.Option(
            min=1,
            help="Tokens scored per recomputed forward: k times cheaper, each token then sees "
            "window - k + 1 to window tokens.",
        ),
    ] = default(sliding_recompute_perplexity, "stride"),
    device: DeviceOpt = "auto",
    output: Annotated[Path | None, typer.Option("--out", help="Results JSON.")] = None,
) -> None:
    """Streaming perplexity: feed a long text through a KV-cache policy in chunks, measuring that
    memory stays flat, optionally against a sliding window recomputed from scratch."""
    from memext.adapters import open_model
    from memext.infer.cache import CACHES
    from memext.io import atomic_write_text
    from memext.runtime import resolve_device

    CACHES.lookup(cache)  # an unknown policy is refused before the model loads
    model = open_model(model_path, resolve_device(device))
    if model.segment_len:
        raise MemextError(
            f"{str(model_path)!r} reads long input in {model.segment_len}-token segments through "
            f"its memory, not through a KV cache, so there is no cache policy to stream; "
            f"`memext eval {model_path}` measures how far its memory reaches"
        )
    options = {**stream_defaults(model.window, cache), **cache_options(cache_opt)}
    policy = stream_policy(cache, options, tokens)  # checked before the text is read
    window = recompute_window or (tokens_seen(policy) if recompute else None)
    if recompute and window is None:
        raise MemextError(
            f"the {cache} cache keeps no fixed number of tokens per query: give "
            "--recompute-window for the recomputation"
        )
    if recompute and recompute_stride > window:  # refused now, not after the stream
        raise MemextError(f"--recompute-stride {recompute_stride} exceeds the window, {window}")
    ids, parts = stream_text(text or ["stdlib"], model.tokenizer, tokens, log=err.print)
    lengths = model.tokenizer.byte_lengths()
    r = streaming_perplexity(
        model.model,
        ids,
        cache,
        chunk,
        cache_options=options,
        byte_lengths=lengths,
        every=every,
        token_nats=bool(recompute),
        chunk_peak=chunk_peak,
    )
    nats = r.pop("token_nats", None)
    _print_stream(r, every, f"streaming {ids.size:,} tokens through {cache} — {model_path}")
    result = {"model": str(model_path), "kind": model.kind, "texts": parts, **r}
    if recompute:
        first = max(0, ids.size - 1 - recompute)
        cmp = against_recompute(
            model.model, ids, nats, first, window, recompute_stride, byte_lengths=lengths
        )
        out.print(
            f"last {cmp['tokens']:,} tokens: perplexity {cmp['stream']['perplexity']:.3f} through "
            f"{cache}, {cmp['recompute']['perplexity']:.3f} recomputed over {window} tokens "
            f"(stride {recompute_stride}); ratio {cmp['perplexity_ratio']:.4f}"
        )
        result["recompute"] = cmp
    if output is not None:
        atomic_write_text(output, json.dumps(result, indent=2))
        out.print(f"results: {output}")


def _print_stream(r: dict, every: int, title: str) -> None:
    """One row per ``every`` tokens: that bucket's loss, and the memory measured in it."""
    marks = {c["start"] // every: c for c in r["checkpoints"]}
    table = Table(title=title)
    for col in ("tokens", "perplexity", "bits/byte", "cache bytes", "chunk peak", "RSS MiB"):
        table.add_column(col, justify="right")
    for k, b in enumerate(r["by_position"]):
        c = marks.get(k, {})
        table.add_row(
            f"{b['start']:,}–{b['start'] + b['tokens']:,}",
            f"{b['perplexity']:.3f}",
            f"{b['bits_per_byte']:.4f}" if b["bits_per_byte"] is not None else "",
            _shown(c.get("cache_nbytes")),
            _shown(c.get("chunk_peak_bytes")),
            _shown(c.get("rss_bytes"), 2**20),
        )
    out.print(table)
    speed = f", {r['tokens_per_s']:,.0f} tokens/s" if r["tokens_per_s"] else ""
    out.print(f"bits/byte {r['bits_per_byte']:.4f}, perplexity {r['perplexity']:.3f}{speed}")


def _shown(value: int | None, unit: int = 1) -> str:
    return "" if value is None else f"{round(value / unit):,}"


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
