"""Perplexity of a long token stream read through a KV cache, and its recomputation reference.

``streaming_perplexity`` reads the stream once, ``chunk`` tokens per forward, through a cache
policy (``memext.infer.cache``): every token is predicted from what the cache kept. Every
``every`` tokens it records the running loss, what the cache holds (``nbytes``) and the peak
tensor memory of one chunk's forward, so a bounded policy can be shown flat over the stream.

``sliding_recompute_perplexity`` is the reference a bounded cache is measured against: each
token is predicted by a fresh forward over the ``window`` tokens ending at the one before it (no
cache, so every layer sees exactly those tokens). With ``stride`` k > 1 one forward scores k
tokens, each seeing between ``window - k + 1`` and ``window`` tokens: cheaper, less exact. On a
one-layer model a ``window`` cache of width w equals this reference with window w, stride 1.

Both return nats per token, bits per token and, given ``byte_lengths``, bits per byte (the
definition of ``memext.evals.perplexity``: special tokens score their loss, count no bytes).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from memext.evals.perplexity import nats_and_bytes, perplexity
from memext.infer.generate import new_state
from memext.profiling import peak_memory


def _as_ids(ids: Any, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(
            f"a token stream is 1-D with at least 2 tokens, got shape {tuple(t.shape)}"
        )
    return t.to(device)


def _score(
    logits: torch.Tensor, targets: torch.Tensor, byte_lengths: np.ndarray | None
) -> tuple[float, int]:
    if byte_lengths is None:
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        return float(nll), 0
    return nats_and_bytes(logits, targets, byte_lengths)


def _summary(nats: float, n_tokens: int, n_bytes: int, with_bytes: bool) -> dict[str, Any]:
    return {
        "tokens": n_tokens,
        "nats_per_token": nats / max(n_tokens, 1),
        "bits_per_token": nats / math.log(2) / max(n_tokens, 1),
        "perplexity": perplexity(nats / max(n_tokens, 1)),
        "bytes": n_bytes if with_bytes else None,
        "bits_per_byte": nats / math.log(2) / max(n_bytes, 1) if with_bytes else None,
    }


@torch.no_grad()
def streaming_perplexity(
    model: torch.nn.Module,
    ids: Any,
    cache: str,
    chunk: int,
    *,
    cache_options: dict[str, Any] | None = None,
    byte_lengths: np.ndarray | None = None,
    every: int = 4096,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``ids`` (a 1-D stream) through the cache policy ``cache`` read ``chunk`` at a time.

    Returns the summary (nats/token, bits/token, perplexity, bits/byte), ``tokens_per_s`` (over
    the chunks not measured for memory) and ``checkpoints``: one entry about every ``every``
    tokens with the tokens read, the running nats/token, ``cache_nbytes``, ``timed_tokens`` and
    ``timed_s`` so far (rates between checkpoints show whether speed stays flat) and ``chunk_peak_bytes``
    (peak tensor memory of that chunk's forward above what was live before it: the allocator's
    own counter on CUDA, the profiler's allocation events on CPU; that chunk is left out of the
    timing because the profiler slows it down).
    """
    if chunk < 1 or every < 1:
        raise ValueError(f"chunk and every must be positive, got chunk={chunk}, every={every}")
    device = next(model.parameters()).device
    stream = _as_ids(ids, device)
    was_training = model.training
    model.eval()
    try:
        state = new_state(model, 1, stream.numel() - 1, cache, **(cache_options or {}))
        nats, n_tok, n_bytes = 0.0, 0, 0
        timed_tokens, timed_s = 0, 0.0
        checkpoints: list[dict[str, Any]] = []
        next_mark = 0
        n_inputs = stream.numel() - 1  # the last token is only a target
        bar = tqdm(total=n_inputs, desc=f"stream {cache}", unit="tok", disable=not progress)
        for a in range(0, n_inputs, chunk):
            b = min(a + chunk, n_inputs)
            inputs, targets = stream[None, a:b], stream[None, a + 1 : b + 1]
            out: dict[str, Any] = {}

            def step(inputs=inputs, state=state, out=out) -> None:
                out["logits"], out["state"] = model(inputs, state)

            measure = a >= next_mark
            if measure:
                peak = peak_memory(step, device)
            else:
                t0 = time.perf_counter()
                step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timed_s += time.perf_counter() - t0
                timed_tokens += b - a
            state = out["state"]
            nll, nb = _score(out["logits"], targets, byte_lengths)
            nats, n_tok, n_bytes = nats + nll, n_tok + (b - a), n_bytes + nb
            if measure:
                checkpoints.append(
                    {
                        "tokens": b,
                        "nats_per_token": nats / n_tok,
                        "cache_nbytes": state.cache.nbytes(),
                        "timed_tokens": timed_tokens,
                        "timed_s": timed_s,
                        "chunk_peak_bytes": peak,
                    }
                )
                next_mark += every
            bar.update(b - a)
        bar.close()
    finally:
        model.train(was_training)
    result = _summary(nats, n_tok, n_bytes, byte_lengths is not None)
    result.update(
        cache=cache,
        cache_options=dict(cache_options or {}),
        chunk=chunk,
        tokens_per_s=timed_tokens / timed_s if timed_s > 0 else None,
        checkpoints=checkpoints,
    )
    return result


@torch.no_grad()
def sliding_recompute_perplexity(
    model: torch.nn.Module,
    ids: Any,
    window: int,
    stride: int = 1,
    *,
    byte_lengths: np.ndarray | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``ids`` with a fresh forward per ``stride`` tokens over the ``window`` tokens before.

    Forwards are batched ``batch_size`` windows at a time. The first forward reads the first
    ``window`` tokens and scores them all (each already sees at most ``window`` tokens), so
    every target of the stream is scored exactly once, in order.
    """
    if window < 1 or stride < 1 or stride > window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    stream = _as_ids(ids, device)
    n_inputs = stream.numel() - 1
    was_training = model.training
    model.eval()
    try:
        head = min(window, n_inputs)
        logits, _ = model(stream[None, :head])
        nats, n_bytes = _score(logits, stream[None, 1 : head + 1], byte_lengths)
        n_tok = head
        # The rest in blocks of `stride` inputs [s, e); each block's forward reads [e - window, e).
        blocks = [(s, min(s + stride, n_inputs)) for s in range(head, n_inputs, stride)]
        bar = tqdm(total=n_inputs, desc=f"recompute W={window}", unit="tok", disable=not progress)
        bar.update(head)
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            ends = torch.tensor([e for _, e in batch], device=device)
            idx = (ends - window)[:, None] + torch.arange(window + 1, device=device)[None, :]
            seg = stream[idx]  # inputs e - window .. e - 1, then the target of the last one
            logits, _ = model(seg[:, :-1])
            for width in sorted({e - s for s, e in batch}):  # only the stream's tail is narrower
                rows = [r for r, (s, e) in enumerate(batch) if e - s == width]
                nll, nb = _score(logits[rows, -width:], seg[rows, -width:], byte_lengths)
                nats, n_tok, n_bytes = nats + nll, n_tok + width * len(rows), n_bytes + nb
            bar.update(sum(e - s for s, e in batch))
        bar.close()
    finally:
        model.train(was_training)
    result = _summary(nats, n_tok, n_bytes, byte_lengths is not None)
    result.update(window=window, stride=stride)
    return result
