"""Structured head pruning (issue 21, item 3): bits-per-byte before and after pruning and after a
short recovery fine-tune, and the forward wall-clock of the pruned model against the unpruned
one, in one process, one thread count.

Steps (every one through memext's own code):

1. **Train** ``--config`` (default ``benchmarks/configs/extend-base.yaml``: d64, 2 layers, 4
   heads, full attention, no memory) for ``--steps`` with ``memext.train.train`` into
   ``--work/base`` (reused when it is already there), ``model.max_seq_len`` raised to
   ``--length`` so a forward pass at that length is allowed (rotary positions only: no weight
   depends on it).
2. **Prune** ``--heads`` of the heads with ``memext.adapters.prune`` (the command ``memext
   compress prune``): importance on the first ``--batches`` x ``--seq-len`` tokens of the run's
   validation text into ``--work/pruned``; the same, plus ``--recover-steps`` (default 5% of the
   base's steps) of recovery through ``memext.train`` on ``--recover-data`` (default
   ``corpus``: the text alone; ``mixture`` adds the config's passkey batches, which cost the
   text bpb in a short recovery), into ``--work/recovered``.
3. **Bits-per-byte** of base, pruned, recovered and ``continued`` (the control: the unpruned
   base trained the same recovery steps the same way, since a briefly trained base still
   improves with any training) on ``--eval-tokens`` tokens of the
   validation text that follow the scoring tokens (disjoint from them), in windows of
   ``--context`` tokens, each window's tokens after its first scored (as
   ``benchmarks/quantize.py`` does), through each adapter's ``log_probs``.
4. **Forward wall-clock** at batch 1 and ``--length`` tokens (``torch.no_grad``): one warm-up
   each, then ``--repeats`` rounds timing base and pruned once each, alternating which goes
   first; the table shows medians and the speed-up paired within rounds.
5. With ``--smollm2``: SmolLM2-135M's Δbpb with ``--heads`` of its KV groups pruned (no
   recovery), on ``--smollm2-tokens`` tokens of its validation text after the scoring tokens.

The CPU model (``/proc/cpuinfo``) and the 1-minute load average before and after the timing
are recorded: the machine may be shared, so wall-clock figures carry that caveat.

    OMP_NUM_THREADS=1 python benchmarks/prune.py --threads 1 --out benchmarks/results/prune.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.adapters import open_model, prune
from memext.config import Config
from memext.evals.perplexity import windowed_bits_per_byte as bits_per_byte
from memext.runtime import cpu_name, write_result


def held_ids(adapter: Any, skip: int, n: int) -> np.ndarray:
    """``n`` validation ids after the first ``skip`` (those the importance was scored on)."""
    ids = np.asarray(adapter.validation()[0])
    if len(ids) < skip + n:
        raise SystemExit(f"the validation text has {len(ids)} ids, fewer than {skip} + {n}")
    return np.array(ids[skip : skip + n])  # a writable copy (torch reads it)


def forward_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        started = time.perf_counter()
        model(x)
        return time.perf_counter() - started


def train_base(args: argparse.Namespace, out: Path) -> Config:
    from memext import checkpoint as ckpt
    from memext.train import train

    if (out / ckpt.WEIGHTS).is_file():
        print(f"reusing the trained base in {out}", file=sys.stderr)
        return ckpt.load_config(out)
    cfg = Config.load(args.config).override(
        {
            "model.max_seq_len": str(args.length),
            "train.steps": str(args.steps),
            "train.save_every": str(args.steps),
        }
    )
    started = time.perf_counter()
    train(cfg, out, progress=False, log=lambda m: print(m, file=sys.stderr))
    print(f"trained {args.steps} steps in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return cfg


def continue_base(
    base: Path, out: Path, steps: int, lr: float | None, data: str, kd: float = 0.0
) -> None:
    """The unpruned base fine-tuned exactly as the recovery fine-tunes the pruned one (with
    ``kd``, distilled from itself, as the pruned one is from it)."""
    from memext import checkpoint as ckpt
    from memext.adapters.pruned import recovery_config
    from memext.train import train

    teacher = str(base.resolve())
    cfg = recovery_config(ckpt.load_config(base), steps, lr, data, kd=kd, teacher=teacher)
    train(
        cfg,
        out,
        progress=False,
        log=lambda m: None,
        init_from=base / ckpt.WEIGHTS,
        teacher=open_model(teacher) if kd else None,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cfg = train_base(args, work / "base")
    recover = args.recover_steps
    if recover is None:
        recover = max(1, int(0.05 * cfg.train.steps))
    scoring = {"batches": args.batches, "seq_len": args.seq_len}
    made = {}
    for name, steps in (("pruned", 0), ("recovered", recover)):
        out = work / name
        if not out.exists():
            made[name] = prune(work / "base", out, args.heads, recover_steps=steps,
                               recover_lr=args.recover_lr, recover_data=args.recover_data,
                               recover_kd=args.recover_kd if steps else 0.0,
                               **scoring)  # fmt: skip
    continued = work / "continued"
    if not continued.exists():  # the control: the unpruned base trained the same extra steps
        continue_base(
            work / "base", continued, recover, args.recover_lr, args.recover_data, args.recover_kd
        )
    names = ("base", "continued", "pruned", "recovered")
    adapters = {name: open_model(work / name) for name in names}
    skip = args.batches * args.seq_len + 1
    ids = held_ids(adapters["base"], skip, args.eval_tokens)
    rows = {}
    for name, adapter in adapters.items():
        bpb = bits_per_byte(adapter, ids, args.context)
        heads = adapter.cfg.model.layer_heads()
        rows[name] = {"model": name, "heads": list(heads), "bits_per_byte": bpb,
                      "params": sum(p.numel() for p in adapter.model.parameters())}  # fmt: skip
        print(f"{name}: {bpb:.4f} bits/byte, heads {list(heads)}", file=sys.stderr)
    for name in ("continued", "pruned", "recovered"):
        rows[name]["delta_bpb"] = rows[name]["bits_per_byte"] - rows["base"]["bits_per_byte"]
    # A briefly trained base still improves with any further training: the recovered model is
    # also compared with the base trained the same steps unpruned.
    rows["recovered"]["delta_bpb_vs_continued"] = (
        rows["recovered"]["bits_per_byte"] - rows["continued"]["bits_per_byte"]
    )
    rows["continued"]["steps"] = recover
    rows["recovered"]["recover_steps"] = recover
    rows["recovered"]["recover_share"] = recover / cfg.train.steps
    rows["recovered"]["recover_data"] = args.recover_data
    rows["recovered"]["recover_kd"] = args.recover_kd

    x = torch.as_tensor(np.asarray(adapters["base"].validation()[0])[: args.length].astype(np.int64))[None]  # fmt: skip
    timed = {"base": adapters["base"].model.eval(), "pruned": adapters["pruned"].model.eval()}
    for model in timed.values():
        forward_seconds(model, x)  # warm-up
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {name: [] for name in timed}
    for r in range(args.repeats):
        for name in list(timed)[r % 2 :] + list(timed)[: r % 2]:
            seconds[name].append(forward_seconds(timed[name], x))
    load_after = os.getloadavg()[0]
    speedups = [a / b for a, b in zip(seconds["base"], seconds["pruned"], strict=True)]
    timing = {
        "length": args.length,
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": {name: statistics.median(s) for name, s in seconds.items()},
        "speedup_median_paired": statistics.median(speedups),
        "cpu": cpu_name(),
        "loadavg_1min_before_after": [load_before, load_after],
    }
    result: dict[str, Any] = {
        "config": str(args.config),
        "base_steps": cfg.train.steps,
        "heads_fraction": args.heads,
        "eval_tokens": len(ids),
        "rows": list(rows.values()),
        "forward": timing,
    }
    if args.smollm2:
        result["smollm2"] = smollm2(args, work)
    result["targets"] = {
        "delta_bpb_after_recovery<=": [0.02, rows["recovered"]["delta_bpb"],
                                       rows["recovered"]["delta_bpb"] <= 0.02],
        "delta_bpb_after_recovery_vs_continued<=": [
            0.02, rows["recovered"]["delta_bpb_vs_continued"],
            rows["recovered"]["delta_bpb_vs_continued"] <= 0.02],
        "recover_share<=": [0.05, rows["recovered"]["recover_share"],
                            rows["recovered"]["recover_share"] <= 0.05],
        "speedup>=": [1.15, timing["speedup_median_paired"],
                      timing["speedup_median_paired"] >= 1.15],
    }  # fmt: skip
    return result


def smollm2(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / "smollm2-pruned"
    if not out.exists():
        prune("smollm2", out, args.heads, batches=args.batches, seq_len=args.seq_len)
    base = open_model("smollm2")
    ids = held_ids(base, args.batches * args.seq_len + 1, args.smollm2_tokens)
    before = bits_per_byte(base, ids, args.smollm2_context)
    del base
    pruned = open_model(out)
    after = bits_per_byte(pruned, ids, args.smollm2_context)
    row = {"bits_per_byte": before, "pruned_bits_per_byte": after, "delta_bpb": after - before,
           "heads_after": pruned.meta["heads_after"], "eval_tokens": len(ids),
           "context": args.smollm2_context}  # fmt: skip
    print(f"smollm2: {before:.4f} -> {after:.4f} bits/byte", file=sys.stderr)
    return row


def print_table(result: dict[str, Any]) -> None:
    print(f"{'model':<10} {'heads':>6} {'params':>8} {'bits/byte':>9} {'Δbpb':>8} "
          f"{'vs continued':>12}")  # fmt: skip
    for row in result["rows"]:
        delta = f"{row['delta_bpb']:+.4f}" if "delta_bpb" in row else "-"
        vs = row.get("delta_bpb_vs_continued")
        print(f"{row['model']:<10} {sum(row['heads']):>6} {row['params']:>8,} "
              f"{row['bits_per_byte']:>9.4f} {delta:>8} "
              f"{'-' if vs is None else f'{vs:+.4f}':>12}")  # fmt: skip
    t = result["forward"]
    med = t["median_seconds"]
    print(f"forward at {t['length']} tokens, {t['threads']} thread(s), {t['repeats']} rounds: "
          f"base {med['base']:.3f} s, pruned {med['pruned']:.3f} s (medians), speed-up "
          f"{t['speedup_median_paired']:.2f}x (median of paired ratios); CPU {t['cpu']}; "
          f"load {t['loadavg_1min_before_after']}")  # fmt: skip
    if "smollm2" in result:
        s = result["smollm2"]
        print(f"smollm2: {s['bits_per_byte']:.4f} -> {s['pruned_bits_per_byte']:.4f} bits/byte "
              f"(Δ {s['delta_bpb']:+.4f}), heads {sum(s['heads_after'])}")  # fmt: skip
    for name, (target, got, met) in result["targets"].items():
        print(f"target {name} {target}: {got:.4f} {'met' if met else 'MISSED'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=Path("benchmarks/configs/extend-base.yaml"))
    p.add_argument("--steps", type=int, default=1000, help="Training steps of the base.")
    p.add_argument("--work", type=Path, default=Path("runs/prune-bench"))
    p.add_argument("--heads", type=float, default=0.25)
    p.add_argument("--recover-steps", type=int, default=None, help="Default: 5%% of --steps.")
    p.add_argument("--recover-lr", type=float, default=None)
    p.add_argument("--recover-data", default="corpus", help="mixture or corpus (the text alone).")
    p.add_argument(
        "--recover-kd",
        type=float,
        default=0.0,
        help="alpha of the unpruned model's soft targets in the recovery (and in the control's, "
        "distilled from itself); 0 = the text alone",
    )
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--context", type=int, default=128, help="Tokens per scored window.")
    p.add_argument("--length", type=int, default=4096, help="Tokens of the timed forward.")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smollm2", action="store_true")
    p.add_argument("--smollm2-tokens", type=int, default=8192)
    p.add_argument("--smollm2-context", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prune.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_result(args.out, "benchmarks/prune.py", args, torch.device("cpu"), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
