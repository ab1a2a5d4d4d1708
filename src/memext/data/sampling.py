"""Training batches: random spans of the token stream, synthetic-task samples as batches, the
rows of a batch each data-parallel rank reads, and how a long input is cut into segments (training, evaluation and the model adapters cut alike;
evaluation windows live in memext.evals.perplexity)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from memext.data.tasks import Sample
from memext.errors import MemextError


def sample_batch(
    tokens: np.ndarray,
    batch_size: int,
    seq_len: int,
    seed: int,
    step: int,
    stream: int = 0,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random segments of ``seq_len + 1`` tokens as (inputs, targets), each (B, T) int64.

    The batch is a pure function of (seed, step, stream), so a resumed run draws exactly the
    batches an uninterrupted one would, without saving sampler state; ``stream`` > 0 draws an
    independent sequence of batches (another text source of a mixture). ``rows``: only these
    rows of the batch are read (a data-parallel rank's share: ``rows``).
    """
    if tokens.size < seq_len + 1:
        raise ValueError(
            f"the token stream ({tokens.size} tokens) is shorter than seq_len+1={seq_len + 1}"
        )
    rng = np.random.default_rng([seed, step, stream] if stream else [seed, step])
    starts = rng.integers(0, tokens.size - seq_len, size=batch_size)
    if rows is not None:  # every row's start is drawn first, so a row reads the same span
        starts = starts[rows]
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    seg = torch.from_numpy(tokens[idx].astype(np.int64))
    return seg[:, :-1], seg[:, 1:]


def rows(batch_size: int, rank: int, ranks: int) -> slice:
    """The rows of a ``batch_size``-row batch that data-parallel rank ``rank`` of ``ranks``
    reads: contiguous equal shares, so the ranks together read exactly the batch one process
    reads, and a run resumed at another world size reads the same global sequence of samples."""
    per = per_rank(batch_size, ranks)
    return slice(rank * per, (rank + 1) * per)


def per_rank(batch_size: int, ranks: int, name: str = "the batch") -> int:
    """Rows per data-parallel rank; a batch that does not split evenly is refused (an uneven
    split would weigh the ranks' rows unequally in the mean loss)."""
    if batch_size % ranks:
        raise MemextError(
            f"{name} of {batch_size} rows does not split evenly over {ranks} data-parallel "
            f"ranks: choose a multiple of {ranks}"
        )
    return batch_size // ranks


def task_batch(samples: Sequence[Sample]) -> tuple[Tensor, Tensor, Tensor]:
    """Inputs (B, T), targets (B, T) (the inputs shifted by one) and a (B, T) bool mask that is
    True where the target is an answer token, for samples of one length (T = length - 1)."""
    if not samples:
        raise ValueError("task_batch needs at least one sample")
    lengths = {s.tokens.size for s in samples}
    if len(lengths) > 1:
        raise ValueError(f"samples in one batch must share a length, got {sorted(lengths)}")
    tokens = torch.from_numpy(np.stack([s.tokens for s in samples]))
    positions = torch.arange(tokens.shape[1] - 1)
    starts = torch.tensor([s.answer_start - 1 for s in samples])  # predicts the first answer token
    mask = positions[None, :] >= starts[:, None]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def segments(n_tokens: int, segment_len: int) -> list[tuple[int, int]]:
    """[start, end) spans tiling [0, n_tokens), cut backwards from the end: every span is
    ``segment_len`` long except the first, which takes the remainder."""
    if segment_len < 1:
        raise ValueError(f"segment_len={segment_len} must be positive")
    if n_tokens < 0:
        raise ValueError(f"n_tokens={n_tokens} must be non-negative")
    ends = range(n_tokens, 0, -segment_len)
    return [(max(0, end - segment_len), end) for end in reversed(ends)]


def pair_batch(
    samples: Sequence[Sample], bos: int, eos: int, pad: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An encoder-decoder's batch of samples whose prompts share a length: the sources (B, S) =
    the prompts; the decoder's inputs (B, T) = ``bos`` + answer, and its targets (B, T) =
    answer + ``eos``, padded with ``pad`` to the longest answer; and a (B, T) bool mask, True
    on real targets (the causal decoder never reads the padding of a row's own future)."""
    if not samples:
        raise ValueError("pair_batch needs at least one sample")
    lengths = {s.answer_start for s in samples}
    if len(lengths) > 1:
        raise ValueError(f"sources in one batch must share a length, got {sorted(lengths)}")
    src = torch.from_numpy(np.stack([s.prompt for s in samples]))
    t = 1 + max(s.answer.size for s in samples)
    x = torch.full((len(samples), t), pad, dtype=torch.long)
    y = torch.full((len(samples), t), pad, dtype=torch.long)
    for i, s in enumerate(samples):
        n = s.answer.size
        answer = torch.from_numpy(s.answer.astype(np.int64))
        x[i, 0], x[i, 1 : n + 1] = bos, answer
        y[i, :n], y[i, n] = answer, eos
    mask = torch.arange(t)[None, :] <= torch.tensor([s.answer.size for s in samples])[:, None]
    return src, x, y, mask
