"""Sharded checkpoints: weights and optimizer state written with ``torch.distributed.checkpoint``
(DCP), each rank writing its own shards, and read back at any world size.

DCP records every tensor's global shape and where each shard lies, so a checkpoint written by W
ranks loads into W' ranks (it reshards on read), into an unsharded model on several ranks, or
into one process without a process group (``load_weights``: eval, generate, extend). Parameters
and optimizer state are keyed by their names in the model (``get_state_dict``), which sharding
does not change, so every reader finds them.

Only what DCP writes is here; making a checkpoint one unit (the pending folder, the commit
marker, the renames) is ``memext.checkpoint``'s.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from memext.errors import MemextError

STEP = "step"  # saved beside the tensors, so a loader can check it against the training state


def _collective(sharded: bool) -> bool:
    # Unsharded models are read and written whole by each process alone: no collective, so
    # rank 0 may save while the others carry on, and one process needs no group at all.
    return sharded and dist.is_available() and dist.is_initialized()


def save(
    model: nn.Module, opt: torch.optim.Optimizer, path: Path, step: int, *, sharded: bool
) -> None:
    """Write ``model``'s weights and ``opt``'s state at ``step`` into the folder ``path``.
    ``sharded``: every rank calls this and writes its shards; otherwise one process writes all."""
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, STEP: step}
    try:
        with _quiet():
            dcp.save(state, checkpoint_id=str(path), no_dist=not _collective(sharded))
    except CheckpointException as e:
        # A BaseException wrapping each rank's error: raise the first (a full disk stays an
        # OSError, which memext.checkpoint reports as a storage error).
        raise _first(e) from None


def load(model: nn.Module, opt: torch.optim.Optimizer, path: Path, *, sharded: bool) -> int:
    """Read the checkpoint in ``path`` into ``model`` and ``opt`` (resharded to this world);
    returns its step. A foreign or damaged folder is a MemextError naming it."""
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, STEP: -1}
    _read(state, path, sharded)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state[STEP])


def load_weights(model: nn.Module, path: Path) -> int:
    """Read only the weights in ``path`` into an unsharded ``model``, in this process alone
    (no process group needed); returns the checkpoint's step."""
    state = {"model": model.state_dict(), STEP: -1}
    _read(state, path, sharded=False)
    model.load_state_dict(state["model"])
    return int(state[STEP])


def saved_step(path: Path) -> int:
    """The step of the checkpoint in ``path``, read from its metadata and one small item."""
    state = {STEP: -1}
    _read(state, path, sharded=False)
    return int(state[STEP])


def files(path: Path) -> list[Path]:
    """The files of the checkpoint in ``path`` (its identity: ``adapters`` fingerprints them)."""
    return sorted(p for p in path.iterdir() if p.is_file())


def _read(state: dict, path: Path, sharded: bool) -> None:
    if not (path / ".metadata").is_file():
        raise MemextError(f"{str(path)!r} is not a sharded checkpoint (no .metadata in it)")
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=not _collective(sharded))
    except (Exception, CheckpointException) as e:  # a missing key, a wrong shape, a short file
        # A CheckpointException (a BaseException, not an Exception) holds each failing rank's
        # (exception, traceback): show the first exception.
        cause = _first(e) if isinstance(e, CheckpointException) else e
        raise MemextError(
            f"{str(path)!r} is corrupt or holds another architecture than the run's config "
            f"describes ({type(cause).__name__}: {str(cause).strip()[:200]})"
        ) from None


def _first(e: CheckpointException) -> BaseException:
    """The first rank's own exception inside DCP's wrapper (each failure is (error, trace))."""
    failure = next(iter(e.failures.values()), None)
    return failure[0] if failure is not None else RuntimeError(str(e))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it assumes one process whenever no group exists, which is meant here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
