"""One self-contained report (HTML, and Markdown for terminals and CI logs) from suite results.

``build_report`` reads one or more results files (``RUN_DIR/eval/<suite>.json``, see
``memext.evals.results``) and writes ``report.html`` and ``report.md`` side by side, one column or
line per run. The HTML page has no external resources: plots are base64 PNGs drawn with
matplotlib's Agg canvas, and each ``<img class="plot">`` carries the numbers it draws in a
``data-series`` attribute (JSON), so a reader or a test can check a plot against its data.
The runs are read in ``report_runs.py``, the plots drawn in ``report_plots.py``.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import memext
from memext.errors import MemextError
from memext.evals.report_plots import Plot, Seq2SeqRun, plots, seq2seq_plots
from memext.evals.report_runs import (
    Run,
    _is_suite_file,
    _labels,
    has_depths,
    load_runs,
    run_lengths,
    run_tasks,
)
from memext.evals.results import by_length
from memext.io import atomic_write_text

NONE_NOTE = "score at the shortest length is 0"
# Keys every cell has; anything else is a task extra, shown in the cell table.
CELL_KEYS = ("task", "length", "depth", "metric", "higher_is_better", "score", "n", "chance")


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
        ("reading", [_plain(r.model.get("reading")) for r in runs]),
        ("params", [_params(r.model.get("params")) for r in runs]),
        ("trained length", [_plain(r.model.get("trained_length")) for r in runs]),
        ("max context", [_plain(r.model.get("max_context")) for r in runs]),
        (
            "effective context (solved tasks)",
            [r.summary.get("effective_context") for r in runs],
        ),
    ]
    for task in run_tasks(runs):
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


def _notes(runs: Sequence[Run]) -> list[str]:
    """The suites' own notes (``SuiteSpec.note``: where and why their lengths stop), once each."""
    notes = (str((r.data.get("spec") or {}).get("note") or "") for r in runs)
    return list(dict.fromkeys(n for n in notes if n))


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
    definitions += "".join(
        f'<p class="definition">Suite note: {html.escape(n)}</p>' for n in _notes(runs)
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
    if not runs:
        return "memext evaluation report — encoder-decoder"
    suites = ", ".join(dict.fromkeys(str(r.data.get("suite", "?")) for r in runs))
    return f"memext evaluation report — suite {suites}"


# --- encoder-decoder runs ------------------------------------------------------------------------

SEQ2SEQ_NOTE = (
    "Held-out samples of each task cut from the run's validation text, scored in ROUGE-1/2/L, "
    "BLEU and chrF (0-100) and the teacher-forced loss (nats per target token). whole: the model "
    "reads the whole source; prefix K: only its first K tokens, the question kept (the "
    "truncation baseline); oracle: what a perfect reader of the same tokens writes. Sources "
    "longer than the model's max_seq_len are read with retrieval cross-attention (chunked "
    "encoding; cross-attention logits scaled for the number of states, or top-k): marked "
    "retrieval."
)
SEQ2SEQ_HEAD = (
    "run",
    "task",
    "length",
    "reading",
    "source tokens",
    "ROUGE-1",
    "ROUGE-2",
    "ROUGE-L",
    "BLEU",
    "chrF",
    "loss",
    "oracle ROUGE-L",
    "n",
    "seconds",
)


def retrieval_label(retrieval: dict[str, Any]) -> str:
    """``{"encode_chunk": 160, "cross_topk": None, "trained_len": 160}`` -> "chunks of 160,
    scaled from 160"."""
    parts = [f"chunks of {retrieval['encode_chunk']}"]
    if retrieval.get("cross_topk"):
        parts.append(f"top-{retrieval['cross_topk']}")
    if retrieval.get("trained_len"):
        parts.append(f"scaled from {retrieval['trained_len']}")
    return ", ".join(parts)


def _seq2seq_rows(runs: Sequence[Seq2SeqRun]) -> list[list[str]]:
    rows = []
    for run in runs:
        for c in run.cells:
            reading = "whole" if c.get("keep") is None else f"prefix {c['keep']}"
            if c.get("retrieval"):
                reading += f" (retrieval: {retrieval_label(c['retrieval'])})"
            oracle = c.get("oracle")
            rows.append(
                [
                    run.label,
                    c["task"],
                    str(c["length"]),
                    reading,
                    str(c.get("source_tokens", "")),
                    *(f"{c[m]:.1f}" for m in ("rouge1", "rouge2", "rougeL", "bleu", "chrf")),
                    f"{c['loss']:.3f}",
                    "—" if oracle is None else f"{oracle['rougeL']:.1f}",
                    str(c.get("n", "")),
                    _duration(c.get("seconds")),
                ]
            )
    return rows


def _seq2seq_html(runs: Sequence[Seq2SeqRun], drawn: Sequence[Plot]) -> list[str]:
    head = "".join(f"<th>{h}</th>" for h in SEQ2SEQ_HEAD)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>"
        for row in _seq2seq_rows(runs)
    )
    return [
        "<h2>Encoder-decoder: held-out pairs by source length</h2>",
        f'<p class="definition">{html.escape(SEQ2SEQ_NOTE)}</p>',
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
        *(f"<h2>{html.escape(p.title)}</h2>{_plot_html(p)}" for p in drawn),
    ]


def _seq2seq_markdown(runs: Sequence[Seq2SeqRun]) -> list[str]:
    return [
        "## Encoder-decoder: held-out pairs by source length",
        SEQ2SEQ_NOTE,
        _md_table(SEQ2SEQ_HEAD, _seq2seq_rows(runs)),
    ]


def render_html(
    runs: Sequence[Run],
    drawn: Sequence[Plot],
    s2s: Sequence[Seq2SeqRun] = (),
    s2s_drawn: Sequence[Plot] = (),
) -> str:
    """The whole page; ``drawn`` is ``plots(runs)``, ``s2s_drawn`` ``seq2seq_plots(s2s)``."""
    n = len(runs) + len(s2s)
    sections = [
        f"<h1>{html.escape(_title(runs))}</h1>",
        f'<p class="muted">{n} run(s); memext {html.escape(memext.__version__)}</p>',
    ]
    if runs:
        sections += [
            "<h2>Summary</h2>",
            _summary_html(runs),
            *(f"<h2>{html.escape(p.title)}</h2>{_plot_html(p)}" for p in drawn),
            "<h2>Cells</h2>",
            _cells_html(runs),
        ]
    if s2s:
        sections += _seq2seq_html(s2s, s2s_drawn)
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
    averaged = "; mean over depths" if has_depths(runs, task) else ""
    rows = [[n, *(_score(col.get(n)) for col in columns)] for n in run_lengths(runs, task)]
    return f"### {task}\n\n{metric['metric']}, {better} is better{averaged}.\n\n" + _md_table(
        ["length", *(r.label for r in runs)], rows
    )


def render_markdown(runs: Sequence[Run], s2s: Sequence[Seq2SeqRun] = ()) -> str:
    """The summary and, per task, a length × run table of scores; no images. Encoder-decoder
    runs (``s2s``) add their table of held-out pairs."""
    parts = [f"# {_title(runs)}"]
    if runs:
        rows = [
            [field, *(_effective_md(v) if field.startswith("effective") else v for v in values)]
            for field, values in _summary_rows(runs)
        ]
        parts += [
            "## Summary",
            _md_table(["", *(r.label for r in runs)], rows),
            f"—* {NONE_NOTE}: there is nothing to hold, so no effective context.",
            *(f"The threshold: {d}." for d in _definitions(runs)),
            *(f"Suite note: {n}" for n in _notes(runs)),
            "## Scores by length",
            *(_scores_md(runs, t) for t in run_tasks(runs)),
        ]
    if s2s:
        parts += _seq2seq_markdown(s2s)
    return "\n\n".join(parts) + "\n"


# --- entry point ---------------------------------------------------------------------------------


def build_report(
    results: Sequence[str | Path], out_dir: str | Path, suite: str | None = None
) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` for the runs in ``results`` into ``out_dir``.

    Args:
        results: results files (``RUN_DIR/eval/<suite>.json``), run or model directories, or
            models by name (every suite results file in their ``eval/``: ``report_runs``),
            shown side by side in this order.
        out_dir: where the two files go (created if missing).
        suite: only the results of this suite from directories and models.

    Returns:
        The paths of the HTML and the Markdown report.

    Raises:
        MemextError: no results, a file that is not suite results of this schema version, a run
            directory without suite results, or matplotlib missing.
    """
    s2s, others = _seq2seq_runs(results)
    runs = load_runs(others, suite) if others or not s2s else []
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MemextError("the report's plots need matplotlib: pip install matplotlib") from None
    out = Path(out_dir)
    html_path, md_path = out / "report.html", out / "report.md"
    page = render_html(runs, plots(runs) if runs else [], s2s, seq2seq_plots(s2s) if s2s else [])
    atomic_write_text(html_path, page)
    atomic_write_text(md_path, render_markdown(runs, s2s))
    return html_path, md_path


def _seq2seq_runs(
    results: Sequence[str | Path],
) -> tuple[list[Seq2SeqRun], list[str | Path]]:
    """The encoder-decoder results among ``results`` (a seq2seq results file, or a run whose
    ``eval/`` holds one), labelled, and the entries left for the suite's reader: every other
    one, and a directory that also holds suite results."""
    from memext.evals.seq2seq_suite import load_seq2seq_results, seq2seq_files

    found: list[tuple[Path, dict[str, Any]]] = []
    others: list[str | Path] = []
    for entry in results:
        files = seq2seq_files(entry)
        found += [(f, load_seq2seq_results(f)) for f in files]
        home = Path(entry)
        suite_too = home.is_dir() and any(_is_suite_file(p) for p in home.glob("eval/*.json"))
        if not files or suite_too:
            others.append(entry)
    labels = _labels(found)
    return [Seq2SeqRun(lbl, p, d) for lbl, (p, d) in zip(labels, found, strict=True)], others
