"""Tiny random memext runs (a config and untrained weights in a directory) and the set of tiny
models that tests opening every kind read: a plain run, a Transformer-XL run and the tiny
Hugging Face Llama of ``tiny_hf``."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from memext import build_model
from memext import checkpoint as ckpt
from memext.config import Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from tiny_hf import save_tiny_llama


def save_tiny_run(
    path: Path, corpus: Path, *, seq_len: int = 128, max_seq_len: int = 512, **model: Any
) -> Path:
    """A random 2-layer byte-level run configured to train at ``seq_len`` (in segments of half
    that when it has a memory) and to evaluate at half and all of ``seq_len``; ``model``
    overrides further ``ModelConfig`` fields."""
    cfg = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, max_seq_len=max_seq_len)
    cfg = dataclasses.replace(cfg, **model)
    half = seq_len // 2
    config = Config(
        model=cfg,
        data=DataConfig(corpus=str(corpus)),
        train=TrainConfig(seq_len=seq_len, segment_len=half if cfg.memory != "none" else 0),
        eval=EvalConfig(lengths=(half, seq_len)),
    )
    path.mkdir(parents=True)
    config.save(path / ckpt.CONFIG)
    ckpt.save_weights(build_model(cfg, seed=0), path / ckpt.WEIGHTS, {"step": "0"})
    return path


def save_tiny_corpus(path: Path, *, docs: int, lines: int) -> Path:
    """``docs`` text files of ``lines`` repeated lines each, in ``path`` (made if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (path / f"d{i}.txt").write_text(f"The value of item {i} is {i * 7}.\n" * lines)
    return path


def save_tiny_models(root: Path, *, seq_len: int, max_seq_len: int, lines: int) -> dict[str, Path]:
    """One model of each kind under ``root``, by name: ``memext`` (no memory, positions up to
    ``max_seq_len``), ``memext-xl`` (memory of half ``seq_len``, positions up to ``seq_len``) and
    ``hf``; the runs name a 3-document corpus of ``lines`` lines a document."""
    corpus = save_tiny_corpus(root / "corpus", docs=3, lines=lines)
    return {
        "memext": save_tiny_run(root / "plain", corpus, seq_len=seq_len, max_seq_len=max_seq_len),
        "memext-xl": save_tiny_run(
            root / "xl",
            corpus,
            seq_len=seq_len,
            max_seq_len=seq_len,
            memory="xl",
            mem_len=seq_len // 2,
        ),
        "hf": save_tiny_llama(root / "llama"),
    }


def tiny_train_settings(steps: int, save_every: int, **extra: str) -> dict[str, str]:
    """``--set`` overrides for a 2-layer d32 model trained on 32-token sequences, batch 4, no
    memory, no mixture: what the distributed tests run on one process and on several."""
    return {
        "model.d_model": "32",
        "model.n_layers": "2",
        "model.n_heads": "2",
        "model.max_seq_len": "256",
        "model.memory": "none",
        "data.mixture": "[]",
        "train.seq_len": "32",
        "train.segment_len": "0",
        "train.curriculum": "",
        "train.curriculum_steps": "",
        "train.batch_size": "4",
        "train.steps": str(steps),
        "train.save_every": str(save_every),
        "train.eval_every": "0",
        "train.log_every": "1",
        "train.eval_tokens": "256",
        "train.warmup_steps": "2",
        "eval.lengths": "32,64",
        "eval.max_tokens": "256",
        **extra,
    }
