"""Long-document classification: chunks -> encoder -> aggregator -> linear head.

A document is split into token-aware chunks that fit the encoder whole, special tokens included
(``chunk_text``); each chunk becomes one embedding (the encoder's mean pooling); an aggregator
(``aggregators.py``: mean, max, attention, transformer) turns a document's chunk embeddings into
one vector, and a linear layer classifies it. The encoder is either frozen (every chunk embedded
once, through the encoder's on-disk cache, and only the head trains) or fine-tuned with the head.
``truncate=True`` is the baseline a plain encoder classifier is: it reads the first chunk only,
i.e. the first ``max_tokens`` tokens, and trains the same way.

A run directory holds ``classifier.json`` (config, label names, the encoder's identity, written
last, so a folder that has it is complete), ``head.safetensors``, ``encoder.safetensors`` (only
when the encoder was fine-tuned) and ``metrics.jsonl`` (one line per epoch).
"""

from __future__ import annotations

import dataclasses
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
from memext.io import atomic_write, atomic_write_text
from memext.pipelines.aggregators import AGGREGATORS, AggregatorSpec, build_aggregator
from memext.pipelines.chunking import Chunk, check_text, chunk_text
from memext.pipelines.encoder import Encoder

FORMAT = "memext-classifier"
CLASSIFIER = "classifier.json"
HEAD = "head.safetensors"
ENCODER_WEIGHTS = "encoder.safetensors"
METRICS = "metrics.jsonl"


# --- config -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything a classifier run is built and trained from; stored in ``classifier.json``.

    Args:
        encoder: a local Hugging Face encoder folder; None for the bundled all-MiniLM-L6-v2.
        aggregator: how chunk embeddings become a document vector (``AGGREGATORS``). ``mean``
            by default: on real documents with ~100 examples a class it beat the learned ones
            (docs/results.md#documents).
        truncate: the baseline: read only the first chunk (the first ``max_tokens`` tokens).
        frozen: train only the head on cached embeddings; False fine-tunes the encoder too.
        max_tokens: tokens per chunk, special tokens included; None for the encoder's limit.
        overlap: tokens each chunk shares with the next.
        max_chunks: the most chunks read per document; a longer document is read as
            ``max_chunks`` chunks spread evenly over it, its first and last included. It bounds
            memory when fine-tuning (a step runs up to ``batch_size * max_chunks`` chunks
            through the encoder with gradients) and sets the transformer aggregator's positions.
        epochs, lr, weight_decay, batch_size: of AdamW on the head (documents per batch).
        encoder_lr: the encoder's learning rate when fine-tuning.
        dropout: before the linear layer, and inside the transformer aggregator.
        n_layers, n_heads: of the transformer aggregator.
        seed: weights, shuffling and dropout; equal seeds give equal runs.
    """

    encoder: str | None = None
    aggregator: str = "mean"
    truncate: bool = False
    frozen: bool = True
    max_tokens: int | None = None
    overlap: int = 0
    max_chunks: int = 32
    epochs: int = 10
    lr: float = 1e-3
    encoder_lr: float = 2e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    # The aggregators' own defaults (the transformer aggregator's, for dropout).
    dropout: float = AGGREGATORS.default("dropout")
    n_layers: int = AGGREGATORS.default("n_layers")
    n_heads: int = AGGREGATORS.default("n_heads")
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.encoder, Path):  # stored as JSON: keep it a string
            object.__setattr__(self, "encoder", str(self.encoder))
        if self.aggregator not in AGGREGATORS:
            raise ValueError(
                f"aggregator={self.aggregator!r} is unknown: expected "
                + AGGREGATORS.accepted(self.aggregator)
            )
        positive = ("max_chunks", "epochs", "batch_size", "n_layers", "n_heads")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected >= 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} is invalid: expected >= 1 or None")
        if self.overlap < 0:
            raise ValueError(f"overlap={self.overlap} is invalid: expected >= 0")
        for name in ("lr", "encoder_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} is invalid: expected > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay} is invalid: expected >= 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} is invalid: expected 0 <= dropout < 1")

    @property
    def chunks_read(self) -> int:
        """The most chunks the model reads per document."""
        return 1 if self.truncate else self.max_chunks

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown classifier settings {unknown}; known: {sorted(known)}")
        return cls(**d)


# --- model --------------------------------------------------------------------------------------


class ClassifierHead(nn.Module):
    """Chunk embeddings ``(B, C, dim)`` and a ``(B, C)`` chunk mask -> logits ``(B, n_classes)``.

    Embeddings are first standardised with per-feature statistics of the training chunks
    (``shift``, ``scale``, saved with the weights): the unit vectors of a sentence encoder sit
    in a narrow cone, so the differences between documents are small next to what they share,
    and a linear head would otherwise need many steps just to scale them up.
    """

    def __init__(self, aggregator: nn.Module, dim: int, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.aggregator = aggregator
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(dim, n_classes)

    def fit_stats(self, vectors: Tensor) -> None:
        """Standardise with the statistics of ``(N, dim)`` training chunk embeddings."""
        self.shift.copy_(vectors.mean(0))
        self.scale.copy_(vectors.std(0, unbiased=False).clamp(min=1e-6))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = (x - self.shift) / self.scale  # (B, C, dim)
        return self.out(self.dropout(self.aggregator(x, mask)))  # (B, n_classes)


def build_head(cfg: ClassifierConfig, dim: int, n_classes: int) -> ClassifierHead:
    spec = AggregatorSpec(dim, cfg.chunks_read, cfg.n_layers, cfg.n_heads, cfg.dropout)
    try:
        aggregator = build_aggregator(cfg.aggregator, spec)
    except ValueError as e:
        raise MemextError(f"cannot build the {cfg.aggregator} aggregator: {e}") from None
    return ClassifierHead(aggregator, dim, n_classes, cfg.dropout)


def pooled_embeddings(encoder: Encoder, chunks: Sequence[Chunk]) -> Tensor:
    """``(len(chunks), dim)`` embeddings with gradients, pooled as ``Encoder.embed_chunks``
    pools them, for fine-tuning."""
    return encoder.pool([encoder.wrap(c.token_ids) for c in chunks])


def pad_chunks(vectors: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-document ``(n_i, dim)`` embeddings -> ``(B, C, dim)`` zero-padded and ``(B, C)`` mask."""
    x = nn.utils.rnn.pad_sequence(list(vectors), batch_first=True)  # (B, C, dim)
    lengths = torch.tensor([len(v) for v in vectors], device=x.device)
    mask = torch.arange(x.shape[1], device=x.device) < lengths.unsqueeze(1)  # (B, C)
    return x, mask


class Classifier:
    """A trained classifier: its config, label names, encoder and head. See ``load_classifier``."""

    def __init__(
        self, cfg: ClassifierConfig, labels: list[str], encoder: Encoder, head: ClassifierHead
    ) -> None:
        self.cfg, self.labels, self.encoder, self.head = cfg, labels, encoder, head

    def chunks(self, texts: Sequence[str]) -> list[list[Chunk]]:
        """The chunks the model reads of each text (at most ``cfg.chunks_read``)."""
        return _chunk_documents(_as_texts(texts), self.encoder, self.cfg)[0]

    def embed(self, texts: Sequence[str]) -> list[Tensor]:
        """Each text's chunk embeddings, ``(n_chunks, dim)``."""
        return _embed_documents(self.encoder, self.chunks(texts))

    def logits(self, vectors: Sequence[Tensor]) -> Tensor:
        """``(n, n_classes)`` logits of documents given as chunk embeddings."""
        self.head.eval()
        device = self.head.out.weight.device
        out = []
        with torch.no_grad():
            for b in range(0, len(vectors), self.cfg.batch_size):
                x, mask = pad_chunks([v.to(device) for v in vectors[b : b + self.cfg.batch_size]])
                out.append(self.head(x, mask).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict_proba(self, texts: Sequence[str]) -> np.ndarray:
        """``(len(texts), n_classes)`` class probabilities, columns in ``self.labels`` order."""
        return self.logits(self.embed(texts)).softmax(-1).numpy()

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The most probable label of each text."""
        return [self.labels[i] for i in self.logits(self.embed(texts)).argmax(-1).tolist()]

    def __repr__(self) -> str:
        kind = "truncate" if self.cfg.truncate else self.cfg.aggregator
        return f"Classifier({kind}, labels={self.labels}, encoder={self.encoder.name!r})"


def _open_encoder(
    cfg: ClassifierConfig, path: str | Path | None, *, progress: bool, cache: bool, device: str
) -> Encoder:
    # A fine-tuned encoder never uses the cache: its keys name the base weights, not these.
    return Encoder(
        path,
        max_tokens=cfg.max_tokens,
        cache=cache and cfg.frozen,
        progress=progress,
        device=device,
    )


def _spread(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` evenly spread, first and last included (all of them if n <= k)."""
    if n <= k:
        return list(range(n))
    return np.linspace(0, n - 1, k).round().astype(int).tolist()  # distinct, as n > k


def _as_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a list of documents; wrap a single one as [text]")
    return list(texts)


def _chunk_documents(
    texts: list[str], encoder: Encoder, cfg: ClassifierConfig
) -> tuple[list[list[Chunk]], int]:
    """The chunks the model reads of each text, and how many texts had more than it reads."""
    docs, n_over = [], 0
    for i, text in enumerate(texts):
        try:
            # the baseline's chunk is the first max_tokens tokens exactly, no boundary search
            chunks = chunk_text(
                check_text(text),
                encoder.tokenizer,
                encoder.max_tokens,
                0 if cfg.truncate else cfg.overlap,
                boundaries=not cfg.truncate,
            )
        except MemextError as e:
            raise MemextError(f"document {i}: {e}") from None
        n_over += len(chunks) > cfg.chunks_read
        docs.append([chunks[j] for j in _spread(len(chunks), cfg.chunks_read)])
    return docs, n_over


def _embed_documents(encoder: Encoder, docs: list[list[Chunk]]) -> list[Tensor]:
    """Each document's chunk embeddings, ``(n_i, dim)``, in one ``embed_chunks`` call (batched
    across documents, cached when the encoder is frozen)."""
    encoder.model.eval()
    flat = [c for doc in docs for c in doc]
    vectors = torch.from_numpy(encoder.embed_chunks(flat))  # (sum n_i, dim)
    return list(torch.split(vectors, [len(doc) for doc in docs]))


# --- training -----------------------------------------------------------------------------------


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
    texts = _as_texts(texts)
    labels = [str(label) for label in labels]
    if len(labels) != len(texts):
        raise MemextError(f"{len(texts)} documents but {len(labels)} labels")
    names = sorted(set(labels))
    if len(names) < 2:
        raise MemextError(f"the training labels hold {len(names)} class ({names}): need >= 2")
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    # fork_rng: seeding here must not change the caller's random stream (CPU, and CUDA's)
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device).index or 0] if cuda else []):
        torch.manual_seed(cfg.seed)
        encoder = _open_encoder(cfg, cfg.encoder, progress=progress, cache=cache, device=device)
        clf = Classifier(cfg, names, encoder, build_head(cfg, encoder.dim, len(names)).to(device))
        docs, n_over = _chunk_documents(texts, encoder, cfg)
        y = torch.from_numpy(_label_ids(names, labels))
        val_set = None
        if val is not None:
            val_texts, val_labels = val
            val_y = _label_ids(names, val_labels)
            if len(val_y) != len(val_texts):
                raise MemextError(f"{len(val_texts)} val documents but {len(val_y)} labels")
            val_set = (clf.chunks(val_texts), torch.from_numpy(val_y))
        rows = _fit(clf, docs, y, val_set, out_dir, progress)
    _save(clf, out_dir)
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
    vectors = _embed_documents(encoder, docs if cfg.frozen else docs[:256])
    head.fit_stats(torch.cat(vectors).to(head.shift.device))
    groups: list[dict[str, Any]] = [{"params": list(head.parameters()), "lr": cfg.lr}]
    if cfg.frozen:
        encoder.model.requires_grad_(False)
    else:
        groups.append({"params": list(encoder.model.parameters()), "lr": cfg.encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    order = torch.Generator().manual_seed(cfg.seed)
    val_vectors = _embed_documents(encoder, val[0]) if val is not None and cfg.frozen else None
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
            val_x = val_vectors if val_vectors is not None else _embed_documents(encoder, val[0])
            scores = _scores(val[1].numpy(), clf.logits(val_x).argmax(-1).numpy(), clf.labels)
            row |= {"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        atomic_write_text(out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in rows))
    bar.close()
    head.eval()
    encoder.model.eval()
    return rows


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise MemextError(f"{str(out_dir)!r} is a file, not a run directory")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (overwrite and (out_dir / CLASSIFIER).is_file()):
            what = "a classifier run" if (out_dir / CLASSIFIER).is_file() else "other files"
            raise MemextError(
                f"{str(out_dir)!r} already holds {what}; choose a new directory"
                + (" or pass overwrite=True (--overwrite)" if what == "a classifier run" else "")
            )
        # classifier.json first: a run stopped halfway must not look complete
        for name in (CLASSIFIER, HEAD, ENCODER_WEIGHTS, METRICS):
            (out_dir / name).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _save(clf: Classifier, out_dir: Path) -> None:
    from safetensors.torch import save_model

    meta = {"format": FORMAT}
    atomic_write(out_dir / HEAD, lambda tmp: save_model(clf.head, tmp, meta, True))
    if not clf.cfg.frozen:
        atomic_write(
            out_dir / ENCODER_WEIGHTS, lambda tmp: save_model(clf.encoder.model, tmp, meta, True)
        )
    enc = clf.encoder
    info = {
        "format": FORMAT,
        "version": 1,
        "config": clf.cfg.to_dict(),
        "labels": clf.labels,
        "encoder": {
            "name": enc.name,
            "path": str(enc.path.resolve()),
            "fingerprint": enc.fingerprint,
            "dim": enc.dim,
            "max_tokens": enc.max_tokens,
        },
    }
    atomic_write_text(out_dir / CLASSIFIER, json.dumps(info, indent=2) + "\n")


# --- loading, prediction, evaluation ------------------------------------------------------------


def load_classifier(
    run_dir: str | Path,
    *,
    encoder: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    cache: bool = True,
) -> Classifier:
    """Load a classifier run (in eval mode).

    Args:
        run_dir: the directory ``train_classifier`` wrote.
        encoder: the encoder folder, when it is no longer where the run was trained; it must
            hold the very same files (same fingerprint).
        device, progress, cache: as in ``train_classifier``.

    Raises:
        MemextError: the directory is missing or not a classifier run, a file is corrupt or
            does not match the config, or the encoder is not the one the run was trained on.
    """
    run_dir = Path(run_dir)
    info = _read_info(run_dir)
    try:
        cfg = ClassifierConfig.from_dict(info["config"])
        labels = info["labels"]
        identity = info["encoder"]
        name, fingerprint, trained_path = (identity[k] for k in ("name", "fingerprint", "path"))
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ValueError("labels must be a list of strings")
    except (KeyError, TypeError, ValueError) as e:
        raise MemextError(f"{run_dir / CLASSIFIER} is corrupt: {e}") from None
    path = encoder if encoder is not None else (None if cfg.encoder is None else trained_path)
    try:
        enc = _open_encoder(cfg, path, progress=progress, cache=cache, device=device)
    except MemextError as e:
        raise MemextError(
            f"{e}; {run_dir} was trained on {name!r} from {trained_path}: pass encoder= "
            "(--encoder) the folder that holds it now"
        ) from None
    if enc.fingerprint != fingerprint:
        raise MemextError(
            f"{run_dir} was trained on encoder {name!r} ({fingerprint[:12]}), but {enc.path} "
            f"holds another model ({enc.fingerprint[:12]}): its embeddings would mean nothing "
            "to this head; pass the folder of the encoder the run was trained on"
        )
    head = build_head(cfg, enc.dim, len(labels))
    _load_weights(head, run_dir / HEAD)
    if not cfg.frozen:
        _load_weights(enc.model, run_dir / ENCODER_WEIGHTS)
    enc.model.eval()
    return Classifier(cfg, labels, enc, head.to(device).eval())


def _read_info(run_dir: Path) -> dict[str, Any]:
    if not run_dir.is_dir():
        raise MemextError(f"run directory {str(run_dir)!r} does not exist")
    path = run_dir / CLASSIFIER
    if not path.is_file():
        lm = " (it looks like a language-model run)" if (run_dir / "config.json").is_file() else ""
        raise MemextError(f"{str(run_dir)!r} is not a classifier run: it has no {CLASSIFIER}{lm}")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise MemextError(f"{path} is corrupt: not JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise MemextError(f"{path} is not a memext classifier file (format != {FORMAT!r})")
    if info.get("version") != 1:
        raise MemextError(f"{path} has version {info.get('version')!r}; this memext reads 1")
    return info


def _load_weights(module: nn.Module, path: Path) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    if not path.is_file():
        raise MemextError(f"{path} is missing: the run is incomplete")
    try:
        load_model(module, str(path), strict=True)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0][:200]
        raise MemextError(
            f"{path} is corrupt or does not match {CLASSIFIER} (unreadable, or other weights "
            f"than its config describes: {reason})"
        ) from None


def _as_classifier(classifier: Classifier | str | Path) -> Classifier:
    if isinstance(classifier, Classifier):
        return classifier
    return load_classifier(classifier, progress=False)


def predict(classifier: Classifier | str | Path, texts: Sequence[str]) -> list[str]:
    """The predicted label of each text, by a ``Classifier`` or the run directory of one."""
    return _as_classifier(classifier).predict(texts)


def evaluate(
    classifier: Classifier | str | Path, texts: Sequence[str], labels: Sequence[str | int]
) -> dict[str, Any]:
    """Score a classifier on labeled documents.

    Returns:
        ``n``, ``accuracy``, ``macro_f1`` (scikit-learn's, over the classes present in the
        labels or predictions), ``labels`` (the classifier's classes), ``confusion`` (rows:
        true label, columns: predicted, in ``labels`` order), ``seconds`` and ``docs_per_s``
        (chunking, embedding and classifying; a frozen encoder's cache can make a repeat fast).

    Raises:
        MemextError: a label the classifier was never trained on (it could never be right).
    """
    clf = _as_classifier(classifier)
    texts = _as_texts(texts)
    y = _label_ids(clf.labels, labels)
    if len(y) != len(texts):
        raise MemextError(f"{len(texts)} documents but {len(y)} labels")
    start = time.perf_counter()
    pred = clf.logits(clf.embed(texts)).argmax(-1).numpy()
    seconds = time.perf_counter() - start
    return _scores(y, pred, clf.labels) | {
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(texts) / seconds, 2) if seconds > 0 else None,
    }


def _scores(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    return {
        "n": len(y),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "labels": list(names),
        "confusion": confusion_matrix(y, pred, labels=list(range(len(names)))).tolist(),
    }


def _label_ids(names: list[str], labels: Sequence[str | int]) -> np.ndarray:
    """Class indices of ``labels``; MemextError naming any label outside ``names``."""
    if isinstance(labels, str):
        raise TypeError("expected a list of labels, one per document")
    index = {name: i for i, name in enumerate(names)}
    labels = [str(label) for label in labels]
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise MemextError(
            f"labels {unknown[:5]}{'…' if len(unknown) > 5 else ''} are not among the classes "
            f"this classifier was trained on ({names}), so it can never predict them; evaluate "
            "on data with the training label set, or retrain with these classes"
        )
    return np.asarray([index[label] for label in labels], dtype=np.int64)
