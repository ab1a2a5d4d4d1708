"""The longest sequence one attention layer trains on at a fixed per-rank memory: 1 rank vs N.

One rank runs the kernel itself (``full``: SDPA ``is_causal``; ``sliding``); N ranks run
``ring_attention`` or ``ulysses_attention`` over a gloo group of N spawned processes (one thread
each) on zig-zag shards. A rank's *footprint* is what one training step of the layer holds at
its worst moment: its q, k, v and incoming output gradient, plus the peak of the tensors forward
and backward allocate (``memext.profiling.peak_memory``; gloo's own buffers, outside PyTorch's
allocator, are not seen). Footprints are measured, never extrapolated: two short runs give a
linear guess of the longest length, then lengths are measured on a grid of ``--step`` tokens
until the longest that fits and the shortest that does not are both measured.

    python benchmarks/context_parallel.py --budget-mib 64 --out benchmarks/results/context_parallel.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from memext.dist.cp_common import ring_window, shard_sequence
from memext.dist.ring import ring_attention
from memext.dist.ulysses import ulysses_attention
from memext.nn.attention import build_attention
from memext.profiling import peak_memory
from memext.runtime import command_line, provenance


def _kernel(name: str, window: int) -> torch.nn.Module:
    return build_attention("sliding", window=window) if name == "sliding" else build_attention(name)


def _attend(method: str, kernel: torch.nn.Module) -> Callable:
    if method == "single":
        if kernel.name == "full":  # the kernel's own causal square path: SDPA is_causal
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return kernel
    if method == "ring":
        return lambda q, k, v: ring_attention(q, k, v, window=ring_window(kernel))
    return lambda q, k, v: ulysses_attention(q, k, v, kernel=kernel)


def _footprint(attend: Callable, t: int, rank: int, world: int, args: argparse.Namespace) -> int:
    """Bytes this rank holds at the worst moment of one forward + backward at length ``t``."""
    gen = torch.Generator().manual_seed(t)
    shape = (1, args.heads, t // world, args.head_dim)
    whole = [torch.randn(1, args.heads, t, args.head_dim, generator=gen) for _ in range(4)]
    q, k, v, g = (shard_sequence(x, rank, world) if world > 1 else x for x in whole)
    del whole
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    held = 4 * torch.Size(shape).numel() * 4  # q, k, v and the output gradient, fp32

    def step() -> None:
        attend(q, k, v).backward(g)

    return held + peak_memory(step)


def _search(measure: Callable[[int], int], args: argparse.Namespace) -> dict[str, Any]:
    """The longest multiple of ``step`` whose footprint fits the budget, and the next one."""
    budget, step = args.budget_mib * 2**20, args.step
    seen: dict[int, int] = {}

    def fits(t: int) -> bool:
        if t not in seen:
            seen[t] = measure(t)
        return seen[t] <= budget

    a, b = 2 * step, 4 * step
    fits(a), fits(b)
    slope = (seen[b] - seen[a]) / (b - a)
    t = max(step, int((budget - seen[a]) / slope + a) // step * step)
    if fits(t):
        while fits(t + step):
            t += step
    else:
        while t > step and not fits(t):
            t -= step
    return {
        "longest": t if fits(t) else 0,
        "footprint_mib": {str(n): m / 2**20 for n, m in sorted(seen.items())},
    }


def _worker(rank: int, world: int, port: int, method: str, kernel: str, args, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    attend = _attend(method, _kernel(kernel, args.window))

    def measure(t: int) -> int:  # every rank measures; the group agrees on the largest
        peak = torch.tensor(_footprint(attend, t, rank, world, args), dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"  {method}/{kernel} x{world} T={t}: {peak.item() / 2**20:.1f} MiB", flush=True)
        return int(peak.item())

    found = _search(measure, args)
    if rank == 0:
        Path(out).write_text(json.dumps(found))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-mib", type=float, default=64.0, help="per-rank footprint budget")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--methods", default="ring,ulysses")
    ap.add_argument("--kernels", default="full,sliding")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--step", type=int, default=512, help="length grid (a multiple of 2N)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    started, load = time.strftime("%Y-%m-%d %H:%M:%S"), os.getloadavg()
    rows: list[dict[str, Any]] = []
    for kernel in args.kernels.split(","):
        attend = _attend("single", _kernel(kernel, args.window))

        def measure(t: int, attend: Callable = attend, kernel: str = kernel) -> int:
            peak = _footprint(attend, t, 0, 1, args)
            print(f"  single/{kernel} x1 T={t}: {peak / 2**20:.1f} MiB", flush=True)
            return peak

        one = _search(measure, args)
        rows.append({"kernel": kernel, "method": "single", "ranks": 1, **one})
        for method in args.methods.split(","):
            out = Path(f"/tmp/memext-cp-{os.getpid()}-{method}-{kernel}.json")
            mp.spawn(
                _worker,
                args=(args.ranks, _free_port(), method, kernel, args, str(out)),
                nprocs=args.ranks,
            )
            found = json.loads(out.read_text())
            out.unlink()
            found["vs_one_rank"] = found["longest"] / one["longest"] if one["longest"] else None
            rows.append({"kernel": kernel, "method": method, "ranks": args.ranks, **found})
    print(
        f"\nLongest trainable length at {args.budget_mib:g} MiB per rank "
        f"({args.heads} heads x {args.head_dim}, fp32, 1 thread per rank, load {load[0]:.1f})"
    )
    print("| kernel | method | ranks | longest tokens | vs 1 rank |\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_one_rank']:.2f}x" if r.get("vs_one_rank") else "1x"
        print(f"| {r['kernel']} | {r['method']} | {r['ranks']} | {r['longest']} | {ratio} |")
    if args.out:
        payload = {
            "command": command_line("benchmarks/context_parallel.py", args),
            "started": started,
            "load_average_at_start": load,
            "load_average_at_end": os.getloadavg(),
            "provenance": provenance(),
            "rows": rows,
        }
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
