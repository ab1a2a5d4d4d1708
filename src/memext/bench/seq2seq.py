"""``memext bench seq2seq``: encode a long source and greedily write a fixed number of tokens,
memext's encoder-decoder against Hugging Face LED and LongT5 of the same width and depth.

What is compared. Three untrained models (random weights, fp32, eval mode, dropout 0) built
offline from configs, one source of ``length`` random byte ids each, batch 1:

- ``memext``: ``memext.model.build_model`` of ``ModelConfig(arch="seq2seq",
  attention="sliding", window=W, global_tokens=G)``: a sliding-window encoder (|i - j| <= W/2)
  with G learned global slots prepended to the source, a dense causal decoder with
  cross-attention, SwiGLU feed-forwards of width ``d_ff``, rotary positions, tied embeddings.
  It runs ``memext.infer.seq2seq.greedy_decode`` (KV caches) itself, the path users call.
- ``led``: ``LEDForConditionalGeneration`` with ``attention_window=W`` (Longformer's window is
  the same two-sided W; it must be even and LED pads the source to a multiple of it) and
  ``global_attention_mask`` set on the first G source tokens, so the same number of positions
  see and are seen by all. Its feed-forward is ungated (fc1, gelu, fc2), so its hidden width is
  3/2 ``d_ff``: the parameters and multiply-adds per token of a gated feed-forward of width
  ``d_ff``.
- ``longt5``: ``LongT5ForConditionalGeneration`` with ``encoder_attention_type=
  "transient-global"``, ``local_radius=W/2`` (the same two-sided reach) and a gated-gelu
  feed-forward of width ``d_ff``. Its global tokens are not G leading positions: each block of
  ``global_block_size`` source tokens is summed into one transient global token that every
  query reads (LongT5's own design; 16 is its authors' and transformers' default), so at
  ``length`` tokens there are length / global_block_size of them.

Parameters differ where the architectures do (``Params``): LED learns absolute position
embeddings (``max_encoder_position_embeddings`` rows, here the longest source rounded up to W,
plus the decoder's) and gives global queries their own q/k/v projections; LongT5 learns
relative-position bias tables; memext has neither (rotary) but learns G slot vectors. Without
those, the three are within a few per cent (biases and LayerNorm shifts in LED).

Protocol (why each step is there):

- "time" is the whole request: encode the source and generate ``new_tokens`` tokens greedily,
  from token ids to token ids; each contender must return exactly ``new_tokens`` ids (memext is
  given an end-of-sequence id outside its vocabulary, which argmax never returns; the peers get
  ``min_new_tokens`` = ``max_new_tokens``, Hugging Face's way to force the length);
- each contender at a length is built once and warmed up once, then timed ``repeats`` times
  interleaved with the others (memext, led, longt5, memext, ...), so slow drifts of a shared
  machine hit all alike; the median is reported;
- peak memory is a separate, untimed run: the allocator's peak of tensor bytes above what was
  live before the call (``memext.profiling.peak_memory``: on CPU the profiler's allocation
  events, summed in time order), so weights do not count, activations, caches and generation's
  own tensors do. It is the same in-process method as ``memext bench attention``;
- a contender whose warm-up takes over ``time_limit`` seconds is recorded at that length with
  that one time (status says so) and not run at longer lengths.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from memext.io import atomic_write_text
from memext.profiling import peak_memory

#: The source's token ids are byte values; memext's decoder starts from the first reserved id.
BYTES = 256


@dataclass(frozen=True)
class Seq2SeqShape:
    """One shape for all three contenders."""

    d_model: int = 256
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 4
    d_ff: int = 0  # 0 = memext's default, 8/3 d_model rounded up to 64
    vocab_size: int = 264  # memext's byte vocabulary
    window: int = 256
    global_tokens: int = 4
    global_block_size: int = 16
    new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.window < 2 or self.window % 2:
            raise ValueError(f"window={self.window} must be even and >= 2 (LED's attention_window)")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")
        if self.vocab_size <= BYTES:
            raise ValueError(
                f"vocab_size={self.vocab_size} must exceed {BYTES} (byte ids + a start)"
            )
        for name in ("encoder_layers", "decoder_layers", "new_tokens", "global_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.global_tokens < 0 or self.d_ff < 0:
            raise ValueError("global_tokens and d_ff must be >= 0")

    @property
    def ffn(self) -> int:
        """The gated feed-forward width of memext and LongT5."""
        return self.d_ff or -(-(8 * self.d_model // 3) // 64) * 64


@dataclass
class Params:
    """``total``: every parameter once (tied ones once); ``positions``: learned position
    embeddings or relative-bias tables; ``global_projections``: weights that only global
    queries use (LED's q/k/v_global); ``core`` = total less both."""

    total: int
    positions: int = 0
    global_projections: int = 0

    @property
    def core(self) -> int:
        return self.total - self.positions - self.global_projections


@dataclass
class Built:
    """A contender built for one length: ``run()`` encodes the source and returns the generated
    ids (one row)."""

    model: nn.Module
    run: Callable[[], list[int]]
    params: Params


@dataclass
class Contender:
    name: str
    package: str  # the distribution it needs; "memext" is always there
    build: Callable[[Seq2SeqShape, int], Built]


def source(length: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, BYTES, (1, length), generator=gen)


def _count(model: nn.Module, names: Callable[[str], bool]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if names(n))


def memext_model(shape: Seq2SeqShape, length: int) -> nn.Module:
    from memext.config import ModelConfig
    from memext.model import build_model

    cfg = ModelConfig(
        arch="seq2seq",
        vocab_size=shape.vocab_size,
        d_model=shape.d_model,
        n_layers=shape.decoder_layers,
        encoder_layers=shape.encoder_layers,
        n_heads=shape.heads,
        d_ff=shape.ffn,
        attention="sliding",
        window=shape.window,
        global_tokens=shape.global_tokens,
        max_seq_len=length,
        max_target_len=shape.new_tokens + 1,
    )
    return build_model(cfg).eval()


def build_memext(shape: Seq2SeqShape, length: int) -> Built:
    from memext.infer.seq2seq import greedy_decode

    model = memext_model(shape, length)
    src = source(length)

    def run() -> list[int]:
        # eos outside the vocabulary: argmax never returns it, so exactly new_tokens come out.
        return greedy_decode(model, src, BYTES, shape.vocab_size, shape.new_tokens)[0]

    params = Params(sum(p.numel() for p in model.parameters()))
    return Built(model, run, params)


def _hf_generate(
    model: nn.Module, shape: Seq2SeqShape, length: int, **inputs: Tensor
) -> Callable[[], list[int]]:
    src = source(length)
    mask = torch.ones_like(src)

    def run() -> list[int]:
        with torch.no_grad():
            out = model.generate(
                input_ids=src,
                attention_mask=mask,
                max_new_tokens=shape.new_tokens,
                min_new_tokens=shape.new_tokens,
                do_sample=False,
                num_beams=1,
                **inputs,
            )
        return out[0, 1:].tolist()  # the decoder start token is not generated

    return run


def _quiet_hf() -> None:
    # generate() warns on every call about flags of the default generation config; the table
    # is the output here.
    from transformers.utils import logging

    logging.set_verbosity_error()


def build_led(shape: Seq2SeqShape, length: int) -> Built:
    from transformers import LEDConfig, LEDForConditionalGeneration

    _quiet_hf()
    w = shape.window
    cfg = LEDConfig(
        vocab_size=shape.vocab_size,
        d_model=shape.d_model,
        encoder_layers=shape.encoder_layers,
        decoder_layers=shape.decoder_layers,
        encoder_attention_heads=shape.heads,
        decoder_attention_heads=shape.heads,
        encoder_ffn_dim=shape.ffn * 3 // 2,
        decoder_ffn_dim=shape.ffn * 3 // 2,
        attention_window=w,
        # LED pads the source to a multiple of the window before the position lookup.
        max_encoder_position_embeddings=-(-length // w) * w,
        max_decoder_position_embeddings=shape.new_tokens + 1,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LEDForConditionalGeneration(cfg).eval()
    glob = torch.zeros(1, length, dtype=torch.long)
    glob[:, : shape.global_tokens] = 1
    params = Params(
        sum(p.numel() for p in model.parameters()),
        positions=_count(model, lambda n: "embed_positions" in n),
        global_projections=_count(model, lambda n: "_global." in n),
    )
    return Built(model, _hf_generate(model, shape, length, global_attention_mask=glob), params)


def build_longt5(shape: Seq2SeqShape, length: int) -> Built:
    from transformers import LongT5Config, LongT5ForConditionalGeneration

    _quiet_hf()
    cfg = LongT5Config(
        vocab_size=shape.vocab_size,
        d_model=shape.d_model,
        d_kv=shape.d_model // shape.heads,
        d_ff=shape.ffn,
        num_layers=shape.encoder_layers,
        num_decoder_layers=shape.decoder_layers,
        num_heads=shape.heads,
        encoder_attention_type="transient-global",
        local_radius=shape.window // 2,
        global_block_size=shape.global_block_size,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        decoder_start_token_id=0,  # T5's: the pad id
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LongT5ForConditionalGeneration(cfg).eval()
    params = Params(
        sum(p.numel() for p in model.parameters()),
        positions=_count(model, lambda n: "relative_attention_bias" in n),
    )
    return Built(model, _hf_generate(model, shape, length), params)


def contenders() -> list[Contender]:
    return [
        Contender("memext", "memext", build_memext),
        Contender("led", "transformers", build_led),
        Contender("longt5", "transformers", build_longt5),
    ]


def available(c: Contender) -> str | None:
    """None when the contender can run here, else why not."""
    if c.package == "memext":
        return None
    try:
        metadata.version(c.package)
    except metadata.PackageNotFoundError:
        return f"not installed (pip install {c.package})"
    return None


def select(only: str | None = None) -> tuple[list[Contender], dict[str, str]]:
    """The contenders to run, and the ones left out with the reason."""
    chosen, left_out = [], {}
    wanted = [s.strip() for s in (only or "").split(",") if s.strip()]
    for c in contenders():
        if wanted and c.name not in wanted:
            continue
        why = available(c)
        if why:
            left_out[c.name] = why
        else:
            chosen.append(c)
    return chosen, left_out


@dataclass
class Record:
    name: str
    length: int
    seconds: float | None = None  # median of the timed repeats
    tokens_per_s: float | None = None  # source tokens per second of the whole request
    peak_bytes: int | None = None
    params: dict[str, int] = field(default_factory=dict)
    warmup_s: float | None = None
    times: list[float] = field(default_factory=list)
    status: str = "ok"


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _checked(run: Callable[[], list[int]], n: int) -> Callable[[], list[int]]:
    """``run`` that fails unless it wrote exactly ``n`` tokens: a shorter answer is less work."""

    def call() -> list[int]:
        ids = run()
        if len(ids) != n:
            raise RuntimeError(f"generated {len(ids)} tokens, not {n}")
        return ids

    return call


def measure(
    chosen: Sequence[Contender],
    lengths: Sequence[int],
    shape: Seq2SeqShape,
    *,
    repeats: int = 3,
    memory: bool = True,
    time_limit: float = 300.0,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Record]:
    records: list[Record] = []
    too_slow: dict[str, int] = {}
    for t in sorted(lengths):
        live: list[tuple[Record, Callable[[], list[int]]]] = []
        for c in chosen:
            rec = Record(c.name, t)
            records.append(rec)
            if c.name in too_slow:
                rec.status = f"skipped: warm-up over {time_limit:g} s at {too_slow[c.name]}"
                continue
            try:
                progress(f"{t} build+warm-up {c.name}")
                built = c.build(shape, t)
                rec.params = {**asdict(built.params), "core": built.params.core}
                call = _checked(built.run, shape.new_tokens)
                rec.warmup_s = _timed(call)
            except Exception as exc:  # a peer's failure is a result, not a crash
                rec.status = f"error: {type(exc).__name__}: {exc}"[:200]
                continue
            if rec.warmup_s > time_limit:
                too_slow[c.name] = t
                rec.times = [rec.warmup_s]
                rec.status = f"one run: warm-up over {time_limit:g} s"
            else:
                live.append((rec, call))
        for r in range(repeats):
            for rec, call in live:
                progress(f"{t} repeat {r + 1}/{repeats} {rec.name}")
                rec.times.append(_timed(call))
        for rec in records:
            if rec.length == t and rec.times:
                rec.seconds = statistics.median(rec.times)
                rec.tokens_per_s = t / rec.seconds
        if memory:
            for rec, call in live:
                progress(f"{t} memory {rec.name}")
                rec.peak_bytes = peak_memory(call, "cpu")
    return records


def comparisons(records: Sequence[Record], ours: str = "memext") -> list[dict]:
    """Per peer and length: speed-up = peer's seconds / ours, memory = peer's peak / ours."""
    by = {(r.name, r.length): r for r in records}
    rows = []
    for r in records:
        mine = by.get((ours, r.length))
        if r.name == ours or mine is None or not mine.seconds or not r.seconds:
            continue
        row: dict = {"ours": ours, "theirs": r.name, "length": r.length}
        row["speedup"] = r.seconds / mine.seconds
        if mine.peak_bytes and r.peak_bytes:
            row["memory_ratio"] = r.peak_bytes / mine.peak_bytes
        rows.append(row)
    return rows


def payload(
    records: Sequence[Record],
    shape: Seq2SeqShape,
    left_out: dict[str, str],
    command: str,
    repeats: int,
) -> dict:
    from memext.runtime import provenance

    versions = {}
    for pkg in ("transformers",):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "format": "memext-benchmark",
        "benchmark": "seq2seq_speed",
        "command": command,
        "provenance": {
            **provenance(torch.device("cpu")),  # names the CPU
            **versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "shape": {**asdict(shape), "ffn": shape.ffn, "led_ffn": shape.ffn * 3 // 2},
        "dtype": "float32",
        "batch": 1,
        "repeats": repeats,
        "timing": "median seconds of encode + greedy generation of new_tokens, interleaved rounds",
        "memory": "allocator peak of tensor bytes above the live set (torch profiler), own run",
        "left_out": left_out,
        "records": [asdict(r) for r in records],
        "comparisons": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            for row in comparisons(records)
        ],
    }


def report(
    console: Console,
    records: Sequence[Record],
    shape: Seq2SeqShape,
    left_out: dict[str, str],
    path: Path,
    command: str,
    repeats: int,
) -> dict:
    """Print the table of records and the ratios; write the JSON to ``path``; return it."""
    title = (
        f"encode + {shape.new_tokens} greedy tokens: d_model {shape.d_model}, "
        f"{shape.encoder_layers}+{shape.decoder_layers} layers, {shape.heads} heads, "
        f"W={shape.window}, G={shape.global_tokens}, {torch.get_num_threads()} threads"
    )
    table = Table(title=title)
    cols = ("contender", "T", "s", "tok/s", "peak MiB", "params", "time x", "mem x", "status")
    for col in cols:
        table.add_column(col, justify="left" if col in ("contender", "status") else "right")
    ratios = {(row["theirs"], row["length"]): row for row in comparisons(records)}
    for r in records:
        row = ratios.get((r.name, r.length), {})
        table.add_row(
            r.name,
            str(r.length),
            _fmt(r.seconds, "{:.3f}"),
            _fmt(r.tokens_per_s, "{:,.0f}"),
            _fmt(r.peak_bytes and r.peak_bytes / 2**20, "{:,.1f}"),
            _fmt(r.params.get("total") and r.params["total"] / 1e6, "{:.2f}M"),
            _fmt(row.get("speedup"), "{:.2f}"),
            _fmt(row.get("memory_ratio"), "{:.2f}"),
            r.status,
        )
    console.print(table)
    console.print(
        "T: source tokens; tok/s: source tokens per second of the whole request; "
        "time x, mem x: the peer's figure / memext's (above 1: memext is faster or leaner)"
    )
    for name, why in left_out.items():
        console.print(f"{name}: left out, {why}")
    result = payload(records, shape, left_out, command, repeats)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else spec.format(value)
