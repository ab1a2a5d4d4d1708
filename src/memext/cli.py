"""The `memext` command line: thin commands over the library."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

import memext
from memext.config import PRESETS, Config, describe_fields, parse_value
from memext.errors import MemextError

app = typer.Typer(
    help="memext: extend the memory of language models, and measure how far it reaches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")
bench_app = typer.Typer(help="Benchmarks: speed and memory, against peers.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
memory_app = typer.Typer(
    help="A persistent retrieval memory of documents (SQLite; embeddings, BM25, hybrid).",
    no_args_is_help=True,
)
app.add_typer(memory_app, name="memory")
classify_app = typer.Typer(
    help="Long-document classification on a pretrained encoder (chunks -> aggregator -> head).",
    no_args_is_help=True,
)
app.add_typer(classify_app, name="classify")
out = Console()
err = Console(stderr=True)


def _fields_epilog() -> str:
    lines = ["Settings for --set SECTION.FIELD=VALUE (defaults of the tiny preset):\n\n"]
    for name, typ, default, help_ in describe_fields():
        lines.append(f"  {name} ({typ}, default {default!r}): {help_}\n\n")
    return "".join(lines)


def user_errors(fn):
    """Turn errors a user can fix into one red line and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (MemextError, ValueError) as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _assignments(overrides: list[str]) -> dict[str, str]:
    assignments = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is invalid: expected SECTION.FIELD=VALUE")
        assignments[key.strip()] = value
    return assignments


def _config(preset: str, config: Path | None, overrides: list[str]) -> Config:
    cfg = Config.load(config) if config else Config.preset(preset)
    return cfg.override(_assignments(overrides))


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


PresetOpt = Annotated[str, typer.Option(help=f"Preset: {', '.join(PRESETS)}.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="A config file (JSON or YAML).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a setting: SECTION.FIELD=VALUE (repeatable)."),
]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, mps or auto.")]
CacheOpt = Annotated[
    str, typer.Option(help="KV-cache policy by name, see `memext info` (docs/context.md).")
]
CacheOptsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--cache-opt",
        help="A cache policy option KEY=VALUE, e.g. window=1024, sinks=4, axis=channel, "
        "policy=sinks (repeatable).",
    ),
]


def _cache_options(items: list[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in _assignments(items or []).items():
        try:
            options[key] = int(value)
        except ValueError:
            options[key] = value
    return options


@app.command(epilog=_fields_epilog())
@user_errors
def train(
    preset: PresetOpt = "tiny",
    config: ConfigOpt = None,
    set_: SetOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Run directory (default: runs/PRESET-TIMESTAMP).")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
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
    from memext.runtime import resolve_device
    from memext.train import train as run_training

    dev = resolve_device(device)
    if resume is not None:
        if out_dir is not None and out_dir != resume:
            raise MemextError("--resume names the run directory; leave out --out")
        cfg = load_config(resume).override(_assignments(set_ or []))
        run_dir = resume
    else:
        cfg = _config(preset, config, set_ or [])
        run_dir = out_dir or Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    t0 = time.perf_counter()
    result = run_training(
        cfg,
        run_dir,
        device=dev,
        resume=resume is not None,
        overwrite=overwrite,
        log=lambda m: err.print(m, highlight=False),
    )
    out.print(
        f"{result.status} at step {result.step} in {time.perf_counter() - t0:.0f}s: {run_dir}"
    )
    if result.status != "completed":
        raise typer.Exit(130)
    if evaluate:
        _evaluate(run_dir, None, None, dev, None)
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

    from memext.evals.adapters import load_adapter
    from memext.evals.suite import get_suite, run_suite

    spec = get_suite(suite)
    if lengths:
        spec = dataclasses.replace(spec, lengths=tuple(lengths))
    adapter = load_adapter(path, dev, memory)
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


def _evaluate(
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


@app.command("eval")
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
    _evaluate(run_dir, parsed, max_tokens, resolve_device(device), output)


@app.command()
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


@app.command()
@user_errors
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    prompt: Annotated[str | None, typer.Option(help="The prompt text.")] = None,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Read the prompt from this file.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 200,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Keep the k most likely tokens; 0 = all.")] = 0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 0.95,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop at this string (repeatable).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    cache: CacheOpt = "full",
    cache_opt: CacheOptsOpt = None,
    chunk: Annotated[
        int | None, typer.Option(min=1, help="Read the prompt this many tokens per forward.")
    ] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Continue a prompt with a trained model (KV-cached; window/sinks read input of any length)."""
    from memext.checkpoint import load, run_tokenizer
    from memext.infer.generate import generate_text
    from memext.runtime import resolve_device

    if (prompt is None) == (prompt_file is None):
        raise MemextError("give exactly one of --prompt and --prompt-file")
    if prompt_file is not None:
        if not prompt_file.is_file():
            raise MemextError(f"prompt file {str(prompt_file)!r} does not exist")
        try:
            prompt = prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MemextError(f"prompt file {str(prompt_file)!r} is not valid UTF-8") from None
    model, _ = load(run_dir, resolve_device(device))
    tok = run_tokenizer(run_dir)
    for piece in generate_text(
        model,
        tok,
        prompt,
        max_new_tokens,
        stop=stop or (),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        cache=cache,
        cache_options=_cache_options(cache_opt),
        chunk=chunk,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
@user_errors
def stream(
    run_dir: Annotated[Path, typer.Argument(help="A run directory.")],
    text: Annotated[
        str,
        typer.Option(help="Text to read: 'stdlib' (its validation split), a file or directory."),
    ] = "stdlib",
    tokens: Annotated[
        int, typer.Option(min=2, help="Tokens to feed (at most the text's).")
    ] = 100_000,
    cache: CacheOpt = "sinks",
    cache_opt: CacheOptsOpt = None,
    chunk: Annotated[int, typer.Option(min=1, help="Tokens per forward.")] = 256,
    every: Annotated[
        int, typer.Option(min=1, help="Measure cache bytes and peak memory every N tokens.")
    ] = 10_000,
    device: DeviceOpt = "auto",
    output: Annotated[Path | None, typer.Option("--out", help="Results JSON.")] = None,
) -> None:
    """Streaming perplexity: feed a long text through a KV-cache policy in chunks, measuring that
    memory stays flat."""
    from memext.checkpoint import load, run_tokenizer
    from memext.config import DataConfig
    from memext.data import prepare_data
    from memext.evals.streaming import streaming_perplexity
    from memext.io import atomic_write_text
    from memext.runtime import resolve_device

    model, _ = load(run_dir, resolve_device(device))
    tok = run_tokenizer(run_dir)
    store, _ = prepare_data(DataConfig(corpus=text), tok, log=lambda m: err.print(m))
    ids = store.validation if text == "stdlib" else np.concatenate([store.train, store.validation])
    if ids.size < 2:
        raise MemextError(f"the text {text!r} holds {ids.size} tokens: nothing to score")
    ids = ids[:tokens]
    r = streaming_perplexity(
        model,
        ids,
        cache,
        chunk,
        cache_options=_cache_options(cache_opt),
        byte_lengths=tok.byte_lengths(),
        every=every,
    )
    table = Table(title=f"streaming {ids.size:,} tokens through {cache} — {run_dir}")
    for col in ("tokens read", "nats/token so far", "cache bytes", "chunk peak bytes"):
        table.add_column(col, justify="right")
    for c in r["checkpoints"]:
        table.add_row(
            f"{c['tokens']:,}",
            f"{c['nats_per_token']:.4f}",
            f"{c['cache_nbytes']:,}",
            f"{c['chunk_peak_bytes']:,}",
        )
    out.print(table)
    out.print(
        f"bits/byte {r['bits_per_byte']:.4f}, perplexity {r['perplexity']:.3f}, "
        f"{r['tokens_per_s']:,.0f} tokens/s"
    )
    if output is not None:
        atomic_write_text(output, json.dumps({"run": str(run_dir), "text": text, **r}, indent=2))
        out.print(f"results: {output}")


@app.command()
@user_errors
def extend(
    src: Annotated[
        Path, typer.Argument(help="A memext run, or a local Hugging Face causal-LM directory.")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Where the extended copy goes.")],
    scaling: Annotated[
        str, typer.Option(help="Rotary scaling rule by name, see `memext info`.")
    ] = "yarn",
    factor: Annotated[float, typer.Option(help="New length / original length.")] = 4.0,
    original_len: Annotated[
        int | None,
        typer.Option(help="The length the model was trained at (default: read from SRC)."),
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="YaRN's alpha (beta_slow).")] = None,
    beta: Annotated[float | None, typer.Option(help="YaRN's beta (beta_fast).")] = None,
    steps: Annotated[
        int, typer.Option(min=0, help="Fine-tune this many steps at the new length (memext runs).")
    ] = 0,
    lr: Annotated[
        float | None, typer.Option(help="Fine-tuning learning rate (default: the source's final).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a run already in --out.")] = False,
    device: DeviceOpt = "auto",
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Evaluate the copy (memext runs).")
    ] = True,
) -> None:
    """Write a context-extended copy of a model: rotary scaled by FACTOR, optionally fine-tuned."""
    from memext.checkpoint import is_memext_run
    from memext.runtime import resolve_device

    if not src.is_dir():
        raise MemextError(f"{str(src)!r} is not a directory")
    if is_memext_run(src):
        from memext.extend import extend_run

        dev = resolve_device(device)
        extend_run(
            src,
            out_dir,
            scaling,
            factor,
            original_len=original_len,
            alpha=alpha,
            beta=beta,
            steps=steps,
            lr=lr,
            overwrite=overwrite,
            device=str(dev),
            log=lambda m: err.print(m, highlight=False),
        )
        out.print(f"extended {src} x{factor:g} ({scaling}) -> {out_dir}")
        if evaluate:
            _evaluate(out_dir, None, None, dev, None)
        return
    from memext.hf import extend_hf

    if steps:
        raise MemextError(
            "fine-tuning a Hugging Face checkpoint is not supported yet: drop --steps, or "
            "fine-tune the written copy with transformers"
        )
    extend_hf(src, out_dir, scaling, factor, original_len=original_len, alpha=alpha, beta=beta)
    out.print(f"extended {src} x{factor:g} ({scaling}) -> {out_dir}")


@app.command()
@user_errors
def info(
    run_dir: Annotated[
        Path | None, typer.Argument(help="A run directory; none = what this memext offers.")
    ] = None,
) -> None:
    """Describe a run (config, size, progress, results), or list presets and registered variants."""
    from memext.variants import registries

    if run_dir is None:
        out.print(f"memext {memext.__version__}")
        out.print(f"presets: {', '.join(PRESETS)}")
        for registry in registries():
            out.print(f"{registry.kind}: {', '.join(registry.names())}", soft_wrap=True)
        return
    from memext.checkpoint import WEIGHTS, load_config, read_metrics
    from memext.model import build_model

    cfg = load_config(run_dir)
    model = build_model(cfg.model, seed=None)
    m = cfg.model
    out.print(f"[bold]{run_dir}[/]")
    out.print(
        f"model: {m.n_layers} layers x d_model {m.d_model}, {m.n_heads} heads, attention "
        f"{m.attention}, {model.num_params() / 1e6:.2f}M parameters (without embeddings)"
    )
    out.print(f"data: corpus {cfg.data.corpus!r}, tokenizer {cfg.data.tokenizer!r}")
    metrics = read_metrics(run_dir)
    steps = [r for r in metrics if "loss" in r]
    vals = [r for r in metrics if "val_bits_per_byte" in r]
    weights = Path(run_dir) / WEIGHTS
    state = f"step {steps[-1]['step']} of {cfg.train.steps}" if steps else "not started"
    out.print(f"training: {state}; checkpoint {'present' if weights.is_file() else 'missing'}")
    if steps:
        out.print(
            f"last loss {steps[-1]['loss']:.4f}, {steps[-1].get('tokens_per_s', 0):,.0f} tokens/s"
        )
    if vals:
        out.print(
            f"last validation bits/byte {vals[-1]['val_bits_per_byte']:.4f} (step {vals[-1]['step']})"
        )
    eval_path = Path(run_dir) / "eval.json"
    if eval_path.is_file():
        _print_eval(json.loads(eval_path.read_text())["results"], "evaluation")


@app.command("config")
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
        from memext.config import fields_markdown

        print(fields_markdown(), end="")
        return
    cfg = _config(preset, config, set_ or [])
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


@tokenizer_app.command("train")
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


@bench_app.command("attention")
@user_errors
def bench_attention(
    lengths: Annotated[str, typer.Option(help="Sequence lengths, comma-separated.")] = (
        "1024,2048,4096,8192,16384"
    ),
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 8,
    head_dim: Annotated[int, typer.Option(help="Dimension per head.")] = 64,
    window: Annotated[int, typer.Option(help="Window W of sliding and local attention.")] = 512,
    batch: Annotated[int, typer.Option(help="Batch size.")] = 1,
    lsh_chunk: Annotated[int, typer.Option(help="LSH chunk (reformer-pytorch bucket_size).")] = 64,
    lsh_rounds: Annotated[int, typer.Option(help="LSH hashing rounds.")] = 2,
    block_size: Annotated[int, typer.Option(help="block_sparse / BigBird block length.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed repeats per contender and length.")] = 3,
    threads: Annotated[int, typer.Option(help="torch threads; 0 = torch's default.")] = 0,
    only: Annotated[
        str | None, typer.Option(help="Run contenders whose name contains one of these (a,b).")
    ] = None,
    peers: Annotated[bool, typer.Option(help="Include the peers installed from PyPI.")] = True,
    backward: Annotated[bool, typer.Option(help="Also time forward+backward.")] = True,
    memory: Annotated[bool, typer.Option(help="Also measure allocator peak memory.")] = True,
    time_limit: Annotated[
        float, typer.Option(help="Stop growing a contender's length past this many seconds.")
    ] = 120.0,
    train_length: Annotated[
        int, typer.Option(help="Also time tiny-preset training at this context (0 = skip).")
    ] = 8192,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    out_dir: Annotated[Path, typer.Option("--out", help="Where the JSON and PNG go.")] = Path(
        "bench-results"
    ),
) -> None:
    """Time and peak memory of every attention variant against sequence length, vs peers."""
    import torch
    from tqdm import tqdm

    from memext.bench import attention as bench
    from memext.bench.peers import Shape
    from memext.runtime import resolve_device

    if threads:
        torch.set_num_threads(threads)
    dev = str(resolve_device(device))
    shape = Shape(
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        window=window,
        lsh_chunk=lsh_chunk,
        lsh_rounds=lsh_rounds,
        block_size=block_size,
        device=dev,
    )
    chosen, left_out = bench.select(only, peers)
    if not chosen:
        raise ValueError(f"--only {only!r} matches no contender")
    for name, why in left_out.items():
        err.print(f"[yellow]skipping {name}:[/] {why}", highlight=False)
    sizes = parse_value("--lengths", tuple[int, ...], lengths)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--lengths={lengths!r} is invalid: expected positive integers")
    bar = tqdm(desc="bench attention", unit="step", leave=False)

    def tick(msg: str) -> None:
        bar.set_postfix_str(msg, refresh=False)
        bar.update()

    records = bench.measure(
        chosen,
        sizes,
        shape,
        repeats=repeats,
        backward=backward,
        memory=memory,
        time_limit=time_limit,
        progress=tick,
    )
    from memext.nn.attention import ATTENTION

    variants = sorted({c.name.split()[1] for c in chosen if c.package == "memext"} & set(ATTENTION))
    training = (
        bench.train_tokens_per_s(variants, train_length, device=dev, progress=tick)
        if train_length
        else []
    )
    bar.close()
    command = " ".join(["memext", *sys.argv[1:]])
    path, png = bench.report(out, records, training, shape, left_out, out_dir, command)
    out.print(f"wrote {path}" + (f" and {png}" if png else " (no PNG: pip install matplotlib)"))


StoreOpt = Annotated[Path, typer.Option("--store", help="The store's SQLite file.")]
EncoderOpt = Annotated[
    Path | None,
    typer.Option(help="A local Hugging Face encoder dir (default: all-MiniLM-L6-v2, shipped)."),
]
ModeOpt = Annotated[str, typer.Option(help="embedding, bm25 or hybrid.")]


def _open_store(store: Path, encoder: Path | None):
    from memext.pipelines import Encoder, RetrievalStore

    return RetrievalStore(store, encoder=Encoder(encoder))


@memory_app.command("add")
@user_errors
def memory_add(
    files: Annotated[list[Path], typer.Argument(help="UTF-8 text files; each is one document.")],
    store: StoreOpt,
    encoder: EncoderOpt = None,
    overlap: Annotated[int, typer.Option(help="Tokens shared by neighbouring chunks.")] = 32,
) -> None:
    """Chunk, embed and store documents (re-adding one changes nothing)."""
    with _open_store(store, encoder) as db:
        for f in files:
            try:
                data = f.read_bytes()
            except OSError as e:
                raise MemextError(f"cannot read {f}: {e}") from None
            new = db.add_text(str(f), data, overlap=overlap, metadata={"path": str(f)})
            out.print(f"{f}: {new} new chunk(s)")
        out.print(f"{store}: {len(db)} chunks")


@memory_app.command("search")
@user_errors
def memory_search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    store: StoreOpt,
    encoder: EncoderOpt = None,
    k: Annotated[int, typer.Option("-k", help="How many chunks.")] = 5,
    mode: ModeOpt = "hybrid",
) -> None:
    """The chunks most relevant to a query."""
    with _open_store(store, encoder) as db:
        for hit in db.search(query, k=k, mode=mode):
            text = " ".join(hit.text.split())
            out.print(f"{hit.score:8.4f}  {hit.doc_id}  {text[:100]}", highlight=False)


@app.command()
@user_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    store: StoreOpt,
    model: Annotated[Path, typer.Option(help="A memext run or a local HF causal-LM dir.")],
    encoder: EncoderOpt = None,
    k: Annotated[int, typer.Option("-k", help="Chunks to consider.")] = 8,
    mode: ModeOpt = "hybrid",
    max_new_tokens: Annotated[int, typer.Option(help="Length of the answer.")] = 64,
    device: DeviceOpt = "cpu",
) -> None:
    """Answer from a store: the most relevant chunks that fit the model's window, then generate."""
    from memext.pipelines.ask import ask as run_ask

    with _open_store(store, encoder) as db:
        r = run_ask(
            db, model, question, k=k, mode=mode, max_new_tokens=max_new_tokens, device=device
        )
    err.print(
        f"{len(r['used'])} chunk(s), {r['prompt_tokens']} of {r['window']} tokens: "
        + ", ".join(u["doc_id"] for u in r["used"]),
        highlight=False,
    )
    out.print(r["answer"], highlight=False)


DataOpt = Annotated[Path, typer.Option("--data", help="JSONL (or .jsonl.gz) documents.")]
TextFieldOpt = Annotated[str, typer.Option(help="The field holding each document's text.")]
LabelFieldOpt = Annotated[str, typer.Option(help="The field holding each document's label.")]
SplitFieldOpt = Annotated[
    str | None, typer.Option(help="A field naming each line's split (train / validation).")
]


@classify_app.command("train")
@user_errors
def classify_train(
    data: DataOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="The classifier's run directory.")],
    text_field: TextFieldOpt = "text",
    label_field: LabelFieldOpt = "label",
    split_field: SplitFieldOpt = None,
    encoder: EncoderOpt = None,
    aggregator: Annotated[str, typer.Option(help="mean, max, attention or transformer.")] = (
        "mean"
    ),
    truncate: Annotated[
        bool, typer.Option(help="The baseline: the first chunk (first max_tokens) only.")
    ] = False,
    fine_tune: Annotated[bool, typer.Option(help="Train the encoder's weights too.")] = False,
    epochs: Annotated[int, typer.Option(help="Passes over the training documents.")] = 10,
    max_chunks: Annotated[int, typer.Option(help="Chunks read per document.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of everything random.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a classifier already in --out.")] = False,
    device: DeviceOpt = "cpu",
) -> None:
    """Train a hierarchical long-document classifier (or the truncation baseline)."""
    from memext.pipelines import ClassifierConfig, read_documents, train_classifier

    fields = {"text_field": text_field, "label_field": label_field, "split_field": split_field}
    docs = read_documents(data, **fields, split="train" if split_field else None)
    val = None
    if split_field:
        v = read_documents(data, **fields, split="validation")
        val = (v.texts, v.labels)
    cfg = ClassifierConfig(
        encoder=str(encoder) if encoder else None,
        aggregator=aggregator,
        truncate=truncate,
        frozen=not fine_tune,
        epochs=epochs,
        max_chunks=max_chunks,
        seed=seed,
    )
    result = train_classifier(
        cfg, docs.texts, docs.labels, out_dir, val=val, overwrite=overwrite, device=device
    )
    out.print_json(data=result.summary())


@classify_app.command("eval")
@user_errors
def classify_eval(
    run_dir: Annotated[Path, typer.Argument(help="A classifier run directory.")],
    data: DataOpt,
    text_field: TextFieldOpt = "text",
    label_field: LabelFieldOpt = "label",
    split_field: SplitFieldOpt = None,
    split: Annotated[str, typer.Option(help="The split to score, with --split-field.")] = (
        "validation"
    ),
) -> None:
    """Accuracy and macro-F1 (scikit-learn) on labelled documents."""
    from memext.pipelines import evaluate, load_classifier, read_documents

    docs = read_documents(
        data,
        text_field=text_field,
        label_field=label_field,
        split_field=split_field,
        split=split if split_field else None,
    )
    r = evaluate(load_classifier(run_dir), docs.texts, docs.labels)
    out.print(
        f"accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  n {r['n']}  "
        f"{r['docs_per_s']:.1f} docs/s"
    )


@classify_app.command("predict")
@user_errors
def classify_predict(
    run_dir: Annotated[Path, typer.Argument(help="A classifier run directory.")],
    data: DataOpt,
    text_field: TextFieldOpt = "text",
) -> None:
    """One predicted label per document, as JSON lines."""
    from memext.pipelines import load_classifier, read_documents

    docs = read_documents(data, text_field=text_field, label_field=None)
    for line, label in zip(docs.lines, load_classifier(run_dir).predict(docs.texts), strict=True):
        out.print(json.dumps({"line": line, "label": label}), highlight=False)


def version_callback(value: bool) -> None:
    if value:
        print(f"memext {memext.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    pass


def main() -> None:
    app()
