"""Run, evaluate and report: `memext train`, `eval`, `report`, `info`, `config` and
`tokenizer train`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import memext
from memext.cli.common import (
    ConfigOpt,
    DeviceOpt,
    PresetOpt,
    SetOpt,
    assignments,
    build_config,
    default,
    err,
    out,
    user_errors,
)
from memext.config_docs import describe_fields
from memext.errors import MemextError
from memext.fields import parse_value
from memext.presets import PRESETS
from memext.train import trainer


def fields_epilog() -> str:
    lines = ["Settings for --set SECTION.FIELD=VALUE (defaults of the tiny preset):\n\n"]
    for name, typ, value, help_ in describe_fields():
        lines.append(f"  {name} ({typ}, default {value!r}): {help_}\n\n")
    return "".join(lines)


def _print_eval(rows: list[dict[str, Any]], title: str) -> None:
    table = Table(title=title)
    for col in ("context L", "bits/byte", "perplexity", "scored tokens"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["length"]),
            f"{r['bits_per_byte']:.4f}",
            f"{r['perplexity']:.3f}",
            f"{r['scored_tokens']:,}",
        )
    out.print(table)


@user_errors
def train(
    preset: PresetOpt = "tiny",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default: runs/PRESET-TIMESTAMP).")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = default(
        trainer.train, "overwrite"
    ),
    device: DeviceOpt = "auto",
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval", help="Evaluate bits-per-byte by context length at the end."
        ),
    ] = True,
    suite: Annotated[
        str,
        typer.Option(
            help="After the evaluation, run this suite (longctx, quick, a .yaml file, or none) "
            "and write the HTML report."
        ),
    ] = "longctx",
) -> None:
    """Train a long-context LM (the main job: `memext train` trains `tiny` on the built-in corpus)."""
    from memext.checkpoint import load_config
    from memext.evals.probes import training_probes
    from memext.runtime import resolve_device
    from memext.train import train as run_training  # looked up per call: a test wraps it

    dev = resolve_device(device)
    if resume is not None:
        if out_dir is not None and out_dir != resume:
            raise MemextError("--resume names the run directory; leave out --out")
        cfg = load_config(resume).override(assignments(set_ or []))
        run_dir = resume
    else:
        cfg = build_config(preset, config, set_ or [])
        run_dir = out_dir or Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    result = run_training(
        cfg,
        run_dir,
        device=dev,
        resume=resume is not None,
        overwrite=overwrite,
        log=lambda m: err.print(m, highlight=False),
        probes=training_probes(cfg),
    )
    out.print(
        f"{result.status} at step {result.step} in {time.perf_counter() - t0:.0f}s: {run_dir}"
    )
    if result.status != "completed":
        raise typer.Exit(130)
    if evaluate:
        evaluate_and_print(run_dir, None, None, dev, None)
        if suite != "none":
            _run_suite(run_dir, suite, None, dev, None)
            if cfg.train.segment_len:  # the same weights without memory: what memory adds
                _run_suite(run_dir, suite, None, dev, None, memory=False)
            _report([run_dir], run_dir / "report")


def _run_suite(
    path: Path,
    suite: str,
    lengths: list[int] | None,
    dev,
    out_file: Path | None,
    memory: bool = True,
) -> Path:
    import dataclasses

    from memext.adapters import open_model
    from memext.evals.suite import get_suite, run_suite

    spec = get_suite(suite)
    if lengths:
        spec = dataclasses.replace(spec, lengths=tuple(lengths))
    adapter = open_model(path, dev, memory=memory)
    name = spec.name if memory else f"{spec.name}-no-memory"
    target = out_file or path / "eval" / f"{name}.json"
    err.print(f"suite {spec.name} on {adapter.name} ({adapter.kind}) -> {target}")
    results = run_suite(adapter, spec, target, log=lambda m: err.print(m, highlight=False))
    _print_suite(results)
    out.print(f"suite results: {target}")
    return target


def _print_suite(results: dict[str, Any]) -> None:
    summary = results["summary"]
    lengths = [str(n) for n in results["lengths"]]
    units = {"bits_per_byte": "bits/byte", "exact_match": "exact", "tokens_per_s": "tok/s"}
    table = Table(title=f"{results['suite']}: score by length — {results['model']['name']}")
    table.add_column("task", no_wrap=True)
    table.add_column("metric", no_wrap=True)
    for col in (*lengths, "effective context"):
        table.add_column(col, justify="right")
    for task, s in summary["tasks"].items():
        cells = [s["by_length"].get(n) for n in lengths]
        table.add_row(
            task,
            units.get(s["metric"], s["metric"]),
            *("-" if v is None else f"{v:,.0f}" if v >= 100 else f"{v:.3f}" for v in cells),
            "-" if s["effective_context"] is None else str(s["effective_context"]),
        )
    out.print(table)
    eff = summary["effective_context"]
    out.print(
        "effective context length (mean of the accuracy tasks): "
        + (f"{eff} tokens" if eff is not None else "none — they score 0 at the shortest length")
        + f"; threshold {summary['threshold']:g} × the shortest length's score"
    )


def _report(inputs: list[Path], out_dir: Path) -> None:
    from memext.evals.report import build_report

    html, md = build_report(inputs, out_dir)
    out.print(f"report: {html} (Markdown: {md})")


def evaluate_and_print(
    run_dir: Path, lengths: list[int] | None, max_tokens: int | None, dev, out_file: Path | None
) -> None:
    from memext.evals.runner import evaluate_run

    rows, reach_rows, path = evaluate_run(run_dir, lengths, max_tokens, dev, out_file)
    _print_eval(rows, f"validation bits-per-byte by context length — {run_dir}")
    if reach_rows:
        _print_reach(reach_rows)
    out.print(f"results: {path}")


def _print_reach(rows: list[dict[str, Any]]) -> None:
    w = rows[0]["segment_len"]
    table = Table(title=f"memory reach: bits-per-byte of a {w}-token segment after R tokens")
    for col in ("reach R", "with memory (segments)", "without (one pass)"):
        table.add_column(col, justify="right")
    by = {}
    for r in rows:
        by.setdefault(r["reach_in_segments"], {})[r["memory"]] = r["bits_per_byte"]
    for m, cells in sorted(by.items()):
        table.add_row(
            f"{m}W = {m * w}",
            *(f"{cells[k]:.4f}" if k in cells else "-" for k in (True, False)),
        )
    out.print(table)


@user_errors
def eval_(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A run directory (or, with --suite, a local Hugging Face model dir)."),
    ],
    suite: Annotated[
        str | None,
        typer.Option(
            help="Run an evaluation suite instead: longctx, quick or a .yaml file "
            "(docs/evaluation.md); finished cells are kept and not recomputed."
        ),
    ] = None,
    lengths: Annotated[
        str | None,
        typer.Option(help="Comma-separated context lengths (default: the run's eval.lengths)."),
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Scored tokens per length.")] = None,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="With --suite: --no-memory reads a memory model with its memory emptied before "
            "each segment (the same weights, window only), into RUN/eval/SUITE-no-memory.json.",
        ),
    ] = True,
    device: DeviceOpt = "auto",
    output: Annotated[
        Path | None,
        typer.Option(
            "--out", help="Results JSON (default: RUN_DIR/eval.json, RUN_DIR/eval/SUITE.json)."
        ),
    ] = None,
) -> None:
    """Bits-per-byte and perplexity on the validation split at several context lengths; or,
    with --suite, a suite of long-context tasks and the model's effective context length."""
    from memext.runtime import resolve_device

    parsed = list(parse_value("--lengths", tuple[int, ...], lengths)) if lengths else None
    if not memory and suite is None:
        raise MemextError("--no-memory applies to suites: add --suite NAME")
    if suite is not None:
        _run_suite(run_dir, suite, parsed, resolve_device(device), output, memory)
        out.print(f"next: memext report {run_dir}")
        return
    evaluate_and_print(run_dir, parsed, max_tokens, resolve_device(device), output)


@user_errors
def report(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="Run directories (their eval/*.json) or suite results files."),
    ],
    output: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for report.html and report.md (default: RUN/report)."),
    ] = None,
) -> None:
    """One self-contained HTML page (and a Markdown twin) from suite results, runs side by side."""
    first = inputs[0]
    _report(inputs, output or (first if first.is_dir() else first.parent) / "report")


@user_errors
def info(
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A model: a run directory or a local Hugging Face model dir; none = what this "
            "memext offers."
        ),
    ] = None,
) -> None:
    """Describe a model (a run: config, size, progress, results), or list presets and
    registered variants."""
    from memext.variants import registries

    if run_dir is None:
        out.print(f"memext {memext.__version__}")
        out.print(f"presets: {', '.join(PRESETS)}")
        for registry in registries():
            out.print(f"{registry.kind}: {', '.join(registry.names())}", soft_wrap=True)
        return
    from memext.adapters import detect_kind, model_kind

    kind = detect_kind(run_dir)
    out.print(f"[bold]{run_dir}[/] ({kind})")
    for line in model_kind(kind).summary(run_dir):
        out.print(line, highlight=False)
    eval_path = Path(run_dir) / "eval.json"
    if eval_path.is_file():
        _print_eval(json.loads(eval_path.read_text())["results"], "evaluation")


@user_errors
def config_(
    preset: PresetOpt = "tiny",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    save: Annotated[
        Path | None, typer.Option(help="Write the resulting config here (JSON or YAML).")
    ] = None,
    markdown: Annotated[
        bool, typer.Option(help="Print the settings reference as Markdown (docs/configuration.md).")
    ] = False,
) -> None:
    """Show every setting with its value and documentation (or save it to a file)."""
    if markdown:
        from memext.config_docs import fields_markdown

        print(fields_markdown(), end="")
        return
    cfg = build_config(preset, config, set_ or [])
    if save is not None:
        cfg.save(save)
        out.print(f"saved {save}")
        return
    table = Table(show_lines=False)
    for col in ("setting", "value", "meaning"):
        table.add_column(col)
    for name, _, _, help_ in describe_fields():
        section, field = name.split(".")
        table.add_row(name, repr(getattr(getattr(cfg, section), field)), help_)
    out.print(table)


@user_errors
def tokenizer_train(
    output: Annotated[Path, typer.Option("--out", help="Where to write tokenizer.json.")],
    corpus: Annotated[
        str, typer.Option(help="'stdlib', a file, a directory or a glob.")
    ] = "stdlib",
    vocab_size: Annotated[
        int, typer.Option(help="Vocabulary size, special tokens included.")
    ] = 4096,
) -> None:
    """Train a byte-level BPE tokenizer locally (then use it with --set data.tokenizer=PATH)."""
    from memext.data import read_corpus
    from memext.tokenizer import train_bpe

    c = read_corpus(corpus)
    tok = train_bpe((d.data.decode("utf-8") for d in c.train), vocab_size, output)
    out.print(
        f"wrote {output} ({tok.vocab_size} tokens); train with "
        f"--set data.tokenizer={output} --set model.vocab_size={tok.vocab_size}"
    )
