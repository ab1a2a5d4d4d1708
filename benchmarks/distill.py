"""Distillation from a long-context teacher into a windowed memory student (issue 21).

Three runs of the product's own commands, then one suite over each:

- the teacher: `memext train --config benchmarks/configs/distill-teacher.yaml` (full attention
  over 1,024 tokens, d128 x 4 layers; `--teacher-steps` trains it longer than its config's
  300 steps, so that its soft targets carry more than the students could learn alone);
- the CE student: `memext train --config benchmarks/configs/distill-student.yaml` (kNN memory,
  128-token segments, d64 x 2 layers), cross-entropy alone;
- the KD students: `memext distill --teacher TEACHER --student distill-student.yaml --alpha A
  --temperature T`, the same config and the same steps, with the teacher's soft targets, one run
  per `--kd A:T` (run `kd-aA-tT`);
- `memext eval RUN --suite benchmarks/configs/distill-suite.yaml` on each: bits-per-byte of
  held text at 1,024 tokens (the students read it in segments through their memory), passkey at
  4x and 8x the student's 128-token window.

The teacher and the CE student train side by side (two processes), then the KD students, two
at a time. Reports the gap each KD student closes, (bpb_CE - bpb_KD) / (bpb_CE - bpb_teacher),
and the students' passkey at 4x their window. A finished run is not trained again (and is
graded from its cached suite cells), so a sweep can add a --kd variant later.

    OMP_NUM_THREADS=1 python benchmarks/distill.py --runs runs/distill \\
        --kd 0.5:2 --kd 0.5:1 --out benchmarks/results/distill.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from memext import checkpoint as ckpt
from memext.runtime import command_line, provenance

# Relative to the repository root, where the benchmark runs: the commands it records are the
# ones a reader types there.
CONFIGS = Path("benchmarks/configs")
SUITE = CONFIGS / "distill-suite.yaml"
WINDOW = 128  # the student's segment: its attention window
CE_INIT = "ce-init"  # with --init: alpha 0 from the teacher's weights, the init's share alone


def finished(run: Path) -> bool:
    from memext.checkpoint import load_config, read_metrics

    if not (run / ckpt.WEIGHTS).is_file():
        return False
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    return bool(steps) and steps[-1] == load_config(run).train.total_steps


def kd_name(alpha: float, temperature: float) -> str:
    return f"kd-a{alpha:g}-t{temperature:g}"


def command(run: Path, args: argparse.Namespace) -> list[str]:
    """The command that trains ``run`` (its name says which)."""
    memext = [sys.executable, "-m", "memext"]
    if run.name == "teacher":
        steps = [] if args.teacher_steps is None else ["--set", f"train.steps={args.teacher_steps}"]
        return [*memext, "train", "--config", str(args.teacher_config), *steps]
    student = str(args.student)
    seed = [] if args.seed is None else ["--set", f"train.seed={args.seed}"]
    if run.name == "ce":
        return [*memext, "train", "--config", student, *seed]
    if run.name == CE_INIT:  # the teacher's weights without its soft targets
        alpha, temperature = 0.0, 1.0
    else:
        alpha, temperature = next(v for v in args.kd if kd_name(*v) == run.name)
    init = ["--init-from-teacher"] if args.init else []
    return [
        *memext, "distill", "--teacher", str(args.runs / "teacher"), "--student", student,
        "--alpha", f"{alpha:g}", "--temperature", f"{temperature:g}", *init, *seed,
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


def wait(proc: subprocess.Popen | None, run: Path, log: dict) -> None:
    """Wait for ``run``'s training; log the seconds its command reported (from its log)."""
    if proc is not None and proc.wait() != 0:
        raise SystemExit(f"{run.name} failed: see {run.parent / (run.name + '.log')}")
    found = re.findall(
        r"completed at step \d+ in (\d+)s", (run.parent / f"{run.name}.log").read_text()
    )
    log[run.name]["train_seconds"] = int(found[-1]) if found else None


def grade(run: Path) -> dict:
    out = run.parent / f"{run.name}-suite.json"
    cmd = [sys.executable, "-m", "memext", "eval", str(run), "--suite", str(SUITE), "--out",
           str(out), "--device", "cpu"]  # fmt: skip
    print("$ memext", " ".join(cmd[3:]), flush=True)
    if not out.is_file():  # a results file `memext eval` finished is read as it is
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    tasks = json.loads(out.read_text())["summary"]["tasks"]
    return {
        "bits_per_byte": tasks["bpb"]["by_length"],
        "passkey": tasks["passkey"]["by_length"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=Path, default=Path("runs/distill"))
    p.add_argument(
        "--kd",
        type=lambda v: tuple(float(x) for x in v.split(":")),
        action="append",
        help="ALPHA:TEMPERATURE of a KD student (repeatable; default 0.5:2)",
    )
    p.add_argument(
        "--teacher-config",
        type=Path,
        default=CONFIGS / "distill-teacher.yaml",
        help="the teacher's config (distill-teacher-curriculum.yaml: one that reads passkeys)",
    )
    p.add_argument(
        "--teacher-steps",
        type=int,
        help="the teacher's training steps (default: its config's); the students' stay equal",
    )
    p.add_argument(
        "--student",
        type=Path,
        default=CONFIGS / "distill-student.yaml",
        help="the students' config (CE and KD alike)",
    )
    p.add_argument(
        "--init",
        action="store_true",
        help="KD students start from the teacher's weights (DistilBERT's initialisation; the "
        "student must have the teacher's width); adds a run of that start with CE alone",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="the students' train.seed (default: their config's); the teacher is the same run",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/distill.json"))
    args = p.parse_args(argv)
    args.kd = args.kd or [(0.5, 2.0)]
    args.runs.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    students = [kd_name(*v) for v in args.kd] + ([CE_INIT] if args.init else [])
    runs = {name: args.runs / name for name in ("teacher", "ce", *students)}
    log: dict = {}
    teacher = start(runs["teacher"], args, log)
    ce = start(runs["ce"], args, log)
    wait(teacher, runs["teacher"], log)
    running = [("ce", ce)]
    for name in students:  # two processes at a time
        running.append((name, start(runs[name], args, log)))
        if len(running) == 2:
            done, proc = running.pop(0)
            wait(proc, runs[done], log)
    for done, proc in running:
        wait(proc, runs[done], log)
    scores = {name: grade(run) for name, run in runs.items()}
    length, probe = "1024", str(4 * WINDOW)
    bpb = {name: s["bits_per_byte"][length] for name, s in scores.items()}
    passkey = {name: s["passkey"][probe] for name, s in scores.items()}
    gap = bpb["ce"] - bpb["teacher"]
    closed = {n: (bpb["ce"] - bpb[n]) / gap if gap > 0 else None for n in students}
    result = {
        "command": command_line("benchmarks/distill.py", args, leave_out=("kd",))
        + "".join(f" --kd {a:g}:{t:g}" for a, t in args.kd),
        "runs": log,
        "suite": str(SUITE),
        "kd": {kd_name(*v): {"alpha": v[0], "temperature": v[1]} for v in args.kd},
        "student": str(args.student),
        "init_from_teacher": args.init,
        "scores": scores,
        "bits_per_byte_at": int(length),
        "gap_closed": closed,
        "passkey_at": int(probe),
        "targets": {
            n: {
                "gap_closed_at_least_0.4": closed[n] is not None and closed[n] >= 0.4,
                "kd_improves_passkey_at_4x_window": passkey[n] > passkey["ce"],
            }
            for n in students
        },
        "wall_seconds_of_this_call": round(time.perf_counter() - t0, 1),
        "provenance": provenance(torch.device("cpu")),
    }
    print(
        f"\n{'model':<14} {'bpb@' + length:>9} {'passkey@' + probe:>11} {'passkey@1024':>12} gap closed"
    )
    for name in runs:
        s, c = scores[name], closed.get(name)
        shown = "" if c is None else f"{c:+.3f}"
        print(
            f"{name:<14} {bpb[name]:>9.4f} {passkey[name]:>11.3f} "
            f"{s['passkey']['1024']:>12.3f} {shown}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
