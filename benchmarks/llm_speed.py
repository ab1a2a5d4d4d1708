"""memext's decode and prefill on a Hugging Face model against transformers' own paths (issue 18:
decode tokens/s ≥ 1.0x transformers' ``generate``; chunked prefill at 8k ≤ 1/4 of one-shot
prefill's peak activation memory).

**Decode.** One process, one thread count, one prompt (``--prompt-tokens`` of the built-in corpus,
the same ids for every configuration), batch 1, greedy, ``--new-tokens`` new tokens each:

- ``transformers``: ``model.generate(ids, do_sample=False, max_new_tokens=N)`` with its default
  ``DynamicCache`` (one-shot prefill; end-of-sequence stopping off, so every run makes N tokens);
- ``full``: memext's decode loop (``HFAdapter._generate_ids``, what ``HFAdapter.generate`` runs,
  given the ids so that no text decoding is timed) with ``cache="full"`` and no chunk:
  one-shot prefill, memext's loop, transformers' ``DynamicCache`` with memext's
  ``GrowingLayer`` (``memext.hf.growing``: room for prompt + N allocated once, no per-token copy
  of the whole cache);
- ``full-chunked``, ``window``, ``sinks``, ``quantized``, ``retrieval``: memext's policies as a
  ``memext.hf.cache.PolicyCache``, the prompt read ``--chunk`` tokens per forward
  (``memext.hf.cache.prefill``). ``quantized`` is int8 storage over the ``sinks`` policy (same
  sizes), so it differs from ``sinks`` by its storage only.

What is timed: a wall-clock stamp as each new token reaches the caller (transformers: a streamer's
``put``, which ``generate`` calls right after choosing each token; memext: each ``yield``). Token
1 arrives after the prefill forward, token k after k - 1 single-token forwards more, so decode
tokens/s = (N - 1) / (stamp N - stamp 1): the same N - 1 forwards, sampling and loop overhead on
both sides, prefill excluded. ``first_token_s`` (call to stamp 1) is prefill + the first token.
A warm-up run of every configuration (``--warmup-prompt-tokens``, 4 tokens) comes first; then
``--repeats`` rounds, each running every configuration once in turn (each round starting one
later), so drift from other load hits all of them; the table shows medians, and each ratio to
transformers also paired within rounds. Greedy tokens of every configuration are compared with
transformers' (``full`` and ``full-chunked`` read everything, so they should agree; the bounded
policies see less and need not).

**Prefill memory.** Each configuration reads the same ``--prompt-tokens`` prompt in its own
fresh subprocess, after the model is loaded, the ids built and a 32-token read of the same
kind (what a process's first forward sets up once is no prefill's activation):

- ``one-shot``: a transformers forward over the whole prompt with a ``DynamicCache``,
  ``logits_to_keep=1``;
- ``chunked-transformers``: the same forward ``--chunk`` tokens at a time into one
  ``DynamicCache`` (a plain loop, transformers alone);
- ``chunked-memext``: ``memext.hf.cache.prefill`` into ``PolicyCache("full",
  max_len=prompt)``, ``--chunk`` tokens per forward (the exact cache memext preallocates).

Measured on CPU, each in its own subprocess: ``rss``, the peak resident set (``VmHWM``, its peak
reset just before the prefill through ``/proc/self/clear_refs``) minus the resident set then,
with ``MALLOC_MMAP_THRESHOLD_`` set so that large frees go back to the system at once (else freed
heap pages hide later allocations); ``profiler``, the peak of live tensor bytes the allocator
reported under ``torch.profiler`` (``memext.profiling.peak_memory``). On CUDA: the caching
allocator's peak above what was allocated before (``max_memory_allocated``). All of these include
the KV cache the prefill leaves behind, so its bytes (of the cache object itself) are reported
next to them and activation = peak - cache.

    python benchmarks/llm_speed.py --model smollm2 --prompt-tokens 8192 --new-tokens 64 \
        --chunk 512 --threads 2 --repeats 3 --out benchmarks/results/llm_speed.json
    python benchmarks/llm_speed.py --model smollm2 --prompt-tokens 1024 --new-tokens 8 \
        --chunk 256 --repeats 1 --out /tmp/llm_speed.json   # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.adapters import open_model
from memext.data.filler import Filler
from memext.io import atomic_write_text
from memext.runtime import command_line, provenance, resolve_device

DECODE_CONFIGS = (
    "transformers",
    "full",
    "full-chunked",
    "window",
    "sinks",
    "quantized",
    "retrieval",
)
MEMORY_CONFIGS = ("one-shot", "chunked-transformers", "chunked-memext")
WARMUP_TOKENS = 4
# TRANSFORMERS_SDPA_FORCE_GQA: transformers' SDPA then attends grouped heads without repeating
# K/V even under a mask (chunked prefill), which changes prefill's peak memory.
ENVIRONMENT = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRANSFORMERS_SDPA_FORCE_GQA")


# --- the model and the prompt ------------------------------------------------------------------


def causal_lm(adapter: Any) -> Any:
    """The transformers ``...ForCausalLM`` behind an ``HFAdapter``."""
    lm = getattr(getattr(adapter, "model", None), "model", None)
    if lm is None or not hasattr(lm, "generate"):
        raise SystemExit("--model must be a Hugging Face model (kind hf or a known name)")
    return lm


def prompt_ids(adapter: Any, tokens: int, seed: int) -> list[int]:
    """``tokens`` contiguous ids of the built-in corpus (~6 bytes a token is plenty of text)."""
    filler = Filler.stdlib(adapter.tokenizer, max_bytes=max(200_000, 8 * tokens))
    return filler.take(tokens, np.random.default_rng(seed)).astype(np.int64).tolist()


def kv_shape(lm: Any) -> tuple[int, int, int, int]:
    """(layers, KV heads, head_dim, bytes per element) of a transformers causal LM."""
    c = lm.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return c.num_hidden_layers, kv, head_dim, next(lm.parameters()).element_size()


# --- decode ------------------------------------------------------------------------------------


def decode_options(config: str, args: argparse.Namespace) -> tuple[str, dict[str, Any], int | None]:
    """(memext cache policy, its options, prefill chunk) of a memext decode configuration."""
    if config == "full":
        return "full", {}, None  # HFAdapter's default path: DynamicCache, one-shot prefill
    if config == "full-chunked":
        return "full", {}, args.chunk  # max_len comes from the adapter (prompt + new tokens)
    if config == "window":
        return "window", {"window": args.window}, args.chunk
    if config == "sinks":
        return "sinks", {"sinks": args.sinks, "window": args.window}, args.chunk
    if config == "quantized":
        sizes = {"sinks": args.sinks, "window": args.window}
        return "quantized", {"policy": "sinks", **sizes, "axis": "token"}, args.chunk
    if config == "retrieval":
        keys = ("sinks", "window", "block", "topk", "reps")
        return "retrieval", {k: getattr(args, k) for k in keys}, args.chunk
    raise ValueError(f"unknown decode configuration {config!r}")


def cache_bytes(config: str, opts: dict[str, Any], tokens: int, shape: tuple) -> int:
    """Bytes the cache holds at the end of a generation of ``tokens`` tokens in all (prompt and
    new; the last is never forwarded), batch 1, by the formulas documented in
    ``memext.infer.cache`` and ``memext.infer.retrieval`` (retrieval: what attention works from,
    not its block store)."""
    layers, heads, d, e = shape
    if config in ("transformers", "full"):  # a DynamicCache: every token forwarded
        return 2 * layers * heads * (tokens - 1) * d * e
    if config == "full-chunked":  # preallocated to max_len = prompt + new tokens
        return 2 * layers * heads * tokens * d * e
    if config == "window":
        return 2 * layers * heads * (opts["window"] - 1) * d * e
    if config == "sinks":
        return 2 * layers * heads * (opts["sinks"] + opts["window"] - 1) * d * e
    if config == "quantized":  # axis token over sinks: int8 recent part, full-precision sinks
        recent = opts["window"] - 1
        return layers * heads * 2 * recent * (d + 4) + 2 * layers * heads * opts["sinks"] * d * e
    s, w, b, k = opts["sinks"], opts["window"], opts["block"], opts["topk"]
    return layers * heads * (2 * (s + w + b - 2 + k * b) * d * e + 8 * (w + b - 2))


class _Stamps:
    """A ``generate`` streamer that stamps each new token as it arrives (its first ``put`` is
    the prompt, which it skips)."""

    def __init__(self, stamps: list[float], tokens: list[int]) -> None:
        self.stamps, self.tokens, self.prompt_seen = stamps, tokens, False

    def put(self, value: torch.Tensor) -> None:
        now = time.perf_counter()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.stamps.append(now)
        self.tokens.extend(int(t) for t in value.reshape(-1))

    def end(self) -> None:
        pass


def transformers_tokens(lm: Any, ids: list[int], n: int) -> Iterator[tuple[int, float]]:
    """(token, stamp) for each token transformers' ``generate`` makes, greedy, DynamicCache."""
    stamps: list[float] = []
    tokens: list[int] = []
    x = torch.tensor([ids], device=lm.device)
    lm.generate(
        x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=None,  # no early stop: N tokens on both sides
        streamer=_Stamps(stamps, tokens),
    )
    yield from zip(tokens, stamps, strict=True)


def memext_tokens(
    adapter: Any, ids: list[int], n: int, cache: str, opts: dict, chunk: int | None
) -> Iterator[tuple[int, float]]:
    """(token, stamp) for each token memext's decode loop yields."""
    for token in adapter._generate_ids(
        ids, n, temperature=0, cache=cache, cache_options=opts, chunk=chunk
    ):
        yield token, time.perf_counter()


def decode_run(
    adapter: Any, config: str, ids: list[int], n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One generation of ``n`` tokens under ``config``: its tokens and timings."""
    lm = causal_lm(adapter)
    gc.collect()
    started = time.perf_counter()
    if config == "transformers":
        made = list(transformers_tokens(lm, ids, n))
    else:
        cache, opts, chunk = decode_options(config, args)
        made = list(memext_tokens(adapter, ids, n, cache, opts, chunk))
    if len(made) != n:
        raise RuntimeError(f"{config}: {len(made)} tokens were made, {n} asked for")
    tokens = [t for t, _ in made]
    stamps = [s for _, s in made]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    decode_s = stamps[-1] - stamps[0]
    return {
        "config": config,
        "tokens": tokens,
        "first_token_s": stamps[0] - started,
        "decode_s": decode_s,
        "decode_steps": n - 1,
        "tokens_per_s": (n - 1) / decode_s if decode_s > 0 else None,
        "median_step_ms": 1000 * statistics.median(gaps) if gaps else None,
    }


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many leading tokens agree."""
    same = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        same += 1
    return same


def decode_benchmark(
    adapter: Any,
    ids: list[int],
    warmup_ids: list[int],
    configs: list[str],
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Warm-up, then ``args.repeats`` rounds of every configuration in turn. Returns the rows
    (one per run) and the table (one per configuration: medians, ratios, agreement)."""
    for config in configs:
        decode_run(adapter, config, warmup_ids, WARMUP_TOKENS, args)
    rows: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        # Each round starts one configuration later, so none always runs first.
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:
            row = {"repeat": repeat} | decode_run(adapter, config, ids, args.new_tokens, args)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "tokens"}
            log(json.dumps(shown))
    shape = kv_shape(causal_lm(adapter))
    end = len(ids) + args.new_tokens
    reference = [r["tokens"] for r in rows if r["config"] == "transformers"]
    base = _median([r["tokens_per_s"] for r in rows if r["config"] == "transformers"])
    table = []
    for config in configs:
        runs = [r for r in rows if r["config"] == config]
        rate = _median([r["tokens_per_s"] for r in runs])
        # Paired within a round: both ran back to back, under the same outside load.
        paired = [
            r["tokens_per_s"] / t["tokens_per_s"]
            for r in runs
            for t in rows
            if t["config"] == "transformers" and t["repeat"] == r["repeat"]
        ]
        cache, opts, _ = (
            ("full", {}, None) if config == "transformers" else decode_options(config, args)
        )
        entry: dict[str, Any] = {
            "config": config,
            "cache": {"transformers": "DynamicCache", "full": "GrowingLayer"}.get(config, cache),
            "options": opts,
            "runs": len(runs),
            "tokens_per_s": rate,
            "ms_per_token": 1000 / rate if rate else None,
            "first_token_s": _median([r["first_token_s"] for r in runs]),
            "vs_transformers": rate / base if rate and base else None,
            "vs_transformers_paired": _median(paired) if paired else None,
            "cache_bytes": cache_bytes(config, opts, end, shape),
            "same_tokens_every_run": all(r["tokens"] == runs[0]["tokens"] for r in runs),
        }
        if reference:
            entry["tokens_equal_transformers"] = all(
                r["tokens"] == ref for r, ref in zip(runs, reference, strict=True)
            )
            entry["tokens_agreeing_with_transformers"] = min(
                agreement(r["tokens"], ref) for r, ref in zip(runs, reference, strict=True)
            )
        table.append(entry)
    return rows, table


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


# --- prefill memory ----------------------------------------------------------------------------


def prefill_fn(lm: Any, ids: torch.Tensor, config: str, chunk: int) -> Callable[[], Any]:
    """A call that reads ``ids`` under ``config`` and returns the cache it filled."""
    from memext.hf.model import _transformers, cache_kwargs

    def one_shot() -> Any:
        past = _transformers().DynamicCache(config=lm.config)
        lm(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(lm, past))
        return past

    def chunked_transformers() -> Any:
        past = _transformers().DynamicCache(config=lm.config)
        for a in range(0, ids.shape[1], chunk):
            # transformers takes the positions from the cache's length.
            piece = ids[:, a : a + chunk]
            lm(input_ids=piece, use_cache=True, logits_to_keep=1, **cache_kwargs(lm, past))
        return past

    def chunked_memext() -> Any:
        from memext.hf.cache import PolicyCache, prefill

        past = PolicyCache(lm.config, "full", max_len=ids.shape[1])
        return prefill(lm, ids, past, chunk)[1]

    fns = {
        "one-shot": one_shot,
        "chunked-transformers": chunked_transformers,
        "chunked-memext": chunked_memext,
    }
    if config not in fns:
        raise ValueError(f"unknown prefill configuration {config!r}")
    return torch.no_grad()(fns[config])


def held_bytes(cache: Any) -> int:
    """Bytes of the tensors a filled cache holds (DynamicCache or PolicyCache)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    return sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )


def _proc_status(field: str) -> int | None:
    """A ``/proc/self/status`` size in bytes (None where there is no such file)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_freed_heap() -> None:
    """Hand freed heap pages back to the system (glibc), so the baseline is what is live."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_prefill(
    lm: Any, ids: torch.Tensor, config: str, chunk: int, method: str
) -> dict[str, Any]:
    """Peak memory of one prefill by ``method`` (rss, profiler or cuda), and the cache bytes."""
    from memext.profiling import peak_memory

    # A short read first: what the first forward of a process sets up once (library code paged
    # in, thread pools, workspaces) is no prefill's activation.
    prefill_fn(lm, ids[:, : min(32, ids.shape[1])], config, min(16, chunk))()
    fn = prefill_fn(lm, ids, config, chunk)
    gc.collect()
    out: dict[str, Any] = {"config": config, "method": method, "tokens": int(ids.shape[1])}
    if method == "rss":
        _release_freed_heap()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM, the peak resident set, to the current one
            out["rss_peak"] = "VmHWM after clear_refs"
        except OSError:  # no /proc: ru_maxrss, which counts the loading too (an upper bound)
            out["rss_peak"] = "ru_maxrss (peak over the process, loading included)"
        before = _proc_status("VmRSS")
        started = time.perf_counter()
        cache = fn()
        out["seconds"] = time.perf_counter() - started
        peak = _proc_status("VmHWM")
        if peak is None or before is None:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            before = before or 0
        out["peak_bytes"] = peak - before
        out["after_bytes"] = (_proc_status("VmRSS") or peak) - before
    elif method in ("profiler", "cuda"):
        box: list[Any] = []
        device = "cuda" if method == "cuda" else "cpu"
        out["peak_bytes"] = peak_memory(lambda: box.append(fn()), device)
        cache = box[0]
    else:
        raise ValueError(f"unknown memory method {method!r}")
    out["cache_bytes"] = held_bytes(cache)
    out["activation_bytes"] = out["peak_bytes"] - out["cache_bytes"]
    return out


def memory_child(args: argparse.Namespace) -> None:
    """The subprocess side: load, build the ids, measure one configuration, print one line."""
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    adapter = open_model(args.model, device)
    lm = causal_lm(adapter)
    ids = torch.tensor([prompt_ids(adapter, args.prompt_tokens, args.seed)], device=device)
    config, method = args.memory_child.split(":")
    print("RESULT " + json.dumps(measure_prefill(lm, ids, config, args.chunk, method)), flush=True)


def memory_benchmark(
    configs: list[str], methods: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Every (configuration, method) in its own fresh subprocess of this script."""
    rows = []
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed: big frees unmap at once (see the doc)
    for method in methods:
        for config in configs:
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                f"--model={args.model}",
                f"--prompt-tokens={args.prompt_tokens}",
                f"--chunk={args.chunk}",
                f"--threads={args.threads}",
                f"--device={args.device}",
                f"--seed={args.seed}",
                f"--memory-child={config}:{method}",
            ]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                raise RuntimeError(f"{config}:{method} failed:\n{done.stderr[-3000:]}")
            row = json.loads(lines[-1][len("RESULT ") :])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def memory_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: each configuration's peak, cache and activation, and activation against
    one-shot's (the target: chunked ≤ 0.25)."""
    table = []
    for row in rows:
        base = next(
            (r for r in rows if r["method"] == row["method"] and r["config"] == "one-shot"), None
        )
        entry = {k: row[k] for k in ("config", "method", "peak_bytes", "cache_bytes")}
        entry["activation_bytes"] = row["activation_bytes"]
        entry["activation_vs_one_shot"] = (
            row["activation_bytes"] / base["activation_bytes"]
            if base and base["activation_bytes"] > 0
            else None
        )
        table.append(entry)
    return table


# --- the command -------------------------------------------------------------------------------


def print_tables(decode: list[dict[str, Any]], memory: list[dict[str, Any]], tokens: int) -> None:
    if decode:
        print(
            f"\ndecode at {tokens} prompt tokens (medians)\n"
            f"{'config':>13} {'tok/s':>7} {'ms/tok':>7} {'x tf':>6} {'x tf pair':>9} "
            f"{'1st tok s':>9} {'cache MB':>9} {'= tf':>5} {'agree':>5}"
        )
        for r in decode:
            print(
                f"{r['config']:>13} {_f(r['tokens_per_s'], 2):>7} {_f(r['ms_per_token'], 1):>7} "
                f"{_f(r['vs_transformers'], 2):>6} {_f(r['vs_transformers_paired'], 2):>9} "
                f"{_f(r['first_token_s'], 1):>9} {r['cache_bytes'] / 1e6:>9.2f} "
                f"{r.get('tokens_equal_transformers', '-')!s:>5} "
                f"{r.get('tokens_agreeing_with_transformers', '-'):>5}"
            )
    if memory:
        print(
            f"\nprefill peak memory at {tokens} tokens (MB above the loaded model)\n"
            f"{'config':>21} {'method':>9} {'peak':>8} {'KV cache':>9} {'activation':>10} "
            f"{'x one-shot':>10}"
        )
        for r in memory:
            print(
                f"{r['config']:>21} {r['method']:>9} {r['peak_bytes'] / 1e6:>8.1f} "
                f"{r['cache_bytes'] / 1e6:>9.1f} {r['activation_bytes'] / 1e6:>10.1f} "
                f"{_f(r['activation_vs_one_shot'], 3):>10}"
            )


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def targets(decode: list[dict[str, Any]], memory: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's two targets, as measured (absent where their rows did not run)."""
    out: dict[str, Any] = {}
    for r in decode:
        if r["config"] in ("full", "full-chunked") and r["vs_transformers"] is not None:
            out[f"decode_{r['config']}_vs_transformers"] = {
                "target": ">= 1.0",
                "ratio": r["vs_transformers"],
                "met": r["vs_transformers"] >= 1.0,
            }
    for r in memory:
        if r["config"] != "one-shot" and r["activation_vs_one_shot"] is not None:
            out[f"prefill_activation_{r['config']}_{r['method']}"] = {
                "target": "<= 0.25",
                "ratio": r["activation_vs_one_shot"],
                "met": r["activation_vs_one_shot"] <= 0.25,
            }
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="A Hugging Face dir or known name.")
    p.add_argument("--prompt-tokens", type=int, default=8192)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--chunk", type=int, default=512, help="Prompt tokens per chunked forward.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup-prompt-tokens", type=int, default=512)
    p.add_argument("--configs", default=",".join(DECODE_CONFIGS), help="Decode configurations.")
    p.add_argument(
        "--memory-configs",
        default=",".join(MEMORY_CONFIGS),
        help="Prefill memory configurations ('' to skip).",
    )
    p.add_argument(
        "--memory-methods", default="rss,profiler", help="CPU: rss, profiler; CUDA: cuda."
    )
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/llm_speed.json"))
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return
    configs = [c for c in args.configs.split(",") if c]
    mem_configs = [c for c in args.memory_configs.split(",") if c]
    methods = [m for m in args.memory_methods.split(",") if m]
    for given, known, flag in (
        (configs, DECODE_CONFIGS, "--configs"),
        (mem_configs, MEMORY_CONFIGS, "--memory-configs"),
        (methods, ("rss", "profiler", "cuda"), "--memory-methods"),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise SystemExit(f"{flag}: unknown {unknown}; expected some of {', '.join(known)}")
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda" and set(methods) - {"cuda"}:
        raise SystemExit("on CUDA measure prefill memory with --memory-methods cuda")

    adapter = open_model(args.model, device)
    ids = prompt_ids(adapter, args.prompt_tokens, args.seed)
    warmup = prompt_ids(adapter, args.warmup_prompt_tokens, args.seed + 1)
    rows, decode = decode_benchmark(adapter, ids, warmup, configs, args) if configs else ([], [])
    del adapter
    gc.collect()
    mem_rows = memory_benchmark(mem_configs, methods, args) if mem_configs else []
    memory = memory_table(mem_rows)
    print_tables(decode, memory, args.prompt_tokens)
    result = {
        "command": command_line("benchmarks/llm_speed.py", args, ("memory_child",)),
        "provenance": provenance(device),
        "model": args.model.as_posix(),
        # Settings read from the environment that change these paths or their threads.
        "environment": {k: os.environ.get(k) for k in ENVIRONMENT},
        "decode_timing": (
            "tokens/s = (N - 1) / (stamp of token N - stamp of token 1), stamps as each token "
            "reaches the caller (generate's streamer; memext's yield): N - 1 single-token "
            "forwards, prefill excluded; first_token_s = prefill + first token"
        ),
        "memory_measure": {
            "rss": "peak resident set (VmHWM reset before the prefill) minus the resident set "
            "then, in a fresh subprocess with the model loaded, MALLOC_MMAP_THRESHOLD_=65536",
            "profiler": "peak live tensor bytes under torch.profiler (memext.profiling)",
            "cuda": "torch.cuda.max_memory_allocated above memory_allocated before",
            "activation": "peak minus the bytes of the KV cache the prefill leaves",
        },
        "targets": targets(decode, memory),
        "decode": decode,
        "memory": memory,
        "decode_rows": rows,
        "memory_rows": mem_rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
