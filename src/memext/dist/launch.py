"""Joining the process group torchrun sets up, and the torchrun command ``--nproc`` executes.

torchrun (``python -m torch.distributed.run``) starts one process per rank and passes the
rendezvous through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``); ``join`` reads it. A process that torchrun did not start is a world of one,
with no process group at all, so single-process training runs exactly the code it ran before.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.rendezvous import rendezvous

from memext.errors import MemextError

# What torchrun sets for every worker; the elastic agent adds the restart count and the job's id.
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RESTART_VAR = "TORCHELASTIC_RESTART_COUNT"
JOB_VAR = "TORCHELASTIC_RUN_ID"


@dataclass
class World:
    """This process's place among the ranks of a job; a world of one when not launched."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owned: bool = False  # this process made the process group, so it also destroys it

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that logs, shows progress, evaluates and writes the run."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def leave(self) -> None:
        """Destroy the process group if ``join`` made it (a library caller's group stays)."""
        if self.owned and self.distributed:
            dist.destroy_process_group()
            self.owned = False


def launched() -> bool:
    """Whether torchrun (or another launcher that sets its variables) started this process."""
    return all(name in os.environ for name in RANK_VARS)


def backend_for(device: torch.device) -> str:
    """nccl between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def join(device: torch.device, timeout_s: float) -> World:
    """This process's ``World``: the process group already made by the caller, the one torchrun
    describes (made here, with ``timeout_s`` for every collective), or a world of one.

    On CUDA each rank takes the GPU of its local rank."""
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return World(device=device)
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise MemextError(
                f"local rank {local} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node (--nproc)"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise MemextError(f"distributed training runs on CUDA or CPU, not on {device.type}")
    owned = False
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun's store outlives an elastic restart and still holds the last attempt's
        # addresses: a restarted rank could read a dead peer's and fail ("Connection refused",
        # seen with gloo in torch 2.13). Each attempt's keys get their own prefix.
        store, rank, size = next(rendezvous("env://", timeout=timeout))
        store = dist.PrefixStore(f"memext/attempt-{restart_count()}", store)
        dist.init_process_group(
            backend_for(device),
            store=store,
            rank=rank,
            world_size=size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
        )
        owned = True
    return World(dist.get_rank(), dist.get_world_size(), local, device, owned)


def rank_seed(seed: int, rank: int) -> int:
    """The RNG seed of ``rank`` in a job seeded ``seed``: each rank draws its own dropout masks."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def restart_count() -> int:
    """How many times torchrun's elastic agent has restarted this job's workers (0: first try)."""
    return int(os.environ.get(RESTART_VAR, "0") or 0)


def job_id() -> str | None:
    """The id torchrun gave this job (its rendezvous id), the same on every rank and restart."""
    return os.environ.get(JOB_VAR) or None


def torchrun_command(nproc: int, max_restarts: int, args: Sequence[str]) -> list[str]:
    """The command ``memext train --nproc N`` executes: torchrun, on this node, with ``nproc``
    workers each running ``memext ARGS`` (``ARGS`` without ``--nproc`` and ``--max-restarts``).

    ``--standalone`` lets torchrun pick a free port on this machine, so two jobs never share
    one; torchrun is run as ``python -m torch.distributed.run`` with this interpreter, so the
    workers see the same environment as this process."""
    if nproc < 1:
        raise MemextError(f"--nproc {nproc} is invalid: expected a number of processes >= 1")
    if max_restarts < 0:
        raise MemextError(f"--max-restarts {max_restarts} is invalid: expected a number >= 0")
    if launched():
        raise MemextError(
            "--nproc starts torchrun, but this process already runs under torchrun: leave "
            "out --nproc"
        )
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--max-restarts={max_restarts}",
        "-m",
        "memext",
        *args,
    ]


def exec_torchrun(nproc: int, max_restarts: int, out: Path | None) -> NoReturn:
    """Replace this process (``memext train --nproc N ...``) by torchrun running the same
    command on ``nproc`` ranks. ``out``: the run directory this process chose by default (its
    name holds the time), passed on so that every rank and restart uses the same one."""
    args = strip_options(sys.argv[1:], ("--nproc", "--max-restarts"))
    if out is not None:
        args += ["--out", str(out)]
    command = torchrun_command(nproc, max_restarts, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


def strip_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """``argv`` without the options ``names`` and their values (``--x V`` or ``--x=V``)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(f"{name}=") for name in names):
            kept.append(arg)
    return kept
