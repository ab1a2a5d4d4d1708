"""Scoring an encoder-decoder on held-out task samples: greedy output against the answer in
ROUGE, BLEU and chrF (``memext.evals.text_metrics``), and the teacher-forced loss.

A **prefix baseline** (``keep``) reads the same samples with each source cut to its first
``keep`` tokens: the document's first ``keep - q`` tokens, then the task's question (``q``
tokens, ``meta["question_tokens"]``; 0 when the task has none), so that the baseline loses the
input the truncation drops and nothing else. This is the "Lead" reading of a model that cannot
take the whole input (SCROLLS' BART-1k against LED-16k). Its ceiling is the **prefix oracle**
(``oracle_answer``): what a perfect reader of the same tokens writes, from the items a task
lists in ``meta`` (``items``, ``item_ends``, ``joiner``); with no cut it is the reference.

Held-out samples are cut from the validation text, with seeds above ``TRAIN_SEEDS`` (the range
training samples draw theirs from) and depths spread evenly, as ``memext.evals.probes`` does; a
task that picks its own source files (``outline``: a ``split`` setting) reads the validation ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from memext.data.filler import Filler
from memext.data.mixture import TRAIN_SEEDS
from memext.data.sampling import pair_batch
from memext.data.tasks import TASKS, Sample, TooShort
from memext.errors import MemextError
from memext.evals.text_metrics import text_scores
from memext.infer.seq2seq import greedy_decode
from memext.tokenizer import Tokenizer
from memext.train.probes import Moment, ProbeContext


def held_out_samples(
    task: str, tok: Tokenizer, filler: Filler, length: int, n: int, split: str = "validation"
) -> list[Sample]:
    """``n`` samples of ``task`` with ``length``-token sources: sample ``i`` at depth
    (i + 1/2) / n, seed ``TRAIN_SEEDS + i``; ``split`` goes to a task that takes one."""
    extra = {"split": split} if "split" in TASKS.takes(task) else {}
    try:
        return [
            TASKS.build(
                task,
                tok=tok,
                filler=filler,
                length=length,
                depth=(i + 0.5) / n,
                seed=TRAIN_SEEDS + i,
                **extra,
            )
            for i in range(n)
        ]
    except TooShort as e:
        raise MemextError(f"{task}@{length}: {e}") from None


def prefix_source(sample: Sample, keep: int) -> np.ndarray:
    """The first ``keep`` tokens a prefix baseline reads: the document's start and the
    question."""
    q = int(sample.meta.get("question_tokens", 0))
    if keep <= q:
        raise ValueError(f"keep={keep} leaves no document before the {q}-token question")
    prompt = sample.prompt
    if keep >= prompt.size:
        return prompt
    return np.concatenate([prompt[: keep - q], prompt[prompt.size - q :]])


def oracle_answer(sample: Sample, keep: int | None = None) -> str:
    """What a perfect reader of ``prefix_source(sample, keep)`` writes: the answer's items
    (``meta["items"]``) whose evidence ends (``meta["item_ends"]``) inside the kept document,
    joined by ``meta["joiner"]``. ``keep=None``: the whole input, so the reference itself."""
    meta = sample.meta
    if not {"items", "item_ends", "joiner"} <= meta.keys():
        raise ValueError(f"{sample.task} samples list no answer items (meta['items']): no oracle")
    seen = sample.prompt.size
    if keep is not None and keep < seen:
        seen = prefix_source(sample, keep).size - int(meta.get("question_tokens", 0))
    items = zip(meta["items"], meta["item_ends"], strict=True)
    return str(meta["joiner"]).join(item for item, end in items if end <= seen)


def oracle_scores(
    tok: Tokenizer, samples: Sequence[Sample], keep: int | None = None
) -> dict[str, float]:
    """``text_scores`` of the prefix oracle's answers (``oracle_answer``) against the
    references, as ``evaluate_pairs`` scores a model's. With ``keep`` None (the whole input)
    ROUGE-L and chrF are 100; BLEU can be lower (sacrebleu gives 0 to answers shorter than its
    4-grams, as the digest's are)."""
    refs = [tok.decode(s.answer.tolist()) for s in samples]
    return text_scores([oracle_answer(s, keep) for s in samples], refs)


@torch.no_grad()
def evaluate_pairs(
    model: torch.nn.Module,
    tok: Tokenizer,
    samples: Sequence[Sample],
    device: torch.device | str = "cpu",
    *,
    keep: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    encode_chunk: int | None = None,
    cross_topk: int | None = None,
    trained_len: int | None = None,
) -> dict[str, Any]:
    """Greedy outputs of ``samples``' sources (cut to ``keep`` tokens when given) scored against
    their answers: ROUGE-1/2/L, BLEU, chrF (0-100), ``loss`` (teacher-forced, nats per target
    token, end token included), ``n``, ``source_tokens`` and a few ``examples``.
    ``encode_chunk``, ``cross_topk``, ``trained_len``: read with retrieval cross-attention
    (``memext.nn.seq2seq``), loss and outputs alike; None: the plain model."""
    if not samples:
        raise ValueError("no samples to evaluate")
    special = tok.special_id
    bos, eos, pad = special("<bos>"), special("<eod>"), special("<pad>")
    limit = max_new_tokens or model.max_target_len - 1
    retrieval = {"encode_chunk": encode_chunk, "cross_topk": cross_topk, "trained_len": trained_len}
    was_training = model.training
    model.eval()
    preds: list[str] = []
    nll, count = 0.0, 0.0
    try:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            if keep is not None:
                chunk = [_with_prompt(s, prefix_source(s, keep)) for s in chunk]
            src, x, y, real = pair_batch(chunk, bos, eos, pad)
            src = src.to(device)
            logits, _ = model(src, x.to(device), **retrieval)
            loss = F.cross_entropy(logits.float().transpose(1, 2), y.to(device), reduction="none")
            nll += float((loss * real.to(device)).sum())
            count += float(real.sum())
            out = greedy_decode(model, src, bos, eos, limit, **retrieval)
            preds += [tok.decode(ids) for ids in out]
    finally:
        model.train(was_training)
    refs = [tok.decode(s.answer.tolist()) for s in samples]
    return {
        **text_scores(preds, refs),
        "loss": nll / count,
        "n": len(samples),
        "source_tokens": int(keep or samples[0].prompt.size),
        "examples": [
            {"prediction": p, "reference": r} for p, r in zip(preds[:3], refs[:3], strict=True)
        ],
    }


def _with_prompt(sample: Sample, prompt: np.ndarray) -> Sample:
    """``sample`` with another prompt (a prefix baseline's source), its answer unchanged."""
    return Sample(
        np.concatenate([prompt, sample.answer]),
        prompt.size,
        tuple(p for p in sample.key_positions if p < prompt.size),
        sample.task,
        sample.meta,
    )


@dataclass
class HeldOutPairs:
    """A training probe for an encoder-decoder: ROUGE-L (``probe/TASK@LENGTH``) and the
    teacher-forced loss (``.../loss``) of greedy outputs on ``n`` held-out samples whose
    haystacks come from the validation text."""

    task: str
    length: int
    n: int
    at: ClassVar[Moment] = "eval"
    _samples: list[Sample] | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"probe/{self.task}@{self.length}"

    def __call__(self, ctx: ProbeContext) -> dict[str, float]:
        if self._samples is None:
            filler = Filler(ctx.validation)
            self._samples = held_out_samples(self.task, ctx.tokenizer, filler, self.length, self.n)
        r = evaluate_pairs(
            ctx.model, ctx.tokenizer, self._samples, ctx.device, batch_size=ctx.cfg.eval.batch_size
        )
        return {
            self.name: r["rougeL"],
            f"{self.name}/rouge1": r["rouge1"],
            f"{self.name}/loss": r["loss"],
        }
