"""Benchmarks shipped with the library: `memext bench attention` and `memext bench seq2seq`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from memext.bench import attention as bench
from memext.bench import seq2seq as s2s
from memext.bench.peers import Shape
from memext.cli.common import default, err, out, user_errors
from memext.fields import parse_value


@user_errors
def bench_attention(
    lengths: Annotated[str, typer.Option(help="Sequence lengths, comma-separated.")] = (
        "1024,2048,4096,8192,16384"
    ),
    heads: Annotated[int, typer.Option(help="Attention heads.")] = default(Shape, "heads"),
    head_dim: Annotated[int, typer.Option(help="Dimension per head.")] = default(Shape, "head_dim"),
    window: Annotated[int, typer.Option(help="Window W of sliding and local attention.")] = default(
        Shape, "window"
    ),
    batch: Annotated[int, typer.Option(help="Batch size.")] = default(Shape, "batch"),
    lsh_chunk: Annotated[
        int, typer.Option(help="LSH chunk (reformer-pytorch bucket_size).")
    ] = default(Shape, "lsh_chunk"),
    lsh_rounds: Annotated[int, typer.Option(help="LSH hashing rounds.")] = default(
        Shape, "lsh_rounds"
    ),
    block_size: Annotated[int, typer.Option(help="block_sparse / BigBird block length.")] = default(
        Shape, "block_size"
    ),
    repeats: Annotated[int, typer.Option(help="Timed repeats per contender and length.")] = default(
        bench.measure, "repeats"
    ),
    threads: Annotated[int, typer.Option(help="torch threads; 0 = torch's default.")] = 0,
    only: Annotated[
        str | None, typer.Option(help="Run contenders whose name contains one of these (a,b).")
    ] = None,
    peers: Annotated[bool, typer.Option(help="Include the peers installed from PyPI.")] = True,
    backward: Annotated[bool, typer.Option(help="Also time forward+backward.")] = default(
        bench.measure, "backward"
    ),
    memory: Annotated[bool, typer.Option(help="Also measure allocator peak memory.")] = default(
        bench.measure, "memory"
    ),
    time_limit: Annotated[
        float, typer.Option(help="Stop growing a contender's length past this many seconds.")
    ] = default(bench.measure, "time_limit"),
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


@user_errors
def bench_seq2seq(
    lengths: Annotated[str, typer.Option(help="Source lengths, comma-separated.")] = "4096,16384",
    d_model: Annotated[int, typer.Option(help="Width of all three.")] = default(
        s2s.Seq2SeqShape, "d_model"
    ),
    encoder_layers: Annotated[int, typer.Option(help="Encoder blocks.")] = default(
        s2s.Seq2SeqShape, "encoder_layers"
    ),
    decoder_layers: Annotated[int, typer.Option(help="Decoder blocks.")] = default(
        s2s.Seq2SeqShape, "decoder_layers"
    ),
    heads: Annotated[int, typer.Option(help="Attention heads.")] = default(
        s2s.Seq2SeqShape, "heads"
    ),
    d_ff: Annotated[
        int,
        typer.Option(help="Gated feed-forward width (LED's ungated one: 3/2 of it); 0 = 8/3 d."),
    ] = default(s2s.Seq2SeqShape, "d_ff"),
    vocab_size: Annotated[int, typer.Option(help="Vocabulary of all three.")] = default(
        s2s.Seq2SeqShape, "vocab_size"
    ),
    window: Annotated[
        int, typer.Option(help="Encoder window W (even): LED attention_window, LongT5 radius W/2.")
    ] = default(s2s.Seq2SeqShape, "window"),
    global_tokens: Annotated[
        int, typer.Option(help="memext global slots = LED's globally attending leading tokens.")
    ] = default(s2s.Seq2SeqShape, "global_tokens"),
    global_block_size: Annotated[
        int, typer.Option(help="LongT5: source tokens per transient global token.")
    ] = default(s2s.Seq2SeqShape, "global_block_size"),
    new_tokens: Annotated[int, typer.Option(help="Tokens each contender generates.")] = default(
        s2s.Seq2SeqShape, "new_tokens"
    ),
    repeats: Annotated[int, typer.Option(help="Timed repeats per contender and length.")] = default(
        s2s.measure, "repeats"
    ),
    threads: Annotated[int, typer.Option(help="torch threads; 0 = torch's default.")] = 0,
    only: Annotated[
        str | None, typer.Option(help="Run only these contenders (memext,led,longt5).")
    ] = None,
    memory: Annotated[bool, typer.Option(help="Also measure allocator peak memory.")] = default(
        s2s.measure, "memory"
    ),
    time_limit: Annotated[
        float, typer.Option(help="Stop growing a contender's length past this many seconds.")
    ] = default(s2s.measure, "time_limit"),
    out_path: Annotated[Path, typer.Option("--out", help="The JSON file to write.")] = Path(
        "bench-results/seq2seq_speed.json"
    ),
) -> None:
    """Encode + greedy generation: memext's encoder-decoder vs Hugging Face LED and LongT5."""
    import torch
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    shape = s2s.Seq2SeqShape(
        d_model=d_model,
        encoder_layers=encoder_layers,
        decoder_layers=decoder_layers,
        heads=heads,
        d_ff=d_ff,
        vocab_size=vocab_size,
        window=window,
        global_tokens=global_tokens,
        global_block_size=global_block_size,
        new_tokens=new_tokens,
    )
    chosen, left_out = s2s.select(only)
    if not chosen:
        raise ValueError(f"--only {only!r} matches no contender (memext, led, longt5)")
    for name, why in left_out.items():
        err.print(f"[yellow]skipping {name}:[/] {why}", highlight=False)
    sizes = parse_value("--lengths", tuple[int, ...], lengths)
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--lengths={lengths!r} is invalid: expected positive integers")
    bar = tqdm(desc="bench seq2seq", unit="step", leave=False)

    def tick(msg: str) -> None:
        bar.set_postfix_str(msg, refresh=False)
        bar.update()

    records = s2s.measure(
        chosen, sizes, shape, repeats=repeats, memory=memory, time_limit=time_limit, progress=tick
    )
    bar.close()
    command = " ".join(["memext", *sys.argv[1:]])
    s2s.report(out, records, shape, left_out, out_path, command, repeats)
    out.print(f"wrote {out_path}")
