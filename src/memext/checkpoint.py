"""Run directories: config, weights (safetensors) and training state, written atomically.

A run directory holds ``config.json``, ``model.safetensors``, ``train_state.pt`` (optimizer and
RNG state, loaded with ``weights_only=True``), ``metrics.jsonl`` and, when the tokenizer is not
the byte tokenizer, ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from memext.config import Config
from memext.curriculum import stage_at
from memext.errors import MemextError
from memext.io import atomic_write
from memext.model import build_model
from memext.nn.transformer import LongLM, State

STATE_FORMAT = "memext-state"

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"
TOKENIZER = "tokenizer.json"


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file() or (path / WEIGHTS).is_file()


def is_memext_run(path: Path) -> bool:
    """A folder holding a memext config (Hugging Face model folders hold a config.json too)."""
    from memext.config import FORMAT

    try:
        return json.loads((Path(path) / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


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
        return int(weights_metadata(path).get("step", 0))
    except Exception:
        return 0


def load_weights(model: LongLM, path: Path) -> None:
    """Load weights into ``model``; any mismatch or corruption is a MemextError saying which."""
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
    model = build_model(stage_at(cfg, max(0, _saved_step(run_dir / WEIGHTS) - 1)).model, seed=None)
    load_weights(model, run_dir / WEIGHTS)
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
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile wraps the module


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
