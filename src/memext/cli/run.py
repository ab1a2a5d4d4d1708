"""Run, evaluate and report: `memext train`, `eval`, `report`, `info`, `config` and
`tokenizer train`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

import memext
from memext.cli.common import (
    CacheOptsOpt,
    ConfigOpt,
    DeviceOpt,
    ModelArg,
    PresetOpt,
    SetOpt,
    assignments,
    build_config,
    cache_options,
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
            "--eval/--no-eval",
            help="Evaluate at the end: the suite (with and without memory for memory models) "
            "and its HTML report.",
        ),
    ] = True,
    suite: Annotated[
        str,
        typer.Option(
            help="The suite to evaluate with: longctx, default (bits-per-byte and memory reach "
            "only), quick, a .yaml file, or none."
        ),
    ] = "longctx",
    nproc: Annotated[
        int | None,
        typer.Option(
            help="Train on N processes of this machine: runs `torchrun --standalone "
            "--nproc-per-node N -m memext train ...` (train.strategy: ddp or fsdp; "
            "docs/distributed.md)."
        ),
    ] = None,
    max_restarts: Annotated[
        int,
        typer.Option(
            help="With --nproc: torchrun restarts the job this many times after a rank fails; "
            "each restart resumes from the last checkpoint."
        ),
    ] = 0,
) -> None:
    """Train a long-context LM (the main job: `memext train` trains `tiny` on the built-in corpus)."""
    from memext.checkpoint import load_config
    from memext.dist.launch import exec_torchrun, launched
    from memext.evals.probes import training_probes
    from memext.runtime import resolve_device
    from memext.train import train as run_training  # looked up per call: a test wraps it

    if nproc is not None:  # torchrun starts the ranks, each running this command without --nproc
        chosen = Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        exec_torchrun(nproc, max_restarts, chosen if resume is None and out_dir is None else None)
    if max_restarts:
        raise MemextError("--max-restarts goes with --nproc (under torchrun, give it to torchrun)")
    if launched() and resume is None and out_dir is None:
        raise MemextError("under torchrun every rank must write the same run: pass --out DIR")
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
        teacher=open_teacher(cfg, dev),
    )
    if not result.main:  # rank 0 alone reports and evaluates
        return
    out.print(
        f"{result.status} at step {result.step} in {time.perf_counter() - t0:.0f}s: {run_dir}"
    )
    if result.status != "completed":
        raise typer.Exit(130)
    if evaluate and suite != "none" and cfg.model.arch == "seq2seq":
        # An encoder-decoder reads no running text: its evaluation is the held-out pairs at
        # eval.lengths, whole and by the 512-token prefix baseline (docs/evaluation.md).
        run_and_print_seq2seq(run_dir, dev)
        _report([run_dir], run_dir / "report")
    elif evaluate and suite != "none":
        out.print(
            "The trainer's val_bits_per_byte and bits_per_byte_by_length above are its monitor: "
            "one forward pass over each window, on other positions than the suite's. The suite's "
            "bpb below reads the model as it reads long input (docs/evaluation.md).",
            highlight=False,
        )
        run_and_print_suite(run_dir, suite, None, None, dev, None)
        if cfg.train.segment_len:  # the same weights without memory: what memory adds
            run_and_print_suite(run_dir, suite, None, None, dev, None, memory=False)
        _report([run_dir], run_dir / "report")


def open_teacher(cfg: memext.Config, dev: Any) -> Any:
    """The model ``train.distill_teacher`` names, opened for the trainer; None when unset."""
    from memext.adapters import open_model

    name = cfg.train.distill_teacher
    if not name:
        return None
    try:
        return open_model(name, dev)
    except MemextError as e:
        raise MemextError(f"the teacher (train.distill_teacher): {e}") from None


def run_and_print_suite(
    path: Path,
    suite: str,
    lengths: list[int] | None,
    max_tokens: int | None,
    dev,
    out_file: Path | None,
    memory: bool = True,
    reading: Any = None,
) -> Path:
    from memext.evals.runner import evaluate_model

    results, target = evaluate_model(
        path,
        suite,
        lengths,
        max_tokens,
        dev,
        out_file,
        memory,
        log=lambda m: err.print(m, highlight=False),
        reading=reading,
    )
    _print_suite(results)
    out.print(f"suite results: {target}")
    return target


def run_and_print_seq2seq(
    path: Path,
    dev: Any,
    lengths: list[int] | None = None,
    tasks: list[str] | None = None,
    samples: int | None = None,
    keep: int | None = None,
    out_file: Path | None = None,
) -> Path:
    """``memext eval`` on an encoder-decoder run: the held-out pairs of its tasks at each
    length, whole and by the prefix baseline (``memext.evals.seq2seq_suite``)."""
    from memext.evals.seq2seq_suite import plan_seq2seq, run_seq2seq_eval

    spec = plan_seq2seq(path, lengths, tasks, samples, keep)
    results, target = run_seq2seq_eval(
        path, spec, dev, out_file, log=lambda m: err.print(m, highlight=False)
    )
    _print_seq2seq(results)
    out.print(f"seq2seq results: {target}")
    return target


def _print_seq2seq(results: dict[str, Any]) -> None:
    from memext.evals.report import retrieval_label

    model, spec = results["model"], results["spec"]
    table = Table(title=f"held-out pairs by source length — {model['name']}")
    for col in ("task", "length", "reading"):
        table.add_column(col, no_wrap=True)
    for col in ("ROUGE-L", "BLEU", "chrF", "loss", "oracle ROUGE-L"):
        table.add_column(col, justify="right")
    for c in results["cells"]:
        oracle = c.get("oracle")
        table.add_row(
            c["task"],
            f"{c['length']}{'*' if c['retrieval'] else ''}",
            "whole" if c["keep"] is None else f"prefix {c['keep']}",
            *(f"{c[m]:.1f}" for m in ("rougeL", "bleu", "chrf")),
            f"{c['loss']:.3f}",
            "-" if oracle is None else f"{oracle['rougeL']:.1f}",
        )
    out.print(table)
    for c in results["skipped"]:
        out.print(f"  {c['task']}@{c['length']} {c['reading']}: {c['skipped']}", highlight=False)
    out.print(
        f"scores 0-100 on {spec['samples']} held-out samples each (ROUGE-1/2 in the JSON); "
        f"*: past max_seq_len={model['max_seq_len']}, read with retrieval cross-attention "
        f"({retrieval_label(spec)})",
        highlight=False,
    )


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
    from memext.evals.suite_tasks import SUITE_TASKS

    for task in summary["tasks"]:
        measures = SUITE_TASKS[task].measures if task in SUITE_TASKS else ""
        if measures:
            out.print(f"  {task}: {measures}", highlight=False)
    eff, solved = summary["effective_context"], summary.get("solved_tasks", [])
    out.print(
        f"effective context length (the shortest among the tasks it solves: "
        f"{', '.join(solved) or 'none'}): "
        + (f"{eff} tokens" if eff is not None else "none — no accuracy task is solved")
        + f"; threshold {summary['threshold']:g} × each task's score at its shortest length",
        highlight=False,
    )


def _report(inputs: list[Path], out_dir: Path, suite: str | None = None) -> None:
    from memext.evals.report import build_report

    html, md = build_report(inputs, out_dir, suite)
    out.print(f"report: {html} (Markdown: {md})")


@user_errors
def eval_(
    run_dir: ModelArg,
    suite: Annotated[
        str,
        typer.Option(
            help="The suite: default (bits-per-byte by length, and memory reach for models "
            "that read in segments), longctx, quick or a .yaml file (docs/evaluation.md); "
            "finished cells are kept and not recomputed."
        ),
    ] = "default",
    lengths: Annotated[
        str | None,
        typer.Option(help="Comma-separated context lengths (default: the suite's)."),
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Scored tokens per length of bpb and reach.")
    ] = None,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory/--no-memory",
            help="--no-memory reads a memory model with its memory emptied before each segment "
            "(the same weights, window only), into RUN/eval/SUITE-no-memory.json.",
        ),
    ] = True,
    cache: Annotated[
        str | None,
        typer.Option(
            help="Read each input through this KV-cache policy (`memext info` lists them): the "
            "input in --chunk-token forwards, the answer positions one token per forward, as "
            "greedy decoding reads; results in RUN/eval/SUITE-POLICY-OPTIONS.json. Default: the "
            "model's own reading (one pass, or its memory's segments)."
        ),
    ] = None,
    cache_opt: CacheOptsOpt = None,
    chunk: Annotated[
        int | None,
        typer.Option(
            min=1, help="Tokens per forward when reading through --cache (default: one forward)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    output: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Results JSON (default: RUN/eval/SUITE.json; RUN/eval/seq2seq.json for an "
            "encoder-decoder run).",
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="Encoder-decoder runs: comma-separated tasks to score (default: the tasks of "
            "the run's data.mixture)."
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Encoder-decoder runs: held-out samples per task and length (default: the "
            "run's eval.probe_samples).",
        ),
    ] = None,
    keep: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Encoder-decoder runs: source tokens the prefix baseline reads (default: 512, "
            "or model.max_seq_len when shorter).",
        ),
    ] = None,
) -> None:
    """Grade a model with a suite: bits-per-byte by context length and memory reach by default;
    long-context tasks and the effective context length with --suite longctx. An encoder-decoder
    run is scored on held-out pairs of its tasks instead: ROUGE, BLEU, chrF and loss at each
    length, whole and by a prefix baseline."""
    from memext.adapters import Reading
    from memext.evals.seq2seq_suite import is_seq2seq_run
    from memext.runtime import resolve_device

    parsed = list(parse_value("--lengths", tuple[int, ...], lengths)) if lengths else None
    if is_seq2seq_run(run_dir):  # decided from the config: the suite's adapters refuse it
        suite_only = {
            "--suite": suite != "default",
            "--max-tokens": max_tokens is not None,
            "--no-memory": not memory,
            "--cache": cache is not None,
            "--cache-opt": bool(cache_opt),
            "--chunk": chunk is not None,
        }
        given = [name for name, set_ in suite_only.items() if set_]
        if given:
            raise MemextError(
                f"{', '.join(given)}: options of the suite, which reads decoder-only models; "
                f"{run_dir} is an encoder-decoder run, scored with --lengths, --task, --samples "
                "and --keep"
            )
        tasks = [t.strip() for t in task.split(",") if t.strip()] if task is not None else None
        if tasks == []:
            raise MemextError("--task names no task: give one or more, comma-separated")
        run_and_print_seq2seq(run_dir, resolve_device(device), parsed, tasks, samples, keep, output)
        out.print(f"next: memext report {run_dir if output is None else output}")
        return
    options = (("--task", task), ("--samples", samples), ("--keep", keep))
    given = [name for name, value in options if value is not None]
    if given:
        raise MemextError(
            f"{', '.join(given)}: options for encoder-decoder runs (model.arch=seq2seq); "
            f"{run_dir} is read by the suite (--suite, --lengths, --max-tokens)"
        )
    reading = Reading.of(cache, cache_options(cache_opt), chunk)
    target = run_and_print_suite(
        run_dir, suite, parsed, max_tokens, resolve_device(device), output, memory, reading
    )
    # A model's own results folder is found from its name or path; elsewhere, the file itself.
    out.print(f"next: memext report {run_dir if output is None else target}")


@user_errors
def report(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Suite results files, or models whose eval/*.json to show: run directories, "
            "model directories, GGUF files, known model names (smollm2); each model's readings "
            "(--cache) side by side."
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for report.html and report.md (default: the first model's "
            "report/, or beside the first results file).",
        ),
    ] = None,
    suite: Annotated[
        str | None,
        typer.Option(help="Only the results of this suite (by name) from each model's eval/."),
    ] = None,
) -> None:
    """One self-contained HTML page (and a Markdown twin) from suite results, runs side by side."""
    from memext.evals.report_runs import results_home

    home = results_home(inputs[0])
    _report(inputs, output or (home if home is not None else inputs[0].parent) / "report", suite)


@user_errors
def info(
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A model: a memext run, a local Hugging Face model dir, a GGUF file or a known "
            "model name; none = what this "
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
    from memext.adapters import detect_kind, model_home, model_kind
    from memext.evals.results import load_results

    kind = detect_kind(run_dir)
    lines = model_kind(kind).summary(run_dir)  # a broken model fails here, before any output
    out.print(f"[bold]{run_dir}[/] ({kind})")
    for line in lines:
        out.print(line, highlight=False)
    home = model_home(run_dir, kind)
    for path in sorted((home / "eval").glob("*.json")):
        try:
            summary = load_results(path)["summary"]
        except MemextError:
            continue  # another evaluation's file, or one of an older schema
        reached = summary.get("effective_context")
        out.print(
            f"{path.relative_to(home) if home == run_dir else path}: effective context "
            f"{'none' if reached is None else reached} (tasks solved: "
            f"{', '.join(summary.get('solved_tasks', [])) or 'none'})",
            highlight=False,
        )


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
