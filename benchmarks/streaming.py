"""Long-input inference in flat memory: issue 5's streaming and quantized-cache results on a
memext run, issue 18's on a real LLM (SmolLM2).

Reads ``--text`` (repeatable, in order, sharing ``--tokens`` equally; default the built-in
corpus's validation split, text a memext run did not train on; the stream is read again from its
start when the texts are shorter than ``--tokens``) with ``--model``: any model memext opens (a
plain memext run, memory none; a Hugging Face dir, a GGUF file or a known name such as
``smollm2``, whose cache policies run as a ``transformers.Cache``). The issue-5 figures on the
results page read ``runs/extension-base``, the 512-token base of the former
``context_extension.py`` (``git show b1da94e:benchmarks/context_extension.py``); any plain run
works, e.g. ``--model runs/bench/extend-none-s0`` from ``python benchmarks/seeds.py extend-none``:

1. ``sinks`` streaming over ``--tokens`` tokens in chunks: cache bytes, the chunk's allocator
   peak, the process's resident set and tokens/s at checkpoints from 10k tokens on (flat =
   within 5% of the first), and perplexity by position (buckets of ``--every`` tokens).
2. The slice, inputs [``--slice-at``, ``--slice-at`` + ``--slice``): sinks (read from the
   stream's start) against a sliding window re-read from scratch for every ``--stride`` tokens
   (StreamingLLM's "sliding window with recomputation"; stride 1 is exact, stride k lets each
   token see between W - k + 1 and W tokens), W = sinks + window tokens seen, on the same
   positions: perplexity ratio and speed ratio.
3. The quantized cache (int8, token and channel axes) against the same policy in fp32
   (``--int8-policy``), read from the stream's start, on the slice: cache bytes ratio (formula in
   memext/infer/cache.py) and perplexity change.

    python benchmarks/streaming.py                                   # issue 5 (a memext run)
    python benchmarks/streaming.py --tokens 30000 --slice 2000 --out /tmp/s.json   # a smoke run
    python benchmarks/streaming.py --parts 2,3     # some parts; the others' results are kept
    python benchmarks/streaming.py --model smollm2 --text ../shared/data/kjv_bible.txt \\
        --text stdlib --tokens 250000 --window 2044 --slice 2048 --slice-at 8192 --stride 32 \\
        --int8-policy sinks --out benchmarks/results/streaming-smollm2.json      # issue 18

``--parts`` runs a subset; the results of parts not run are kept from an existing ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.adapters import open_model
from memext.evals.stream_text import stream_text
from memext.evals.streaming import (
    against_recompute,
    streaming_perplexity,
    summarize,
    target_bytes,
)
from memext.runtime import command_line, provenance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", "--run", dest="model", default="runs/extension-base")
    p.add_argument("--text", action="append", help="repeatable; default: stdlib")
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--slice", type=int, default=20_000)
    p.add_argument("--slice-at", type=int, default=0, help="the slice's first input position")
    p.add_argument("--stride", type=int, default=1, help="tokens per recomputed forward")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=508, help="sinks + window = cached tokens")
    p.add_argument("--int8-policy", choices=("window", "sinks"), default="window")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--every", type=int, default=10_000)
    p.add_argument(
        "--chunk-peak",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="part 1: each checkpoint chunk's allocator peak, under the profiler on CPU (which "
        "keeps memory of its own, so the resident set is the stream's own only without)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/streaming.json"))
    p.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 2,3")
    args = p.parse_args()
    parts = {int(x) for x in args.parts.split(",")}
    if not parts or not parts <= {1, 2, 3}:
        p.error(f"--parts={args.parts!r}: expected a comma-separated subset of 1,2,3")
    args.text = args.text or ["stdlib"]
    torch.set_num_threads(args.threads)
    model = open_model(args.model)
    if model.segment_len:
        p.error(f"{args.model} reads through its memory, not a KV cache: give a plain model")
    texts, text_parts = stream_text(args.text, model.tokenizer, args.tokens + 1)
    # A stream shorter than --tokens is read again from its start (the window is far shorter
    # than the texts, so no repeat is ever in view).
    stream = np.resize(texts, args.tokens + 1)
    end = args.slice_at + args.slice
    if end > args.tokens:
        p.error(f"the slice ends at {end:,}, past the stream's {args.tokens:,} tokens")
    bl = model.tokenizer.byte_lengths()
    sinks = {"sinks": args.sinks, "window": args.window}
    seen = args.sinks + args.window
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = {"stream": 1, "slice": 2, "quantized": 3}
    results = {k: v for k, v in old.items() if k in kept and kept[k] not in parts}
    results |= {
        "model": args.model,
        "kind": model.kind,
        "provenance": provenance(torch.device("cpu")),
        "texts": text_parts,
        "text_cycles": round((args.tokens + 1) / texts.size, 3),
        "command": command_line("benchmarks/streaming.py", args, ("out", "parts"), parser=p),
    }
    piece = stream[: end + 1]
    net = model.model
    if 1 in parts:
        results["stream"] = _stream(net, stream, sinks, bl, args)
    if 2 in parts:
        results["slice"] = _slice(net, piece, sinks, seen, bl, args)
    if 3 in parts:
        results["quantized"] = _quantized(net, piece, sinks, seen, bl, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _stream(model: Any, stream: np.ndarray, sinks: dict, bl: Any, args: Any) -> dict[str, Any]:
    """Part 1: the long sinks stream and its flatness figures."""
    print(f"== 1. sinks {sinks} over {args.tokens:,} tokens, chunk {args.chunk}", flush=True)
    long = streaming_perplexity(
        model,
        stream,
        "sinks",
        args.chunk,
        cache_options=sinks,
        byte_lengths=bl,
        every=args.every,
        chunk_peak=args.chunk_peak,
    )
    marks = [c for c in long["checkpoints"] if c["tokens"] >= 10_000]
    rates = []
    for a, b in itertools.pairwise(marks):
        rates.append((b["timed_tokens"] - a["timed_tokens"]) / (b["timed_s"] - a["timed_s"]))
    s = {
        **long,
        "tokens_per_s_between_checkpoints": rates,
        "cache_bytes_spread": max(c["cache_nbytes"] for c in marks)
        / min(c["cache_nbytes"] for c in marks),
        "peak_bytes_spread_vs_first": _spread(marks, "chunk_peak_bytes"),
        "rss_spread_vs_first": _spread(marks, "rss_bytes"),
        "tokens_per_s_spread": max(rates) / min(rates) if rates else None,
        # Steal time and other processes only ever slow an interval down, in bursts: the
        # median over the first and the last tenth of the stream tells a cost that grows with
        # the tokens read (what "flat" is about) from noise.
        "tokens_per_s_last_vs_first_tenth": _tenths(rates),
    }
    print(
        f"  bits/byte {s['bits_per_byte']:.4f}; cache bytes max/min {s['cache_bytes_spread']:.4f}; "
        f"peak max/first {s['peak_bytes_spread_vs_first']}; RSS max/first "
        f"{s['rss_spread_vs_first']}; tok/s max/min {s['tokens_per_s_spread']}; "
        f"tok/s last/first tenth {s['tokens_per_s_last_vs_first_tenth']}",
        flush=True,
    )
    return s


def _spread(marks: list[dict], key: str) -> float | None:
    values = [c[key] for c in marks]
    return None if None in values else max(values) / values[0]  # None: not measured


def _tenths(rates: list[float]) -> float | None:
    n = max(1, len(rates) // 10)
    if len(rates) < 2 * n:
        return None
    return float(np.median(rates[-n:]) / np.median(rates[:n]))


def _slice(
    model: Any, piece: np.ndarray, sinks: dict, seen: int, bl: Any, args: Any
) -> dict[str, Any]:
    """Part 2: sinks against a sliding window with recomputation on the slice."""
    print(
        f"== 2. {args.slice:,}-token slice at {args.slice_at:,}: sinks vs sliding window "
        f"with recompute (W={seen}, stride {args.stride})",
        flush=True,
    )
    t0 = time.perf_counter()
    sink = streaming_perplexity(
        model,
        piece,
        "sinks",
        args.chunk,
        cache_options=sinks,
        byte_lengths=bl,
        every=10**9,
        token_nats=True,
    )
    sink_s = time.perf_counter() - t0
    cmp = against_recompute(
        model, piece, sink["token_nats"], args.slice_at, seen, args.stride, byte_lengths=bl
    )
    # The stream reads from the start to the slice's end, the recomputation only the slice.
    sink_rate, recompute_rate = (
        (args.slice_at + args.slice) / sink_s,
        args.slice / cmp["recompute_s"],
    )
    out = {
        "tokens": args.slice,
        "first": args.slice_at,
        "sinks": {**cmp["stream"], "seconds": round(sink_s, 2), "tokens_per_s": sink_rate},
        "sliding_recompute": {
            **cmp["recompute"],
            "window": seen,
            "stride": args.stride,
            "seconds": round(cmp["recompute_s"], 2),
            "tokens_per_s": recompute_rate,
        },
        "perplexity_ratio": cmp["perplexity_ratio"],
        "speedup": sink_rate / recompute_rate,
    }
    print(f"  {out}", flush=True)
    return out


def _quantized(
    model: Any, piece: np.ndarray, sinks: dict, seen: int, bl: Any, args: Any
) -> dict[str, Any]:
    """Part 3: the int8 cache (token and channel axes) against fp32, on the slice."""
    policy = args.int8_policy
    print(f"== 3. int8 cache vs fp32, {policy} policy, on the slice", flush=True)
    sizes = {"window": seen} if policy == "window" else sinks
    slice_bytes = target_bytes(piece, bl)[args.slice_at :]

    def run(cache: str, options: dict) -> tuple[dict[str, Any], int]:
        r = streaming_perplexity(
            model,
            piece,
            cache,
            args.chunk,
            cache_options=options,
            byte_lengths=bl,
            every=10**9,
            token_nats=True,
        )
        return summarize(r["token_nats"][args.slice_at :], slice_bytes), r["checkpoints"][0][
            "cache_nbytes"
        ]

    base, base_bytes = run(policy, sizes)
    out: dict[str, Any] = {"policy": policy, f"fp32_{policy}": base}
    for axis in ("token", "channel"):
        q, q_bytes = run("quantized", {"policy": policy, "axis": axis, **sizes})
        out[axis] = {
            **q,
            "perplexity_change": q["perplexity"] / base["perplexity"] - 1,
            "cache_bytes": q_bytes,
            "fp32_cache_bytes": base_bytes,
            "bytes_ratio": q_bytes / base_bytes,
        }
        print(f"  {axis}: {out[axis]}", flush=True)
    return out


if __name__ == "__main__":
    main()
