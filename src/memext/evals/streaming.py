"""Perplexity of a long token stream read through a KV cache, and its recomputation reference.

The model is a memext ``LongLM`` or a Hugging Face causal LM (``memext.hf.model.HFCausalLM``, what
the ``hf``, ``gguf`` and ``known`` adapters hold). Both go through the one measurement below; only
the forward differs (``memext.evals.stream_readers``): memext's cache for a ``LongLM``, the same
policy as a ``transformers.Cache`` for a Hugging Face model.

``streaming_perplexity`` reads the stream once, ``chunk`` tokens per forward, through a cache
policy: every token is predicted from what the cache kept. It returns the loss over the stream,
by position (``by_position``: buckets of ``every`` tokens), and every ``every`` tokens a
checkpoint of memory and speed, so a bounded policy can be shown flat over the stream. Memory,
as measured at a checkpoint:

- ``cache_nbytes``: the tensors the cache holds, its ``nbytes()`` (the formulas are in
  ``memext.infer.cache``); ``store_nbytes`` too for a cache with a block store (``retrieval``);
- ``chunk_peak_bytes``: the allocator's peak during that chunk's forward, above what was live
  before it (``memext.profiling.peak_memory``: CUDA's own counter; on CPU the running sum of the
  allocations and frees the profiler recorded), so the cache itself, allocated up front, is not
  in it; None with ``chunk_peak=False``;
- ``rss_bytes``: the resident set of the whole process after that chunk (weights, allocator
  caches, the interpreter; Linux's ``VmRSS``, None elsewhere); ``max_rss_bytes``: its
  high-water mark since the process started (``VmHWM``; ``ru_maxrss`` on other Unixes), which
  the model's loading may have set. On CPU PyTorch's profiler keeps memory of its own after
  every chunk it profiles (not given back by ``malloc_trim``), so the resident set grows with
  the checkpoints measured for ``chunk_peak_bytes``; ``chunk_peak=False`` leaves the profiler
  out, and only then is ``rss_bytes`` the stream's own.

``sliding_recompute_perplexity`` is the reference a bounded cache is measured against: each
token is predicted by a fresh forward over the ``window`` tokens ending at the one before it (no
cache, so every layer sees exactly those tokens). With ``stride`` k > 1 one forward scores k
tokens, each seeing between ``window - k + 1`` and ``window`` tokens: cheaper, less exact. On a
one-layer model a ``window`` cache of width w equals this reference with window w, stride 1.
``against_recompute`` scores a slice of a stream both ways, on the same positions.

The text a stream reads is ``memext.evals.stream_text``.

Losses are nats per token, bits per token and, given ``byte_lengths``, bits per byte (the
definition of ``memext.evals.perplexity``: special tokens score their loss, count no bytes).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from memext.evals.perplexity import perplexity
from memext.evals.stream_readers import StreamNet
from memext.profiling import peak_memory


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --- losses -------------------------------------------------------------------------------------
def _as_ids(ids: Any, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    if t.dim() != 1 or t.numel() < 2:
        raise ValueError(
            f"a token stream is 1-D with at least 2 tokens, got shape {tuple(t.shape)}"
        )
    return t.to(device)


def _token_nats(logits: Tensor, targets: Tensor) -> np.ndarray:
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return nll.double().cpu().numpy()


def target_bytes(ids: Any, byte_lengths: np.ndarray | None) -> np.ndarray | None:
    """The UTF-8 bytes of every target of stream ``ids`` (index i: the token after input i)."""
    if byte_lengths is None:
        return None
    return np.asarray(byte_lengths)[np.asarray(ids)[1:].astype(np.int64)]


def summarize(nats: np.ndarray, n_bytes: np.ndarray | None = None) -> dict[str, Any]:
    """Per-token losses (and the targets' bytes) -> tokens, nats/token, bits/token, perplexity,
    bytes and bits/byte (None without bytes)."""
    total, n = float(np.sum(nats, dtype=np.float64)), len(nats)
    per_token = total / max(n, 1)
    b = int(np.sum(n_bytes)) if n_bytes is not None else None
    return {
        "tokens": n,
        "nats_per_token": per_token,
        "bits_per_token": per_token / math.log(2),
        "perplexity": perplexity(per_token),
        "bytes": b,
        "bits_per_byte": total / math.log(2) / max(b, 1) if b is not None else None,
    }


def _process_memory() -> tuple[int | None, int | None]:
    """(resident set now, its high-water mark) of this process, in bytes; None where unknown."""
    fields: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):  # one source for both, in kB
                fields[key] = int(value.split()[0]) * 1024
    if len(fields) == 2:
        return fields["VmRSS"], fields["VmHWM"]
    try:
        import resource
    except ImportError:  # not Unix
        return None, None
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return None, peak * (1 if sys.platform == "darwin" else 1024)


# --- the stream ---------------------------------------------------------------------------------
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
    token_nats: bool = False,
    chunk_peak: bool = True,
) -> dict[str, Any]:
    """Score ``ids`` (a 1-D stream) through the cache policy ``cache`` read ``chunk`` at a time.

    Returns the summary (``summarize``), ``tokens_per_s`` (over the chunks not measured for
    memory), ``by_position`` (the summary of the targets of inputs [k·every, (k+1)·every), with
    its ``start``) and ``checkpoints``: at the first chunk starting in each bucket, its ``start``,
    the tokens read after it (``tokens``), the running nats/token, the memory figures of the module doc,
    ``timed_tokens`` and ``timed_s`` so far (rates between checkpoints show whether speed stays
    flat). The measured chunk runs under the profiler on CPU, so it is left out of the timing;
    ``chunk_peak=False`` measures no allocator peak (and so keeps the profiler's own memory out
    of ``rss_bytes``).
    With ``token_nats``, also ``token_nats``: every target's loss (float64, index i = the target
    after input i), for comparisons on the same positions; not JSON, drop it before writing.
    """
    if chunk < 1 or every < 1:
        raise ValueError(f"chunk and every must be positive, got chunk={chunk}, every={every}")
    net = StreamNet(model)
    stream = _as_ids(ids, net.device)
    n_inputs = stream.numel() - 1  # the last token is only a target
    losses = np.empty(n_inputs, dtype=np.float64)
    timed_tokens, timed_s = 0, 0.0
    checkpoints: list[dict[str, Any]] = []
    next_mark = 0
    with _evaluating(model):
        reader = net.reader(cache, dict(cache_options or {}), n_inputs)
        bar = tqdm(total=n_inputs, desc=f"stream {cache}", unit="tok", disable=not progress)
        try:
            for a in range(0, n_inputs, chunk):
                b = min(a + chunk, n_inputs)
                inputs = stream[None, a:b]
                out: list[Tensor] = []
                measure = a >= next_mark
                peak = None
                if measure and chunk_peak:
                    peak = peak_memory(
                        lambda inputs=inputs, out=out: out.append(reader.read(inputs)), net.device
                    )
                else:
                    t0 = time.perf_counter()
                    out.append(reader.read(inputs))
                    if net.device.type == "cuda":
                        torch.cuda.synchronize(net.device)
                    timed_s += time.perf_counter() - t0
                    timed_tokens += b - a
                losses[a:b] = _token_nats(out[0], stream[None, a + 1 : b + 1])
                if measure:
                    rss, max_rss = _process_memory()
                    checkpoints.append(
                        {
                            "start": a,
                            "tokens": b,
                            "nats_per_token": float(losses[:b].mean()),
                            "cache_nbytes": reader.nbytes(),
                            "store_nbytes": reader.store_nbytes(),
                            "chunk_peak_bytes": peak,
                            "rss_bytes": rss,
                            "max_rss_bytes": max_rss,
                            "timed_tokens": timed_tokens,
                            "timed_s": timed_s,
                        }
                    )
                    next_mark = (a // every + 1) * every
                bar.update(b - a)
        finally:
            bar.close()
            reader.close()
    bytes_ = target_bytes(stream.cpu().numpy(), byte_lengths)
    result = summarize(losses, bytes_)
    result.update(
        cache=cache,
        cache_options=dict(cache_options or {}),
        chunk=chunk,
        tokens_per_s=timed_tokens / timed_s if timed_s > 0 else None,
        by_position=[
            {"start": s, **summarize(losses[s : s + every], _part(bytes_, s, s + every))}
            for s in range(0, n_inputs, every)
        ],
        checkpoints=checkpoints,
    )
    if token_nats:
        result["token_nats"] = losses
    return result


def _part(a: np.ndarray | None, start: int, end: int) -> np.ndarray | None:
    return None if a is None else a[start:end]


# --- the reference ------------------------------------------------------------------------------
@torch.no_grad()
def sliding_recompute_perplexity(
    model: torch.nn.Module,
    ids: Any,
    window: int,
    stride: int = 1,
    *,
    first: int = 0,
    byte_lengths: np.ndarray | None = None,
    batch_size: int = 16,
    progress: bool = True,
    token_nats: bool = False,
) -> dict[str, Any]:
    """Score the targets of inputs [``first``, end) of ``ids`` with a fresh forward per
    ``stride`` tokens over the ``window`` tokens before (the stream's own tokens before
    ``first`` included).

    Forwards are batched ``batch_size`` windows at a time. Inputs within the first ``window``
    are scored by one forward over the stream's first ``window`` tokens (each already sees at
    most ``window`` tokens), so every target is scored exactly once, in order. With
    ``token_nats``, also ``token_nats``: the per-target losses (index i: input ``first + i``).
    """
    if window < 1 or stride < 1 or stride > window:
        raise ValueError(f"need 1 <= stride <= window, got window={window}, stride={stride}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    net = StreamNet(model)
    stream = _as_ids(ids, net.device)
    n_inputs = stream.numel() - 1
    if not 0 <= first < n_inputs:
        raise ValueError(f"first={first} is not an input position of a {n_inputs + 1}-token stream")
    losses = np.empty(n_inputs - first, dtype=np.float64)
    with _evaluating(model):
        bar = tqdm(
            total=n_inputs - first, desc=f"recompute W={window}", unit="tok", disable=not progress
        )
        start = first
        head = min(window, n_inputs)
        if first < head:
            logits = net.last_logits(stream[None, :head], head - first)
            losses[: head - first] = _token_nats(logits, stream[None, first + 1 : head + 1])
            bar.update(head - first)
            start = head
        # The rest in blocks of `stride` inputs [s, e); each block's forward reads [e - window, e).
        blocks = [(s, min(s + stride, n_inputs)) for s in range(start, n_inputs, stride)]
        for i in range(0, len(blocks), batch_size):
            batch = blocks[i : i + batch_size]
            ends = torch.tensor([e for _, e in batch], device=net.device)
            idx = (ends - window)[:, None] + torch.arange(window + 1, device=net.device)[None, :]
            seg = stream[idx]  # inputs e - window .. e - 1, then the target of the last one
            logits = net.last_logits(seg[:, :-1], stride)
            for r, (s, e) in enumerate(batch):  # only the stream's tail is narrower than stride
                w = e - s
                losses[s - first : e - first] = _token_nats(logits[r, -w:], seg[r, -w:])
            bar.update(sum(e - s for s, e in batch))
        bar.close()
    bytes_ = target_bytes(stream.cpu().numpy(), byte_lengths)
    result = summarize(losses, _part(bytes_, first, n_inputs))
    result.update(window=window, stride=stride, first=first)
    if token_nats:
        result["token_nats"] = losses
    return result


def against_recompute(
    model: torch.nn.Module,
    ids: Any,
    stream_nats: np.ndarray,
    first: int,
    window: int,
    stride: int = 1,
    *,
    byte_lengths: np.ndarray | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[str, Any]:
    """A stream's losses (``stream_nats``, from ``streaming_perplexity(..., token_nats=True)``)
    on the targets of inputs [``first``, end) against ``sliding_recompute_perplexity`` with
    ``window`` and ``stride`` on the same positions: both summaries, the perplexity ratio
    (stream / recompute) and the seconds the recomputation took."""
    n_inputs = len(np.asarray(ids)) - 1
    if len(stream_nats) != n_inputs:
        raise ValueError(f"{len(stream_nats)} stream losses for a {n_inputs + 1}-token stream")
    t0 = time.perf_counter()
    ref = sliding_recompute_perplexity(
        model,
        ids,
        window,
        stride,
        first=first,
        byte_lengths=byte_lengths,
        batch_size=batch_size,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    mine = summarize(stream_nats[first:], _part(target_bytes(ids, byte_lengths), first, n_inputs))
    return {
        "first": first,
        "tokens": n_inputs - first,
        "window": window,
        "stride": stride,
        "stream": mine,
        "recompute": {k: v for k, v in ref.items() if k not in ("window", "stride", "first")},
        "perplexity_ratio": mine["perplexity"] / ref["perplexity"],
        "recompute_s": seconds,
    }
