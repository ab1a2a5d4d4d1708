"""`memext eval`: a run's bits-per-byte by context length, saved as JSON with its provenance."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from memext.data import prepare_data
from memext.errors import MemextError
from memext.evals import reach
from memext.evals.perplexity import DEFINITION, evaluate_lengths
from memext.io import atomic_write_text
from memext.runtime import provenance

RESULTS_FORMAT = "memext-eval"
RESULTS_SCHEMA = 1


def evaluate_run(
    run_dir: str | Path,
    lengths: list[int] | None = None,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    out_file: str | Path | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], Path]:
    from memext.adapters import open_model

    run_dir = Path(run_dir)
    adapter = open_model(run_dir, device, kind="memext")  # the one-pass table reads memext runs
    model, cfg, tok = adapter.model, adapter.cfg, adapter.tokenizer
    lengths = sorted(set(lengths or cfg.eval.lengths))
    bad = [n for n in lengths if n < 2 or n % 2]
    if bad:
        raise MemextError(f"context lengths must be even and >= 2; got {bad}")
    if max(lengths) > model.max_seq_len:
        raise MemextError(
            f"context length {max(lengths)} exceeds the model's limit max_seq_len={model.max_seq_len}"
        )
    store, _ = prepare_data(cfg.data, tok, log=lambda m: None)
    t0 = time.perf_counter()
    rows = evaluate_lengths(
        model,
        store.validation,
        tuple(lengths),
        max_tokens or cfg.eval.max_tokens,
        tok.byte_lengths(),
        cfg.eval.batch_size,
        device,
        progress,
    )
    reach_rows = []
    if cfg.train.segment_len and cfg.eval.reach:
        reach_rows = reach.memory_reach(
            model,
            store.validation,
            cfg.train.segment_len,
            cfg.eval.reach,
            max_tokens or cfg.eval.max_tokens,
            tok.byte_lengths(),
            cfg.eval.batch_size,
            device,
            progress,
        )
    run_info = run_dir / "run.json"
    trained_on = json.loads(run_info.read_text()).get("corpus_hash") if run_info.is_file() else None
    payload = {
        "format": RESULTS_FORMAT,
        "schema_version": RESULTS_SCHEMA,
        "run": str(run_dir),
        "task": "bits_per_byte_vs_length",
        "definition": DEFINITION,
        "corpus": cfg.data.corpus,
        "corpus_hash": store.corpus_hash,
        "trained_on_same_corpus": trained_on == store.corpus_hash if trained_on else None,
        "seconds": round(time.perf_counter() - t0, 2),
        "provenance": provenance(torch.device(device)),
        "results": rows,
        "memory_reach": {"definition": reach.DEFINITION, "results": reach_rows},
    }
    path = Path(out_file) if out_file else run_dir / "eval.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return rows, reach_rows, path
