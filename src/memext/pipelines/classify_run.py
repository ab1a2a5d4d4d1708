"""A classifier's run directory: made empty, written complete, read back and checked.

The directory holds ``classifier.json`` (config, label names, the encoder's identity, written
last, so a folder that has it is complete), ``head.safetensors``, ``encoder.safetensors`` (only
when the encoder was fine-tuned) and ``metrics.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from memext.errors import MemextError
from memext.io import atomic_write, atomic_write_text
from memext.pipelines.classify_config import ClassifierConfig
from memext.pipelines.classify_model import Classifier, build_head, open_encoder

FORMAT = "memext-classifier"
CLASSIFIER = "classifier.json"
HEAD = "head.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"
METRICS = "metrics.jsonl"


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Make ``out_dir`` an empty run directory, refusing one that holds anything but a
    classifier run (and that one unless ``overwrite``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise MemextError(f"{str(out_dir)!r} is a file, not a run directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (overwrite and (out_dir / CLASSIFIER).is_file()):
            what = "a classifier run" if (out_dir / CLASSIFIER).is_file() else "other files"
            raise MemextError(
                f"{str(out_dir)!r} already holds {what}; choose a new directory"
                + (" or pass overwrite=True (--overwrite)" if what == "a classifier run" else "")
            )
        # classifier.json first: a run stopped halfway must not look complete
        for name in (CLASSIFIER, HEAD, ENCODER_WEIGHTS, METRICS):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def save_run(clf: Classifier, out_dir: Path) -> None:
    """Write ``clf``'s weights, then ``classifier.json`` (last: it marks the run complete)."""
    from safetensors.torch import save_model

    meta = {"format": FORMAT}
    atomic_write(out_dir / HEAD, lambda tmp: save_model(clf.head, tmp, meta, True))
    if not clf.cfg.frozen:
        atomic_write(
            out_dir / ENCODER_WEIGHTS, lambda tmp: save_model(clf.encoder.model, tmp, meta, True)
        )
    enc = clf.encoder
    info = {
        "format": FORMAT,
        "version": 1,
        "config": clf.cfg.to_dict(),
        "labels": clf.labels,
        "encoder": {
            "name": enc.name,
            "path": str(enc.path.resolve()),
            "fingerprint": enc.fingerprint,
            "dim": enc.dim,
            "max_tokens": enc.max_tokens,
        },
    }
    atomic_write_text(out_dir / CLASSIFIER, json.dumps(info, indent=2) + "\n")


def load_classifier(
    run_dir: str | Path,
    *,
    encoder: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    cache: bool = True,
) -> Classifier:
    """Load a classifier run (in eval mode).

    Args:
        run_dir: the directory ``train_classifier`` wrote.
        encoder: the encoder folder, when it is no longer where the run was trained; it must
            hold the very same files (same fingerprint).
        device, progress, cache: as in ``train_classifier``.

    Raises:
        MemextError: the directory is missing or not a classifier run, a file is corrupt or
            does not match the config, or the encoder is not the one the run was trained on.
    """
    run_dir = Path(run_dir)
    info = _read_info(run_dir)
    try:
        cfg = ClassifierConfig.from_dict(info["config"])
        labels = info["labels"]
        identity = info["encoder"]
        name, fingerprint, trained_path = (identity[k] for k in ("name", "fingerprint", "path"))
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError("labels must be a list of strings")
    except (KeyError, TypeError, ValueError) as e:
        raise MemextError(f"{run_dir / CLASSIFIER} is corrupt: {e}") from None
    path = encoder if encoder is not None else (None if cfg.encoder is None else trained_path)
    try:
        enc = open_encoder(cfg, path, progress=progress, cache=cache, device=device)
    except MemextError as e:
        raise MemextError(
            f"{e}; {run_dir} was trained on {name!r} from {trained_path}: pass encoder= "
            "(--encoder) the folder that holds it now"
        ) from None
    if enc.fingerprint != fingerprint:
        raise MemextError(
            f"{run_dir} was trained on encoder {name!r} ({fingerprint[:12]}), but {enc.path} "
            f"holds another model ({enc.fingerprint[:12]}): its embeddings would mean nothing "
            "to this head; pass the folder of the encoder the run was trained on"
        )
    head = build_head(cfg, enc.dim, len(labels))
    _load_weights(head, run_dir / HEAD)
    if not cfg.frozen:
        _load_weights(enc.model, run_dir / ENCODER_WEIGHTS)
    enc.model.eval()
    return Classifier(cfg, labels, enc, head.to(device).eval())


def _read_info(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise MemextError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / CLASSIFIER
    if not path.is_file():
        lm = " (it looks like a language-model run)" if (run_dir / "config.json").is_file() else ""
        raise MemextError(f"{str(run_dir)!r} is not a classifier run: it has no {CLASSIFIER}{lm}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MemextError(f"{path} is corrupt: not JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise MemextError(f"{path} is not a memext classifier file (format != {FORMAT!r})")
    if info.get("version") != 1:
        raise MemextError(f"{path} has version {info.get('version')!r}; this memext reads 1")
    return info


def _load_weights(module: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise MemextError(f"{path} is missing: the run is incomplete")
    try:
        load_model(module, str(path), strict=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise MemextError(
            f"{path} is corrupt or does not match {CLASSIFIER} (unreadable, or other weights "
            f"than its config describes: {reason})"
        ) from None
