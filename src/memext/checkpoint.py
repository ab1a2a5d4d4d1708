"""Run directories: config, weights (safetensors) and training state, written atomically.

A run directory holds ``config.json``, ``model.safetensors``, ``train_state.pt`` (optimizer and
RNG state, loaded with ``weights_only=True``), ``metrics.jsonl`` and, when the tokenizer is not
the byte tokenizer, ``tokenizer.json``. A run trained with ``train.strategy=fsdp`` holds its
weights and optimizer state sharded instead, in the folder ``model.dcp/``
(``torch.distributed.checkpoint``; ``memext.dcp``), and its ``train_state.pt`` holds the
step and RNG state only; ``load`` reads it into one process.

A checkpoint (weights + training state) is one unit. ``save_checkpoint`` writes both files into
a pending folder, flushes them, then writes a commit marker; only then are they renamed into
place. ``recover`` (run when training starts or resumes) finishes a committed checkpoint that a
kill interrupted mid-rename, or drops an uncommitted one, so the pair at the top of the run
always belongs to one step. Readers of the weights alone never wait: every rename is atomic. (A
sharded checkpoint is a folder, which cannot be renamed over another: the old folder is renamed
aside first, so for a moment a reader finds none; ``recover`` completes the move after a kill.)
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from memext import dcp
from memext.config import Config
from memext.curriculum import stage_at
from memext.errors import MemextError, is_environmental, storage_error
from memext.io import atomic_write, atomic_write_text, fsync_dir, temp_files
from memext.model import build_model
from memext.nn.transformer import LongLM, State

STATE_FORMAT = "memext-state"

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
SHARDED = "model.dcp"  # a sharded checkpoint (train.strategy=fsdp): a folder DCP writes
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
TOKENIZER = "tokenizer.json"
RUN_INFO = "run.json"
EVAL = "eval.json"
PENDING = ".checkpoint-pending"  # the next checkpoint, until committed and moved into place
COMMIT = "COMMITTED"  # the pending checkpoint's commit marker: it names the step

# Every file memext writes at the top of a run directory, and the folders of suite results and
# reports it writes into; ``--overwrite`` removes these and nothing else.
TRAINER_FILES = (CONFIG, WEIGHTS, SHARDED, TRAIN_STATE, METRICS, TOKENIZER, RUN_INFO)
RUN_FILES = (*TRAINER_FILES, EVAL)
SUITE_DIR, REPORT_DIR = "eval", "report"
REPORT_FILES = ("report.html", "report.md")

# Called with the name of each point of a checkpoint save (tests kill the process there).
save_hook: Callable[[str], None] | None = None
KEPT = "the last complete checkpoint is kept"


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file() or (path / WEIGHTS).is_file() or (path / SHARDED).is_dir()


def is_memext_run(path: Path) -> bool:
    """A folder holding a memext config (Hugging Face model folders hold a config.json too)."""
    from memext.config import FORMAT

    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def foreign_files(path: Path) -> list[str]:
    """Files in ``path`` that a fresh run would write over although memext did not write them
    (``path`` holds no memext config, so nothing in it is a run's)."""
    return [name for name in RUN_FILES if (path / name).exists()]


def clear_run(path: Path) -> None:
    """Remove what memext wrote in the run directory ``path`` (its config must say it is a
    memext run), and only that: other files, and folders memext did not make, stay."""
    if not is_memext_run(path):
        raise MemextError(f"{str(path)!r} is not a memext run: it is not memext's to replace")
    try:
        for name in RUN_FILES:
            for p in (path / name, *temp_files(path / name)):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink(missing_ok=True)
        shutil.rmtree(path / PENDING, ignore_errors=True)
        shutil.rmtree(path / _ASIDE, ignore_errors=True)
        suite = path / SUITE_DIR
        if suite.is_dir():
            for p in suite.glob("*.cells.jsonl"):
                p.unlink()
            for p in suite.glob("*.json"):
                if _memext_json(p):
                    p.unlink()
            for p in suite.glob(".*.tmp"):
                p.unlink()
        report = path / REPORT_DIR
        if report.is_dir():
            for name in REPORT_FILES:
                for p in (report / name, *temp_files(report / name)):
                    p.unlink(missing_ok=True)
        for folder in (suite, report):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    except OSError as e:
        raise _storage(e, path, "clear the run in") from None


def _memext_json(path: Path) -> bool:
    """A JSON file memext wrote: an object whose ``format`` names memext."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith("memext")


def load_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MemextError(f"run directory {str(run_dir)!r} does not exist")
    if not (run_dir / CONFIG).is_file():
        raise MemextError(f"{str(run_dir)!r} is not a memext run: it has no {CONFIG}")
    try:
        return Config.load(run_dir / CONFIG)
    except ValueError as e:
        raise MemextError(f"cannot read the run's config: {e}") from None


def save_weights(model: LongLM, path: Path, metadata: dict[str, str]) -> None:
    atomic_write(path, lambda tmp: save_model(unwrap(model), tmp, metadata=metadata))


def weights_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _saved_step(path: Path) -> int:
    """The step a weights file was saved at; 0 when unreadable (``load_weights`` says why)."""
    try:
        if path.is_dir():
            return dcp.saved_step(path)
        return int(weights_metadata(path).get("step", 0))
    except Exception:
        return 0


def weights_path(run_dir: str | Path) -> Path:
    """Where a run's weights are: ``model.safetensors``, or the sharded ``model.dcp/`` of an
    fsdp run (``model.safetensors`` when neither exists, for the error that follows)."""
    run_dir = Path(run_dir)
    if not (run_dir / WEIGHTS).is_file() and (run_dir / SHARDED).is_dir():
        return run_dir / SHARDED
    return run_dir / WEIGHTS


def weights_files(run_dir: str | Path) -> list[Path]:
    """The files holding a run's weights (one, or a sharded checkpoint's), for fingerprints."""
    path = weights_path(run_dir)
    return dcp.files(path) if path.is_dir() else [path]


def load_weights(model: LongLM, path: Path) -> None:
    """Load weights into ``model`` from a safetensors file or a sharded checkpoint folder; any
    mismatch or corruption is a MemextError saying which."""
    if path.is_dir():
        dcp.load_weights(model, path)
        return
    if not path.is_file():
        raise MemextError(f"{str(path)!r} does not exist: the run has no weights yet")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise MemextError(f"{str(path)!r} is corrupt or not a safetensors file ({e})") from None
    # Tied weights are stored once, under the embedding's name.
    tied = model.head.weight is model.embed.weight
    expected = {k: v for k, v in model.state_dict().items() if not (tied and k == "head.weight")}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    )
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''}")
        if wrong:
            parts.append(f"shape {wrong[:3]}")
        raise MemextError(
            f"{str(path)!r} holds weights of another architecture than its config.json describes: "
            + "; ".join(parts)
        )
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name])


def load(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[LongLM, Config]:
    """Load a run's model (in eval mode) and its config."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    # A curriculum run's rotary scaling is that of the stage its last saved step belonged to.
    weights = weights_path(run_dir)
    model = build_model(stage_at(cfg, max(0, _saved_step(weights) - 1)).model, seed=None)
    load_weights(model, weights)
    # Models trained in segments read long input (and generate) the same way.
    model.segment_len = cfg.train.segment_len or None
    return model.to(device).eval(), cfg


def run_tokenizer(run_dir: str | Path):
    """The tokenizer a run was trained with (its own copy of a BPE tokenizer.json, if any)."""
    from memext.tokenizer import ByteTokenizer, load_tokenizer

    local = Path(run_dir) / TOKENIZER
    if local.is_file():
        return load_tokenizer(str(local))
    cfg = load_config(run_dir)
    return ByteTokenizer() if cfg.data.tokenizer == "byte" else load_tokenizer(cfg.data.tokenizer)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``. A torn last line (a kill or a full disk during an
    append) is left out; any other unreadable line is a MemextError naming the file and line."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MemextError(f"cannot read {str(path)!r}: {e}") from None
    lines = text.splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step", 0), int):
            rows.append(row)
        elif not (i == len(lines) - 1 and not text.endswith("\n")):
            raise MemextError(
                f"{str(path)!r} line {i + 1} is not a metrics row ({line[:40]!r}): the file is "
                "damaged; delete that line (or the file, losing the log) and retry"
            )
    return rows


# --- checkpoints: weights + training state as one unit ----------------------------------------


def save_checkpoint(run_dir: Path, model: torch.nn.Module, state: dict, step: int) -> None:
    """Write the weights and the training state of ``step`` as one unit (see the module doc).

    A failure to write (a full disk, a read-only folder) leaves the previous checkpoint in
    place and raises a StorageError that says so.
    """
    pending = run_dir / PENDING
    try:
        _finish_pending(run_dir)  # a committed checkpoint a kill left half-moved goes first
        _hook("start")
        shutil.rmtree(pending, ignore_errors=True)
        pending.mkdir()
        atomic_write(pending / TRAIN_STATE, lambda tmp: _torch_save(state, tmp))
        _hook("state-written")
        save_weights(model, pending / WEIGHTS, {"step": str(step)})
        _hook("weights-written")
        atomic_write_text(pending / COMMIT, json.dumps({"step": step}) + "\n")
        _hook("committed")
    except (OSError, RuntimeError, SafetensorError) as e:
        shutil.rmtree(pending, ignore_errors=True)
        cause = _storage(e, run_dir, f"save the checkpoint of step {step} in", KEPT)
        if cause is e:
            raise
        raise cause from None
    try:
        _move_into_place(run_dir)
    except OSError as e:  # committed: the next start finishes the move
        done = "it is complete, and the next start moves it into place"
        raise _storage(e, run_dir, f"save the checkpoint of step {step} in", done) from None


def save_sharded_checkpoint(
    run_dir: Path,
    write: Callable[[Path], None],
    state: dict,
    step: int,
    *,
    main: bool,
    barrier: Callable[[], None],
) -> None:
    """``save_checkpoint`` for a sharded checkpoint, called on every rank: ``write(folder)``
    writes the weights and optimizer state into ``folder`` (every rank its shards, DCP), and
    rank 0 (``main``) alone prepares the pending folder, writes the training state ``state``,
    commits and moves the unit into place. ``barrier`` waits for every rank."""
    pending = run_dir / PENDING
    try:
        if main:
            _finish_pending(run_dir)
            _hook("start")
            shutil.rmtree(pending, ignore_errors=True)
            pending.mkdir()
        barrier()  # the folder exists (and the last checkpoint is in place) before anyone writes
        write(pending / SHARDED)
        if not main:
            return
        _hook("weights-written")
        atomic_write(pending / TRAIN_STATE, lambda tmp: _torch_save(state, tmp))
        _hook("state-written")
        atomic_write_text(pending / COMMIT, json.dumps({"step": step}) + "\n")
        _hook("committed")
    except (OSError, RuntimeError) as e:
        if main:
            shutil.rmtree(pending, ignore_errors=True)
        cause = _storage(e, run_dir, f"save the checkpoint of step {step} in", KEPT)
        if cause is e:
            raise
        raise cause from None
    try:
        _move_into_place(run_dir)
    except OSError as e:  # committed: the next start finishes the move
        done = "it is complete, and the next start moves it into place"
        raise _storage(e, run_dir, f"save the checkpoint of step {step} in", done) from None


def recover(run_dir: Path) -> None:
    """Finish a checkpoint that was committed but not yet moved into place, drop one that was
    not committed, and remove temporary files a killed trainer left beside the run's files.
    Run when training starts on an existing run, never while another process writes to it."""
    _finish_pending(run_dir)
    for name in TRAINER_FILES:
        for p in temp_files(run_dir / name):
            p.unlink(missing_ok=True)


def _finish_pending(run_dir: Path) -> None:
    pending = run_dir / PENDING
    if (pending / COMMIT).is_file():
        _move_into_place(run_dir)
    elif pending.exists():
        shutil.rmtree(pending)


_ASIDE = ".model.dcp-old"  # the last sharded checkpoint, while the next one moves into place


def _move_into_place(run_dir: Path) -> None:
    pending = run_dir / PENDING
    for i, name in enumerate((TRAIN_STATE, WEIGHTS)):
        if (pending / name).is_file():
            os.replace(pending / name, run_dir / name)
        _hook(f"renamed-{i + 1}")
    if (pending / SHARDED).is_dir():
        # A folder cannot replace a folder in one rename: the old one goes aside first. A kill
        # in between leaves the committed pending folder, which the next start moves again.
        if (run_dir / SHARDED).is_dir():
            shutil.rmtree(run_dir / _ASIDE, ignore_errors=True)
            os.rename(run_dir / SHARDED, run_dir / _ASIDE)
            _hook("shards-aside")
        os.rename(pending / SHARDED, run_dir / SHARDED)
        (run_dir / WEIGHTS).unlink(missing_ok=True)  # a run that switched to fsdp on resume
        _hook("renamed-shards")
    elif (run_dir / WEIGHTS).is_file():
        shutil.rmtree(run_dir / SHARDED, ignore_errors=True)  # one that switched to ddp
    shutil.rmtree(run_dir / _ASIDE, ignore_errors=True)
    fsync_dir(run_dir)
    (pending / COMMIT).unlink()
    shutil.rmtree(pending)
    fsync_dir(run_dir)
    _hook("done")


def load_train_state(run_dir: Path) -> dict:
    """The training state of a run's checkpoint (optimizer, RNG, step), checked for its shape:
    anything else is a MemextError naming the file. A sharded checkpoint's state names
    ``model.dcp`` under ``weights`` and holds no optimizer (it is in the shards)."""
    path = run_dir / TRAIN_STATE
    if not path.is_file():
        raise MemextError(
            f"cannot resume: {str(path)!r} is missing (the weights have no training state)"
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # torch raises many types for a damaged or foreign file
        raise MemextError(f"cannot resume: {str(path)!r} is corrupt or foreign ({e})") from None
    ok = (
        isinstance(state, dict)
        and isinstance(state.get("step"), int)
        and state["step"] >= 0
        and (isinstance(state.get("optimizer"), dict) or state.get("weights") == SHARDED)
        and isinstance(state.get("torch_rng"), torch.Tensor)
    )
    if not ok:
        raise MemextError(
            f"cannot resume: {str(path)!r} is corrupt or foreign (not a memext training state "
            "with step, optimizer and torch_rng)"
        )
    return state


def _hook(point: str) -> None:
    if save_hook is not None:
        save_hook(point)


def _torch_save(obj: object, path: str) -> None:
    # Through a Python file object: a full disk then raises OSError(ENOSPC), where torch.save
    # given a path raises RuntimeError("unexpected pos ...").
    with open(path, "wb") as f:
        torch.save(obj, f)


def _storage(e: BaseException, path: Path, doing: str, then: str = "") -> BaseException:
    """``e`` as a StorageError about ``path`` when its cause is the machine (a StorageError
    about one file of it too); ``e`` itself otherwise."""
    code = getattr(e, "errno", None)
    if code is None:  # safetensors and torch name the OS error only in their message
        found = re.search(r"os error (\d+)", str(e))
        code = int(found.group(1)) if found else None
        if code is None and _disk_nearly_full(path):
            code = errno.ENOSPC
    os_error = OSError(code, os.strerror(code)) if code is not None else None
    if os_error is None or not is_environmental(os_error):
        return e
    return storage_error(os_error, path, doing, then)


def _disk_nearly_full(path: Path) -> bool:
    try:
        return shutil.disk_usage(path).free < 16 * 2**20
    except OSError:
        return False


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile's and DistributedDataParallel's wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, DistributedDataParallel):
            model = model.module
        else:
            return model


def save_state(state: State, path: str | Path, model_name: str = "") -> None:
    """Save where a model stands in a long input (position and memory) so it can resume later.

    The memory is a flat dict of tensors: one safetensors file, position in its metadata. KV
    caches are not saved (they can be rebuilt by re-reading); a state holding one is refused.
    """
    if state.cache is not None:
        raise MemextError("save_state saves memory, not KV caches: pass a state with cache=None")
    tensors = {k: v.detach().contiguous().cpu() for k, v in (state.memory or {}).items()}
    meta = {"format": STATE_FORMAT, "pos": str(state.pos), "memory": model_name}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(path: str | Path, device: str | torch.device = "cpu", model_name: str = "") -> State:
    """The State saved by ``save_state``; a foreign or corrupt file is a MemextError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MemextError(f"state file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), "pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise MemextError(f"{str(path)!r} is corrupt or not a safetensors file ({e})") from None
    if meta.get("format") != STATE_FORMAT:
        raise MemextError(f"{str(path)!r} is not a memext state file")
    if model_name and meta.get("memory") not in ("", model_name):
        raise MemextError(
            f"{str(path)!r} holds {meta['memory']!r} memory; this model uses {model_name!r}"
        )
    return State(pos=int(meta["pos"]), memory=tensors or None)
