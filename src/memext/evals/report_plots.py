"""The report's plots: matplotlib figures on the Agg canvas, each kept as PNG bytes together with
the numbers it draws (``Plot.series``), so a page or a test can check a plot against its data."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from memext.evals.report_runs import (
    Run,
    accuracy_tasks,
    depth_tasks,
    has_depths,
    mean_by_length,
    run_lengths,
)
from memext.evals.results import by_length

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#17becf", "#7f7f7f"]
Series = dict[str, Any]


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
    _length_axis(ax, run_lengths(runs, "bpb"))
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("bits-per-byte (dashed: each run's trained length)")
    ax.legend()
    caption = "One line per run; a dashed line marks each run's trained length."
    return Plot(title, _png(fig), tuple(series), caption=caption)


def _chance(runs: Sequence[Run], task: str) -> dict[int, float]:
    return mean_by_length((c for r in runs for c in r.task_cells(task)), "chance")


def plot_accuracy(runs: Sequence[Run]) -> Plot:
    title = "accuracy against length"
    tasks = accuracy_tasks(runs)
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
        _length_axis(ax, run_lengths(runs, task))
        averaged = " (mean over depths)" if has_depths(runs, task) else ""
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
    tps = [mean_by_length(r.task_cells("speed"), "tokens_per_s") for r in runs]
    mib = [
        {n: v / 2**20 for n, v in mean_by_length(r.task_cells("speed"), "peak_bytes").items()}
        for r in runs
    ]
    if not any(tps) and not any(mib):
        return Plot(title, note="no run has speed cells: speed and memory plot omitted")
    fig, (left, right) = _figure(2, 2, (6, 4))
    series = _line_panel(left, runs, "tokens_per_s", tps)
    series += _line_panel(right, runs, "peak_mib", mib)
    for ax, label in ((left, "tokens per second"), (right, "peak memory (MiB)")):
        _length_axis(ax, run_lengths(runs, "speed"))
        ax.set(yscale="log", ylabel=label, title=label)
        ax.legend(fontsize=8)
    caption = "Throughput and peak memory of the speed task (log scale); dashed: trained length."
    return Plot(title, _png(fig), tuple(series), caption=caption)


def plots(runs: Sequence[Run]) -> list[Plot]:
    """Every plot of the report, in page order; those without data carry a note instead."""
    depth = [plot_depth(runs, t) for t in depth_tasks(runs)] or [
        Plot("depth × length", note="no task has cells at several depths: heatmaps omitted")
    ]
    return [plot_bpb(runs), *depth, plot_accuracy(runs), plot_speed(runs)]


# --- encoder-decoder runs ------------------------------------------------------------------------

#: The text scores drawn against source length, with their axis names.
SEQ2SEQ_PANELS = (("rougeL", "ROUGE-L"), ("bleu", "BLEU"), ("chrf", "chrF"))


@dataclass(frozen=True)
class Seq2SeqRun(Run):
    """One encoder-decoder results file (``memext.evals.seq2seq_suite``) as the report shows it
    (``Run``'s label, path, cells and model; it has no suite summary)."""

    @property
    def keep(self) -> int:
        return int(self.data["spec"]["keep"])

    def tasks(self) -> list[str]:
        return list(dict.fromkeys(c["task"] for c in self.cells))


def seq2seq_points(
    cells: Sequence[dict[str, Any]], task: str, reading: str, metric: str, oracle: bool = False
) -> dict[int, float]:
    """``metric`` of ``task`` at each source length under ``reading``: the model's, or with
    ``oracle`` the prefix oracle's; a cell without the score (a task with no oracle) is left
    out."""
    points = {}
    for c in cells:
        if c["task"] == task and c["reading"] == reading:
            scores = c.get("oracle") if oracle else c
            if scores is not None and scores.get(metric) is not None:
                points[int(c["length"])] = float(scores[metric])
    return dict(sorted(points.items()))


def _readings(run: Seq2SeqRun) -> list[tuple[str, bool, str, str]]:
    """(reading, oracle, name, line style) of each line drawn for a run."""
    return [
        ("whole", False, "whole input", "-"),
        ("prefix", False, f"prefix {run.keep}", "--"),
        ("prefix", True, f"prefix oracle {run.keep}", ":"),
    ]


def plot_seq2seq(runs: Sequence[Seq2SeqRun], task: str) -> Plot:
    """A task's ROUGE-L, BLEU and chrF against source length: the whole input, the prefix
    baseline and its oracle; whole-input points read with retrieval cross-attention (past
    ``max_seq_len``) are hollow."""
    title = f"{task}: ROUGE-L, BLEU and chrF against input length"
    have = [r for r in runs if task in r.tasks()]
    lengths = sorted({int(c["length"]) for r in have for c in r.cells if c["task"] == task})
    fig, axes = _figure(len(SEQ2SEQ_PANELS), 3, (4.6, 3.8))
    series: list[Series] = []
    for ax, (metric, name) in zip(axes, SEQ2SEQ_PANELS, strict=True):
        for i, run in enumerate(have):
            retrieved = {
                int(c["length"])
                for c in run.cells
                if c["task"] == task and c["reading"] == "whole" and c.get("retrieval")
            }
            for j, (reading, oracle, line, style) in enumerate(_readings(run)):
                pts = seq2seq_points(run.cells, task, reading, metric, oracle)
                if not pts:
                    continue
                # One run: a colour per reading; several: a colour per run, a style per reading.
                colour = _colour(i) if len(have) > 1 else (_colour(0), _colour(1), "grey")[j]
                label = line if len(have) == 1 else f"{run.label}: {line}"
                x, y = list(pts), list(pts.values())
                ax.plot(x, y, linestyle=style, marker="" if oracle else "o", color=colour)
                ax.plot([], [], linestyle=style, color=colour, label=label)
                hollow = [n for n in x if n in retrieved and not oracle and reading == "whole"]
                if hollow:
                    hy = [pts[n] for n in hollow]
                    ax.plot(hollow, hy, "o", mfc="white", mec=colour, linestyle="none")
                series.append(
                    {
                        "panel": metric,
                        "label": label,
                        "run": run.label,
                        "reading": reading,
                        "oracle": oracle,
                        "x": x,
                        "y": y,
                        "retrieval": hollow,
                    }
                )
            limit = run.model.get("max_seq_len")
            if limit and lengths and max(lengths) > limit:
                colour = _colour(i) if len(have) > 1 else "grey"
                ax.axvline(
                    limit, color=colour, linestyle="-.", linewidth=1, alpha=0.6, label="max_seq_len"
                )
        _length_axis(ax, lengths)
        ax.set(xlabel="source length (tokens)", ylabel=f"{name} (0-100)", title=name)
        ax.set_ylim(-3, 103)
    axes[0].legend(fontsize=8)
    caption = (
        "The model on the whole source and on its first KEEP tokens (the prefix baseline, "
        "question kept), and what a perfect reader of that prefix writes (dotted: the prefix "
        "oracle; the whole input's oracle is the reference). Hollow points: sources past the "
        "model's max_seq_len (dash-dot line), read with retrieval cross-attention."
    )
    return Plot(title, _png(fig), tuple(series), caption=caption)


def seq2seq_plots(runs: Sequence[Seq2SeqRun]) -> list[Plot]:
    """One plot per task of the encoder-decoder runs, in the order they were scored."""
    tasks = list(dict.fromkeys(t for r in runs for t in r.tasks()))
    if not tasks:
        return [Plot("encoder-decoder scores", note="no scored cells: plot omitted")]
    return [plot_seq2seq(runs, t) for t in tasks]
