"""Long-document classification on a pretrained encoder: `memext classify train/eval/predict`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from memext.cli.common import DeviceOpt, EncoderOpt, default, out, user_errors
from memext.pipelines.classify import ClassifierConfig, train_classifier
from memext.pipelines.documents import read_documents

DataOpt = Annotated[Path, typer.Option("--data", help="JSONL (or .jsonl.gz) documents.")]
TextFieldOpt = Annotated[str, typer.Option(help="The field holding each document's text.")]
LabelFieldOpt = Annotated[str, typer.Option(help="The field holding each document's label.")]
SplitFieldOpt = Annotated[
    str | None, typer.Option(help="A field naming each line's split (train / validation).")
]


@user_errors
def classify_train(
    data: DataOpt,
    out_dir: Annotated[Path, typer.Option("--out", help="The classifier's run directory.")],
    text_field: TextFieldOpt = default(read_documents, "text_field"),
    label_field: LabelFieldOpt = default(read_documents, "label_field"),
    split_field: SplitFieldOpt = None,
    encoder: EncoderOpt = None,
    aggregator: Annotated[str, typer.Option(help="mean, max, attention or transformer.")] = default(
        ClassifierConfig, "aggregator"
    ),
    truncate: Annotated[
        bool, typer.Option(help="The baseline: the first chunk (first max_tokens) only.")
    ] = default(ClassifierConfig, "truncate"),
    fine_tune: Annotated[bool, typer.Option(help="Train the encoder's weights too.")] = not default(
        ClassifierConfig, "frozen"
    ),
    epochs: Annotated[int, typer.Option(help="Passes over the training documents.")] = default(
        ClassifierConfig, "epochs"
    ),
    max_chunks: Annotated[int, typer.Option(help="Chunks read per document.")] = default(
        ClassifierConfig, "max_chunks"
    ),
    seed: Annotated[int, typer.Option(help="Seed of everything random.")] = default(
        ClassifierConfig, "seed"
    ),
    overwrite: Annotated[
        bool, typer.Option(help="Replace a classifier already in --out.")
    ] = default(train_classifier, "overwrite"),
    device: DeviceOpt = default(train_classifier, "device"),
) -> None:
    """Train a hierarchical long-document classifier (or the truncation baseline)."""
    from memext.runtime import resolve_device

    device = str(resolve_device(device))  # a bad --device fails before anything loads
    fields = {"text_field": text_field, "label_field": label_field, "split_field": split_field}
    docs = read_documents(data, **fields, split="train" if split_field else None)
    val = None
    if split_field:
        v = read_documents(data, **fields, split="validation")
        val = (v.texts, v.labels)
    cfg = ClassifierConfig(
        encoder=str(encoder) if encoder else None,
        aggregator=aggregator,
        truncate=truncate,
        frozen=not fine_tune,
        epochs=epochs,
        max_chunks=max_chunks,
        seed=seed,
    )
    result = train_classifier(
        cfg, docs.texts, docs.labels, out_dir, val=val, overwrite=overwrite, device=device
    )
    out.print_json(data=result.summary())


@user_errors
def classify_eval(
    run_dir: Annotated[Path, typer.Argument(help="A classifier run directory.")],
    data: DataOpt,
    text_field: TextFieldOpt = default(read_documents, "text_field"),
    label_field: LabelFieldOpt = default(read_documents, "label_field"),
    split_field: SplitFieldOpt = None,
    split: Annotated[str, typer.Option(help="The split to score, with --split-field.")] = (
        "validation"
    ),
) -> None:
    """Accuracy and macro-F1 (scikit-learn) on labelled documents."""
    from memext.pipelines import evaluate, load_classifier

    docs = read_documents(
        data,
        text_field=text_field,
        label_field=label_field,
        split_field=split_field,
        split=split if split_field else None,
    )
    r = evaluate(load_classifier(run_dir), docs.texts, docs.labels)
    out.print(
        f"accuracy {r['accuracy']:.4f}  macro-F1 {r['macro_f1']:.4f}  n {r['n']}  "
        f"{r['docs_per_s']:.1f} docs/s"
    )


@user_errors
def classify_predict(
    run_dir: Annotated[Path, typer.Argument(help="A classifier run directory.")],
    data: DataOpt,
    text_field: TextFieldOpt = default(read_documents, "text_field"),
) -> None:
    """One predicted label per document, as JSON lines."""
    from memext.pipelines import load_classifier

    docs = read_documents(data, text_field=text_field, label_field=None)
    for line, label in zip(docs.lines, load_classifier(run_dir).predict(docs.texts), strict=True):
        out.print(json.dumps({"line": line, "label": label}), highlight=False)
