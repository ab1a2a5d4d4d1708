"""The main job's cost: wall time and peak memory of `memext train` (its embedded defaults) as a
whole process, with the report card it printed.

    python benchmarks/main_job.py                 # runs `memext train --out runs/bench/main-job`

Time it on a quiet machine: other processes on the same cores add time. The run directory is
replaced (`--overwrite`). Writes ``benchmarks/results/main_job.json``: the wall seconds, the peak RSS of the process and its children (the kernel's
accounting, as ``/usr/bin/time -v`` reports it) and the suite summaries of both readings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from memext.runtime import command_line, provenance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", type=Path, default=Path("runs/bench/main-job"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/main_job.json"))
    args = p.parse_args()
    cmd = [sys.executable, "-m", "memext", "train", "--out", str(args.run), "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    summary = {}
    for name in ("longctx", "longctx-no-memory"):
        path = args.run / "eval" / f"{name}.json"
        summary[name] = json.loads(path.read_text())["summary"]
    result = {
        "command": command_line("benchmarks/main_job.py", args),
        "what": "memext train (the tiny preset) as one process: training, both suites, report",
        "wall_seconds": round(wall, 1),
        "peak_rss_bytes": peak_kib * 1024,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "summary": summary,
        "provenance": provenance(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wall {wall:.0f} s, peak RSS {peak_kib / 2**20:.2f} GiB -> {args.out}")


if __name__ == "__main__":
    main()
