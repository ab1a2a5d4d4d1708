"""``memext bench attention``: time and peak memory against sequence length, memext vs peers.

Protocol (why each step is there):

- every contender at a length is built once, warmed up once (allocator, lazy init, compile caches),
  then timed ``repeats`` times *interleaved* with the others, so slow drifts of a shared machine hit
  everyone alike; the median is reported;
- "forward" runs under ``torch.no_grad()`` (inference); "forward+backward" runs the forward with
  autograd and a backward of a fixed random gradient, then drops the gradients;
- peak memory is measured in separate runs (the CPU measurement uses the profiler, which slows the
  call down) and is the allocator's peak above what was live before: ``memext.profiling``;
- a contender whose warm-up forward+backward exceeds ``time_limit`` seconds is not run at longer
  lengths (recorded as skipped), so quadratic peers cannot stall the run;
- the slope of log(time) against log(length) is fitted per contender over lengths >= 2048 (all
  lengths when fewer than two are that long): 1 means linear, 2 quadratic.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from memext.bench.peers import Contender, Shape, contenders
from memext.io import atomic_write_text
from memext.profiling import peak_memory

#: (ours, theirs): each row of the comparison table; ratio = their time / our time.
COMPARISONS = [
    ("memext sliding", "memext full"),
    ("memext sliding", "x-transformers full"),
    ("memext sliding", "local-attention"),
    ("memext full", "x-transformers full"),
    ("memext sliding (bidir)", "memext full (bidir)"),
    ("memext sliding (bidir)", "HF Longformer"),
    ("memext sliding (bidir)", "HF BigBird"),
    ("memext block_sparse", "HF BigBird"),
    ("memext block_sparse", "HF Longformer"),
    ("memext lsh", "reformer-pytorch lsh"),
]


@dataclass
class Record:
    name: str
    group: str
    length: int
    forward_s: float | None = None
    backward_s: float | None = None  # forward+backward
    forward_peak_bytes: int | None = None
    backward_peak_bytes: int | None = None
    status: str = "ok"
    times: dict[str, list[float]] = field(default_factory=dict)


def available(c: Contender) -> str | None:
    """None when the contender can run here, else why not."""
    if c.package == "memext":
        return None
    try:
        metadata.version(c.package)
    except metadata.PackageNotFoundError:
        return f"not installed (pip install {c.package})"
    return None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _forward(run: Callable[[], Tensor]) -> Callable[[], None]:
    def call() -> None:
        with torch.no_grad():
            run()

    return call


def _forward_backward(run: Callable[[], Tensor], grads: list[Tensor]) -> Callable[[], None]:
    grad_out: list[Tensor] = []

    def call() -> None:
        out = run()
        if not grad_out:
            gen = torch.Generator().manual_seed(1)
            grad_out.append(torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
        out.backward(grad_out[0])
        for g in grads:
            g.grad = None

    return call


def _timed(fn: Callable[[], None], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(
    chosen: Sequence[Contender],
    lengths: Sequence[int],
    shape: Shape,
    *,
    repeats: int = 3,
    backward: bool = True,
    memory: bool = True,
    time_limit: float = 120.0,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Record]:
    records: list[Record] = []
    too_slow: dict[str, int] = {}
    for t in sorted(lengths):
        live: list[tuple[Record, dict[str, Callable[[], None]]]] = []
        for c in chosen:
            rec = Record(c.name, c.group, t)
            records.append(rec)
            if c.name in too_slow:
                rec.status = f"skipped: over {time_limit:g} s at T={too_slow[c.name]}"
                continue
            try:
                run, grads = c.build(shape, t)
                calls = {"forward": _forward(run)}
                if backward:
                    calls["backward"] = _forward_backward(run, grads)
                for mode, call in calls.items():  # warm-up
                    if _timed(call, shape.device) > time_limit:
                        too_slow[c.name] = t
                        rec.status = f"warm-up {mode} over {time_limit:g} s"
                        break
            except Exception as exc:  # a peer's failure is a result, not a crash
                rec.status = f"error: {type(exc).__name__}: {exc}"[:200]
                continue
            live.append((rec, calls))
        for r in range(repeats):
            for rec, calls in live:
                for mode, call in calls.items():
                    rec.times.setdefault(mode, []).append(_timed(call, shape.device))
                progress(f"T={t} repeat {r + 1}/{repeats} {rec.name}")
        for rec, calls in live:
            rec.forward_s = statistics.median(rec.times["forward"]) if rec.times else None
            if backward and rec.times:
                rec.backward_s = statistics.median(rec.times["backward"])
            if memory:
                progress(f"T={t} memory {rec.name}")
                rec.forward_peak_bytes = peak_memory(calls["forward"], shape.device)
                if backward:
                    rec.backward_peak_bytes = peak_memory(calls["backward"], shape.device)
    return records


def slopes(records: Sequence[Record]) -> dict[str, dict[str, float]]:
    """Least-squares slope of log(time) on log(length), per contender and mode."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r.name for r in records):
        for mode in ("forward_s", "backward_s"):
            pts = [(r.length, getattr(r, mode)) for r in records if r.name == name]
            pts = [(n, s) for n, s in pts if s]
            long = [p for p in pts if p[0] >= 2048]
            pts = long if len(long) >= 2 else pts
            if len(pts) < 2:
                continue
            xs = [math.log(n) for n, _ in pts]
            ys = [math.log(s) for _, s in pts]
            mx, my = statistics.fmean(xs), statistics.fmean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
                (x - mx) ** 2 for x in xs
            )
            out.setdefault(name, {})[mode.removesuffix("_s")] = round(slope, 3)
    return out


def comparisons(records: Sequence[Record]) -> list[dict]:
    """Speed-up (their time / ours) and memory ratio (theirs / ours) per pair and length."""
    by = {(r.name, r.length): r for r in records}
    rows = []
    for ours, theirs in COMPARISONS:
        for t in sorted({r.length for r in records}):
            a, b = by.get((ours, t)), by.get((theirs, t))
            if not a or not b or a.status != "ok" or b.status != "ok":
                continue
            row: dict = {"ours": ours, "theirs": theirs, "length": t}
            for mode in ("forward", "backward"):
                ta, tb = getattr(a, f"{mode}_s"), getattr(b, f"{mode}_s")
                if ta and tb:
                    row[f"{mode}_speedup"] = round(tb / ta, 3)
                ma, mb = getattr(a, f"{mode}_peak_bytes"), getattr(b, f"{mode}_peak_bytes")
                if ma and mb:
                    row[f"{mode}_memory_ratio"] = round(mb / ma, 3)
            rows.append(row)
    return rows


def environment(shape: Shape, threads: int) -> dict:
    versions = {}
    for pkg in ("memext", "torch", "transformers", "x-transformers", "reformer-pytorch"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    dev = shape.device
    return {
        "device": torch.cuda.get_device_name()
        if dev.startswith("cuda")
        else platform.processor() or platform.machine(),
        "threads": threads,
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shape": asdict(shape),
    }


def plot(records: Sequence[Record], path: Path, title: str) -> bool:
    """Log-log time and memory against length; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [
        ("forward_s", "forward time (s)"),
        ("backward_s", "forward+backward time (s)"),
        ("backward_peak_bytes", "forward+backward peak memory (MiB)"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name in dict.fromkeys(r.name for r in records):
            pts = [(r.length, getattr(r, key)) for r in records if r.name == name]
            pts = [(n, v / 2**20 if "bytes" in key else v) for n, v in pts if v]
            if pts:
                style = "-" if name.startswith("memext") else "--"
                ax.plot(*zip(*pts, strict=True), style, marker="o", label=name)
        ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def select(only: str | None, peers: bool) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run, and the ones left out with the reason."""
    chosen, left_out = [], {}
    for c in contenders():
        if only and not any(s.strip() and s.strip() in c.name for s in only.split(",")):
            continue
        if c.package != "memext" and not peers:
            continue
        why = available(c)
        if why:
            left_out[c.name] = why
        else:
            chosen.append(c)
    return chosen, left_out


def write(out_dir: Path, payload: dict) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "attention.json"
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")
    return path


def train_tokens_per_s(
    variants: Sequence[str],
    length: int,
    *,
    preset: str = "tiny",
    steps: int = 3,
    device: str = "cpu",
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict]:
    """Training tokens/s of ``preset`` at ``length`` tokens of context for each attention variant.

    One sequence per step (batch 1), random tokens, the trainer's own step and optimizer; one
    warm-up step, then the median of ``steps`` timed steps.
    """
    from memext.config import Config
    from memext.model import build_model
    from memext.train.trainer import build_optimizer, train_step

    rows = []
    for variant in variants:
        cfg = Config.preset(preset).replace(
            **{
                "model.attention": variant,
                "model.memory": "none",  # one pass over `length` tokens: attention alone
                "train.segment_len": 0,
                "model.max_seq_len": max(length, 1024),
                "train.seq_len": length,
                "train.batch_size": 1,
            }
        )
        model = build_model(cfg.model).to(device).train()
        opt = build_optimizer(model, cfg)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.model.vocab_size, (1, length + 1), generator=gen)
        batch = [(x[:, :-1], x[:, 1:])]
        dev = torch.device(device)
        train_step(model, model, opt, batch, cfg.train.lr, cfg.train, dev)  # warm-up
        step = functools.partial(train_step, model, model, opt, batch, cfg.train.lr, cfg.train, dev)
        times = []
        for i in range(steps):
            progress(f"train {variant} step {i + 1}/{steps}")
            times.append(_timed(step, device))
        median = statistics.median(times)
        rows.append(
            {
                "attention": variant,
                "length": length,
                "step_s": round(median, 4),
                "tokens_per_s": round(length / median, 1),
            }
        )
    return rows


def report(
    console: Console,
    records: Sequence[Record],
    training: list[dict],
    shape: Shape,
    left_out: dict[str, str],
    out_dir: Path,
    command: str,
) -> tuple[Path, Path | None]:
    """Print the tables, slopes and training rows; write the JSON and the PNG (if matplotlib)."""
    title = (
        f"attention: {shape.heads} heads x {shape.head_dim}, W={shape.window}, batch {shape.batch}"
    )
    table = Table(title=title)
    for col in ("contender", "T", "fwd s", "fwd+bwd s", "fwd MiB", "fwd+bwd MiB", "status"):
        table.add_column(col, justify="left" if col in ("contender", "status") else "right")
    for r in records:
        table.add_row(
            r.name,
            str(r.length),
            _fmt(r.forward_s, "{:.4f}"),
            _fmt(r.backward_s, "{:.4f}"),
            _fmt(r.forward_peak_bytes and r.forward_peak_bytes / 2**20, "{:,.1f}"),
            _fmt(r.backward_peak_bytes and r.backward_peak_bytes / 2**20, "{:,.1f}"),
            r.status,
        )
    console.print(table)
    pairs = comparisons(records)
    if pairs:
        ratios = Table(title="speed-up = their time / ours; memory = their peak / ours")
        for col in ("ours", "theirs", "T", "fwd x", "fwd+bwd x", "fwd mem", "fwd+bwd mem"):
            ratios.add_column(col, justify="left" if col in ("ours", "theirs") else "right")
        keys = ("forward_speedup", "backward_speedup", "forward_memory_ratio")
        for p in pairs:
            cells = [_fmt(p.get(k), "{:.2f}") for k in (*keys, "backward_memory_ratio")]
            ratios.add_row(p["ours"], p["theirs"], str(p["length"]), *cells)
        console.print(ratios)
    fitted = slopes(records)
    for name, s in fitted.items():
        fits = ", ".join(f"{k} {v}" for k, v in s.items())
        console.print(f"slope of time vs length, {name}: {fits}")
    for row in training:
        console.print(
            f"training tiny preset at {row['length']} tokens, {row['attention']}: "
            f"{row['tokens_per_s']:,.0f} tokens/s"
        )
    payload = {
        "format": "memext-bench-attention",
        "schema_version": 1,
        "command": command,
        "environment": environment(shape, torch.get_num_threads()),
        "left_out": left_out,
        "records": [asdict(r) for r in records],
        "comparisons": pairs,
        "slopes": fitted,
        "training": training,
    }
    path = write(out_dir, payload)
    png = out_dir / "attention.png"
    title = f"attention vs length ({shape.device}, {torch.get_num_threads()} threads)"
    return path, png if plot(records, png, title) else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
