"""Long-input inference in flat memory (issue 5's streaming and quantized-cache results).

Reads the built-in corpus's validation split (text the model did not train on; read again from
its start when shorter than ``--tokens``) with a trained plain model (memory none). The figures
on the results page read ``runs/extension-base``, the 512-token base of the former
``context_extension.py`` (``git show b1da94e:benchmarks/context_extension.py``); any plain run
works, e.g. ``--run runs/bench/extend-none-s0`` from ``python benchmarks/seeds.py extend-none``:

1. ``sinks`` streaming over ``--tokens`` tokens in chunks: cache bytes, the chunk's peak tensor
   memory and tokens/s at checkpoints from 10k tokens on (flat = within 5% of the first).
2. A ``--slice``-token slice: sinks vs a sliding window re-read from scratch for every token
   (StreamingLLM's "sliding window with recomputation"), same number of tokens seen; perplexity
   ratio and speed ratio.
3. The quantized cache (int8, token and channel axes) against the same policy in fp32 on the
   slice: cache bytes ratio (formula in memext/infer/cache.py) and perplexity change.

    python benchmarks/streaming.py                                   # the full measurement
    python benchmarks/streaming.py --tokens 30000 --slice 2000 --out /tmp/s.json   # a smoke run
    python benchmarks/streaming.py --parts 2,3     # some parts; the others' results are kept

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

from memext import load
from memext.checkpoint import run_tokenizer
from memext.config import DataConfig
from memext.data import prepare_data
from memext.evals.streaming import sliding_recompute_perplexity, streaming_perplexity
from memext.runtime import command_line, provenance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/extension-base"))
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--slice", type=int, default=20_000)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=508, help="sinks + window = cached tokens")
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--every", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/streaming.json"))
    p.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 2,3")
    args = p.parse_args()
    parts = {int(x) for x in args.parts.split(",")}
    if not parts or not parts <= {1, 2, 3}:
        p.error(f"--parts={args.parts!r}: expected a comma-separated subset of 1,2,3")
    torch.set_num_threads(args.threads)
    model, _ = load(args.run)
    tok = run_tokenizer(args.run)
    store, _ = prepare_data(DataConfig(), tok)
    # Held-out text only: a validation split shorter than --tokens is read again from its start
    # (the window is far shorter than the split, so no repeat is ever in view).
    stream = np.resize(store.validation, args.tokens + 1)
    cycles = (args.tokens + 1) / store.validation.size
    bl = tok.byte_lengths()
    sinks = {"sinks": args.sinks, "window": args.window}
    seen = args.sinks + args.window
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    kept = {"stream": 1, "slice": 2, "quantized": 3}
    results = {k: v for k, v in old.items() if k in kept and kept[k] not in parts}
    results |= {
        "run": str(args.run),
        "provenance": provenance(torch.device("cpu")),
        "validation_tokens": int(store.validation.size),
        "validation_cycles": round(cycles, 3),
        "command": command_line("benchmarks/streaming.py", args, ("out", "parts")),
    }
    piece = stream[: args.slice + 1]
    if 1 in parts:
        results["stream"] = _stream(model, stream, sinks, bl, args)
    if 2 in parts:
        results["slice"] = _slice(model, piece, sinks, seen, bl, args)
    if 3 in parts:
        results["quantized"] = _quantized(model, piece, seen, bl, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def _stream(model: Any, stream: np.ndarray, sinks: dict, bl: Any, args: Any) -> dict[str, Any]:
    """Part 1: the long sinks stream and its flatness figures."""
    print(f"== 1. sinks {sinks} over {args.tokens:,} tokens, chunk {args.chunk}", flush=True)
    long = streaming_perplexity(
        model, stream, "sinks", args.chunk, cache_options=sinks, byte_lengths=bl, every=args.every
    )
    marks = [c for c in long["checkpoints"] if c["tokens"] >= 10_000]
    rates = []
    for a, b in itertools.pairwise(marks):
        rates.append((b["timed_tokens"] - a["timed_tokens"]) / (b["timed_s"] - a["timed_s"]))
    first = marks[0]
    s = {
        **{k: v for k, v in long.items() if k != "checkpoints"},
        "checkpoints": long["checkpoints"],
        "tokens_per_s_between_checkpoints": rates,
        "cache_bytes_spread": max(c["cache_nbytes"] for c in marks)
        / min(c["cache_nbytes"] for c in marks),
        "peak_bytes_spread_vs_first": max(c["chunk_peak_bytes"] for c in marks)
        / first["chunk_peak_bytes"],
        "tokens_per_s_spread": max(rates) / min(rates) if rates else None,
        # Steal time and other processes only ever slow an interval down, in bursts: the
        # median over the first and the last tenth of the stream tells a cost that grows with
        # the tokens read (what "flat" is about) from noise.
        "tokens_per_s_last_vs_first_tenth": _tenths(rates),
    }
    print(
        f"  bits/byte {s['bits_per_byte']:.4f}; cache bytes max/min {s['cache_bytes_spread']:.4f}; "
        f"peak max/first {s['peak_bytes_spread_vs_first']:.4f}; tok/s max/min "
        f"{s['tokens_per_s_spread']}; tok/s last/first tenth {s['tokens_per_s_last_vs_first_tenth']}",
        flush=True,
    )
    return s


def _tenths(rates: list[float]) -> float | None:
    n = max(1, len(rates) // 10)
    if len(rates) < 2 * n:
        return None
    return float(np.median(rates[-n:]) / np.median(rates[:n]))


def _slice(
    model: Any, piece: np.ndarray, sinks: dict, seen: int, bl: Any, args: Any
) -> dict[str, Any]:
    """Part 2: sinks against a sliding window with recomputation on the slice."""
    print(f"== 2. {args.slice:,}-token slice: sinks vs sliding window with recompute", flush=True)
    t0 = time.perf_counter()
    sink_slice = streaming_perplexity(
        model, piece, "sinks", args.chunk, cache_options=sinks, byte_lengths=bl, every=10**9
    )
    sink_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    recompute = sliding_recompute_perplexity(model, piece, seen, 1, byte_lengths=bl)
    recompute_s = time.perf_counter() - t0
    out = {
        "tokens": args.slice,
        "sinks": {"perplexity": sink_slice["perplexity"], "seconds": round(sink_s, 2)},
        "sliding_recompute": {
            "window": seen,
            "perplexity": recompute["perplexity"],
            "seconds": round(recompute_s, 2),
        },
        "perplexity_ratio": sink_slice["perplexity"] / recompute["perplexity"],
        "speedup": recompute_s / sink_s,
    }
    print(f"  {out}", flush=True)
    return out


def _quantized(model: Any, piece: np.ndarray, seen: int, bl: Any, args: Any) -> dict[str, Any]:
    """Part 3: the int8 cache (token and channel axes) against fp32, window policy."""
    print("== 3. int8 cache vs fp32, window policy, on the slice", flush=True)
    window = {"window": seen}
    base = streaming_perplexity(
        model, piece, "window", args.chunk, cache_options=window, byte_lengths=bl, every=10**9
    )
    out: dict[str, Any] = {"fp32_window": {"perplexity": base["perplexity"]}}
    for axis in ("token", "channel"):
        q = streaming_perplexity(
            model,
            piece,
            "quantized",
            args.chunk,
            cache_options={"policy": "window", "axis": axis, **window},
            byte_lengths=bl,
            every=10**9,
        )
        out[axis] = {
            "perplexity": q["perplexity"],
            "perplexity_change": q["perplexity"] / base["perplexity"] - 1,
            "cache_bytes": q["checkpoints"][0]["cache_nbytes"],
            "fp32_cache_bytes": base["checkpoints"][0]["cache_nbytes"],
            "bytes_ratio": q["checkpoints"][0]["cache_nbytes"]
            / base["checkpoints"][0]["cache_nbytes"],
        }
        print(f"  {axis}: {out[axis]}", flush=True)
    return out


if __name__ == "__main__":
    main()
