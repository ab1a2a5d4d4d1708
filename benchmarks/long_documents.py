"""Long-document classification on a pretrained encoder: hierarchical vs truncation (issue 7).

Data: ``../shared/data/linux_docs_subsystems.jsonl.gz`` (Linux 6.1 kernel docs, 17 subsystem
labels); trains on the ``train`` split (1,527 documents) and reports on ``validation`` (304),
the split fixed by the data set. Encoder: the bundled all-MiniLM-L6-v2, 256 tokens a chunk
(special tokens included).

Parts (``--parts``; results of parts not run are kept from an existing ``--out``):

- ``frozen``: the encoder frozen; truncation (the first chunk only) and each aggregator (mean,
  max, attention, transformer) over up to ``--max-chunks`` chunks spread over the document.
  Heads train on cached embeddings, so each is run for ``--seeds`` seeds: mean and spread.
- ``finetune``: the encoder fine-tuned with the head: truncation and the aggregator with the
  best frozen macro-F1, over up to ``--ft-max-chunks`` chunks, ``--ft-epochs`` epochs, one seed
  (encoder passes with gradients dominate the cost on CPU).
- ``speed``: prediction docs/s (chunking, encoder and head; embedding cache off) of every model
  trained above, on the first ``--speed-docs`` validation documents.

Scores are the last epoch's on ``validation`` (no epoch is picked by its validation score).

    python benchmarks/long_documents.py                           # everything (2-core CPU: ~75 min)
    python benchmarks/long_documents.py --parts frozen --seeds 1  # frozen heads only
    python benchmarks/long_documents.py --limit 40 --epochs 1 --seeds 1 --ft-epochs 1 \
        --speed-docs 4 --runs /tmp/ld --out /tmp/ld.json            # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memext.pipelines.aggregators import AGGREGATORS
from memext.pipelines.classify import ClassifierConfig, load_classifier, train_classifier
from memext.pipelines.documents import Documents, read_documents
from memext.runtime import command_line, provenance

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
PARTS = ("frozen", "finetune", "speed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA / "linux_docs_subsystems.jsonl.gz")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--max-chunks", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ft-max-chunks", type=int, default=2)
    p.add_argument("--ft-epochs", type=int, default=1)
    p.add_argument("--ft-lr", type=float, default=1e-3, help="the head's lr when fine-tuning")
    p.add_argument("--encoder-lr", type=float, default=5e-5)
    p.add_argument("--speed-docs", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="first N documents of each split")
    p.add_argument("--runs", type=Path, default=Path("runs/long-documents"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/long_documents.json"))
    args = p.parse_args()
    parts = set(args.parts.split(","))
    if not parts or not parts <= set(PARTS):
        p.error(f"--parts={args.parts!r}: expected a comma-separated subset of {PARTS}")
    torch.set_num_threads(args.threads)

    train = read_documents(args.data, split_field="split", split="train")
    val = read_documents(args.data, split_field="split", split="validation")
    if args.limit:  # smoke runs: documents spread over each split, val labels seen in train
        train = _subset(train, args.limit, None)
        val = _subset(val, args.limit, set(train.labels))
    old = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results: dict[str, Any] = {k: v for k, v in old.items() if k in PARTS and k not in parts}
    results |= {
        "data": args.data.name,
        "n_train": len(train.texts),
        "n_validation": len(val.texts),
        "n_classes": len(set(train.labels)),
        "provenance": provenance(torch.device("cpu")),
        "command": command_line("benchmarks/long_documents.py", args, ("out",)),
    }

    def fit(name: str, cfg: ClassifierConfig) -> dict[str, Any]:
        print(f"-- {name}", flush=True)
        r = train_classifier(
            cfg,
            train.texts,
            train.labels,
            args.runs / name,
            val=(val.texts, val.labels),
            progress=False,
            overwrite=True,
        )
        last = r.metrics[-1]
        row = {
            "run": str(r.out_dir),
            "accuracy": last["val_accuracy"],
            "macro_f1": last["val_macro_f1"],
            "train_seconds": r.seconds,
            "chunks_per_doc": round(r.chunks_per_doc, 3),
            "docs_over_max_chunks": r.docs_over_max_chunks,
            "epochs": r.metrics,
        }
        print(f"   accuracy {row['accuracy']:.4f}  macro-F1 {row['macro_f1']:.4f}", flush=True)
        return row

    models = ["truncate", *AGGREGATORS]
    if "frozen" in parts:
        frozen: dict[str, Any] = {}
        for model in models:
            seeds = []
            for seed in range(args.seeds):
                cfg = ClassifierConfig(
                    aggregator="mean" if model == "truncate" else model,
                    truncate=model == "truncate",
                    max_chunks=args.max_chunks,
                    epochs=args.epochs,
                    seed=seed,
                )
                seeds.append(fit(f"frozen-{model}-seed{seed}", cfg))
            frozen[model] = _summary(seeds)
        results["frozen"] = {
            "max_chunks": args.max_chunks,
            "epochs": args.epochs,
            "models": frozen,
        }

    if "finetune" in parts:
        best = max(AGGREGATORS, key=lambda m: results["frozen"]["models"][m]["macro_f1"])
        tuned: dict[str, Any] = {}
        for model in ("truncate", best):
            cfg = ClassifierConfig(
                aggregator="mean" if model == "truncate" else model,
                truncate=model == "truncate",
                frozen=False,
                max_chunks=args.ft_max_chunks,
                epochs=args.ft_epochs,
                lr=args.ft_lr,
                encoder_lr=args.encoder_lr,
                batch_size=8,
            )
            tuned[model] = _summary([fit(f"finetune-{model}", cfg)])
        results["finetune"] = {
            "max_chunks": args.ft_max_chunks,
            "epochs": args.ft_epochs,
            "encoder_lr": args.encoder_lr,
            "models": tuned,
        }

    if "speed" in parts:
        texts = val.texts[: args.speed_docs]
        speed: dict[str, Any] = {}
        for kind in ("frozen", "finetune"):
            for model, row in results.get(kind, {}).get("models", {}).items():
                clf = load_classifier(row["runs"][0], progress=False, cache=False)
                clf.predict(texts[:2])  # warm-up
                t0 = time.perf_counter()
                clf.predict(texts)
                seconds = time.perf_counter() - t0
                speed[f"{kind}/{model}"] = round(len(texts) / seconds, 2)
                print(f"   {kind}/{model}: {speed[f'{kind}/{model}']} docs/s", flush=True)
        results["speed"] = {"docs": len(texts), "docs_per_s": speed}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _table(results)
    print(f"wrote {args.out}")


def _subset(docs: Documents, n: int, labels: set[str] | None) -> Documents:
    keep = [i for i, y in enumerate(docs.labels) if labels is None or y in labels]
    keep = [keep[j] for j in sorted(set(np.linspace(0, len(keep) - 1, n).astype(int)))]
    pick = dataclasses.replace
    return pick(docs, texts=[docs.texts[i] for i in keep], labels=[docs.labels[i] for i in keep])


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of the validation scores, and each seed's run."""
    out: dict[str, Any] = {"seeds": len(rows), "runs": [r["run"] for r in rows]}
    for key in ("accuracy", "macro_f1"):
        values = [r[key] for r in rows]
        out[key] = round(statistics.fmean(values), 4)
        out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    out["train_seconds"] = [r["train_seconds"] for r in rows]
    out["chunks_per_doc"] = rows[0]["chunks_per_doc"]
    out["docs_over_max_chunks"] = rows[0]["docs_over_max_chunks"]
    out["epochs"] = rows[0]["epochs"]
    return out


def _table(results: dict[str, Any]) -> None:
    speed = results.get("speed", {}).get("docs_per_s", {})
    print(f"{'encoder':9} {'model':12} {'chunks':>6} {'accuracy':>9} {'macro-F1':>9} {'docs/s':>7}")
    for kind in ("frozen", "finetune"):
        part = results.get(kind)
        if not part:
            continue
        base = part["models"]["truncate"]["macro_f1"]
        for model, row in part["models"].items():
            gain = "" if model == "truncate" else f"  ({100 * (row['macro_f1'] - base):+.1f} pts)"
            print(
                f"{kind:9} {model:12} {row['chunks_per_doc']:6.2f} {row['accuracy']:9.4f} "
                f"{row['macro_f1']:9.4f} {speed.get(f'{kind}/{model}', float('nan')):7.2f}{gain}"
            )


if __name__ == "__main__":
    main()
