"""Passkey through a model's KV cache: ``full`` against ``sinks`` against ``retrieval`` (issue 18
item 4, training-free memory).

Any model ``memext.adapters.open_model`` opens (a memext run, a local Hugging Face directory, and
whatever sources it learns, such as a GGUF file or a known name). For each length, ``--samples``
passkey prompts (5-digit key at evenly spaced depths, the classic grass/sky filler or the
built-in corpus) are decoded greedily through each policy, the prompt read in ``--chunk``-token
pieces; a sample is right when the first digits generated are the key.

Budgets: ``retrieval`` keeps ``--sinks``, a ``--window`` and brings back ``--topk`` blocks of
``--block`` tokens; ``sinks`` gets the same attention budget (``window + topk·block``), so the
two differ only in which old tokens they show. ``full`` keeps everything; a model whose
``full`` cache cannot hold the prompt refuses it (recorded as refused). Cache bytes are the
documented formulas (``memext.infer.cache``, ``memext.infer.retrieval``) for the model's shape:
what attention works from, not retrieval's block store. Positions stay below sinks + window +
(topk + 1)·block + chunk; the script warns when that passes the model's trained length.

    python benchmarks/kv_retrieval.py --model ./SmolLM2-dir --lengths 8192,32768 --samples 20
    python benchmarks/kv_retrieval.py --model DIR --lengths 512,1024 --samples 2 \
        --sinks 4 --window 64 --block 16 --topk 2 --chunk 64 --out /tmp/kv.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from memext.adapters import open_model
from memext.data.filler import CLASSIC_FILLER, Filler
from memext.data.tasks import passkey
from memext.io import atomic_write_text
from memext.runtime import command_line, provenance, resolve_device

POLICIES = ("full", "sinks", "retrieval")


def shape(model: Any) -> tuple[int, int, int, int]:
    """(layers, KV heads, head_dim, bytes per element) of an adapter's model."""
    hf = getattr(getattr(model, "model", None), "model", None)
    config = getattr(hf, "config", None)
    if config is not None:  # a Hugging Face causal LM
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        element = next(hf.parameters()).element_size()
        return config.num_hidden_layers, kv, head_dim, element
    m = model.cfg.model  # a memext run
    return m.n_layers, m.n_heads, m.d_model // m.n_heads, 4


def options(policy: str, args: argparse.Namespace) -> dict[str, int | str]:
    if policy == "sinks":
        return {"sinks": args.sinks, "window": args.window + args.topk * args.block}
    if policy == "retrieval":
        keys = ("sinks", "window", "block", "topk", "reps", "tail", "group", "share", "score")
        return {k: getattr(args, k) for k in keys}
    return {}


def cache_bytes(policy: str, opts: dict[str, int], tokens: int, model_shape: tuple) -> int:
    """Bytes attention works from, by the documented formulas (batch 1)."""
    layers, heads, d, e = model_shape
    if policy == "full":
        return 2 * layers * heads * tokens * d * e
    if policy == "sinks":
        return 2 * layers * heads * (opts["sinks"] + opts["window"] - 1) * d * e
    s, w, b, k = opts["sinks"], opts["window"], opts["block"], opts["topk"]
    return layers * heads * (2 * (s + w + b - 2 + k * b) * d * e + 8 * (w + b - 2))


def first_number(text: str) -> int | None:
    found = re.search(r"\d+", text)
    return int(found.group()) if found else None


def run_one(model: Any, prompt: str, policy: str, opts: dict, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    try:
        pieces = model.generate(
            prompt,
            args.new_tokens,
            temperature=0,
            cache=policy,
            cache_options=opts,
            chunk=args.chunk,
            chat=args.chat,
        )
        text = "".join(pieces)
    except ValueError as e:  # e.g. a full cache longer than the model reads
        return {"refused": str(e), "seconds": time.perf_counter() - started}
    return {"output": text, "seconds": time.perf_counter() - started}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True, help="A model path or name.")
    p.add_argument("--lengths", default="8192,32768", help="Prompt lengths in tokens.")
    p.add_argument("--samples", type=int, default=5, help="Samples per length (depths spread).")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--window", type=int, default=2048, help="retrieval's local window")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument(
        "--tail", type=int, default=0, help="The prompt's last TAIL tokens read as one chunk."
    )
    p.add_argument("--group", choices=("mean", "max"), default="mean", help="retrieval's group")
    p.add_argument("--share", choices=("head", "layer"), default="head", help="retrieval's share")
    p.add_argument("--score", choices=("free", "rope"), default="free", help="retrieval's score")
    p.add_argument("--chunk", type=int, default=512, help="Prompt tokens per forward.")
    # SmolLM2 writes digits one token each: "The pass key is " and five digits take ~10 tokens;
    # 8 cut every answer after its third digit.
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--filler", choices=("classic", "stdlib"), default="classic")
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Wrap the prompt in the chat template (default: when the tokenizer has one); "
        "--no-chat: the prompt as plain text, continued.",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/kv_retrieval.json"))
    args = p.parse_args()
    policies = args.policies.split(",")
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        p.error(f"--policies: unknown {unknown}; expected some of {', '.join(POLICIES)}")
    lengths = [int(x) for x in args.lengths.split(",")]
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    model = open_model(args.model, device)
    tok = model.tokenizer
    trained = getattr(model, "trained_length", None)
    reach = args.sinks + args.window + (args.topk + 1) * args.block + args.chunk
    if trained and reach > trained:
        print(
            f"warning: retrieval positions reach {reach} > the model's trained length {trained}: "
            "lower --window, --topk, --block or --chunk"
        )
    filler = Filler.from_text(tok, CLASSIC_FILLER) if args.filler == "classic" else None
    filler = filler or Filler.stdlib(tok)
    model_shape = shape(model)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        for i in range(args.samples):
            depth = (i + 0.5) / args.samples
            sample = passkey(tok, filler, length, depth, (args.seed, length, i))
            prompt = tok.decode_bytes(sample.prompt.tolist()).decode("utf-8", errors="replace")
            for policy in policies:
                opts = options(policy, args)
                got = run_one(model, prompt, policy, opts, args)
                right = first_number(got.get("output", "")) == sample.meta["key"]
                row = {
                    "length": length,
                    "depth": depth,
                    "policy": policy,
                    "key": sample.meta["key"],
                }
                row |= got | {
                    "right": right,
                    "cache_bytes": cache_bytes(policy, opts, length, model_shape),
                }
                rows.append(row)
                print(json.dumps({k: row[k] for k in row if k != "output"}), flush=True)

    table = []
    print(f"\n{'length':>8} {'policy':>10} {'passkey':>8} {'cache MB':>9} {'s/sample':>9}")
    for length in lengths:
        for policy in policies:
            cell = [r for r in rows if r["length"] == length and r["policy"] == policy]
            ran = [r for r in cell if "refused" not in r]
            score = sum(r["right"] for r in ran) / len(ran) if ran else None
            seconds = sum(r["seconds"] for r in ran) / len(ran) if ran else None
            entry = {
                "length": length,
                "policy": policy,
                "score": score,
                "n": len(ran),
                "refused": len(cell) - len(ran),
                "cache_bytes": cell[0]["cache_bytes"],
                "seconds_per_sample": seconds,
            }
            table.append(entry)
            shown = "refused" if score is None else f"{score:.2f}"
            secs = "-" if seconds is None else f"{seconds:.1f}"
            mb = entry["cache_bytes"] / 1e6
            print(f"{length:>8} {policy:>10} {shown:>8} {mb:>9.2f} {secs:>9}")
    result = {
        "command": command_line("benchmarks/kv_retrieval.py", args),
        "provenance": provenance(device),
        "model": args.model.as_posix(),
        "settings": {p: options(p, args) for p in policies},
        "table": table,
        "rows": rows,
    }
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
