"""One self-contained report (HTML, and Markdown for terminals and CI logs) from suite results.

``build_report`` reads one or more results files (``RUN_DIR/eval/<suite>.json``, see
``memext.evals.results``) and writes ``report.html`` and ``report.md`` side by side, one column or
line per run. The HTML page has no external resources: plots are base64 PNGs drawn with
matplotlib's Agg canvas, and each ``<img class="plot">`` carries the numbers it draws in a
``data-series`` attribute (JSON), so a reader or a test can check a plot against its data.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import memext
from memext.errors import MemextError
from memext.evals.results import (
    DEFAULT_THRESHOLD,
    FORMAT,
    by_length,
    load_results,
    summarize,
)
from memext.io import atomic_write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
NONE_NOTE = "score at the shortest length is 0"
# Keys every cell has; anything else is a task extra, shown in the cell table.
CELL_KEYS = ("task", "length", "depth", "metric", "higher_is_better", "score", "n", "chance")
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]
Series = dict[str, Any]


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
        # Written by every suite run; recomputed only so a hand-trimmed file still reports.
        return self.data.get("summary") or summarize(
            self.cells, self.data.get("threshold", DEFAULT_THRESHOLD)
        )

    def task_cells(self, task: str) -> list[dict[str, Any]]:
        return [c for c in self.cells if c["task"] == task]


# --- loading -------------------------------------------------------------------------------------


def _is_suite_file(path: Path) -> bool:
    """Whether a JSON file in RUN_DIR/eval claims the suite format (other evals live there too)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _results_files(entry: Path) -> list[Path]:
    if not entry.is_dir():
        return [entry]
    found = sorted(p for p in (entry / "eval").glob("*.json") if _is_suite_file(p))
    if not found:
        raise MemextError(
            f"{entry}: no suite results in {entry / 'eval'}; run "
            f"`memext eval {entry} --suite longctx` first"
        )
    return found


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


def load_runs(results: Sequence[str | Path]) -> list[Run]:
    """Each results file, or each run directory's suite results, labelled for the report."""
    if not results:
        raise MemextError("no results to report: give results files or run directories")
    files = [f for entry in results for f in _results_files(Path(entry))]
    loaded = [(f, load_results(f)) for f in files]
    return [
        Run(label, path, data) for label, (path, data) in zip(_labels(loaded), loaded, strict=True)
    ]


# --- what the runs hold --------------------------------------------------------------------------


def _lengths(runs: Sequence[Run], task: str | None = None) -> list[int]:
    return sorted(
        {int(c["length"]) for r in runs for c in r.cells if task is None or c["task"] == task}
    )


def _tasks(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(c["task"] for r in runs for c in r.cells))


def _accuracy_tasks(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(t for r in runs for t in r.summary.get("accuracy_tasks", [])))


def _has_depths(runs: Sequence[Run], task: str) -> bool:
    return any(c["depth"] is not None for r in runs for c in r.task_cells(task))


def _depth_tasks(runs: Sequence[Run]) -> list[str]:
    return [t for t in _tasks(runs) if _has_depths(runs, t)]


def _mean_by_length(cells: Iterable[dict[str, Any]], key: str) -> dict[int, float]:
    sums: dict[int, list[float]] = {}
    for c in cells:
        if c.get(key) is not None:
            sums.setdefault(int(c["length"]), []).append(float(c[key]))
    return {n: sum(v) / len(v) for n, v in sorted(sums.items())}


# --- formatting ----------------------------------------------------------------------------------


def _score(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}"


def _params(n: int | None) -> str:
    if n is None:
        return "—"
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = seconds / 60
    return f"{minutes:.1f} min" if minutes < 60 else f"{minutes / 60:.1f} h"


def _plain(value: Any) -> str:
    return "—" if value is None or value == "" else str(value)


def _summary_rows(runs: Sequence[Run]) -> list[tuple[str, list[Any]]]:
    """The summary table, field by field; an effective context is an ``int``, ``None`` (no score
    to hold) or the string "not run"; every other value is display text."""
    rows: list[tuple[str, list[Any]]] = [
        ("model", [_plain(r.model.get("name")) for r in runs]),
        ("kind", [_plain(r.model.get("kind")) for r in runs]),
        ("params", [_params(r.model.get("params")) for r in runs]),
        ("trained length", [_plain(r.model.get("trained_length")) for r in runs]),
        ("max context", [_plain(r.model.get("max_context")) for r in runs]),
        ("effective context (overall)", [r.summary.get("effective_context") for r in runs]),
    ]
    for task in _tasks(runs):
        if task == "speed":  # a throughput, not a score that can hold up with length
            continue
        values = [
            r.summary["tasks"][task]["effective_context"]
            if task in r.summary.get("tasks", {})
            else "not run"
            for r in runs
        ]
        rows.append((f"effective context: {task}", values))
    rows += [
        ("suite", [_plain(r.data.get("suite")) for r in runs]),
        ("seconds", [_duration(r.data.get("seconds")) for r in runs]),
        ("corpus", [_corpus(r) for r in runs]),
        ("date", [_plain(str(r.data.get("created") or "")[:16].replace("T", " ")) for r in runs]),
    ]
    return rows


def _corpus(run: Run) -> str:
    corpus = run.data.get("corpus") or {}
    short = str(corpus.get("hash") or "")[:12]
    return f"{corpus.get('name') or '—'} ({short})" if short else _plain(corpus.get("name"))


def _definitions(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(r.summary["definition"] for r in runs if "definition" in r.summary))


# --- plots ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plot:
    """A drawn figure, or the reason it was left out."""

    title: str
    png: bytes | None = None
    series: tuple[Series, ...] = ()
    note: str = ""
    caption: str = ""


def _figure(
    n_panels: int, ncols: int, panel_size: tuple[float, float]
) -> tuple[Figure, list[Axes]]:
    # A bare Figure on an Agg canvas: no pyplot, so no global backend switch and no figure
    # manager holding every figure alive in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _length_axis(ax: Axes, lengths: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths), [str(n) for n in lengths])
    ax.minorticks_off()
    # Pinned to the evaluated lengths: a trained length far outside them would squash the data.
    ax.set_xlim(min(lengths) / 1.2, max(lengths) * 1.2)
    ax.set_xlabel("context length (tokens)")
    ax.grid(True, alpha=0.3)


def _trained_line(ax: Axes, run: Run, colour: str) -> None:
    trained = run.model.get("trained_length")
    if trained:
        ax.axvline(trained, color=colour, linestyle="--", linewidth=1, alpha=0.7)


def _colour(i: int) -> str:
    return COLOURS[i % len(COLOURS)]


def _line_panel(
    ax: Axes, runs: Sequence[Run], panel: str, points: Sequence[dict[int, float]]
) -> list[Series]:
    """One line per run that has points; the series drawn, for the page."""
    series = []
    for i, (run, pts) in enumerate(zip(runs, points, strict=True)):
        if not pts:
            continue
        x, y = list(pts), list(pts.values())
        ax.plot(x, y, marker="o", color=_colour(i), label=run.label)
        _trained_line(ax, run, _colour(i))
        trained = run.model.get("trained_length")
        series.append(
            {"panel": panel, "label": run.label, "x": x, "y": y, "trained_length": trained}
        )
    return series


def plot_bpb(runs: Sequence[Run]) -> Plot:
    title = "bits-per-byte against length"
    points = [by_length(r.cells, "bpb") for r in runs]
    if not any(points):
        return Plot(title, note="no run has bits-per-byte (bpb) cells: plot omitted")
    fig, (ax,) = _figure(1, 1, (8.5, 4.5))
    series = _line_panel(ax, runs, "bpb", points)
    _length_axis(ax, _lengths(runs, "bpb"))
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("bits-per-byte (dashed: each run's trained length)")
    ax.legend()
    caption = "One line per run; a dashed line marks each run's trained length."
    return Plot(title, _png(fig), tuple(series), caption=caption)


def _chance(runs: Sequence[Run], task: str) -> dict[int, float]:
    return _mean_by_length((c for r in runs for c in r.task_cells(task)), "chance")


def plot_accuracy(runs: Sequence[Run]) -> Plot:
    title = "accuracy against length"
    tasks = _accuracy_tasks(runs)
    if not tasks:
        return Plot(title, note="no run has accuracy tasks: plot omitted")
    fig, axes = _figure(len(tasks), 2, (6, 4))
    series: list[Series] = []
    for ax, task in zip(axes, tasks, strict=True):
        series += _line_panel(ax, runs, task, [by_length(r.cells, task) for r in runs])
        chance = _chance(runs, task)
        if chance:
            ax.plot(list(chance), list(chance.values()), ":", color="grey", label="chance")
            series.append(
                {"panel": task, "label": "chance", "x": list(chance), "y": list(chance.values())}
            )
        metric = next(c["metric"] for r in runs for c in r.task_cells(task))
        _length_axis(ax, _lengths(runs, task))
        averaged = " (mean over depths)" if _has_depths(runs, task) else ""
        ax.set(ylim=(-0.03, 1.03), ylabel=metric, title=task + averaged)
        ax.legend(fontsize=8)
    caption = (
        "One panel per task, one line per run (mean over depths where the task has them); "
        "dotted grey: chance; dashed: each run's trained length."
    )
    return Plot(title, _png(fig), tuple(series), caption=caption)


def _depth_matrix(run: Run, task: str) -> tuple[list[float], list[int], list[list[float | None]]]:
    cells = [c for c in run.task_cells(task) if c["depth"] is not None]
    depths = sorted({float(c["depth"]) for c in cells})
    lengths = sorted({int(c["length"]) for c in cells})
    z: list[list[float | None]] = [[None] * len(lengths) for _ in depths]
    for c in cells:
        z[depths.index(float(c["depth"]))][lengths.index(int(c["length"]))] = float(c["score"])
    return depths, lengths, z


def _heatmap(ax: Axes, depths: list[float], lengths: list[int], z: list[list[float | None]]) -> Any:
    import numpy as np

    grid = np.array([[math.nan if v is None else v for v in row] for row in z])
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper")
    for (i, j), v in np.ndenumerate(grid):
        if not math.isnan(v):
            # Dark text on the bright (yellow) end of viridis, light text elsewhere.
            colour = "black" if v > 0.6 else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=colour)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set(xlabel="context length (tokens)", ylabel="depth (0 = start)")
    return image


def plot_depth(runs: Sequence[Run], task: str) -> Plot:
    """A task's score at each depth and length: one panel per run that ran it."""
    title = f"{task}: depth × length"
    have = [r for r in runs if any(c["depth"] is not None for c in r.task_cells(task))]
    fig, axes = _figure(len(have), 3, (5.2, 0.45 * _n_depths(have, task) + 2.2))
    series: list[Series] = []
    image = None
    for ax, run in zip(axes, have, strict=True):
        depths, lengths, z = _depth_matrix(run, task)
        image = _heatmap(ax, depths, lengths, z)
        ax.set_title(f"{run.label} — {task}")
        series.append(
            {"panel": task, "label": run.label, "depths": depths, "lengths": lengths, "z": z}
        )
    fig.colorbar(image, ax=axes, shrink=0.9, label="score")
    caption = f"{task}'s score at each depth of the context (0 = its start) and length, per run."
    return Plot(title, _png(fig), tuple(series), caption=caption)


def _n_depths(runs: Sequence[Run], task: str) -> int:
    return len({c["depth"] for r in runs for c in r.task_cells(task) if c["depth"] is not None})


def plot_speed(runs: Sequence[Run]) -> Plot:
    title = "speed and memory against length"
    tps = [_mean_by_length(r.task_cells("speed"), "tokens_per_s") for r in runs]
    mib = [
        {n: v / 2**20 for n, v in _mean_by_length(r.task_cells("speed"), "peak_bytes").items()}
        for r in runs
    ]
    if not any(tps) and not any(mib):
        return Plot(title, note="no run has speed cells: speed and memory plot omitted")
    fig, (left, right) = _figure(2, 2, (6, 4))
    series = _line_panel(left, runs, "tokens_per_s", tps)
    series += _line_panel(right, runs, "peak_mib", mib)
    for ax, label in ((left, "tokens per second"), (right, "peak memory (MiB)")):
        _length_axis(ax, _lengths(runs, "speed"))
        ax.set(yscale="log", ylabel=label, title=label)
        ax.legend(fontsize=8)
    caption = "Throughput and peak memory of the speed task (log scale); dashed: trained length."
    return Plot(title, _png(fig), tuple(series), caption=caption)


def plots(runs: Sequence[Run]) -> list[Plot]:
    """Every plot of the report, in page order; those without data carry a note instead."""
    depth = [plot_depth(runs, t) for t in _depth_tasks(runs)] or [
        Plot("depth × length", note="no task has cells at several depths: heatmaps omitted")
    ]
    return [plot_bpb(runs), *depth, plot_accuracy(runs), plot_speed(runs)]


# --- HTML ----------------------------------------------------------------------------------------

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       background: #fff; margin: 0; }
main { max-width: 1180px; margin: 0 auto; padding: 24px; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 32px 0 8px; border-bottom: 1px solid #e5e5e5; padding-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f5f5f7; }
tbody tr:nth-child(even) { background: #fafafa; }
.none { cursor: help; border-bottom: 1px dotted #888; }
.muted, .note { color: #666; }
.definition { max-width: 900px; color: #444; }
figure { margin: 12px 0 24px; }
figcaption { color: #555; font-size: 14px; }
img.plot { display: block; max-width: 100%; height: auto; border: 1px solid #e5e5e5; }
details summary { cursor: pointer; font-weight: 600; }
"""


def _effective_html(value: Any) -> str:
    if value is None:
        return f'<span class="none" title="{NONE_NOTE}">—*</span>'
    if value == "not run":
        return '<span class="muted">not run</span>'
    return html.escape(str(value))


def _summary_html(runs: Sequence[Run]) -> str:
    head = "".join(f"<th>{html.escape(r.label)}</th>" for r in runs)
    body = []
    for field, values in _summary_rows(runs):
        effective = field.startswith("effective context")
        tds = "".join(
            f"<td>{_effective_html(v) if effective else html.escape(str(v))}</td>" for v in values
        )
        body.append(f"<tr><th>{html.escape(field)}</th>{tds}</tr>")
    definitions = "".join(
        f'<p class="definition">The threshold: {html.escape(d)}.</p>' for d in _definitions(runs)
    )
    return (
        f"<table><thead><tr><th></th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
        f'<p class="note">—* {NONE_NOTE}: there is nothing to hold, so no effective context.</p>'
        f"{definitions}"
    )


def _plot_html(plot: Plot) -> str:
    if plot.png is None:
        return f'<p class="note">{html.escape(plot.note)}</p>'
    src = "data:image/png;base64," + base64.b64encode(plot.png).decode("ascii")
    data = html.escape(json.dumps(list(plot.series)), quote=True)
    alt = html.escape(f"plot: {plot.title}", quote=True)
    return (
        f'<figure><img class="plot" src="{src}" alt="{alt}" data-series="{data}">'
        f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>"
    )


def _cells_html(runs: Sequence[Run]) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in ("run", "task", "length", "depth", "metric", "score", "n", "chance", "seconds")
    )
    rows = []
    for run in runs:
        for c in run.cells:
            extras = ", ".join(f"{k}={c[k]}" for k in c if k not in (*CELL_KEYS, "seconds"))
            values = [run.label, c["task"], c["length"], _plain(c["depth"]), c["metric"]]
            values += [_score(c["score"]), c["n"], _plain(c["chance"]), _duration(c["seconds"])]
            tds = "".join(f"<td>{html.escape(str(v))}</td>" for v in values)
            rows.append(f"<tr>{tds}<td>{html.escape(extras)}</td></tr>")
    return (
        f"<details><summary>every cell ({len(rows)})</summary><table><thead><tr>{head}"
        f"<th>extras</th></tr></thead><tbody>{''.join(rows)}</tbody></table></details>"
    )


def _title(runs: Sequence[Run]) -> str:
    suites = ", ".join(dict.fromkeys(str(r.data.get("suite", "?")) for r in runs))
    return f"memext evaluation report — suite {suites}"


def render_html(runs: Sequence[Run], drawn: Sequence[Plot]) -> str:
    """The whole page; ``drawn`` is ``plots(runs)``."""
    sections = [
        f"<h1>{html.escape(_title(runs))}</h1>",
        f'<p class="muted">{len(runs)} run(s); memext {html.escape(memext.__version__)}</p>',
        "<h2>Summary</h2>",
        _summary_html(runs),
        *(f"<h2>{html.escape(p.title)}</h2>{_plot_html(p)}" for p in drawn),
        "<h2>Cells</h2>",
        _cells_html(runs),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(_title(runs))}</title><style>{CSS}</style></head>"
        f"<body><main>\n{chr(10).join(sections)}\n</main></body></html>\n"
    )


# --- Markdown ------------------------------------------------------------------------------------


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _md_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _effective_md(value: Any) -> str:
    return "—*" if value is None else str(value)


def _scores_md(runs: Sequence[Run], task: str) -> str:
    columns = [by_length(r.cells, task) for r in runs]
    metric = next(c for r in runs for c in r.task_cells(task))
    better = "higher" if metric["higher_is_better"] else "lower"
    averaged = "; mean over depths" if _has_depths(runs, task) else ""
    rows = [[n, *(_score(col.get(n)) for col in columns)] for n in _lengths(runs, task)]
    return f"### {task}\n\n{metric['metric']}, {better} is better{averaged}.\n\n" + _md_table(
        ["length", *(r.label for r in runs)], rows
    )


def render_markdown(runs: Sequence[Run]) -> str:
    """The summary and, per task, a length × run table of scores; no images."""
    rows = [
        [field, *(_effective_md(v) if field.startswith("effective") else v for v in values)]
        for field, values in _summary_rows(runs)
    ]
    parts = [
        f"# {_title(runs)}",
        "## Summary",
        _md_table(["", *(r.label for r in runs)], rows),
        f"—* {NONE_NOTE}: there is nothing to hold, so no effective context.",
        *(f"The threshold: {d}." for d in _definitions(runs)),
        "## Scores by length",
        *(_scores_md(runs, t) for t in _tasks(runs)),
    ]
    return "\n\n".join(parts) + "\n"


# --- entry point ---------------------------------------------------------------------------------


def build_report(results: Sequence[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for the runs in ``results`` into ``out_dir``.

    Args:
        results: results files (``RUN_DIR/eval/<suite>.json``) or run directories (every suite
            results file in ``RUN_DIR/eval``), shown side by side in this order.
        out_dir: where the two files go (created if missing).

    Returns:
        The paths of the HTML and the Markdown report.

    Raises:
        MemextError: no results, a file that is not suite results of this schema version, a run
            directory without suite results, or matplotlib missing.
    """
    runs = load_runs(results)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MemextError("the report's plots need matplotlib: pip install matplotlib") from None
    out = Path(out_dir)
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_text(html_path, render_html(runs, plots(runs)))
    atomic_write_text(md_path, render_markdown(runs))
    return html_path, md_path
