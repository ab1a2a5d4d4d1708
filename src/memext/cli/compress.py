"""Make models smaller: `memext compress quantize`, `memext compress prune`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from memext.adapters.pruned import prune
from memext.adapters.quantized import describe_scheme, quantize
from memext.cli.common import DeviceOpt, ModelArg, default, err, out, user_errors
from memext.nn.quant import INT4_GROUPS, SCHEMES


@user_errors
def compress_quantize(
    model: ModelArg,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The new directory: the quantized layers and a reference to MODEL (which must "
            "stay where it is).",
        ),
    ],
    weights: Annotated[
        str,
        typer.Option(
            help=f"Scheme: {' or '.join(SCHEMES)} (int8: symmetric per output channel; int4: "
            "asymmetric in groups of --group input columns)."
        ),
    ] = default(quantize, "weights"),
    group: Annotated[
        int,
        typer.Option(help=f"int4 group size: {', '.join(map(str, INT4_GROUPS))}."),
    ] = default(quantize, "group"),
    activations: Annotated[
        str,
        typer.Option(
            help="The dtype torch's kernels read activations in: float32, or bfloat16 (torch "
            "2.13's CPU kernels are fast for bfloat16 input only; inputs and outputs rounded to "
            "8 significant bits)."
        ),
    ] = default(quantize, "activations"),
    method: Annotated[
        str,
        typer.Option(
            help="How int4 levels are chosen: rtn (round to nearest) or gptq (each column's "
            "rounding error moved onto the later columns, weighted by calibration inputs)."
        ),
    ] = default(quantize, "method"),
    calibration: Annotated[
        str,
        typer.Option(
            help="GPTQ's calibration text: stdlib (the built-in corpus's train split), or a "
            "file, directory or glob."
        ),
    ] = default(quantize, "calibration"),
    calibration_tokens: Annotated[
        int, typer.Option(help="Tokens of calibration text GPTQ reads.")
    ] = default(quantize, "calibration_tokens"),
    device: DeviceOpt = "auto",
) -> None:
    """Quantize a model's linear layers (weights only) into a directory every model command
    reads (eval, generate, stream, info); the output head and tied layers stay float32. int4
    levels are rounded to nearest, or chosen by GPTQ on calibration text (--method gptq)."""
    from memext.runtime import resolve_device

    meta = quantize(
        model,
        out_dir,
        weights,
        group,
        activations,
        method,
        calibration,
        calibration_tokens,
        device=resolve_device(device),
        log=lambda m: err.print(m, highlight=False, soft_wrap=True),
    )
    size = meta["linear_bytes"]
    native = sum(1 for layer in meta["layers"].values() if layer["native"])
    out.print(
        f"quantized {len(meta['layers'])} linear layers of {model} to {describe_scheme(meta)} "
        f"({native} on torch's native kernel, {len(meta['layers']) - native} on the reference "
        f"path); kept in float32: {', '.join(sorted(meta['skipped'])) or 'none'}",
        highlight=False,
        soft_wrap=True,
    )
    out.print(
        f"linear weights {size['fp32'] / 1e6:,.2f} MB -> {size['quantized'] / 1e6:,.2f} MB "
        f"({size['fp32'] / size['quantized']:.2f}x smaller) -> {out_dir}",
        highlight=False,
        soft_wrap=True,
    )


@user_errors
def compress_prune(
    model: ModelArg,
    out_dir: Annotated[
        Path,
        typer.Option(
            "--out",
            help="The new directory: a memext run (from a memext run) or a pruned directory "
            "that reads its weights from MODEL (from a Hugging Face model).",
        ),
    ],
    heads: Annotated[
        float,
        typer.Option(
            help="The fraction of attention heads to remove, in (0, 1); whole KV groups go "
            "(a group is one head without GQA), and every layer keeps at least one."
        ),
    ] = default(prune, "heads"),
    batches: Annotated[
        int, typer.Option(help="Sequences of text the head importance is summed over.")
    ] = default(prune, "batches"),
    seq_len: Annotated[int, typer.Option(help="Tokens per scoring sequence.")] = default(
        prune, "seq_len"
    ),
    text: Annotated[
        Path | None,
        typer.Option(help="A text file to score heads on (default: the model's validation text)."),
    ] = None,
    recover_steps: Annotated[
        int,
        typer.Option(
            help="memext runs: fine-tune the pruned run this many steps on its training data "
            "(memext train's loop; 0 = none)."
        ),
    ] = default(prune, "recover_steps"),
    recover_lr: Annotated[
        float | None,
        typer.Option(help="Learning rate of the recovery (default: the run's final rate)."),
    ] = None,
    recover_data: Annotated[
        str,
        typer.Option(
            help="What the recovery reads: mixture (the run's data.mixture) or corpus (its "
            "corpus text alone)."
        ),
    ] = default(prune, "recover_data"),
    recover_kd: Annotated[
        float,
        typer.Option(
            help="Weight in [0, 1] of the unpruned model's soft targets in the recovery "
            "(distillation at T = 1; 0 = the text alone)."
        ),
    ] = default(prune, "recover_kd"),
    device: DeviceOpt = "auto",
) -> None:
    """Remove the least important attention heads (gradient x activation of a head gate on
    text, Michel et al. 2019) as smaller projection matrices; every model command reads the
    result."""
    from memext.runtime import resolve_device

    record = prune(
        model,
        out_dir,
        heads,
        batches=batches,
        seq_len=seq_len,
        text=text,
        recover_steps=recover_steps,
        recover_lr=recover_lr,
        recover_data=recover_data,
        recover_kd=recover_kd,
        device=resolve_device(device),
        progress=recover_steps > 0,
        log=lambda m: err.print(m, highlight=False, soft_wrap=True),
    )
    before, after = sum(record["heads_before"]), sum(record["heads_after"])
    unit = "whole KV groups" if record["unit"] == "kv_group" else "heads"
    out.print(
        f"pruned {model}: {after} of {before} attention heads kept ({unit} removed); per layer "
        f"{', '.join(map(str, record['heads_after']))}"
        + (f"; recovered {recover_steps} steps" if recover_steps else "")
        + f" -> {out_dir}",
        highlight=False,
        soft_wrap=True,
    )
