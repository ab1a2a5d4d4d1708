"""Suite results files as the report sees them: a ``Run`` per file (its label, path, cells), and
what a set of runs holds (tasks, lengths, depths)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memext.errors import MemextError
from memext.evals.results import DEFAULT_THRESHOLD, FORMAT, load_results, summarize


@dataclass(frozen=True)
class Run:
    """One results file as the report shows it: where it came from and the label it goes by."""

    label: str
    path: Path
    data: dict[str, Any]

    @property
    def cells(self) -> list[dict[str, Any]]:
        return self.data["cells"]

    @property
    def model(self) -> dict[str, Any]:
        return self.data.get("model") or {}

    @property
    def summary(self) -> dict[str, Any]:
        # Recomputed from the cells: a file written under an older definition of the summary
        # (the overall effective context once averaged unsolved tasks) reports under today's.
        return summarize(self.cells, self.data.get("threshold", DEFAULT_THRESHOLD))

    def task_cells(self, task: str) -> list[dict[str, Any]]:
        return [c for c in self.cells if c["task"] == task]


# --- loading -------------------------------------------------------------------------------------


def _is_suite_file(path: Path) -> bool:
    """Whether a JSON file in RUN_DIR/eval claims the suite format (other evals live there too).
    A file that is not JSON at all is damaged, not someone else's: refused, naming it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        suite = path.stem.removesuffix("-no-memory")
        flags = f"--suite {suite}" + (" --no-memory" if suite != path.stem else "")
        raise MemextError(
            f"{path} is corrupt (not JSON: {e}); `memext eval {path.parent.parent} {flags}` "
            "rewrites it (finished cells are kept in its cell log)"
        ) from None
    return isinstance(data, dict) and data.get("format") == FORMAT


def results_home(entry: str | Path) -> Path | None:
    """The folder whose ``eval/`` holds the results of ``entry``: a run or model directory
    itself; a GGUF file's or a known model's converted directory in the cache (where ``memext
    eval`` wrote them); None for a results file."""
    entry = Path(entry)
    if entry.is_dir():
        return entry
    if entry.is_file() and entry.suffix == ".json":
        return None
    from memext.adapters import model_home

    return model_home(entry)  # a name no kind claims is refused there, with a did-you-mean


def _results_files(entry: Path, suite: str | None = None) -> list[Path]:
    home = results_home(entry)
    if home is None:
        return [entry]
    # By stem: a suite's plain reading (SUITE.json) before its others (SUITE-POLICY-....json).
    found = sorted((p for p in (home / "eval").glob("*.json") if _is_suite_file(p)), key=_stem)
    if not found:
        raise MemextError(
            f"{entry}: no suite results in {home / 'eval'}; run "
            f"`memext eval {entry} --suite longctx` first"
        )
    if suite is None:
        return found
    names = {p: json.loads(p.read_text(encoding="utf-8")).get("suite") for p in found}
    kept = [p for p in found if names[p] == suite]
    if not kept:
        raise MemextError(
            f"{entry}: no results of suite {suite!r} in {home / 'eval'} (it holds "
            f"{', '.join(sorted({str(n) for n in names.values()}))}); run "
            f"`memext eval {entry} --suite {suite}` first"
        )
    return kept


def _stem(path: Path) -> str:
    return path.stem


def _source(path: Path) -> str:
    """A short name for where a results file came from: its run directory, else its file name."""
    return path.parent.parent.name if path.parent.name == "eval" else path.stem


def _labels(runs: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    """The model name, qualified by its source when two runs share it, numbered as a last resort."""
    names = [str((data.get("model") or {}).get("name") or _source(path)) for path, data in runs]
    labels = [
        f"{name} ({_source(path)})" if names.count(name) > 1 else name
        for name, (path, _) in zip(names, runs, strict=True)
    ]
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label} #{seen[label]}")
    return unique


def load_runs(results: Sequence[str | Path], suite: str | None = None) -> list[Run]:
    """Each results file, or the suite results of each run, model directory or model name (its
    readings side by side: ``SUITE.json``, ``SUITE-POLICY-....json``), labelled for the report;
    ``suite`` keeps only a model's results of that suite (results files are taken as given)."""
    if not results:
        raise MemextError("no results to report: give results files, run directories or models")
    files = [f for entry in results for f in _results_files(Path(entry), suite)]
    loaded = [(f, load_results(f)) for f in files]
    return [
        Run(label, path, data) for label, (path, data) in zip(_labels(loaded), loaded, strict=True)
    ]


# --- what the runs hold --------------------------------------------------------------------------


def run_lengths(runs: Sequence[Run], task: str | None = None) -> list[int]:
    return sorted(
        {int(c["length"]) for r in runs for c in r.cells if task is None or c["task"] == task}
    )


def run_tasks(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(c["task"] for r in runs for c in r.cells))


def accuracy_tasks(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(t for r in runs for t in r.summary.get("accuracy_tasks", [])))


def has_depths(runs: Sequence[Run], task: str) -> bool:
    return any(c["depth"] is not None for r in runs for c in r.task_cells(task))


def depth_tasks(runs: Sequence[Run]) -> list[str]:
    return [t for t in run_tasks(runs) if has_depths(runs, t)]


def mean_by_length(cells: Iterable[dict[str, Any]], key: str) -> dict[int, float]:
    sums: dict[int, list[float]] = {}
    for c in cells:
        if c.get(key) is not None:
            sums.setdefault(int(c["length"]), []).append(float(c[key]))
    return {n: sum(v) / len(v) for n, v in sorted(sums.items())}
