"""Context extension: a copy of a model whose rotary embedding is scaled to a longer length,
optionally fine-tuned there for a few steps (``memext extend``).

``extend_model`` takes any model the adapters read: the kind that claims the source
(``memext.adapters.detect_kind``) picks its writer in ``EXTENDERS``: ``extend_run`` for memext
runs, ``memext.hf.extend_hf`` for local Hugging Face directories, and for GGUF files and known
models ``extend_hf`` on their converted directory. A kind that can be extended adds its writer
there.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memext import checkpoint as ckpt
from memext import dcp
from memext.adapters import detect_kind
from memext.config import Config
from memext.curriculum import trained_length
from memext.errors import MemextError
from memext.nn.rope_scaling import build_rule
from memext.train.probes import Probe


def extended_config(
    cfg: Config,
    scaling: str,
    factor: float,
    original_len: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    steps: int = 0,
    lr: float | None = None,
) -> Config:
    """``cfg`` with its rotary scaled by ``factor`` from ``original_len`` (default: the trained
    length); with ``steps`` it trains at the new length for that many steps, at the same tokens
    per step, learning rate ``lr`` (default: the source's final rate, lr * min_lr_ratio)."""
    if not math.isfinite(factor) or factor <= 0:
        raise MemextError(f"factor={factor} is invalid: expected a finite number > 0")
    for name, value in (("alpha", alpha), ("beta", beta), ("lr", lr)):
        if value is not None and not math.isfinite(value):
            raise MemextError(f"{name}={value} is invalid: expected a finite number")
    if steps < 0:
        raise MemextError(f"steps={steps} is invalid: expected a number >= 0")
    original = original_len or trained_length(cfg)
    new_len = round(original * factor)
    try:
        new = _extended(cfg, scaling, factor, original, new_len, alpha, beta, steps, lr)
        build_rule(scaling, alpha, beta, strict=True)  # YaRN's ramp ends for another rule: refused
        return new
    except ValueError as e:
        raise MemextError(str(e)) from None


def _extended(cfg, scaling, factor, original, new_len, alpha, beta, steps, lr) -> Config:
    m, t = cfg.model, cfg.train
    model = dataclasses.replace(
        m,
        rope_scaling=scaling,
        rope_factor=float(factor),
        rope_original_len=original,
        yarn_alpha=m.yarn_alpha if alpha is None else alpha,
        yarn_beta=m.yarn_beta if beta is None else beta,
        max_seq_len=max(m.max_seq_len, new_len, *cfg.eval.lengths),
    )
    seg = t.segment_len
    train = dataclasses.replace(
        t,
        seq_len=new_len if not seg else -(-new_len // seg) * seg,
        batch_size=max(1, t.batch_size * trained_length(cfg) // new_len),
        steps=max(1, steps),
        curriculum=(),
        curriculum_steps=(),
        lr=lr if lr is not None else t.lr * t.min_lr_ratio,
        warmup_steps=min(t.warmup_steps, max(1, steps) // 10),
        eval_every=0,
        save_every=max(1, steps),
        context_parallel=1,  # one process fine-tunes
    )
    return dataclasses.replace(cfg, model=model, train=train)


def extend_run(
    src: str | Path,
    out: str | Path,
    scaling: str,
    factor: float,
    *,
    original_len: int | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    steps: int = 0,
    lr: float | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    probes: Sequence[Probe] = (),
) -> Path:
    """Write the extended copy of run ``src`` into ``out``; returns ``out``. ``probes``: what the
    fine-tuning (``steps``) measures as it trains (``memext.train.train``'s)."""
    src, out = Path(src), Path(out)
    cfg = ckpt.load_config(src)
    if src.resolve() == out.resolve():
        raise MemextError("the extended copy needs its own directory: --out must differ from SRC")
    new = extended_config(cfg, scaling, factor, original_len, alpha, beta, steps, lr)
    weights = ckpt.weights_path(src)  # model.safetensors, or a sharded run's model.dcp
    if steps:
        from memext.train import train

        train(
            new,
            out,
            device=device,
            overwrite=overwrite,
            progress=progress,
            log=log,
            init_from=weights,
            probes=probes,
        )
        return out
    from memext.io import atomic_write
    from memext.train.run_dir import check_run_dir, make_run_dir

    check_run_dir(out, resume=False, overwrite=overwrite)
    model, _ = ckpt.load(src)  # refuses corrupt or foreign weights before anything is written
    make_run_dir(out, overwrite)
    new.save(out / ckpt.CONFIG)  # first: a copy cut short is still a memext run (--overwrite)
    for name in (ckpt.TOKENIZER, ckpt.WEIGHTS):
        if (src / name).is_file():
            atomic_write(out / name, lambda tmp, name=name: shutil.copyfile(src / name, tmp))
    if weights.is_dir():  # a sharded run's copy holds its weights as one file (no optimizer)
        ckpt.save_weights(model, out / ckpt.WEIGHTS, {"step": str(dcp.saved_step(weights))})
    return out


def _extend_hf(src: Path, out: Path, scaling: str, factor: float, **options: Any) -> None:
    from memext.hf import extend_hf

    if options.pop("steps", 0):
        raise MemextError(
            "fine-tuning a Hugging Face checkpoint is not supported yet: drop --steps, or "
            "fine-tune the written copy with transformers"
        )
    for unused in ("lr", "overwrite", "device", "progress", "log", "probes"):
        options.pop(unused, None)
    extend_hf(src, out, scaling, factor, **options)


def _extend_converted(src: Path, out: Path, scaling: str, factor: float, **options: Any) -> None:
    """A GGUF file or a known model: its converted Hugging Face directory, extended as one."""
    from memext.adapters import model_kind

    _extend_hf(model_kind(detect_kind(src)).hf_dir(src), out, scaling, factor, **options)


#: The writer of an extended copy, by model kind (``memext.adapters.MODEL_KINDS``).
EXTENDERS: dict[str, Callable[..., Any]] = {
    "memext": extend_run,
    "hf": _extend_hf,
    "gguf": _extend_converted,
    "known": _extend_converted,
}


def extend_model(
    src: str | Path, out: str | Path, scaling: str, factor: float, **options: Any
) -> str:
    """Write the extended copy of the model in ``src`` (any kind in ``EXTENDERS``) into ``out``
    with ``extend_run``'s options; returns the kind it was."""
    kind = detect_kind(src)
    if kind not in EXTENDERS:
        raise MemextError(
            f"{str(src)!r} is a {kind} model: extend reads {', '.join(EXTENDERS)} models"
        )
    EXTENDERS[kind](Path(src), Path(out), scaling, factor, **options)
    return kind
