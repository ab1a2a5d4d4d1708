"""Score a model on long-range tasks (``memext.data.tasks``) the way a memory model reads.

Each sample is fed segment by segment through ``model(segment, state)``, carrying the returned
``State`` from one segment to the next, starting from ``None``. Segments are cut from the *end*
(``segments``) so the answer always sits in the last one, whatever the sample's length; the
trainer cuts its task batches the same way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from memext.data.sampling import segments, task_batch
from memext.data.tasks import Sample


def _check_fits(sample: Sample, segment_len: int) -> None:
    # The last segment covers inputs [T - segment_len, T); it must hold every position that
    # predicts an answer token, i.e. answer_start - 1 onwards.
    n_inputs = sample.tokens.size - 1
    last_start = max(0, n_inputs - segment_len)
    if sample.answer_start - 1 < last_start:
        raise ValueError(
            f"segment_len={segment_len} is too short for a {sample.answer.size}-token answer: "
            f"the positions predicting it must all lie in the last segment "
            f"(need segment_len >= {sample.answer.size})"
        )


def _score_batch(
    model: torch.nn.Module, batch: Sequence[Sample], segment_len: int, device: torch.device | str
) -> tuple[list[bool], int, list[list[int]]]:
    """Per-sample exact match, the number of answer tokens predicted right, and each sample's
    argmax at its answer positions."""
    inputs, targets, mask = task_batch(batch)
    cuts = segments(inputs.shape[1], segment_len)
    inputs = inputs.to(device)
    # Only the positions that predict an answer token are scored (the same for the batch).
    cols = mask.any(dim=0).nonzero()[:, 0]
    if len(cuts) == 1 and hasattr(model, "logits_at"):
        # An adapter's reading (``Whole``): the vocabulary projection of those positions only.
        logits = model.logits_at(inputs, cols)
        if logits.shape[:2] != (len(batch), cols.numel()):
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)} for "
                f"{cols.numel()} positions of {len(batch)} samples"
            )
    else:
        state = None
        for start, end in cuts:
            logits, state = model(inputs[:, start:end], state)
            if logits.shape[:2] != (len(batch), end - start):
                raise ValueError(
                    f"the model returned logits of shape {tuple(logits.shape)} for a "
                    f"({len(batch)}, {end - start}) segment: expected one logit row per token"
                )
        logits = logits[:, cols.to(logits.device) - cuts[-1][0]]
    pred = logits.argmax(-1).cpu()
    targets, mask = targets[:, cols], mask[:, cols]
    hit = (pred == targets) & mask
    predicted = [p[m].tolist() for p, m in zip(pred, mask, strict=True)]
    return (hit | ~mask).all(dim=1).tolist(), int(hit.sum()), predicted


@torch.no_grad()
def evaluate_samples(
    model: torch.nn.Module,
    samples: Sequence[Sample],
    segment_len: int,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = False,
    keep: bool = False,
) -> dict[str, Any]:
    """Exact match and token accuracy of ``model`` on ``samples``, read ``segment_len`` at a time.

    Scoring is teacher-forced: a sample is right iff the argmax of the logits at every position
    that predicts an answer token is that token. With the true answer fed back this equals
    greedy decoding's exact match: greedy decoding emits the same argmax tokens for as long as
    they are right, so its first ``len(answer)`` tokens are the answer iff all of them are.

    Samples of one length and answer start are batched together (``batch_size`` at a time). A
    model that offers ``logits_at(tokens, positions)`` (an adapter's ``Whole``) and reads the
    input in one segment is asked for the answer positions only. The result holds
    ``task``, ``n``, ``exact_match``, ``token_accuracy``, ``chance`` (the mean of the samples'
    ``meta["chance"]``: a uniform guess's exact match), ``seconds``, ``segment_len`` and
    ``correct`` (one bool per sample, in order); with ``keep``, ``predicted``: each sample's
    argmax token ids at its answer positions (teacher-forced), in order.
    """
    if not samples:
        raise ValueError("evaluate_samples needs at least one sample")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    for sample in samples:
        _check_fits(sample, segment_len)
    t0 = time.perf_counter()
    # Batched by length and answer start, so that a batch scores the same positions (an
    # adapter reading through a KV policy reads them one token per forward, as decoding does).
    groups: dict[tuple[int, int], list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault((sample.tokens.size, sample.answer_start), []).append(i)
    correct = [False] * len(samples)
    predicted: list[list[int]] = [[] for _ in samples]
    hits = 0
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(samples), desc="tasks", disable=not progress, leave=False)
    try:
        for idx in groups.values():
            for j in range(0, len(idx), batch_size):
                chunk = idx[j : j + batch_size]
                ok, n_hit, preds = _score_batch(
                    model, [samples[k] for k in chunk], segment_len, device
                )
                for k, right, p in zip(chunk, ok, preds, strict=True):
                    correct[k] = right
                    predicted[k] = p
                hits += n_hit
                bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    tasks = sorted({s.task for s in samples})
    chances = [float(s.meta.get("chance", math.nan)) for s in samples]
    out = {
        "task": tasks[0] if len(tasks) == 1 else "+".join(tasks),
        "n": len(samples),
        "segment_len": segment_len,
        "exact_match": sum(correct) / len(samples),
        "token_accuracy": hits / sum(s.answer.size for s in samples),
        "chance": sum(chances) / len(chances),
        "seconds": time.perf_counter() - t0,
        "correct": correct,
    }
    if keep:
        out["predicted"] = predicted
    return out
