"""Why `sliding` runs the way it does on CPU: its two paths, full SDPA and FlexAttention, side by side.

- ``fused``: the default CPU path (pieces through the fused flash kernel, lean backward);
- ``portable``: the same pieces through ``F.scaled_dot_product_attention`` with autograd (the
  path other devices take; ``kernel.fused_cpu = False``);
- ``full``: SDPA ``is_causal=True``;
- ``flex``: FlexAttention with a sliding-window block mask, forward only (no CPU backward in torch
  2.13), compiled; its mask creation and first call are timed separately.

Peak memory is the allocator's (``memext.profiling``), in runs separate from the timings.

    python benchmarks/sliding_paths.py --length 16384 --out benchmarks/results/sliding_paths.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from memext.nn.attention import build_attention
from memext.profiling import peak_memory


def _time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (slow to compile)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    t, w = args.length, args.window
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, args.heads, t, args.head_dim, generator=gen).requires_grad_()
        for _ in range(3)
    )
    grad = torch.randn(q.shape, generator=gen)
    fused = build_attention("sliding", window=w)
    portable = build_attention("sliding", window=w)
    portable.fused_cpu = False
    runs = {
        "fused": lambda: fused(q, k, v),
        "portable": lambda: portable(q, k, v),
        "full": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }

    def forward(fn: Callable) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                fn()

        return call

    def training(fn: Callable) -> Callable[[], None]:
        def call() -> None:
            fn().backward(grad)
            for x in (q, k, v):
                x.grad = None

        return call

    rows = {}
    for name, fn in runs.items():
        forward(fn)(), training(fn)()  # warm-up
        rows[name] = {
            "forward_s": _time(forward(fn), args.repeats),
            "backward_s": _time(training(fn), args.repeats),
            "forward_peak_mib": peak_memory(forward(fn)) / 2**20,
            "backward_peak_mib": peak_memory(training(fn)) / 2**20,
        }
    if not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def window(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < w)

        start = time.perf_counter()
        mask = create_block_mask(window, None, None, t, t, device="cpu")
        setup = time.perf_counter() - start
        flex = torch.compile(flex_attention)
        qd, kd, vd = (x.detach() for x in (q, k, v))  # FlexAttention refuses grad inputs on CPU
        start = time.perf_counter()
        forward(lambda: flex(qd, kd, vd, block_mask=mask))()
        first = time.perf_counter() - start
        rows["flex"] = {
            "forward_s": _time(forward(lambda: flex(qd, kd, vd, block_mask=mask)), args.repeats),
            "block_mask_s": setup,
            "compile_and_first_call_s": first,
        }
    print(f"T={t}, {args.heads} heads x {args.head_dim}, W={w}, {torch.get_num_threads()} threads")
    for name, row in rows.items():
        print(f"{name:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    if args.out:
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__}
        payload["threads"] = torch.get_num_threads()
        payload["rows"] = rows
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
