"""Weight-only quantization side by side (issue 21, item 1): float32 against memext's int8 and
int4 (``memext.nn.quant``) and the peers that run here, on bits-per-byte of held text and decode
tokens/s at batch 1, in one process, one thread count.

Configurations (``--configs``), each built from a fresh copy of ``--model`` (any kind
``memext.adapters.open_model`` reads: a memext run, a Hugging Face dir, a GGUF file, ``smollm2``);
every one quantizes the same linear layers, those ``memext.nn.quant.quantize_model`` takes (the
output head and tied layers stay float32):

- ``fp32``: the model as it is;
- ``int8``, ``int4``: memext's ``QuantLinear`` (int8 per output channel; int4 in groups of
  ``--group``), torch's native CPU kernels where they take the layer, float32 activations;
- ``int8-bf16``, ``int4-bf16``: the same with the kernels reading bfloat16 activations
  (``quant.set_activation_dtype``), the only input torch 2.13's CPU kernels are fast for;
- ``torchao-int8``, ``torchao-int4``: torchao's ``quantize_`` with ``Int8WeightOnlyConfig()``
  and ``Int4WeightOnlyConfig(group_size=--group)`` in the first packing format that quantizes
  and runs a small layer here (``TORCHAO_INT4_FORMATS``; torchao 0.18 dropped its CPU layout,
  "opaque", and its default, "plain", needs the ``mslk`` package).
  torchao is not a memext dependency: ``pip install --no-deps torchao==0.18.0`` (its metadata
  requires no torch, so it replaces nothing). A configuration that cannot run here is a row
  saying why (not installed, or the error it raised), never a crash;
- ``dynamic-int8``: ``torch.ao.quantization.quantize_dynamic`` (int8 weights per tensor and int8
  activations quantized on the fly; deprecated in torch 2.13 but working).

**Bits-per-byte**: ``--eval-tokens`` tokens of ``--text`` (default ``stdlib``: the built-in
corpus's validation split, ``memext.evals.stream_text``) in windows of ``--context`` tokens, each
window's tokens after its first scored through the adapter's ``log_probs`` (how the model reads
input), nats over the UTF-8 bytes of the scored tokens. The same ids for every configuration;
Δbpb is against ``fp32``.

**Decode tokens/s**: greedy, batch 1, ``--prompt-tokens`` of the same text as the prompt,
``--new-tokens`` new ones (no stopping); a wall-clock stamp as each id is yielded (memext's
``generate_ids`` on a memext run, ``HFAdapter._generate_ids`` on a Hugging Face model, as
``benchmarks/llm_speed.py`` times them); tokens/s = (N - 1) / (stamp N - stamp 1), prefill
excluded. One warm-up generation per configuration, then ``--repeats`` rounds each running every
configuration once in turn (each round starting one later); the table shows medians and the ratio
to ``fp32`` paired within rounds. Greedy tokens are compared with ``fp32``'s (agreement: the
length of the common prefix).

    OMP_NUM_THREADS=2 python benchmarks/quantize.py --model smollm2 --threads 2 --repeats 3 \\
        --out benchmarks/results/quantize-smollm2.json
    OMP_NUM_THREADS=2 python benchmarks/quantize.py --model runs/tiny --threads 2 --repeats 3 \\
        --out benchmarks/results/quantize-tiny.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.adapters import HFAdapter, open_model
from memext.adapters.quantized import calibration_hessians, linear_root
from memext.evals.perplexity import windowed_bits_per_byte as bits_per_byte
from memext.evals.stream_text import stream_text
from memext.nn import quant
from memext.runtime import resolve_device, write_result

#: torchao's int4 packing formats, tried in order (the first that quantizes and runs a layer).
TORCHAO_INT4_FORMATS = ("plain", "tile_packed_to_4d", "plain_int32", "preshuffled")
CONFIGS = (
    "fp32",
    "int8",
    "int4",
    "int8-bf16",
    "int4-bf16",
    "int4-gptq",
    "int4-gptq-bf16",
    "torchao-int8",
    "torchao-int4",
    "dynamic-int8",
)


# --- building each configuration ---------------------------------------------------------------


def quantizable(root: torch.nn.Module) -> list[str]:
    """The linear layers every configuration quantizes: those ``quantize_model`` would."""
    return sorted(quant.quantizable(root)[0])


def build(config: str, adapter: Any, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Quantize ``adapter``'s model in place as ``config``; what was done (``linear_bytes``
    where known)."""
    root, group = linear_root(adapter), args.group
    if config == "fp32":
        return {"linear_bytes": sum(4 * root.get_submodule(n).weight.numel() for n in names)}
    if config.split("-")[0] in ("int8", "int4") and not config.startswith("torchao"):
        hessians = None
        if "-gptq" in config:  # calibrated on the train split; bits-per-byte reads held text
            hessians = calibration_hessians(
                adapter, names, "stdlib", args.calibration_tokens, args.context
            )
        quant.quantize_model(
            root, config.split("-")[0], group, skip=_others(root, names), hessians=hessians
        )
        if config.endswith("-bf16"):  # the kernels' fast path: bfloat16 activations
            quant.set_activation_dtype(root, torch.bfloat16)
        return {"linear_bytes": quant.linear_bytes(root)["quantized"]}
    if config.startswith("torchao-"):
        import torchao
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        wanted = set(names)
        if config == "torchao-int8":
            quantize_(root, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in wanted)
            return {"linear_bytes": None, "torchao": torchao.__version__}
        # torchao 0.18 has no CPU int4 layout of its own ("opaque" is gone): each packing format
        # is tried on a small layer first (quantize and forward), then used on the model.
        errors = []
        for packing in TORCHAO_INT4_FORMATS:
            cfg = Int4WeightOnlyConfig(group_size=group, int4_packing_format=packing)
            trial = torch.nn.Sequential(torch.nn.Linear(2 * group, 64))
            try:
                quantize_(trial, cfg)
                trial(torch.randn(1, 2 * group))
            except Exception as e:
                errors.append(f"{packing}: {type(e).__name__}: {e}"[:200])
                continue
            quantize_(root, cfg, filter_fn=lambda m, fqn: fqn in wanted)
            return {"linear_bytes": None, "torchao": torchao.__version__, "packing": packing}
        raise RuntimeError("; ".join(errors))
    if config == "dynamic-int8":
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(
            root, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True
        )
        return {"linear_bytes": None}
    raise SystemExit(f"unknown configuration {config!r}")


def _others(root: torch.nn.Module, names: list[str]) -> tuple[str, ...]:
    """Skip patterns that leave exactly ``names`` to quantize."""
    keep = set(names)
    return tuple(
        n for n, m in root.named_modules() if isinstance(m, torch.nn.Linear) and n not in keep
    )


# --- measuring -------------------------------------------------------------------------------------


def token_stream(adapter: Any, prompt: list[int], n: int) -> Iterator[int]:
    if isinstance(adapter, HFAdapter):
        return adapter._generate_ids(prompt, n, temperature=0.0)
    from memext.infer.generate import generate_ids

    return generate_ids(adapter.model, prompt, n, temperature=0.0)


def decode(adapter: Any, prompt: list[int], n: int) -> dict[str, Any]:
    stamps, tokens = [], []
    with torch.no_grad():
        for t in token_stream(adapter, prompt, n):
            stamps.append(time.perf_counter())
            tokens.append(int(t))
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else None
    return {"tokens_per_s": rate, "tokens": tokens}


def agreement(tokens: list[int], reference: list[int]) -> int:
    same = 0
    for a, b in zip(tokens, reference, strict=False):
        if a != b:
            break
        same += 1
    return same


# --- the run -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown or "fp32" not in configs:
        raise SystemExit(f"--configs: unknown {unknown}; give fp32 and some of {CONFIGS}")
    models: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    names: list[str] = []
    ids = prompt = None
    for config in configs:
        adapter = open_model(args.model, device)
        root = linear_root(adapter)
        if ids is None:
            names = quantizable(root)
            ids, _ = stream_text(
                [args.text], adapter.tokenizer, args.eval_tokens + args.prompt_tokens, log=print
            )
            prompt = ids[: args.prompt_tokens].astype(np.int64).tolist()
            ids = ids[args.prompt_tokens :]
        try:
            info = build(config, adapter, names, args)
            started = time.perf_counter()
            bpb = bits_per_byte(adapter, ids, args.context)
            seconds = time.perf_counter() - started
            decode(adapter, prompt[: max(1, args.prompt_tokens // 4)], 4)  # warm-up
        except Exception as e:  # a peer that cannot run here is a row saying why
            if not config.startswith(("torchao", "dynamic")):
                raise  # memext's own rows must run
            rows[config] = {"config": config, "error": f"{type(e).__name__}: {e}"[:600]}
            print(f"{config}: cannot run ({rows[config]['error']})", file=sys.stderr)
            continue
        rows[config] = {"config": config, **info, "bits_per_byte": bpb, "bpb_seconds": seconds}
        print(f"{config}: {bpb:.4f} bits/byte", file=sys.stderr)
        models[config] = adapter
    ready = [c for c in configs if c in models]
    timings: dict[str, list[float | None]] = {c: [] for c in ready}
    tokens: dict[str, list[int]] = {}
    for r in range(args.repeats):
        for config in ready[r % len(ready) :] + ready[: r % len(ready)]:
            got = decode(models[config], prompt, args.new_tokens)
            timings[config].append(got["tokens_per_s"])
            tokens.setdefault(config, got["tokens"])
    base = rows["fp32"]
    for config in ready:
        row = rows[config]
        rates = [t for t in timings[config] if t]
        row["tokens_per_s"] = statistics.median(rates) if rates else None
        row["tokens_per_s_rounds"] = timings[config]
        paired = [a / b for a, b in zip(timings[config], timings["fp32"], strict=True) if a and b]
        row["speed_vs_fp32"] = statistics.median(paired) if paired else None
        row["delta_bpb"] = row["bits_per_byte"] - base["bits_per_byte"]
        if row.get("linear_bytes") and base.get("linear_bytes"):
            row["linear_ratio"] = base["linear_bytes"] / row["linear_bytes"]
        row["greedy_agreement"] = agreement(tokens[config], tokens["fp32"])
    return {
        "model": str(args.model),
        "layers": names,
        "eval_tokens": len(ids),
        "rows": [rows[c] for c in configs],
        "targets": targets(rows),
    }


def targets(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Issue 21's targets for memext's rows: ratio, Δbpb and decode speed against fp32."""
    out = {}
    for config, ratio, dbpb in (("int8", 3.9, 0.01), ("int4", 6.5, 0.05), ("int8-bf16", 3.9, 0.01),
                                ("int4-bf16", 6.5, 0.05), ("int4-gptq", 6.5, 0.05),
                                ("int4-gptq-bf16", 6.5, 0.05)):  # fmt: skip
        row = rows.get(config)
        if not row or "error" in row:
            continue
        out[config] = {
            "linear_ratio>=": [ratio, row.get("linear_ratio"), (row.get("linear_ratio") or 0) >= ratio],
            "delta_bpb<=": [dbpb, row["delta_bpb"], row["delta_bpb"] <= dbpb],
            "speed_vs_fp32>=": [1.0, row["speed_vs_fp32"], (row["speed_vs_fp32"] or 0) >= 1.0],
        }  # fmt: skip
    return out


def print_table(result: dict[str, Any]) -> None:
    head = f"{'config':<14} {'bits/byte':>9} {'Δbpb':>8} {'linear x':>8} {'tok/s':>8} {'vs fp32':>7} {'agree':>5}"  # fmt: skip
    print(head)
    for row in result["rows"]:
        if "error" in row:
            print(f"{row['config']:<14} cannot run: {row['error']}")
            continue
        print(
            f"{row['config']:<14} {row['bits_per_byte']:>9.4f} {row['delta_bpb']:>+8.4f} "
            f"{_f(row.get('linear_ratio'), 2):>8} {_f(row['tokens_per_s'], 1):>8} "
            f"{_f(row['speed_vs_fp32'], 2):>7} {row['greedy_agreement']:>5}"
        )


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="Any model memext opens.")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--group", type=int, default=128, help="int4 group size.")
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=8192,
        help="GPTQ's calibration text (train split).",
    )
    p.add_argument("--text", default="stdlib", help="Held text: stdlib, a file, dir or glob.")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--context", type=int, default=1024, help="Tokens per scored window.")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantize.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    print_table(result)
    write_result(args.out, "benchmarks/quantize.py", args, resolve_device(args.device), result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
