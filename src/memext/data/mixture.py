"""The batch mixture: what each training step reads, built from the config's ``data.mixture``.

Every step takes one batch from each source active in its curriculum stage: corpus text (``lm``)
or samples of a synthetic task (``memext.data.tasks``). A batch is a pure function of
(train.seed, step, micro-batch, source), so a resumed run reads exactly what an uninterrupted one
would, and no sampler state is saved.

Task samples for a model that reads in segments (``train.segment_len`` = W) come in two kinds: a
fraction ``near`` has its key inside the last segment (in-window retrieval: what teaches the
attention that memories reuse, since stored keys get no gradient), the others keep the key at
least W tokens before the question, where only memory reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from memext.config import Config
from memext.data.filler import CLASSIC_FILLER, Filler
from memext.data.sampling import pair_batch, rows, sample_batch, task_batch
from memext.data.tasks import TASKS, Sample, TooShort, make_samples
from memext.errors import MemextError
from memext.source import Source
from memext.tokenizer import Tokenizer

# Corpus tokens a task haystack is cut from (a random span per sample): enough for variety.
CORPUS_FILLER_TOKENS = 4_000_000
# Training samples draw their seeds from [0, TRAIN_SEEDS); held-out samples (the training probes
# of memext.evals.probes) take seeds from TRAIN_SEEDS up, so the two never share a sample.
TRAIN_SEEDS = 2**62
# The answer length a sample is first sized for (a passkey's 5 digits); a task whose answer
# encodes to another length is drawn once more at the corrected size.
ANSWER_GUESS = 5
# fitted_sample: corrections of the prompt's size at one gap, and the gaps it tries.
FIT_TRIES, FIT_GAPS = 8, 64


@dataclass
class Batch:
    """One source's micro-batch: inputs and targets (B, T), per-target ``weights`` (tasks: the
    answer's share of the loss) or None, and whether document boundaries reset memory (text).
    An encoder-decoder's batch also has its sources ``src`` (B, S); x and y are then the
    decoder's inputs and targets."""

    name: str
    share: float
    x: Tensor
    y: Tensor
    weights: Tensor | None = None
    resets: bool = False
    src: Tensor | None = None
    # The denominator of this rank's mean loss when the batch is split over data-parallel ranks:
    # the whole batch's target weight over the number of ranks, so that the ranks' averaged
    # gradients are those of the whole batch's mean. None: the rows' own (one process).
    denom: float | None = None


class BatchSource:
    """The mixture of ``cfg.data.mixture`` over a token store's train split."""

    def __init__(
        self,
        cfg: Config,
        tok: Tokenizer,
        train_tokens: np.ndarray,
        shard: tuple[int, int] = (0, 1),
    ):
        """``shard``: (rank, ranks) of data parallelism; every batch is then this rank's rows of
        the one global batch (``memext.data.sampling.rows``)."""
        self.sources = cfg.data.mixture or (Source(),)
        self.seed = cfg.train.seed
        self.segment_len = cfg.train.segment_len
        self.grad_accum = cfg.train.grad_accum
        self.tok = tok
        self.train_tokens = train_tokens
        self._fillers: dict[str, Filler] = {}
        self.names = _names(self.sources)
        # An encoder-decoder reads each task sample as (source = prompt, target = answer).
        self.pairs = cfg.model.arch == "seq2seq"
        self.max_target_len = cfg.model.max_target_len
        self.shard = shard

    def active(self, stage: int) -> list[int]:
        """Indices of the sources active in curriculum stage ``stage``."""
        return [i for i, s in enumerate(self.sources) if not s.stages or stage in s.stages]

    def batch(self, index: int, step: int, micro: int, seq_len: int, batch_size: int) -> Batch:
        """Source ``index``'s batch for (step, micro-batch); ``seq_len`` and ``batch_size`` are
        the stage's, used where the source leaves them unset."""
        src = self.sources[index]
        rng = np.random.default_rng([self.seed, step, micro, index, 0x5EED])
        length = int(rng.choice(src.lengths)) if src.lengths else seq_len
        size = src.batch_size or batch_size
        name, share = self.names[index], src.share
        rank, ranks = self.shard
        part = rows(size, rank, ranks) if ranks > 1 else None
        if src.task == "lm":
            # Stream 0 (a text source listed first) draws the batches a mixture-free run draws.
            draw = step * self.grad_accum + micro
            x, y = sample_batch(self.train_tokens, size, length, self.seed, draw, index, part)
            return Batch(name, share, x, y, resets=True)
        if self.pairs:
            return _rows(self._pairs(index, length, size, rng), part, ranks)
        try:
            # Every sample of the global batch is drawn (each draw moves the generator), then
            # this rank keeps its rows.
            samples = [self._sample(src, length, rng) for _ in range(size)]
        except TooShort as e:
            raise MemextError(
                f"data.mixture source {name!r} cannot make a {length}-token sample with its key "
                f"in a {self.segment_len}-token segment: {e}"
            ) from None
        x, y, answer = task_batch(samples)
        whole = Batch(name, share, x, y, weights=answer_weights(answer, src.answer_weight))
        return _rows(whole, part, ranks)

    def _pairs(self, index: int, length: int, size: int, rng: np.random.Generator) -> Batch:
        """Source ``index``'s encoder-decoder batch: ``size`` samples of ``length``-token
        sources, each at a random depth, targets weighted equally (the loss is their mean)."""
        src, name = self.sources[index], self.names[index]
        filler = self._filler(src.filler)
        try:
            samples = [
                TASKS.build(
                    src.task,
                    tok=self.tok,
                    filler=filler,
                    length=length,
                    depth=float(rng.uniform()),
                    seed=int(rng.integers(0, TRAIN_SEEDS)),
                )
                for _ in range(size)
            ]
        except TooShort as e:
            raise MemextError(f"data.mixture source {name!r}: {e}") from None
        longest = 1 + max(s.answer.size for s in samples)
        if longest > self.max_target_len:
            raise MemextError(
                f"data.mixture source {name!r} made a target of {longest} tokens (start token "
                f"included) but model.max_target_len={self.max_target_len}: raise it"
            )
        special = self.tok.special_id
        source, x, y, real = pair_batch(
            samples, special("<bos>"), special("<eod>"), special("<pad>")
        )
        return Batch(name, src.share, x, y, weights=real.float(), src=source)

    def _sample(self, src: Source, length: int, rng: np.random.Generator) -> Sample:
        """A ``src.task`` sample of exactly ``length + 1`` tokens (inputs and targets of
        ``length``); its key inside the last segment with probability ``src.near``."""
        filler = self._filler(src.filler)
        seed = int(rng.integers(0, TRAIN_SEEDS))
        window = self.segment_len
        if not window or window >= length:
            return fitted_sample(
                src.task, self.tok, filler, length + 1, float(rng.uniform()), seed, 0
            )
        if rng.uniform() < src.near:
            inner = fitted_sample(
                src.task, self.tok, filler, window + 1, float(rng.uniform()), seed, 0
            )
            return _after(filler.take(length - window, rng), inner)
        return fitted_sample(
            src.task, self.tok, filler, length + 1, float(rng.uniform()), seed, window
        )

    def _filler(self, kind: str) -> Filler:
        if kind not in self._fillers:
            if kind == "classic":
                self._fillers[kind] = Filler.from_text(self.tok, CLASSIC_FILLER)
            else:
                self._fillers[kind] = Filler(self.train_tokens[:CORPUS_FILLER_TOKENS])
        return self._fillers[kind]


def _rows(batch: Batch, part: slice | None, ranks: int) -> Batch:
    """``batch``'s rows ``part`` (all when None), with the whole batch's loss denominator
    shared out over the ``ranks`` data-parallel ranks."""
    if part is None:
        return batch
    assert batch.weights is not None, "text batches are split where they are drawn"
    return Batch(
        batch.name,
        batch.share,
        batch.x[part],
        batch.y[part],
        weights=batch.weights[part],
        resets=batch.resets,
        src=None if batch.src is None else batch.src[part],
        denom=float(batch.weights.float().sum()) / ranks,
    )


def answer_weights(answer: Tensor, share: float) -> Tensor:
    """Per-target weights giving a row's answer targets ``share`` of its loss and the rest
    ``1 - share`` (each row sums to 1: a long filler does not drown a 5-token answer)."""
    n_answer = answer.sum(dim=1, keepdim=True).clamp(min=1)
    n_prompt = (~answer).sum(dim=1, keepdim=True).clamp(min=1)
    return torch.where(answer, share / n_answer, (1.0 - share) / n_prompt).float()


def fitted_sample(
    task: str,
    tok: Tokenizer,
    filler: Filler,
    total: int,
    depth: float,
    seed: int,
    gap: int,
    **kw: Any,
) -> Sample:
    """A sample of ``total`` tokens (prompt + answer): the prompt is sized for the answer's
    token count, which a subword tokenizer may vary (the same seed draws the same answer).
    ``kw``: further task settings (``split``).

    Where the answer grows with the prompt (``outline`` lists the names its window holds), a
    total can fall between two sizes: then the gap grows a token at a time until one fits (a
    gap is a least distance, so a wider one keeps the task's promise)."""

    def make(size: int, wider: int) -> Sample:
        return make_samples(task, tok, filler, size, depth, 1, seed, gap=gap + wider, **kw)[0]

    for wider in range(FIT_GAPS):
        size, tried = max(1, total - ANSWER_GUESS), set()
        try:
            while size not in tried and len(tried) < FIT_TRIES:
                tried.add(size)
                sample = make(size, wider)
                if sample.tokens.size == total:
                    return sample
                size = max(1, total - sample.answer.size)
        except TooShort:
            if wider:
                break  # a wider gap will not fit either
            raise
    raise ValueError(f"{task} cannot make a sample of exactly {total} tokens")


def _after(prefix: np.ndarray, inner: Sample) -> Sample:
    """``inner`` preceded by ``prefix`` (more haystack): its key stays near the question."""
    off = prefix.size
    meta = {**inner.meta, "length": inner.meta.get("length", 0) + off}
    return Sample(
        np.concatenate([prefix, inner.tokens]),
        inner.answer_start + off,
        tuple(p + off for p in inner.key_positions),
        inner.task,
        meta,
    )


def _names(sources: tuple[Source, ...]) -> list[str]:
    """A name per source for logs: its task, numbered when a task appears twice."""
    names = []
    for i, s in enumerate(sources):
        twins = sum(o.task == s.task for o in sources)
        names.append(s.task if twins == 1 else f"{s.task}{i}")
    return names


__all__ = ["Batch", "BatchSource", "answer_weights", "fitted_sample"]
