"""An encoder-decoder run scored on held-out samples of its task: the whole input against a
prefix (Lead) baseline that reads only the first ``keep`` tokens of each source.

Train first (the preset lists the facts scattered through 384-token documents):

    memext train --preset seq2seq-tiny --out runs/seq2seq-tiny
    python benchmarks/seq2seq_digest.py --run runs/seq2seq-tiny

Past the model's max_seq_len, read with retrieval cross-attention (docs/evaluation.md):

    python benchmarks/seq2seq_digest.py --run runs/seq2seq-digest --length 16384 --keep 512 \
        --encode-chunk 4096 --trained-len 4096

The samples are ``memext.evals.seq2seq.held_out_samples``: haystacks cut from the run's
validation text, seeds above the training range, depths spread evenly (``outline`` reads the
stdlib modules of ``--split``). Each reading is also scored for the prefix oracle
(``oracle_answer``: what a perfect reader of the same tokens writes), the ceiling of a prefix
baseline. Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from memext.checkpoint import load, run_tokenizer
from memext.data.filler import Filler
from memext.data.prepare import prepare_data
from memext.evals.seq2seq import evaluate_pairs, held_out_samples, oracle_scores
from memext.io import atomic_write_text
from memext.runtime import command_line, provenance


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="an encoder-decoder run directory")
    ap.add_argument("--task", default="", help="default: the run's first mixture task")
    ap.add_argument("--length", type=int, default=0, help="default: its first training length")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--split", default="validation", help="outline: validation or test modules")
    ap.add_argument(
        "--keep",
        default="0.25,0.5",
        help="prefix baselines: fractions of the length (< 1) or token counts (>= 1)",
    )
    ap.add_argument(
        "--encode-chunk",
        type=int,
        default=0,
        help="retrieval cross-attention: encode the source in chunks of this many tokens",
    )
    ap.add_argument(
        "--cross-topk", type=int, default=0, help="retrieval: each query reads its top-k states"
    )
    ap.add_argument(
        "--trained-len",
        type=int,
        default=0,
        help="retrieval: scale cross-attention logits by log(states) / log(this + slots)",
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/seq2seq_digest.json"))
    args = ap.parse_args()

    model, cfg = load(args.run)
    tok = run_tokenizer(args.run)
    source = cfg.data.mixture[0]
    task = args.task or source.task
    length = args.length or (source.lengths[0] if source.lengths else cfg.train.seq_len)
    store, _ = prepare_data(cfg.data, tok, lambda m: None)
    filler = Filler(store.validation)
    samples = held_out_samples(task, tok, filler, length, args.samples, args.split)

    retrieval = {
        "encode_chunk": args.encode_chunk or None,
        "cross_topk": args.cross_topk or None,
        "trained_len": args.trained_len or None,
    }
    rows = []
    for frac in (1.0, *(float(f) for f in args.keep.split(",") if f)):
        keep = None if frac == 1.0 else round(frac * length if frac < 1 else frac)
        tic = time.perf_counter()
        # A prefix within the trained length needs no retrieval: it is the truncated model.
        r = evaluate_pairs(model, tok, samples, keep=keep, **(retrieval if keep is None else {}))
        r["seconds"] = round(time.perf_counter() - tic, 2)
        r["reading"] = "whole input" if keep is None else f"prefix {keep}"
        if keep is None and args.encode_chunk:
            r["retrieval"] = retrieval
        r["oracle"] = oracle_scores(tok, samples, keep)
        rows.append(r)
        for who, s in (("model", r), ("oracle", r["oracle"])):
            print(
                f"{r['reading']:>12}  {who:>6}  source {r['source_tokens']:>5}  "
                f"ROUGE-1 {s['rouge1']:5.1f}  ROUGE-2 {s['rouge2']:5.1f}  "
                f"ROUGE-L {s['rougeL']:5.1f}  BLEU {s['bleu']:5.1f}  chrF {s['chrf']:5.1f}"
                + (f"  loss {s['loss']:.3f}" if who == "model" else "")
            )
    for ex in rows[0]["examples"]:
        print(f"  reference {ex['reference']!r}\n  output    {ex['prediction']!r}")
    payload = {
        "format": "memext-benchmark",
        "command": command_line("benchmarks/seq2seq_digest.py", args, ("out",)),
        "task": task,
        "length": length,
        "split": args.split,
        "samples": args.samples,
        "rows": rows,
        "provenance": provenance(torch.device("cpu")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
