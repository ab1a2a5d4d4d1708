"""Training batches: random segments (evaluation windows live in memext.evals.perplexity)."""

from __future__ import annotations

import numpy as np
import torch


def sample_batch(
    tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random segments of ``seq_len + 1`` tokens as (inputs, targets), each (B, T) int64.

    The batch is a pure function of (seed, step), so a resumed run draws exactly the batches an
    uninterrupted one would, without saving sampler state.
    """
    if tokens.size < seq_len + 1:
        raise ValueError(
            f"the token stream ({tokens.size} tokens) is shorter than seq_len+1={seq_len + 1}"
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, tokens.size - seq_len, size=batch_size)
    idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
    seg = torch.from_numpy(tokens[idx].astype(np.int64))
    return seg[:, :-1], seg[:, 1:]
