"""Training a long-document classifier: the head alone on cached embeddings, or with its
encoder; one ``metrics.jsonl`` line per epoch, and the run saved when it is done."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memext.errors import MemextError
from memext.io import atomic_write_text
from memext.pipelines.chunking import Chunk
from memext.pipelines.classify_config import ClassifierConfig
from memext.pipelines.classify_eval import label_ids, score_predictions
from memext.pipelines.classify_model import (
    Classifier,
    as_texts,
    build_head,
    chunk_documents,
    embed_documents,
    open_encoder,
    pad_chunks,
    pooled_embeddings,
)
from memext.pipelines.classify_run import METRICS, prepare_out_dir, save_run


@dataclass
class TrainResult:
    """What ``train_classifier`` made: the trained classifier (ready to predict) and run info.

    ``metrics`` holds one row per epoch (as in ``metrics.jsonl``); ``chunks_per_doc`` is the
    mean number of chunks read per training document, ``docs_over_max_chunks`` how many had
    more than ``max_chunks`` (read as an even spread of them).
    """

    classifier: Classifier
    out_dir: Path
    metrics: list[dict[str, Any]]
    n_train: int
    n_val: int
    chunks_per_doc: float
    docs_over_max_chunks: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        """The run info as JSON-ready values, with the last epoch's metrics."""
        return {
            "out_dir": str(self.out_dir),
            "labels": self.classifier.labels,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "chunks_per_doc": round(self.chunks_per_doc, 3),
            "docs_over_max_chunks": self.docs_over_max_chunks,
            **self.metrics[-1],
            "seconds": self.seconds,
        }


def train_classifier(
    cfg: ClassifierConfig,
    texts: Sequence[str],
    labels: Sequence[str | int],
    out_dir: str | Path,
    val: tuple[Sequence[str], Sequence[str | int]] | None = None,
    *,
    progress: bool = True,
    cache: bool = True,
    device: str = "cpu",
    overwrite: bool = False,
) -> TrainResult:
    """Train a classifier on ``texts`` and ``labels`` and save it as a run in ``out_dir``.

    Args:
        cfg: the model and training settings.
        texts, labels: the training documents and their labels (read as strings; at least two
            classes). The classes are the sorted set of labels.
        out_dir: the run directory; it must be empty or new unless ``overwrite``.
        val: (texts, labels) scored after every epoch (``metrics.jsonl``); its labels must be
            among the training labels.
        progress: show progress bars (embedding, training).
        cache: read and write frozen embeddings in the encoder's on-disk cache.
        device: where the encoder and head run.
        overwrite: replace the classifier run already in ``out_dir``.

    Raises:
        MemextError: bad documents or labels, or an ``out_dir`` that holds something else.
    """
    start = time.perf_counter()
    texts = as_texts(texts)
    labels = [str(label) for label in labels]
    if len(labels) != len(texts):
        raise MemextError(f"{len(texts)} documents but {len(labels)} labels")
    names = sorted(set(labels))
    if len(names) < 2:
        raise MemextError(f"the training labels hold {len(names)} class ({names}): need >= 2")
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    # fork_rng: seeding here must not change the caller's random stream (CPU, and CUDA's)
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        torch.manual_seed(cfg.seed)
        encoder = open_encoder(cfg, cfg.encoder, progress=progress, cache=cache, device=device)
        clf = Classifier(cfg, names, encoder, build_head(cfg, encoder.dim, len(names)).to(device))
        docs, n_over = chunk_documents(texts, encoder, cfg)
        y = torch.from_numpy(label_ids(names, labels))
        val_set = None
        if val is not None:
            val_texts, val_labels = val
            val_y = label_ids(names, val_labels)
            if len(val_y) != len(val_texts):
                raise MemextError(f"{len(val_texts)} val documents but {len(val_y)} labels")
            val_set = (clf.chunks(val_texts), torch.from_numpy(val_y))
        rows = _fit(clf, docs, y, val_set, out_dir, progress)
    save_run(clf, out_dir)
    return TrainResult(
        classifier=clf,
        out_dir=out_dir,
        metrics=rows,
        n_train=len(texts),
        n_val=0 if val_set is None else len(val_set[1]),
        chunks_per_doc=float(np.mean([len(doc) for doc in docs])),
        docs_over_max_chunks=n_over,
        seconds=round(time.perf_counter() - start, 3),
    )


def _fit(
    clf: Classifier,
    docs: list[list[Chunk]],
    y: Tensor,
    val: tuple[list[list[Chunk]], Tensor] | None,
    out_dir: Path,
    progress: bool,
) -> list[dict[str, Any]]:
    """Train ``clf`` in place, one ``metrics.jsonl`` line per epoch; returns those lines."""
    from tqdm.auto import tqdm

    cfg, head, encoder = clf.cfg, clf.head, clf.encoder
    # Frozen: every chunk is embedded once and the embeddings are the features. Fine-tuned:
    # a sample of them is enough for the standardisation statistics.
    vectors = embed_documents(encoder, docs if cfg.frozen else docs[:256])
    head.fit_stats(torch.cat(vectors).to(head.shift.device))
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": cfg.lr}]
    if cfg.frozen:
        encoder.model.requires_grad_(False)
    else:
        groups.append({"params": list(encoder.model.parameters()), "lr": cfg.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    val_vectors = embed_documents(encoder, val[0]) if val is not None and cfg.frozen else None
    n_batches = -(-len(docs) // cfg.batch_size)
    bar = tqdm(total=cfg.epochs * n_batches, desc="train", unit="batch", disable=not progress)
    rows: list[dict[str, Any]] = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        head.train()
        encoder.model.train(not cfg.frozen)  # dropout inside a fine-tuned encoder
        total_loss, correct = 0.0, 0
        for idx in torch.randperm(len(docs), generator=order).split(cfg.batch_size):
            batch = [docs[i] for i in idx.tolist()]
            if cfg.frozen:
                xs = [vectors[i] for i in idx.tolist()]
            else:
                flat = pooled_embeddings(encoder, [c for doc in batch for c in doc])
                xs = list(flat.split([len(doc) for doc in batch]))  # each (n_i, dim)
            x, mask = pad_chunks([v.to(head.shift.device) for v in xs])
            logits = head(x, mask)  # (B, n_classes)
            target = y[idx].to(logits.device)
            loss = F.cross_entropy(logits, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(-1) == target).sum())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        row = {
            "epoch": epoch,
            "train_loss": round(total_loss / len(docs), 6),
            "train_accuracy": round(correct / len(docs), 6),
        }
        if val is not None:
            val_x = val_vectors if val_vectors is not None else embed_documents(encoder, val[0])
            scores = score_predictions(
                val[1].numpy(), clf.logits(val_x).argmax(-1).numpy(), clf.labels
            )
            row |= {"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        atomic_write_text(out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    bar.close()
    head.eval()
    encoder.model.eval()
    return rows
