"""Distillation from a long-context teacher into a windowed memory student (issue 21).

Three runs of the product's own commands, then one suite over each:

- the teacher: `memext train --config benchmarks/configs/distill-teacher.yaml` (full attention
  over 1,024 tokens, d128 x 4 layers);
- the CE student: `memext train --config benchmarks/configs/distill-student.yaml` (kNN memory,
  128-token segments, d64 x 2 layers), cross-entropy alone;
- the KD student: `memext distill --teacher TEACHER --student distill-student.yaml`, the same
  config and the same steps, with the teacher's soft targets;
- `memext eval RUN --suite benchmarks/configs/distill-suite.yaml` on each: bits-per-byte of
  held text at 1,024 tokens (the students read it in segments through their memory), passkey at
  4x and 8x the student's 128-token window.

The teacher and the CE student train side by side (two processes), then the KD student.
Reports the gap the KD student closes, (bpb_CE - bpb_KD) / (bpb_CE - bpb_teacher), and the
students' passkey at 4x their window. A finished run is not trained again.

    OMP_NUM_THREADS=1 python benchmarks/distill.py --runs runs/distill \\
        --out benchmarks/results/distill.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from memext import checkpoint as ckpt
from memext.runtime import command_line, provenance

# Relative to the repository root, where the benchmark runs: the commands it records are the
# ones a reader types there.
CONFIGS = Path("benchmarks/configs")
SUITE = CONFIGS / "distill-suite.yaml"
WINDOW = 128  # the student's segment: its attention window


def finished(run: Path) -> bool:
    from memext.checkpoint import load_config, read_metrics

    if not (run / ckpt.WEIGHTS).is_file():
        return False
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    return bool(steps) and steps[-1] == load_config(run).train.total_steps


def command(run: Path, args: argparse.Namespace) -> list[str]:
    """The command that trains ``run`` (its name says which)."""
    memext = [sys.executable, "-m", "memext"]
    if run.name == "teacher":
        return [*memext, "train", "--config", str(CONFIGS / "distill-teacher.yaml")]
    student = str(CONFIGS / "distill-student.yaml")
    if run.name == "ce":
        return [*memext, "train", "--config", student]
    return [
        *memext, "distill", "--teacher", str(args.runs / "teacher"), "--student", student,
        "--alpha", str(args.alpha), "--temperature", str(args.temperature),
    ]  # fmt: skip


def start(run: Path, args: argparse.Namespace, log: dict) -> subprocess.Popen | None:
    """Start training ``run`` unless it is finished; its command is logged either way."""
    cmd = [*command(run, args), "--out", str(run), "--no-eval", "--device", "cpu"]
    log[run.name] = {"command": "memext " + " ".join(cmd[3:])}
    if finished(run):
        return None
    if (run / ckpt.WEIGHTS).is_file():  # an interrupted benchmark continues its runs
        cmd = [*cmd[:4], "--resume", str(run), "--no-eval", "--device", "cpu"]
        log[run.name]["resumed"] = True
    out = open(run.parent / f"{run.name}.log", "w")  # noqa: SIM115  closed with the process
    print("$ memext", " ".join(cmd[3:]), flush=True)
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen | None, run: Path, log: dict, t0: float) -> None:
    if proc is None:
        return
    if proc.wait() != 0:
        raise SystemExit(f"{run.name} failed: see {run.parent / (run.name + '.log')}")
    log[run.name]["train_seconds"] = round(time.perf_counter() - t0, 1)


def grade(run: Path) -> dict:
    out = run.parent / f"{run.name}-suite.json"
    cmd = [sys.executable, "-m", "memext", "eval", str(run), "--suite", str(SUITE), "--out",
           str(out), "--device", "cpu"]  # fmt: skip
    print("$ memext", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    tasks = json.loads(out.read_text())["summary"]["tasks"]
    return {
        "bits_per_byte": tasks["bpb"]["by_length"],
        "passkey": tasks["passkey"]["by_length"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/distill"))
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/distill.json"))
    args = p.parse_args()
    args.runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    runs = {name: args.runs / name for name in ("teacher", "ce", "kd")}
    log: dict = {}
    teacher = start(runs["teacher"], args, log)
    ce = start(runs["ce"], args, log)
    wait(teacher, runs["teacher"], log, t0)
    kd = start(runs["kd"], args, log)
    wait(ce, runs["ce"], log, t0)
    wait(kd, runs["kd"], log, t0)
    scores = {name: grade(run) for name, run in runs.items()}
    length, probe = "1024", str(4 * WINDOW)
    bpb = {name: s["bits_per_byte"][length] for name, s in scores.items()}
    gap = bpb["ce"] - bpb["teacher"]
    closed = (bpb["ce"] - bpb["kd"]) / gap if gap > 0 else None
    passkey = {name: s["passkey"][probe] for name, s in scores.items()}
    result = {
        "command": command_line(),
        "runs": log,
        "suite": str(SUITE),
        "alpha": args.alpha,
        "temperature": args.temperature,
        "scores": scores,
        "bits_per_byte_at": int(length),
        "gap_closed": closed,
        "passkey_at": int(probe),
        "targets": {
            "gap_closed_at_least_0.4": closed is not None and closed >= 0.4,
            "kd_improves_passkey_at_4x_window": passkey["kd"] > passkey["ce"],
        },
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "provenance": provenance("cpu"),
    }
    print(f"\n{'model':<10} {'bpb@' + length:>10} {'passkey@' + probe:>12} {'passkey@1024':>13}")
    for name in runs:
        s = scores[name]
        print(f"{name:<10} {bpb[name]:>10.4f} {passkey[name]:>12.3f} {s['passkey']['1024']:>13.3f}")
    print(f"gap closed by KD: {closed if closed is None else f'{closed:.3f}'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
