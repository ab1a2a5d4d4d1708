"""Bits-per-byte and perplexity against context length.

Definition (docs/evaluation.md): for a context length L the validation stream is read in windows
of L tokens with stride L/2, and only the positions in the second half of each window are scored,
so every scored token is predicted from between L/2 + 1 and L tokens of context. The model
attends over the whole window (no cache tricks). The *same* token positions are scored at every
L of one evaluation — positions ``P0 … P0 + N - 1`` with ``P0 = max(L) / 2`` — so differences
between lengths come from context alone. bits-per-byte = total nats / ln 2 / the UTF-8 bytes of
the scored target tokens (special tokens score their loss but count no bytes). An odd L scores
the last ⌊L/2⌋ positions of each window with stride ⌊L/2⌋, so each position is scored once (the
first is then ⌈max(L)/2⌉).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memext.errors import MemextError

DEFINITION = (
    "windows of L tokens with stride L/2; only the second half of each window is scored, so each "
    "scored token sees L/2+1..L tokens of context; the same positions [max(L)/2, max(L)/2+N) are "
    "scored at every L; bits/byte = nats / ln 2 / UTF-8 bytes of the scored targets"
)


def perplexity(nats_per_token: float) -> float:
    """exp(nats per token), infinite where the float overflows (a diverged model's loss)."""
    return math.exp(nats_per_token) if nats_per_token < 709.0 else math.inf


def _windows(length: int, first: int, n_scored: int) -> list[tuple[int, int]]:
    """(start, end) input spans whose last ⌊length/2⌋ positions tile [first, first + n_scored)."""
    half = length // 2
    lead = length - half  # unscored context at the start of a window (= half when L is even)
    spans, start = [], first - lead
    while start + lead < first + n_scored:
        spans.append((start, min(start + length, first + n_scored)))
        start += half
    return spans


def nats_and_bytes(
    logits: torch.Tensor, targets: torch.Tensor, byte_lengths: np.ndarray
) -> tuple[float, int]:
    """Summed negative log-likelihood of ``targets`` and their UTF-8 bytes: bits-per-byte's parts."""
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
    )
    return float(nll), int(byte_lengths[targets.cpu().numpy()].sum())


@torch.no_grad()
def score_length(
    model: torch.nn.Module,
    tokens: np.ndarray,
    length: int,
    first: int,
    n_scored: int,
    byte_lengths: np.ndarray,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Score positions [first, first + n_scored) of ``tokens`` with windows of ``length``."""
    if length < 2:
        raise ValueError(f"length={length} must be >= 2")
    lead = length - length // 2  # the unscored start of each window: length/2 when it is even
    if first < lead:
        raise ValueError(f"first={first} must be >= length - length//2 = {lead}")
    spans = _windows(length, first, n_scored)
    nats, n_tok, n_bytes = 0.0, 0, 0
    groups: dict[int, list[tuple[int, int]]] = {}
    for s, e in spans:
        groups.setdefault(e - s, []).append((s, e))  # the tail window may be shorter
    bar = tqdm(total=len(spans), desc=f"eval L={length}", disable=not progress, leave=False)
    for size, group in groups.items():
        for i in range(0, len(group), batch_size):
            batch = group[i : i + batch_size]
            idx = np.array([s for s, _ in batch])[:, None] + np.arange(size + 1)[None, :]
            seg = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
            targets = seg[:, lead + 1 :]
            if hasattr(model, "log_probs"):
                # An adapter's reading (``Whole``): the scored positions' log-probabilities,
                # projected on the vocabulary a few hundred rows at a time.
                scored = torch.arange(lead, size, device=seg.device)
                nll = -float(model.log_probs(seg[:, :-1], scored, targets).double().sum())
                nb = int(byte_lengths[targets.cpu().numpy()].sum())
            else:
                logits, _ = model(seg[:, :-1])
                nll, nb = nats_and_bytes(logits[:, lead:], targets, byte_lengths)
            nats, n_tok, n_bytes = nats + nll, n_tok + targets.numel(), n_bytes + nb
            bar.update(len(batch))
    bar.close()
    return {
        "length": length,
        "scored_tokens": n_tok,
        "scored_bytes": n_bytes,
        "nats": nats,
        "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
        "bits_per_token": nats / math.log(2) / max(n_tok, 1),
        "perplexity": perplexity(nats / max(n_tok, 1)),
    }


def evaluate_lengths(
    model: torch.nn.Module,
    tokens: np.ndarray,
    lengths: tuple[int, ...],
    max_tokens: int,
    byte_lengths: np.ndarray,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Bits-per-byte at each context length, on the same scored positions for every length."""
    first = max(n - n // 2 for n in lengths)  # max(lengths) / 2 when they are even
    n_scored = min(max_tokens, tokens.size - 1 - first)
    if n_scored <= 0:
        raise MemextError(
            f"the validation split has {tokens.size} tokens: too few for context length "
            f"{max(lengths)} (needs more than {first + 1})"
        )
    was_training = model.training
    model.eval()
    try:
        return [
            score_length(
                model, tokens, n, first, n_scored, byte_lengths, batch_size, device, progress
            )
            for n in sorted(lengths)
        ]
    finally:
        model.train(was_training)


def windowed_bits_per_byte(adapter: Any, ids: np.ndarray, context: int) -> float:
    """Bits per byte of ``ids`` read through ``adapter.log_probs`` in consecutive windows of
    ``context`` tokens, each window's tokens after its first scored (what the quantization and
    pruning benchmarks compare configurations on)."""
    lengths = np.asarray(adapter.tokenizer.byte_lengths())
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for a in range(0, len(ids) - 1, context):
            window = torch.as_tensor(ids[a : a + context], dtype=torch.int64)[None]
            if window.shape[1] < 2:
                break
            positions = torch.arange(window.shape[1] - 1)
            lp = adapter.log_probs(window, positions, window[:, 1:])
            nats -= float(lp.double().sum())
            nbytes += int(lengths[window[0, 1:].numpy()].sum())
    return nats / math.log(2) / max(nbytes, 1)
