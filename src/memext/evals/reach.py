"""Memory reach: bits-per-byte against how much earlier text the model has read, with and
without its memory.

Definition: the validation stream is scored one segment of W tokens at a time (W = the model's
training segment). For a reach of R = m·W tokens the scored segment comes last in R tokens of
text. *With memory* they are read as m segments with the state carried (attention spans one
segment plus whatever the memory keeps). *Without memory* they are read in one forward pass from
an empty state (attention alone over all R tokens; skipped when R exceeds the model's
max_seq_len). The same segments are scored in every cell, so differences come from how the
earlier text is used. A model without memory gains nothing from reading in segments.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from memext.errors import MemextError
from memext.evals.perplexity import nats_and_bytes

DEFINITION = (
    "the last W-token segment of R = m*W tokens is scored; with memory: read as m segments with "
    "the state carried; without: one pass over all R tokens from an empty state; the same "
    "segments are scored in every cell; bits/byte = nats / ln 2 / UTF-8 bytes of the targets"
)


def _scored_starts(tokens: np.ndarray, w: int, far: int, max_tokens: int) -> tuple[np.ndarray, int]:
    """Starts of the scored W-token segments: the first has room for ``far - 1`` predecessors,
    then as many as ``max_tokens`` and the text allow."""
    first = (far - 1) * w
    n_seg = min(max_tokens, tokens.size - 1 - first) // w
    if n_seg <= 0:
        raise MemextError(
            f"the validation split has {tokens.size} tokens: too few for a reach of {far}x{w}"
        )
    return first + w * np.arange(n_seg), n_seg


@torch.no_grad()
def score_reach(
    model: torch.nn.Module,
    tokens: np.ndarray,
    segment_len: int,
    m: int,
    far: int,
    max_tokens: int,
    byte_lengths: np.ndarray,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    step: int | None = None,
) -> dict[str, Any]:
    """Bits-per-byte of the scored segments (``_scored_starts`` for the farthest reach ``far``)
    after R = m * W tokens, each R-token input fed ``step`` tokens per call with the state
    carried (None: in one call, which a model reading in segments cuts itself)."""
    w = segment_len
    starts, n_seg = _scored_starts(tokens, w, far, max_tokens)
    step = step or m * w
    nats, n_bytes = 0.0, 0
    for i in range(0, n_seg, batch_size):
        s = starts[i : i + batch_size]
        idx = (s - (m - 1) * w)[:, None] + np.arange(m * w + 1)[None, :]
        seq = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
        state = None
        for j in range(0, m * w, step):
            logits, state = model(seq[:, j : j + step], state)
        nll, nb = nats_and_bytes(logits[:, -w:], seq[:, -w:], byte_lengths)
        nats, n_bytes = nats + nll, n_bytes + nb
    return {
        "reach": m * w,
        "scored_tokens": int(n_seg * w),
        "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
    }


def memory_reach(
    model: torch.nn.Module,
    tokens: np.ndarray,
    segment_len: int,
    multiples: tuple[int, ...],
    max_tokens: int,
    byte_lengths: np.ndarray,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> list[dict[str, Any]]:
    """One row per (reach, memory on/off): bits-per-byte on the same scored segments."""
    w, far = segment_len, max(multiples)
    _scored_starts(tokens, w, far, max_tokens)  # refuses a text too short before any work
    was_training = model.training
    model.eval()
    rows = []
    try:
        for m in sorted(set(multiples)):
            for use_memory in (True, False):
                if not use_memory and (m * w > model.max_seq_len or m == 1):
                    continue  # too long for one pass; or one segment, where both are one call
                r = score_reach(
                    model,
                    tokens,
                    w,
                    m,
                    far,
                    max_tokens,
                    byte_lengths,
                    batch_size,
                    device,
                    step=w if use_memory else m * w,
                )
                row = {
                    "reach": m * w,
                    "reach_in_segments": m,
                    "memory": use_memory,
                    "segment_len": w,
                    "scored_tokens": r["scored_tokens"],
                    "bits_per_byte": r["bits_per_byte"],
                }
                rows.append(row)
                if m == 1:  # one segment is one call either way: the same figure, computed once
                    rows.append({**row, "memory": False})
    finally:
        model.train(was_training)
    return rows
