"""What the training loop does differently on several ranks (torchrun): joining the group,
refusing a batch that does not split, elastic restarts, agreeing to stop, and turning a lost
rank or torchrun's stop signal into one clear line.

The data-parallel mechanics (DDP, FSDP2, each rank's rows, sharded checkpoints) are in
``memext.dist``; this module is the trainer's side of them.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from memext import checkpoint as ckpt
from memext.config import Config
from memext.curriculum import stages
from memext.data.sampling import per_rank
from memext.dist.launch import World, job_id, rank_seed, restart_count
from memext.dist.strategy import Strategy
from memext.errors import MemextError

# Substrings of the errors a collective raises when another rank is gone (gloo raises a plain
# RuntimeError; NCCL and the c10d store raise torch.distributed.DistError subclasses).
_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "timed out",
    "Timed out",
    "NCCL",
)


class JobStopped(MemextError):
    """Another rank failed (or torchrun stopped the job); the last checkpoint is kept."""


def check_split(cfg: Config, ranks: int) -> None:
    """Every batch of the run (each curriculum stage's, each mixture source's) splits evenly
    over ``ranks`` data-parallel ranks; checked before anything is written."""
    if ranks == 1:
        return
    for stage in stages(cfg):
        per_rank(stage.batch_size, ranks, f"curriculum stage {stage.index}'s train.batch_size")
    for i, src in enumerate(cfg.data.mixture):
        if src.batch_size:
            per_rank(src.batch_size, ranks, f"data.mixture source {i}'s batch_size")


def describe_batch(cfg: Config, ranks: int, context: int = 1) -> str:
    """The printed line: global batch = per-rank batch x ranks x accumulation. ``ranks``: the
    data-parallel ranks; ``context``: the ranks of a context group, which share a rank's rows
    and split each sequence."""
    t = cfg.train
    rows = t.batch_size // ranks
    total = f"{rows * ranks * t.grad_accum} sequences of {t.seq_len} tokens per step"
    if context == 1:
        return (
            f"global batch: {rows} sequences per rank x {ranks} rank{'s' if ranks > 1 else ''} "
            f"x {t.grad_accum} accumulation = {total}"
        )
    return (
        f"global batch: {rows} sequences per replica x {ranks} "
        f"replica{'s' if ranks > 1 else ''} x {t.grad_accum} accumulation = {total}; each "
        f"sequence split over {context} context-parallel ranks ({t.seq_len // context} tokens "
        f"each, train.cp_method={t.cp_method})"
    )


def elastic_start(run_dir: Path, resume: bool, overwrite: bool, log: Callable) -> tuple[bool, bool]:
    """``(resume, overwrite)`` for this start. When torchrun's elastic agent restarts the job
    (``--max-restarts``), the command is the first try's, but the run directory already holds
    what that try wrote: continue from its last checkpoint (or start again if it saved none).
    Only a run this job wrote is taken over (its ``run.json`` names the job's id)."""
    job = job_id()
    if restart_count() == 0 or resume or job is None or not ckpt.is_memext_run(run_dir):
        return resume, overwrite
    from memext.train.run_dir import read_run_info

    if read_run_info(run_dir).get("job") != job:
        return resume, overwrite
    if (run_dir / ckpt.TRAIN_STATE).is_file():
        log(f"restart {restart_count()}: resuming {run_dir} from its last checkpoint")
        return True, False
    log(f"restart {restart_count()}: {run_dir} has no checkpoint yet; starting again")
    return False, True


def agree(strategy: Strategy, flag: bool) -> bool:
    """Whether any rank raised ``flag`` (a stop request: all ranks stop at the same step)."""
    if strategy.world.size == 1:
        return flag
    return strategy.mean([float(flag)])[0] > 0


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another rank is gone or hung."""
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in _LOST)
    )


@contextlib.contextmanager
def stop_cleanly(world: World, where: Callable[[], str]) -> Iterator[None]:
    """On several ranks: a lost rank or torchrun's SIGTERM (sent to every rank when one fails)
    ends this rank with one ``JobStopped`` line naming this rank and ``where()`` (the step and
    the checkpoint kept). Checkpoints are written as units, so stopping anywhere is safe."""
    if world.size == 1:
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise JobStopped(
            f"rank {world.rank}: stopped by SIGTERM {where()}: torchrun stops every rank when "
            "one fails (its report names that rank), or the job was cancelled"
        )

    from memext.train.run_dir import on_main_thread

    previous = signal.signal(signal.SIGTERM, on_term) if on_main_thread() else None
    try:
        yield
    except (RuntimeError, dist.DistError) as e:
        if not lost_peer(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise JobStopped(
            f"rank {world.rank}: lost contact with another rank {where()} ({first}); "
            "torchrun's report names the rank that failed"
        ) from None
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def seed_rank(seed: int, world: World) -> None:
    """Give each rank its own RNG stream (one process keeps the stream it always had)."""
    if world.size > 1:
        torch.manual_seed(rank_seed(seed, world.rank))
