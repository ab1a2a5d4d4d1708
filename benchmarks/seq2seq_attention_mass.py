"""How concentrated an encoder-decoder's cross-attention is: for each decoder layer and head,
the share of a query's attention weight that its top-k encoder states hold, averaged over the
target positions of held-out samples (teacher-forced). A share well under 1 at k in the
hundreds is a diffuse attention, which top-k cross-attention (``cross_topk``) cuts.

    python benchmarks/seq2seq_attention_mass.py --run runs/s2s-digest --length 4096

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from memext.checkpoint import load, run_tokenizer
from memext.data.filler import Filler
from memext.data.prepare import prepare_data
from memext.evals.seq2seq import held_out_samples
from memext.io import atomic_write_text
from memext.runtime import command_line, provenance


@torch.no_grad()
def top_k_mass(model, tok, samples, ks: list[int]) -> dict[int, np.ndarray]:
    """{k: (layers, heads) mean share of a query's cross-attention weight in its top-k keys}."""
    layers, heads = len(model.decoder), model.decoder[0].cross.n_heads
    sums = {k: np.zeros((layers, heads)) for k in ks}

    def weigh(layer: int):
        def hook(attn, inputs) -> None:  # a pre-hook: reads the weights, changes nothing
            x, k = inputs[0], inputs[1]
            b, t, _ = x.shape
            q = attn.q(x).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
            p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(attn.head_dim), dim=-1)
            ranked = p.sort(dim=-1, descending=True).values.cumsum(dim=-1)
            for kk in ks:
                sums[kk][layer] += ranked[..., min(kk, ranked.shape[-1]) - 1].sum((0, 2)).numpy()

        return hook

    handles = [b.cross.register_forward_pre_hook(weigh(i)) for i, b in enumerate(model.decoder)]
    bos, queries = tok.special_id("<bos>"), 0
    try:
        for s in samples:
            src = torch.tensor(s.prompt, dtype=torch.long)[None]
            tgt = torch.tensor(np.concatenate([[bos], s.answer]), dtype=torch.long)[None]
            model(src, tgt)
            queries += tgt.shape[1]
    finally:
        for h in handles:
            h.remove()
    return {k: v / queries for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="an encoder-decoder run directory")
    ap.add_argument("--length", type=int, default=0, help="default: its first training length")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--ks", default="16,64,256,1024", help="top-k sizes, comma-separated")
    ap.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/seq2seq/attention-mass.json")
    )
    args = ap.parse_args()
    model, cfg = load(args.run)
    model.eval()
    tok = run_tokenizer(args.run)
    source = cfg.data.mixture[0]
    length = args.length or (source.lengths[0] if source.lengths else cfg.train.seq_len)
    store, _ = prepare_data(cfg.data, tok, lambda m: None)
    samples = held_out_samples(source.task, tok, Filler(store.validation), length, args.samples)
    ks = [int(k) for k in args.ks.split(",")]
    mass = top_k_mass(model, tok, samples, ks)
    states = length + model.n_slots
    print(f"{source.task}@{length}: share of cross-attention weight in a query's top-k of "
          f"{states} states, per head")  # fmt: skip
    for k in ks:
        for layer, row in enumerate(mass[k]):
            print(f"  top-{k:<5} layer {layer}: " + "  ".join(f"{v:.3f}" for v in row))
    payload = {
        "format": "memext-benchmark",
        "command": command_line("benchmarks/seq2seq_attention_mass.py", args, ("out",)),
        "task": source.task,
        "length": length,
        "states": states,
        "samples": args.samples,
        "top_k_mass": {str(k): mass[k].round(4).tolist() for k in ks},
        "provenance": provenance(torch.device("cpu")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
