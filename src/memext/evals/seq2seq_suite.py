"""`memext eval` on an encoder-decoder run: its held-out task samples scored at several source
lengths, each read whole and by a prefix baseline, into ``RUN/eval/seq2seq.json``.

A **cell** is one task at one source length under one reading:

- ``whole``: the model reads the whole source (``evaluate_pairs``). A source longer than
  ``model.max_seq_len`` is read with retrieval cross-attention (``encode_chunk``: by default the
  run's trained length, capped at ``max_seq_len``; ``trained_len``: by default that length, so
  the cross-attention logits are scaled by log N / log(trained states) for the N states of all
  chunks; ``cross_topk``: none by default, every state is read, because a trained decoder's
  cross-attention is diffuse and top-k drops the background it relies on: on the
  seq2seq-digest preset at 16k (two seeds), top-1,024 reads ROUGE-L 87 and 85, all states 92
  and 89, all states scaled 94 and 95, docs/results.md#seq2seq); the cell's ``retrieval`` says
  so.
- ``prefix``: the prefix (Lead) baseline of ``memext.evals.seq2seq``: the first ``keep`` tokens,
  question included (default ``DEFAULT_KEEP`` = 512, or ``model.max_seq_len`` if shorter: the
  truncation the long-input literature compares against, SCROLLS' BART-1k readers). A source
  that fits in ``keep`` tokens has no prefix cell (it would be the whole reading again): it is
  listed under ``skipped``.

Each cell holds ROUGE-1/2/L, BLEU, chrF, the teacher-forced ``loss``, ``n``, ``seconds``, a few
``examples`` and the prefix oracle's scores under the same reading (``oracle``; for the whole
input the reference itself; None for a task whose samples list no answer items, such as
``copy``).

The samples are ``held_out_samples`` of the run's validation text, the same for every reading
of a (task, length), so readings differ by what they read and nothing else. Finished cells are
kept in a cell log beside the results (``seq2seq.cells.jsonl``, the suite's mechanism) under a
key of the settings and the weights' fingerprint, and are not recomputed: a killed run resumes
where it stopped, and other settings or retrained weights start afresh. The results file is
rewritten (atomically) after each cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from memext.adapters.base import files_fingerprint
from memext.checkpoint import is_memext_run, load, load_config, run_tokenizer, weights_files
from memext.curriculum import trained_length
from memext.data.filler import Filler
from memext.data.prepare import prepare_data
from memext.data.tasks import TASKS
from memext.errors import MemextError
from memext.evals.seq2seq import evaluate_pairs, held_out_samples, oracle_scores
from memext.evals.suite import _append, _finished, _jsonable
from memext.io import atomic_write_text
from memext.runtime import provenance

FORMAT = "memext-seq2seq-results"
SCHEMA_VERSION = 1
#: Source tokens the prefix baseline keeps unless told otherwise.
DEFAULT_KEEP = 512
READINGS = ("whole", "prefix")
#: The scores a cell carries, in the order tables print them.
METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "chrf")
METRIC_NAMES = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "bleu": "BLEU",
    "chrf": "chrF",
    "loss": "loss",
}


def is_seq2seq_run(path: str | Path) -> bool:
    """Whether ``path`` is a memext run of an encoder-decoder (``model.arch=seq2seq``), read
    from its config alone: commands decide their path before loading any weights."""
    path = Path(path)
    return path.is_dir() and is_memext_run(path) and load_config(path).model.arch == "seq2seq"


@dataclasses.dataclass(frozen=True)
class Seq2SeqEval:
    """What one evaluation of a run reads; every field but the lengths and tasks is part of the
    cell cache's key (``lengths`` and ``tasks`` only choose which cells exist)."""

    lengths: tuple[int, ...]
    tasks: tuple[str, ...]
    samples: int
    keep: int = DEFAULT_KEEP
    split: str = "validation"
    encode_chunk: int = 0
    cross_topk: int = 0  # 0: every encoder state
    trained_len: int = 0  # 0: no log-length scaling

    def key(self, fingerprint: str) -> str:
        fields = dataclasses.asdict(self)
        del fields["lengths"], fields["tasks"]
        blob = json.dumps([FORMAT, SCHEMA_VERSION, fields, fingerprint], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cell_key(task: str, length: int, reading: str) -> str:
    return f"{task}@{length}@{reading}"


def plan_seq2seq(
    run: str | Path,
    lengths: Sequence[int] | None = None,
    tasks: Sequence[str] | None = None,
    samples: int | None = None,
    keep: int | None = None,
    split: str = "validation",
    encode_chunk: int | None = None,
    cross_topk: int | None = None,
    trained_len: int | None = None,
) -> Seq2SeqEval:
    """The evaluation of ``run`` with its defaults filled in from the run's config
    (``eval.lengths``, the tasks of ``data.mixture``, ``eval.probe_samples``; ``keep``:
    ``DEFAULT_KEEP``, or ``model.max_seq_len`` when that is shorter) and every setting checked,
    before any weights are read."""
    cfg = load_config(run)
    if cfg.model.arch != "seq2seq":
        raise MemextError(f"{str(run)!r} is not an encoder-decoder run (model.arch=seq2seq)")
    lengths = tuple(lengths or cfg.eval.lengths)
    if any(n < 2 for n in lengths):
        raise MemextError(f"--lengths {','.join(map(str, lengths))}: lengths must be >= 2")
    tasks = tuple(tasks or dict.fromkeys(s.task for s in cfg.data.mixture if s.task != "lm"))
    for task in tasks:
        if task not in TASKS:
            raise MemextError(f"unknown task {task!r}: expected {TASKS.accepted(task)}")
    if not tasks:
        raise MemextError(f"{str(run)!r} trains on no task (data.mixture): pass --task")
    samples = cfg.eval.probe_samples if samples is None else samples
    if samples < 1:
        raise MemextError(f"--samples={samples} must be at least 1")
    limit = cfg.model.max_seq_len
    keep = min(DEFAULT_KEEP, limit) if keep is None else keep
    if not 1 <= keep <= limit:
        raise MemextError(
            f"--keep={keep}: the prefix baseline reads 1 to model.max_seq_len={limit} tokens"
        )
    trained = min(trained_length(cfg), limit)
    chunk = encode_chunk or trained
    if chunk > limit:
        raise MemextError(f"encode_chunk={chunk} exceeds the model's max_seq_len={limit}")
    scaled = trained if trained_len is None else trained_len
    return Seq2SeqEval(lengths, tasks, samples, keep, split, chunk, cross_topk or 0, scaled)


def default_out(run: str | Path) -> Path:
    return Path(run) / "eval" / "seq2seq.json"


def run_seq2seq_eval(
    run: str | Path,
    spec: Seq2SeqEval,
    device: Any = "cpu",
    out_file: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Path]:
    """Score every cell of ``spec`` not already in the cell log and write the results file
    (default ``RUN/eval/seq2seq.json``); returns the results and their path."""
    target = Path(out_file) if out_file else default_out(run)
    cells_log = target.with_suffix(".cells.jsonl")
    cfg = load_config(run)
    fingerprint = files_fingerprint(weights_files(run))
    key = spec.key(fingerprint)
    grid = [(task, n, reading) for task in spec.tasks for n in spec.lengths for reading in READINGS]
    done = _finished(cells_log, key)
    todo = [c for c in grid if cell_key(*c) not in done]
    log(
        f"seq2seq eval of {run}: {len(todo)} of {len(grid)} cells to run "
        f"({len(grid) - len(todo)} cached) -> {target}"
    )
    t0 = time.perf_counter()
    reader = _Reader(run, spec, device) if todo else None
    params = reader.params if reader is not None else _previous_params(target)
    bar = tqdm(todo, desc="seq2seq", disable=not progress, unit="cell")
    for task, n, reading in bar:
        bar.set_postfix_str(cell_key(task, n, reading))
        row = reader.cell(task, n, reading)  # type: ignore[union-attr]
        _append(cells_log, {"suite_key": key, "cell": cell_key(task, n, reading), "row": row})
        done[cell_key(task, n, reading)] = row
        results = _results(run, spec, cfg, fingerprint, params, grid, done, t0, device)
        _write(target, results)
    bar.close()
    results = _results(run, spec, cfg, fingerprint, params, grid, done, t0, device)
    _write(target, results)
    return results, target


class _Reader:
    """The run's model, tokenizer and validation text, loaded once for the cells to run; the
    samples of each (task, length), built once for both readings."""

    def __init__(self, run: str | Path, spec: Seq2SeqEval, device: Any) -> None:
        self.spec = spec
        self.device = device
        self.model, self.cfg = load(run, device)
        self.tok = run_tokenizer(run)
        store, _ = prepare_data(self.cfg.data, self.tok, lambda m: None)
        self.filler = Filler(store.validation)
        self.params = sum(p.numel() for p in self.model.parameters())
        self._samples: dict[tuple[str, int], Any] = {}

    def samples(self, task: str, length: int) -> Any:

        if (task, length) not in self._samples:
            self._samples[task, length] = held_out_samples(
                task, self.tok, self.filler, length, self.spec.samples, self.spec.split
            )
        return self._samples[task, length]

    def cell(self, task: str, length: int, reading: str) -> dict[str, Any]:

        spec = self.spec
        head: dict[str, Any] = {"task": task, "length": length, "reading": reading}
        if reading == "prefix" and spec.keep >= length:
            why = f"the {length}-token source fits in keep={spec.keep}: it is the whole reading"
            return {**head, "skipped": why}
        c0 = time.perf_counter()
        try:
            samples = self.samples(task, length)
        except MemextError as e:  # a length that cannot hold the task: a cell that cannot exist
            return {**head, "skipped": str(e)}
        keep = spec.keep if reading == "prefix" else None
        read = keep or length
        retrieval = None
        if read > self.model.max_seq_len:
            retrieval = {
                "encode_chunk": spec.encode_chunk,
                "cross_topk": spec.cross_topk or None,
                "trained_len": spec.trained_len or None,
            }
        try:
            scores = evaluate_pairs(
                self.model,
                self.tok,
                samples,
                self.device,
                keep=keep,
                batch_size=self.cfg.eval.batch_size,
                **(retrieval or {}),
            )
        except ValueError as e:  # keep shorter than the task's question
            raise MemextError(f"{task}@{length}, {reading}: {e}") from None
        try:
            oracle: dict[str, float] | None = oracle_scores(self.tok, samples, keep)
        except ValueError:
            oracle = None  # the task lists no answer items
        return {
            **head,
            "keep": keep,
            "retrieval": retrieval,
            **scores,
            "oracle": oracle,
            "seconds": round(time.perf_counter() - c0, 3),
        }


def _results(
    run: str | Path,
    spec: Seq2SeqEval,
    cfg: Any,
    fingerprint: str,
    params: int | None,
    grid: list[tuple[str, int, str]],
    done: dict[str, dict[str, Any]],
    t0: float,
    device: Any,
) -> dict[str, Any]:

    rows = [done[cell_key(*c)] for c in grid if cell_key(*c) in done]
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "spec": dataclasses.asdict(spec),
        "lengths": list(spec.lengths),
        "tasks": list(spec.tasks),
        "model": {
            "name": Path(run).resolve().name,
            "kind": "memext",
            "arch": "seq2seq",
            "path": str(run),
            "trained_length": trained_length(cfg),
            "max_seq_len": cfg.model.max_seq_len,
            "max_target_len": cfg.model.max_target_len,
            "params": params,
            "fingerprint": fingerprint,
        },
        "corpus": cfg.data.corpus,
        "provenance": provenance(_device(device)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 2),
        "cells": [r for r in rows if "skipped" not in r],
        "skipped": [r for r in rows if "skipped" in r],
    }


def _previous_params(target: Path) -> int | None:
    """The parameter count the last write recorded: a run whose cells are all cached loads no
    weights to count them again."""
    try:
        return json.loads(target.read_text(encoding="utf-8"))["model"]["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _device(device: Any) -> torch.device:
    return torch.device(device)


def _write(target: Path, results: dict[str, Any]) -> None:

    atomic_write_text(target, json.dumps(results, indent=2, default=_jsonable) + "\n")


# --- reading results back ------------------------------------------------------------------------


def is_seq2seq_results(path: Path) -> bool:
    """Whether a JSON file claims this format (a damaged or foreign file does not)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def seq2seq_files(entry: str | Path) -> list[Path]:
    """The seq2seq results ``entry`` names: itself (a results file) or those in its ``eval/``
    (a run directory)."""
    entry = Path(entry)
    if entry.is_file():
        return [entry] if entry.suffix == ".json" and is_seq2seq_results(entry) else []
    if entry.is_dir():
        return sorted(p for p in (entry / "eval").glob("*.json") if is_seq2seq_results(p))
    return []


def load_seq2seq_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MemextError(f"{path}: not a memext seq2seq results file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MemextError(f"{path}: not a memext seq2seq results file (format != {FORMAT!r})")
    if data.get("schema_version") != SCHEMA_VERSION or not isinstance(data.get("cells"), list):
        raise MemextError(
            f"{path}: seq2seq results of schema {data.get('schema_version')!r}; this memext "
            f"reads {SCHEMA_VERSION}: re-run `memext eval` on the run to rewrite it"
        )
    return data


def by_length(
    cells: Sequence[dict[str, Any]], task: str, reading: str, metric: str, oracle: bool = False
) -> dict[int, float]:
    """A task's ``metric`` at each length under ``reading`` (the model's, or with ``oracle`` the
    prefix oracle's); lengths without the cell, or without an oracle, are left out."""
    out = {}
    for c in cells:
        if c["task"] != task or c["reading"] != reading:
            continue
        source = c.get("oracle") if oracle else c
        if source is not None and source.get(metric) is not None:
            out[int(c["length"])] = float(source[metric])
    return dict(sorted(out.items()))


__all__ = [
    "DEFAULT_KEEP",
    "FORMAT",
    "Seq2SeqEval",
    "is_seq2seq_run",
    "load_seq2seq_results",
    "plan_seq2seq",
    "run_seq2seq_eval",
    "seq2seq_files",
]
