"""The run directory a training writes: checked before anything is written, then committed
checkpoint by checkpoint.

``check_run_dir`` refuses a folder this start may not use and writes nothing; ``make_run_dir``
makes it. ``commit_checkpoint`` saves weights, optimizer and RNG state as one unit (through
``memext.checkpoint``), never weights that hold NaN or inf, and ``restore_checkpoint`` reads
them back for a resumed run, with its run info, its own tokenizer and its metrics log cut to
the checkpoint.

On several ranks (``memext.dist``) every rank calls both. With ``train.strategy=ddp`` rank 0
writes the one weights file, as a single process does; with ``fsdp`` every rank writes its
shards (``memext.dcp``) and rank 0 commits them. Each rank's RNG state is saved; a run
resumed at another world size reads the same weights, optimizer state and global batches.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from memext import checkpoint as ckpt
from memext import dcp
from memext.config import Config
from memext.dist.launch import World, rank_seed
from memext.dist.strategy import Strategy
from memext.errors import MemextError
from memext.io import atomic_write_text
from memext.tokenizer import load_tokenizer

RUN_INFO = ckpt.RUN_INFO


class TrainingDiverged(MemextError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory this start may not use; writes nothing.

    A fresh start needs a new or empty folder, or one without memext's file names in it;
    ``overwrite`` also accepts a memext run (its config says so) and replaces only the files
    memext wrote there. A folder holding someone else's ``config.json`` (a Hugging Face model,
    a project) is never replaced.
    """
    if resume and overwrite:
        raise MemextError("--resume and --overwrite contradict each other; choose one")
    if resume:
        if not (out / ckpt.CONFIG).is_file():
            raise MemextError(f"cannot resume: {str(out)!r} is not a memext run (no {ckpt.CONFIG})")
        if not ckpt.is_memext_run(out):
            raise MemextError(f"cannot resume: {str(out / ckpt.CONFIG)!r} is not a memext config")
        return
    if out.exists() and not out.is_dir():
        raise MemextError(f"output path {str(out)!r} exists and is not a directory")
    if not out.is_dir():
        return
    if ckpt.is_memext_run(out):
        if not overwrite:
            raise MemextError(
                f"{str(out)!r} already holds a run; pass --resume to continue it or "
                "--overwrite to replace it"
            )
        return
    foreign = ckpt.foreign_files(out)
    if foreign:
        raise MemextError(
            f"{str(out)!r} is not a memext run but holds {', '.join(foreign)}, which memext did "
            "not write: memext replaces only its own runs (--overwrite included); choose "
            "another --out"
        )


def make_run_dir(out: Path, overwrite: bool) -> None:
    """Create the run directory checked by ``check_run_dir``; with ``overwrite``, first remove
    the files an earlier memext run wrote there (and nothing else)."""
    if overwrite and ckpt.is_memext_run(out):
        ckpt.clear_run(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _storage_error(e, out) from None


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """``check_run_dir`` then, unless resuming, ``make_run_dir``."""
    check_run_dir(out, resume, overwrite)
    if not resume:
        make_run_dir(out, overwrite)


def _storage_error(e: OSError, path: Path) -> OSError:
    from memext.errors import is_environmental, storage_error

    return storage_error(e, path, "create") if is_environmental(e) else e


def commit_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    strategy: Strategy | None = None,
) -> None:
    """Save ``model``'s weights, ``opt``'s state and the RNG state at ``step`` as one unit
    (``memext.checkpoint.save_checkpoint``), with Ctrl-C held off while it is written.
    ``strategy``: the data parallelism; every rank calls this, and its ``name`` decides the
    format (``fsdp``: sharded, ``model.dcp``)."""
    world = strategy.world if strategy is not None else World()
    # A non-finite step is never taken, so this holds; checked so a checkpoint never holds one.
    bad = [n for n, p in ckpt.unwrap(model).named_parameters() if not _finite(p)]
    if world.size > 1 and strategy is not None:  # a shard is checked by its rank: all agree
        bad = bad or (["a shard on another rank"] if strategy.mean([float(bool(bad))])[0] else [])
    if bad:
        raise TrainingDiverged(
            f"the weights hold NaN or inf at step {step} ({bad[0]}): not saved; the last good "
            f"checkpoint in {run_dir} is kept: lower train.lr or raise train.warmup_steps"
        )
    state: dict = {"step": step, "torch_rng": torch.get_rng_state()}
    if world.size > 1:  # each rank's generators, so dropout resumes exactly at the same size
        rngs: list = [None] * world.size
        dist.all_gather_object(rngs, _rank_rng(world))
        state["rank_rng"] = rngs
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    sharded = strategy is not None and strategy.name == "fsdp"
    # Ignore Ctrl-C while the checkpoint is written (a kill is handled by ckpt.recover).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if on_main_thread() else None
    try:
        if sharded:
            assert strategy is not None
            state["weights"] = ckpt.SHARDED

            def write(folder: Path) -> None:
                dcp.save(model, opt, folder, step, sharded=strategy.sharded)

            ckpt.save_sharded_checkpoint(
                run_dir, write, state, step, main=world.main, barrier=world.barrier
            )
        elif world.main:
            state["optimizer"] = opt.state_dict()
            ckpt.save_checkpoint(run_dir, model, state, step)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _finite(p: torch.Tensor) -> bool:
    local = p.to_local() if hasattr(p, "to_local") else p  # a shard: this rank's part
    return bool(torch.isfinite(local).all())


def restore_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    strategy: Strategy | None = None,
    log: Callable[[str], None] = print,
) -> int:
    """Load the run's checkpoint into ``model`` and ``opt`` and set the RNG; returns its step.
    Reads only: a refusal leaves the run as it was. ``strategy``: how ``model`` is spread over
    the ranks (a sharded checkpoint is read at any world size, into a sharded model or not)."""
    weights = ckpt.weights_path(run_dir)
    if not weights.exists():
        raise MemextError(
            f"cannot resume: {str(weights)!r} is missing, so {str(run_dir)!r} has no checkpoint "
            "to continue from (a run stopped before its first save?); start it again with "
            "--overwrite"
        )
    state = ckpt.load_train_state(run_dir)
    if state.get("weights") == ckpt.SHARDED:
        step = _restore_sharded(run_dir, model, opt, state, strategy)
    else:
        if strategy is not None and strategy.sharded:
            raise MemextError(
                f"cannot resume {str(run_dir)!r} with train.strategy=fsdp on several ranks: it "
                "was saved with train.strategy=ddp (one model.safetensors); resume it with ddp"
            )
        step = _restore_whole(run_dir, model, opt, state)
    _restore_rng(state, strategy.world if strategy is not None else World(), log)
    return step


def _restore_sharded(
    run_dir: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    state: dict,
    strategy: Strategy | None,
) -> int:
    path = run_dir / ckpt.SHARDED
    if not path.is_dir():
        raise MemextError(
            f"cannot resume: {str(path)!r} is missing, so {str(run_dir)!r} has no checkpoint "
            "to continue from; start it again with --overwrite"
        )
    saved = dcp.load(model, opt, path, sharded=strategy is not None and strategy.sharded)
    if saved != state["step"]:
        raise MemextError(
            f"cannot resume: weights (step {saved}) and training state (step {state['step']}) "
            "disagree"
        )
    return saved


def _restore_rng(state: dict, world: World, log: Callable[[str], None]) -> None:
    """Each rank's generator as saved; at another world size, a fresh stream per rank (only
    dropout draws from it: with model.dropout=0 the run continues exactly)."""
    rngs = state.get("rank_rng")
    if rngs is None:  # saved by one process
        rngs = [{"cpu": state["torch_rng"]}]
    if len(rngs) == world.size:
        torch.set_rng_state(rngs[world.rank]["cpu"])
        if rngs[world.rank].get("cuda") is not None and world.device.type == "cuda":
            torch.cuda.set_rng_state(rngs[world.rank]["cuda"], world.device)
    else:
        torch.manual_seed(rank_seed(state["step"], world.rank))
        log(
            f"note: the checkpoint was saved by {len(rngs)} ranks and resumes on {world.size}: "
            "dropout masks will differ from an uninterrupted run (nothing else does)"
        )
    if "cuda_rng" in state and torch.cuda.is_available() and world.size == 1:
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def _rank_rng(world: World) -> dict[str, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(world.device) if world.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _restore_whole(
    run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict
) -> int:
    weights = run_dir / ckpt.WEIGHTS
    if not weights.is_file():
        raise MemextError(
            f"cannot resume: {str(weights)!r} is missing, so {str(run_dir)!r} has no checkpoint "
            "to continue from (a run stopped before its first save?); start it again with "
            "--overwrite"
        )
    ckpt.load_weights(model, weights)
    path = run_dir / ckpt.TRAIN_STATE
    try:
        opt.load_state_dict(state["optimizer"])
    except Exception as e:
        raise MemextError(f"cannot resume: {str(path)!r} is corrupt or foreign ({e})") from None
    step = state["step"]
    saved = ckpt.weights_metadata(weights).get("step")
    if saved != str(step):
        raise MemextError(
            f"cannot resume: weights (step {saved}) and training state (step {step}) disagree"
        )
    return step


def on_main_thread() -> bool:
    """Whether signal handlers can be set here (Python allows it on the main thread only)."""
    return threading.current_thread() is threading.main_thread()


def append_metrics(run_dir: Path, rows: list[dict]) -> None:
    """Append ``rows`` to ``metrics.jsonl``; called just before each checkpoint commit."""
    path = run_dir / ckpt.METRICS
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows))
    except OSError as e:
        from memext.errors import is_environmental, storage_error

        if is_environmental(e):
            raise storage_error(e, path, "write", "the last complete checkpoint is kept") from None
        raise


def read_run_info(run_dir: Path) -> dict:
    """The ``run.json`` of a run being resumed; {} when it has none."""
    path = run_dir / RUN_INFO
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MemextError(f"cannot resume: {str(path)!r} is unreadable ({e})") from None
    if not isinstance(info, dict):
        raise MemextError(f"cannot resume: {str(path)!r} does not hold a JSON object")
    return info


def run_tokenizer(cfg: Config, run_dir: Path, log: Callable[[str], None]):
    """The tokenizer a resumed run continues with: its own copy of a BPE file, never the file
    the config names (which may have changed since)."""
    if cfg.data.tokenizer == "byte":
        return load_tokenizer("byte")
    local = run_dir / ckpt.TOKENIZER
    if not local.is_file():
        raise MemextError(
            f"cannot resume: the run's copy of its tokenizer, {str(local)!r}, is missing"
        )
    source = Path(cfg.data.tokenizer)
    moved = source.resolve() != local.resolve() and source.is_file()
    if moved and source.read_bytes() != local.read_bytes():
        log(f"note: {source} changed since the run started; resuming with the run's own copy")
    return load_tokenizer(str(local))


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop lines logged after the checkpoint being resumed, so the log reads as one run."""
    rows = [r for r in ckpt.read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(run_dir / ckpt.METRICS, "".join(json.dumps(r) + "\n" for r in rows))
