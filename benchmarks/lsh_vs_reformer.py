"""memext's LSH attention against reformer-pytorch's ``LSHAttention``, same settings, on CPU.

Both hash ``rounds`` times into ``T / chunk`` buckets (reformer-pytorch fixes its bucket count to
``seq_len // bucket_size``; memext's is set to match), use chunks of ``chunk`` with look-one-back
and causal masking. Times are medians of interleaved repeats (the two kernels alternate, so a
noisy neighbour hurts both alike); peak memory is measured in separate runs, because the
profiler that measures it on CPU slows the call down.

    OMP_NUM_THREADS=2 python benchmarks/lsh_vs_reformer.py [--lengths 4096 16384] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from reformer_pytorch.reformer_pytorch import LSHAttention as ReformerLSH

from memext.bench.memory import peak_memory
from memext.nn.attention.lsh import LSHAttention


def make_calls(
    t: int, *, heads: int, dim: int, chunk: int, rounds: int, seed: int = 0
) -> dict[str, dict[str, Callable[[], object]]]:
    """{kernel: {"forward": fn, "forward+backward": fn}} on the same random inputs."""
    gen = torch.Generator().manual_seed(seed)
    qk = torch.randn(1, heads, t, dim, generator=gen)
    v = torch.randn(1, heads, t, dim, generator=gen)
    ours = LSHAttention(lsh_chunk=chunk, lsh_buckets=t // chunk, lsh_rounds=rounds)
    theirs = ReformerLSH(bucket_size=chunk, n_hashes=rounds, causal=True)

    def run_ours(grad: bool) -> object:
        q_, v_ = qk.clone().requires_grad_(grad), v.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = ours(q_, q_, v_, causal=True)
            if grad:
                out.sum().backward()
        return out

    def run_theirs(grad: bool) -> object:
        # reformer-pytorch folds heads into the batch: (B * H, T, D).
        q_ = qk.reshape(-1, t, dim).clone().requires_grad_(grad)
        v_ = v.reshape(-1, t, dim).clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = theirs(q_, v_)[0]
            if grad:
                out.sum().backward()
        return out

    return {
        "memext": {"forward": lambda: run_ours(False), "forward+backward": lambda: run_ours(True)},
        "reformer": {
            "forward": lambda: run_theirs(False),
            "forward+backward": lambda: run_theirs(True),
        },
    }


def median_times(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call, median over ``repeats`` rounds in which every call runs once in turn."""
    for fn in calls.values():
        fn()  # warm-up: first-touch allocations, lazy initialisation
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    print(
        f"B=1 H={args.heads} D={args.dim} chunk={args.chunk} rounds={args.rounds} "
        f"buckets=T/chunk causal, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    header = (
        f"{'T':>6} {'pass':<17} {'memext ms':>10} {'reformer ms':>12} {'speed-up':>9} "
        f"{'memext MiB':>11} {'reformer MiB':>13} {'mem ratio':>10}"
    )
    print(header)
    print("-" * len(header))
    for t in args.lengths:
        calls = make_calls(t, heads=args.heads, dim=args.dim, chunk=args.chunk, rounds=args.rounds)
        for kind in ("forward", "forward+backward"):
            secs = median_times({k: calls[k][kind] for k in calls}, args.repeats)
            mem = {k: peak_memory(calls[k][kind]) / 2**20 for k in calls}
            print(
                f"{t:>6} {kind:<17} {secs['memext'] * 1e3:>10.1f} {secs['reformer'] * 1e3:>12.1f} "
                f"{secs['reformer'] / secs['memext']:>8.2f}x {mem['memext']:>11.1f} "
                f"{mem['reformer']:>13.1f} {mem['memext'] / mem['reformer']:>10.2f}"
            )


if __name__ == "__main__":
    main()
