"""KV-cache compression on a real LLM: ``kivi`` (2-bit) and ``snapkv`` (the prompt's end votes
what to keep) against ``full`` and ``sinks`` (issue 21 item 4).

Any model ``memext.adapters.open_model`` opens; the figures are SmolLM2's (``--model smollm2``).
Three parts, each a bounded run (``--parts`` picks; the results of parts not run are kept from
an existing ``--out``):

1. kivi, bytes and perplexity: ``--ppl-tokens`` tokens of ``--text`` read ``--ppl-chunk`` per
   forward through ``full`` and through ``kivi`` (the same chunks, the same positions): the
   perplexity change, and the cache bytes (``nbytes()`` of the live caches, allocated for the
   whole text) against the same cache in fp32.
2. kivi, passkey: ``--samples`` passkey prompts of ``--kivi-length`` tokens (5-digit key at
   evenly spaced depths), greedy, ``full`` against ``kivi``.
3. snapkv, passkey: ``--samples`` prompts of ``--snap-length`` tokens, greedy, ``full`` against
   ``snapkv`` and ``sinks`` with the same budget, ``--budget`` of the prompt's tokens (snapkv:
   ``budget`` tokens per KV head after the prompt; sinks: 4 sinks and a window holding the rest).

A passkey sample is right when the first number generated is the key. Passkey prompts are read
``--chunk`` tokens per forward, as plain text continued after "The pass key is" (``--chat``:
in the model's chat template, as ``memext generate`` reads them by default; with the template
SmolLM2's ``full`` reading already misses at 2k-8k, without it ``full`` read 5 of 5 at 8k,
``benchmarks/kv_retrieval.py --no-chat``). Cache bytes for the passkey parts are those decoding works from, by the documented
formulas (``memext.infer.kivi``, ``memext.infer.snapkv``, ``memext.infer.cache``).

    python benchmarks/kv_compression.py --model smollm2 --text ../shared/data/kjv_bible.txt
    python benchmarks/kv_compression.py --model smollm2 --parts 3 --samples 4   # a smaller run
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.adapters import open_model
from memext.data.filler import CLASSIC_FILLER, Filler
from memext.data.tasks import passkey
from memext.evals.stream_text import stream_text
from memext.evals.streaming import streaming_perplexity
from memext.infer.cache import CACHES
from memext.io import atomic_write_text
from memext.runtime import command_line, provenance


def shape(model: Any) -> tuple[int, int, int, int]:
    """(layers, KV heads, head_dim, bytes per element) of an adapter's model."""
    hf = getattr(getattr(model, "model", None), "model", None)
    config = getattr(hf, "config", None)
    if config is not None:  # a Hugging Face causal LM
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        return config.num_hidden_layers, kv, head_dim, next(hf.parameters()).element_size()
    m = model.cfg.model  # a memext run
    return m.n_layers, m.n_heads, m.d_model // m.n_heads, 4


def kivi_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {"bits": args.bits, "group": args.group, "residual": args.residual}
    options["sinks"] = args.kivi_sinks
    if args.value_group:
        options["value_group"] = args.value_group
    if args.scale_dtype != "float32":
        options["scale_dtype"] = args.scale_dtype
    if args.outliers:
        options["outliers"] = args.outliers
    return options | ({"pre_rotary": True} if args.pre_rotary else {})


def decode_bytes(policy: str, options: dict, prompt: int, new: int, model_shape: tuple) -> int:
    """Bytes decoding works from after a prompt of ``prompt`` tokens, ``new`` to come (batch 1)."""
    layers, heads, d, e = model_shape
    per_token = 2 * layers * heads * d * e
    if policy == "full":
        return per_token * (prompt + new)
    if policy == "sinks":
        return per_token * (options["sinks"] + options["window"] - 1)
    if policy == "snapkv":
        return per_token * (min(options["budget"], prompt) + new)
    # kivi: the cache's own count, allocated for this model's shape
    dtype = {4: torch.float32, 2: torch.bfloat16}[e]
    options = {k: v for k, v in options.items() if k != "pre_rotary"}  # same bytes, no rotary here
    policy = CACHES.build("kivi", max_len=prompt + new, **options)
    return policy.allocate(layers, 1, heads, d, dtype).nbytes()


def first_number(text: str) -> int | None:
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


# --- part 1 ---------------------------------------------------------------------------------
def kivi_perplexity(model: Any, args: argparse.Namespace, model_shape: tuple) -> dict[str, Any]:
    texts, parts = stream_text(args.text, model.tokenizer, args.ppl_tokens + 1)
    stream = np.resize(texts, args.ppl_tokens + 1)
    bl = model.tokenizer.byte_lengths()
    print(f"== 1. kivi vs full: perplexity over {args.ppl_tokens} tokens, chunk {args.ppl_chunk}")
    out: dict[str, Any] = {"tokens": args.ppl_tokens, "chunk": args.ppl_chunk, "texts": parts}
    for policy, options in (("full", {}), ("kivi", kivi_options(args))):
        t0 = time.perf_counter()
        r = streaming_perplexity(
            model.model,
            stream,
            policy,
            args.ppl_chunk,
            cache_options=options,
            byte_lengths=bl,
            every=10**9,
            progress=False,
            chunk_peak=False,
        )
        out[policy] = {
            "options": options,
            "perplexity": r["perplexity"],
            "bits_per_byte": r["bits_per_byte"],
            "cache_bytes": r["checkpoints"][0]["cache_nbytes"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"  {policy}: {out[policy]}", flush=True)
    layers, heads, d, _ = model_shape
    fp32 = 2 * layers * heads * args.ppl_tokens * d * 4
    out["fp32_cache_bytes"] = fp32
    out["bytes_ratio_vs_fp32"] = out["kivi"]["cache_bytes"] / fp32
    out["perplexity_change"] = out["kivi"]["perplexity"] / out["full"]["perplexity"] - 1
    print(
        f"  kivi bytes / fp32 {out['bytes_ratio_vs_fp32']:.4f}; perplexity change "
        f"{out['perplexity_change']:+.4%}",
        flush=True,
    )
    return out


# --- parts 2 and 3 --------------------------------------------------------------------------
def passkey_runs(
    model: Any,
    length: int,
    policies: dict[str, dict[str, Any] | None],
    args: argparse.Namespace,
    model_shape: tuple,
    label: str,
) -> dict[str, Any]:
    """``policies``: name -> options, or None for options that depend on the prompt (set by
    ``budget_options``)."""
    tok = model.tokenizer
    filler = Filler.from_text(tok, CLASSIC_FILLER) or Filler.stdlib(tok)
    rows: list[dict[str, Any]] = []
    print(f"== {label}: passkey at {length} tokens, {args.samples} samples", flush=True)
    for i in range(args.samples):
        depth = (i + 0.5) / args.samples
        sample = passkey(tok, filler, length, depth, (args.seed, length, i))
        prompt = tok.decode_bytes(sample.prompt.tolist()).decode("utf-8", errors="replace")
        n_prompt = len(model.prompt_ids(prompt, chat=args.chat))
        for policy, fixed in policies.items():
            options = fixed if fixed is not None else budget_options(policy, n_prompt, args)
            started = time.perf_counter()
            text = "".join(
                model.generate(
                    prompt,
                    args.new_tokens,
                    temperature=0,
                    cache=policy,
                    cache_options=options,
                    chunk=args.chunk,
                    chat=args.chat,
                )
            )
            row = {
                "depth": depth,
                "policy": policy,
                "options": options,
                "prompt_tokens": n_prompt,
                "key": sample.meta["key"],
                "right": first_number(text) == sample.meta["key"],
                "output": text,
                "seconds": round(time.perf_counter() - started, 2),
                "cache_bytes": decode_bytes(
                    policy, options, n_prompt, args.new_tokens, model_shape
                ),
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "output"}), flush=True)
    table = []
    print(f"\n{'policy':>8} {'passkey':>8} {'right':>6} {'cache MB':>9} {'s/sample':>9}")
    for policy in policies:
        cell = [r for r in rows if r["policy"] == policy]
        entry = {
            "policy": policy,
            "score": sum(r["right"] for r in cell) / len(cell),
            "right": sum(r["right"] for r in cell),
            "n": len(cell),
            "cache_bytes_mean": float(np.mean([r["cache_bytes"] for r in cell])),
            "seconds_per_sample": float(np.mean([r["seconds"] for r in cell])),
        }
        table.append(entry)
        print(
            f"{policy:>8} {entry['score']:>8.2f} {entry['right']:>6} "
            f"{entry['cache_bytes_mean'] / 1e6:>9.2f} {entry['seconds_per_sample']:>9.1f}"
        )
    return {"length": length, "samples": args.samples, "table": table, "rows": rows}


def budget_options(policy: str, n_prompt: int, args: argparse.Namespace) -> dict[str, Any]:
    """snapkv and sinks at ``--budget`` of the prompt's tokens."""
    budget = round(args.budget * n_prompt)
    if policy == "snapkv":
        return {
            "budget": budget,
            "window": args.snap_window,
            "kernel": args.kernel,
            "pool": args.pool,
        }
    return {"sinks": 4, "window": budget - 4 + 1}  # 4 + (window - 1) = budget tokens kept


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="A model path or name.")
    p.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,3")
    p.add_argument("--text", action="append", help="part 1's text (repeatable); default stdlib")
    p.add_argument("--ppl-tokens", type=int, default=4096)
    p.add_argument("--ppl-chunk", type=int, default=128)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group", type=int, default=32)
    p.add_argument("--residual", type=int, default=128)
    p.add_argument("--value-group", type=int, default=0, help="0: all of head_dim")
    p.add_argument("--kivi-sinks", type=int, default=4)
    p.add_argument("--scale-dtype", choices=("float32", "float16"), default="float32")
    p.add_argument("--outliers", type=float, default=0.0, help="kivi: share kept exact")
    p.add_argument(
        "--pre-rotary", action="store_true", help="kivi: quantize keys before rotary (KVQuant)"
    )
    p.add_argument("--kivi-length", type=int, default=2048)
    p.add_argument("--snap-length", type=int, default=4096)
    p.add_argument("--budget", type=float, default=0.2, help="snapkv/sinks: prompt fraction")
    p.add_argument("--snap-window", type=int, default=32)
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--pool", choices=("avg", "max"), default="max", help="snapkv's vote pooling")
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--chunk", type=int, default=512, help="passkey prompt tokens per forward")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Passkey prompts in the chat template (default: plain text, continued).",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_compression.json"))
    args = p.parse_args(argv)
    parts = {int(x) for x in args.parts.split(",")}
    if not parts or not parts <= {1, 2, 3}:
        p.error(f"--parts={args.parts!r}: expected a comma-separated subset of 1,2,3")
    args.text = args.text or ["stdlib"]
    torch.set_num_threads(args.threads)
    model = open_model(args.model, torch.device("cpu"))
    model_shape = shape(model)
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    names = {1: "kivi_perplexity", 2: "kivi_passkey", 3: "snapkv_passkey"}
    results = {names[k]: old[names[k]] for k in names if k not in parts and names[k] in old}
    results |= {
        "model": str(args.model),
        "shape": dict(
            zip(("layers", "kv_heads", "head_dim", "element_bytes"), model_shape, strict=True)
        ),
        "provenance": provenance(torch.device("cpu")),
        "command": command_line("benchmarks/kv_compression.py", args, ("out", "parts")),
    }
    if 1 in parts:
        results[names[1]] = kivi_perplexity(model, args, model_shape)
    if 2 in parts:
        policies = {"full": {}, "kivi": kivi_options(args)}
        results[names[2]] = passkey_runs(model, args.kivi_length, policies, args, model_shape,
                                         "2. kivi vs full")  # fmt: skip
    if 3 in parts:
        policies = {"full": {}, "snapkv": None, "sinks": None}
        results[names[3]] = passkey_runs(model, args.snap_length, policies, args, model_shape,
                                         "3. snapkv vs sinks vs full")  # fmt: skip
        results[names[3]]["budget_fraction"] = args.budget
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
