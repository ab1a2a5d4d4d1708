"""A rank of the distributed tests: torchrun starts this script, which trains through the library
(``memext.train.train``) with what the command line that tests cannot pass to ``memext train``:
a stop at a step, a rank that kills itself, and the bytes each rank holds.

    torchrun --nproc-per-node 2 tests/dist_worker.py OUT SETTINGS.json [--resume]
        [--stop-at N] [--kill-rank R --kill-at N] [--bytes FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import torch.distributed as dist

from memext import Config
from memext.dist.launch import restart_count
from memext.dist.strategy import held_bytes
from memext.train import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("settings", type=Path, help="a JSON object of SECTION.FIELD: VALUE")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-at", type=int, default=0, help="stop (and save) after this step")
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-at", type=int, default=0, help="SIGKILL --kill-rank after this step")
    ap.add_argument("--bytes", type=Path, help="write each rank's held bytes here (rank in name)")
    args = ap.parse_args()
    cfg = Config.preset("tiny").override(json.loads(args.settings.read_text()))

    def callback(loop) -> None:
        rank = dist.get_rank() if dist.is_initialized() else 0
        if args.bytes and loop.step == 1:  # after a step: the optimizer state exists
            opt_bytes = held_bytes(loop.model, loop.opt)
            path = args.bytes.with_name(f"{args.bytes.name}.{rank}")
            path.write_text(json.dumps(opt_bytes))
        # Killed on the first try only, so an elastic restart (--max-restarts) can finish.
        if rank == args.kill_rank and loop.step == args.kill_at and restart_count() == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.stop_at and loop.step == args.stop_at:
            loop.stop_requested = True

    train(cfg, args.out, resume=args.resume, progress=False, callback=callback)


if __name__ == "__main__":
    main()
