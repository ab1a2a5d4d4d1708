"""Peak activation memory of one training forward + backward against depth.

Four ways to train the same width at each depth: ``ordinary`` (autograd keeps every block's
activations), ``checkpointed`` (``activation_checkpointing``: each block keeps only its input and
recomputes the rest in backward), ``reversible`` (RevNet-coupled blocks whose backward inverts
them, ``model.reversible``) and ``reversible+ff_chunk`` (the same, with the feed-forward
recomputed ``ff_chunk`` tokens at a time). Memory comes from ``memext.profiling.peak_memory``:
the allocator's peak above what was live before the call (parameters and the batch were), so it
includes the parameters' gradients, which are allocated during the call; ``param_bytes`` is
printed alongside to make that visible. Times come from separate, unprofiled runs of the same
step and are indicative only on a shared machine.

    python benchmarks/depth_memory.py --out benchmarks/results/depth_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import memext
from memext.config import ModelConfig
from memext.model import build_model
from memext.profiling import peak_memory

VARIANTS = ("ordinary", "checkpointed", "reversible", "reversible+ff_chunk")


def measure(
    variant: str,
    n_layers: int,
    args: argparse.Namespace,
    tokens: torch.Tensor,
) -> dict[str, Any]:
    """Peak bytes (and seconds) of one forward + backward of ``variant`` at ``n_layers``."""
    cfg = ModelConfig(
        d_model=args.d_model,
        n_heads=args.heads,
        n_layers=n_layers,
        max_seq_len=args.seq_len,
        attention="full",
        reversible=variant.startswith("reversible"),
        ff_chunk=args.ff_chunk if variant == "reversible+ff_chunk" else 0,
    )
    model = build_model(cfg, seed=0).to(args.device).train()
    model.activation_checkpointing = variant == "checkpointed"
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step() -> None:
        logits, _ = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()

    step()  # warm-up: one-time allocations (kernels, thread pools) stay out of the figures
    # Gradients are freed outside the measured call, so each call allocates them afresh.
    model.zero_grad(set_to_none=True)
    peak = peak_memory(step, args.device)
    seconds = []
    for _ in range(args.time_runs):
        model.zero_grad(set_to_none=True)
        if args.device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if args.device != "cpu":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "variant": variant,
        "n_layers": n_layers,
        "peak_bytes": peak,
        "param_bytes": params,
        "seconds": min(seconds) if seconds else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="2,4,8,16", help="comma-separated n_layers")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--ff-chunk", type=int, default=128)
    parser.add_argument("--time-runs", type=int, default=1, help="unprofiled runs (min time)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    depths = [int(d) for d in args.depths.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}: expected some of {', '.join(VARIANTS)}")

    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (args.batch, args.seq_len + 1), generator=gen).to(args.device)
    rows = []
    print(
        f"d_model {args.d_model}, heads {args.heads}, T {args.seq_len}, batch {args.batch}, "
        f"ff_chunk {args.ff_chunk}, attention full, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {args.device}"
    )
    header = f"{'variant':<22}{'layers':>7}{'peak MiB':>11}{'params MiB':>12}{'s/step':>9}"
    print(header)
    for variant in variants:
        for n in depths:
            row = measure(variant, n, args, tokens)
            gc.collect()  # the last model's memory is gone before the next one is built
            rows.append(row)
            secs = f"{row['seconds']:.2f}" if row["seconds"] is not None else "-"
            print(
                f"{variant:<22}{n:>7}{row['peak_bytes'] / 2**20:>11.1f}"
                f"{row['param_bytes'] / 2**20:>12.2f}{secs:>9}",
                flush=True,
            )
    result = {
        "benchmark": "depth_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "memext": memext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device,
        "threads": torch.get_num_threads(),
        "shape": {
            "d_model": args.d_model,
            "n_heads": args.heads,
            "seq_len": args.seq_len,
            "batch": args.batch,
            "attention": "full",
            "ff_chunk": args.ff_chunk,
        },
        "measure": "peak allocator bytes of one forward+backward above what was live before it "
        "(memext.profiling.peak_memory); includes the parameters' gradients",
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
