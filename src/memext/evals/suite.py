"""Evaluation suites: named sets of tasks over a grid of lengths (and depths), graded on any
``ModelAdapter`` and saved as a results file that resumes cell by cell.

A suite is data (``SuiteSpec``): the built-in ``quick`` and ``longctx``, or a user's YAML file::

    name: mine
    length_multiples: [0.5, 1, 2]      # times the model's trained length (or `lengths: [...]`)
    depths: [0.0, 0.5, 1.0]
    samples: 4
    seed: 0
    threshold: 0.9
    haystack: stdlib                    # or a path to a UTF-8 text file
    note: "lengths stop at 4k: ..."     # printed on the report
    tasks:
      bpb: {max_tokens: 4096}
      niah: {needle: "The secret word is {value}.", question: "The secret word is "}
      speed: {}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from memext.adapters import ModelAdapter
from memext.data.filler import Filler
from memext.data.tasks import TooShort
from memext.errors import MemextError
from memext.evals.results import DEFAULT_THRESHOLD, FORMAT, SCHEMA_VERSION, summarize
from memext.evals.suite_tasks import (
    SUITE_TASKS,
    Cell,
    Context,
    Task,
    register_suite_task,
)
from memext.io import atomic_write_text

# --- suites -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    name: str
    tasks: dict[str, dict[str, Any]]
    length_multiples: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)
    lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 4
    seed: int = 0
    threshold: float = DEFAULT_THRESHOLD
    haystack: str = "stdlib"
    #: A line the report prints with the results (why the lengths stop where they do); it
    #: changes no score, so it is not part of the cell cache's key.
    note: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.tasks) - set(SUITE_TASKS))
        if unknown:
            raise MemextError(
                f"unknown task(s) {', '.join(unknown)} in suite {self.name!r}: "
                f"expected {SUITE_TASKS.accepted(unknown[0])}"
            )
        if not self.tasks:
            raise MemextError(f"suite {self.name!r} has no tasks")
        for name, options in self.tasks.items():
            try:  # a misspelt option fails when the suite is read, not hours into its run
                SUITE_TASKS.build(name, **options)
            except (TypeError, ValueError) as e:
                raise MemextError(f"suite {self.name!r}, task {name}: {e}") from None
        if not 0 < self.threshold <= 1:
            raise MemextError(f"threshold={self.threshold} must lie in (0, 1]")
        if self.samples < 1:
            raise MemextError(f"samples={self.samples} must be positive")
        if any(not 0 <= d <= 1 for d in self.depths) or not self.depths:
            raise MemextError(f"depths {self.depths} must be non-empty and lie in [0, 1]")
        if any(m <= 0 for m in self.length_multiples) or any(n < 2 for n in self.lengths):
            raise MemextError("length multiples must be positive and lengths at least 2")

    def resolve_lengths(self, trained_length: int) -> list[int]:
        """Absolute lengths (even: bits-per-byte scores half windows)."""
        raw = self.lengths or tuple(m * trained_length for m in self.length_multiples)
        return sorted({max(2, 2 * round(n / 2)) for n in raw})

    @classmethod
    def from_yaml(cls, path: str | Path) -> SuiteSpec:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise MemextError(f"cannot read suite file {path}: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            raise MemextError(f"{path}: a suite file is a mapping with a `tasks` mapping")
        fields = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - fields)
        if extra:
            raise MemextError(f"{path}: unknown suite field(s) {', '.join(extra)}")
        data.setdefault("name", path.stem)
        data["tasks"] = {k: dict(v or {}) for k, v in data["tasks"].items()}
        for key in ("length_multiples", "lengths", "depths"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


#: What ``memext eval RUN`` runs unless told otherwise: the text measures of ``longctx`` with the
#: same grid and options, so the figures it prints are the report card's, cell for cell.
_TEXT = {"bpb": {"max_tokens": 4096}, "reach": {"max_tokens": 4096}}

SUITES: dict[str, SuiteSpec] = {
    "default": SuiteSpec("default", _TEXT),
    "quick": SuiteSpec(
        "quick",
        {"bpb": {"max_tokens": 1024}, "passkey": {}, "speed": {"repeats": 1}},
        length_multiples=(0.5, 1.0, 2.0),
        depths=(0.0, 1.0),
        samples=2,
    ),
    "longctx": SuiteSpec(
        "longctx",
        {
            **_TEXT,
            "passkey": {},
            "niah": {},
            "needle": {"n_keys": 4},
            "multi_value": {"n_values": 2},
            "variable_tracking": {"hops": 2},
            "common_words": {"n_common": 3},
            "assoc_recall": {"n_queries": 1},
            "speed": {},
        },
    ),
}


def get_suite(name_or_path: str) -> SuiteSpec:
    if name_or_path in SUITES:
        return SUITES[name_or_path]
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return SuiteSpec.from_yaml(path)
    raise MemextError(
        f"unknown suite {name_or_path!r}: choose {', '.join(SUITES)} or give a .yaml file"
    )


def haystack(spec: SuiteSpec, tok: Any) -> Filler:
    if spec.haystack == "stdlib":
        return Filler.stdlib(tok)
    path = Path(spec.haystack)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise MemextError(f"cannot read the haystack {path}: {e}") from None
    except UnicodeDecodeError as e:
        raise MemextError(f"the haystack {path} is not UTF-8 text: {e}") from None
    if not text.strip():
        raise MemextError(f"the haystack {path} is empty: needles need text to hide in")
    return Filler.from_text(tok, text)


# --- running, with resumption -------------------------------------------------------------------


def _spec_hash(spec: SuiteSpec, adapter: ModelAdapter) -> str:
    fields = dataclasses.asdict(spec)
    del fields["note"]  # words, not a setting: editing them keeps the finished cells
    blob = json.dumps([fields, adapter.fingerprint()], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan(spec: SuiteSpec, adapter: ModelAdapter) -> tuple[list[int], list[tuple[Task, Cell]]]:
    """The suite's lengths for this model and its cells. Lengths given as multiples of the
    trained length stop at the longest input the model reads (a plain model trained at its
    max_seq_len has no 2x); lengths given outright are kept, and refused when run."""
    lengths = spec.resolve_lengths(adapter.trained_length)
    limit = adapter.max_context
    if not spec.lengths and limit is not None and any(n <= limit for n in lengths):
        lengths = [n for n in lengths if n <= limit]
    tasks = [SUITE_TASKS.build(name, **opts) for name, opts in spec.tasks.items()]
    return lengths, [(t, c) for t in tasks for c in t.cells(lengths, list(spec.depths))]


def estimate(adapter: ModelAdapter, spec: SuiteSpec, todo: list[tuple[Task, Cell]]) -> dict:
    """Seconds for the cells still to run, from a probe's tokens/s, and the tensor memory of
    the longest input, from the probe's allocator peak scaled linearly (an estimate: attention
    without memory grows faster, segment-reading memory models stay flat)."""
    from memext.profiling import peak_memory

    longest = max(c.length for _, c in todo)
    probe = min(256, longest)
    x = torch.randint(0, min(256, adapter.tokenizer.vocab_size), (1, probe))
    last = [probe - 1]  # read as a prompt is: the tasks project only the positions they score
    adapter.logits(x, last)
    t0 = time.perf_counter()
    adapter.logits(x, last)
    rate = probe / max(time.perf_counter() - t0, 1e-9)
    peak = peak_memory(lambda: adapter.logits(x, last), adapter.device)
    tokens = 0
    for task, cell in todo:
        tokens += task.tokens(cell, spec.samples)
    # Attention cost grows with length: scale the probe's rate by the mean length's excess.
    mean_len = sum(c.length for _, c in todo) / len(todo)
    slowdown = max(1.0, mean_len / probe) ** 0.5
    return {
        "seconds": tokens / rate * slowdown,
        "tokens": tokens,
        "probe_tokens_per_s": rate,
        "longest": longest,
        "peak_bytes_at_longest": peak * longest / probe,
    }


def run_suite(
    adapter: ModelAdapter,
    spec: SuiteSpec,
    out_file: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cell not already in ``out_file``'s cell log and write the results file."""
    from memext.runtime import provenance

    out_file = Path(out_file)
    cells_log = out_file.with_suffix(".cells.jsonl")
    lengths, grid = plan(spec, adapter)
    if adapter.max_context is not None and max(lengths) > adapter.max_context:
        raise MemextError(
            f"the suite's longest length, {max(lengths)} tokens, exceeds {adapter.name}'s limit "
            f"of {adapter.max_context} tokens (a model without memory reads at most max_seq_len), so "
            f"no cell is run: pass --lengths up to {adapter.max_context}, or use a model that "
            "reads in segments"
        )
    key = _spec_hash(spec, adapter)
    done = _finished(cells_log, key)
    todo = [(t, c) for t, c in grid if c.key() not in done]
    filler = haystack(spec, adapter.tokenizer)
    ctx = Context(adapter, filler, spec.samples, spec.seed, max(lengths))
    corpus, corpus_hash = None, None
    if "bpb" in spec.tasks:
        _, corpus, corpus_hash = ctx.validation()
    if todo:
        guess = estimate(adapter, spec, todo)
        log(
            f"{len(todo)} of {len(grid)} cells to run ({len(grid) - len(todo)} cached); "
            f"about {_duration(guess['seconds'])} "
            f"({guess['tokens']:,} tokens at ~{guess['probe_tokens_per_s']:,.0f} tok/s); "
            f"~{guess['peak_bytes_at_longest'] / 2**20:,.0f} MiB of tensors for one "
            f"{guess['longest']:,}-token input"
        )
    t0 = time.perf_counter()
    bar = tqdm(todo, desc=f"{spec.name}", disable=not progress, unit="cell")
    for task, cell in bar:
        bar.set_postfix_str(cell.key())
        c0 = time.perf_counter()
        try:
            fields = task.run(cell, ctx)
        except TooShort as e:  # a prompt that cannot hold the task: a cell that cannot exist
            fields = {"skipped": str(e)}
        row = {
            "task": cell.task,
            "length": cell.length,
            "depth": cell.depth,
            "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            **fields,
            "seconds": round(time.perf_counter() - c0, 3),
        }
        _append(cells_log, {"suite_key": key, "cell": cell.key(), "row": row})
        done[cell.key()] = row
    bar.close()
    rows = [done[c.key()] for _, c in grid]
    scored = [r for r in rows if "skipped" not in r]
    results = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "suite": spec.name,
        "spec": dataclasses.asdict(spec),
        "lengths": lengths,
        "model": {
            "name": adapter.name,
            "kind": adapter.kind,
            "path": adapter.path,
            "trained_length": adapter.trained_length,
            "max_context": adapter.max_context,
            "params": adapter.params,
            "fingerprint": adapter.fingerprint(),
            **adapter.describe(),
        },
        "corpus": {"name": corpus, "hash": corpus_hash},
        "haystack": spec.haystack,
        "seed": spec.seed,
        "threshold": spec.threshold,
        "provenance": provenance(adapter.device) | _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.perf_counter() - t0, 2),
        "cells": scored,
        "skipped": [r for r in rows if "skipped" in r],
        "summary": summarize(scored, spec.threshold),
    }
    atomic_write_text(out_file, json.dumps(results, indent=2, default=_jsonable) + "\n")
    return results


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("transformers", "scikit-learn", "matplotlib"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def _finished(path: Path, key: str) -> dict[str, dict[str, Any]]:
    """Rows of cells a run with the same suite and model finished; a torn last line (a run
    killed mid-write) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        # The log is a cache: a line that is not a finished cell is recomputed, never trusted.
        if not isinstance(entry, dict) or not isinstance(entry.get("row"), dict):
            continue
        if entry.get("suite_key") == key and isinstance(entry.get("cell"), str):
            done[entry["cell"]] = entry["row"]
    return done


def _append(path: Path, entry: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        # After a torn last line (a kill mid-write) start a new line, or this entry would be
        # glued to the torn one and lost with it.
        end = f.seek(0, os.SEEK_END)
        torn = False
        if end:
            f.seek(end - 1)
            torn = f.read(1) != b"\n"
        line = json.dumps(entry, default=_jsonable) + "\n"
        f.write((("\n" if torn else "") + line).encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


__all__ = [
    "SUITES",
    "SUITE_TASKS",
    "Cell",
    "SuiteSpec",
    "Task",
    "get_suite",
    "plan",
    "register_suite_task",
    "run_suite",
]
