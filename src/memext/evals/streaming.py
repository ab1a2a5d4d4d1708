"""Perplexity of a long token stream read through a KV cache, and its recomputation reference.

The model is a memext ``LongLM`` or a Hugging Face causal LM (``memext.hf.model.HFCausalLM``, what
the ``hf``, ``gguf`` and ``known`` adapters hold). Both go through the one measurement below; only
the forward differs (``_net``): memext's cache (``memext.infer.cache``) for a ``LongLM``, the same
policy as a ``transformers.Cache`` (``memext.hf.cache.PolicyCache``) for a Hugging Face model,
every chunk under the policy's exact band, as ``memext.hf.cache.prefill`` reads a prompt.

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

``stream_text`` is the token stream of one or more texts, read in order.

Losses are nats per token, bits per token and, given ``byte_lengths``, bits per byte (the
definition of ``memext.evals.perplexity``: special tokens score their loss, count no bytes).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from memext.evals.perplexity import perplexity
from memext.infer.cache import CACHES, CachePolicy
from memext.infer.generate import new_state
from memext.nn.transformer import LongLM
from memext.profiling import peak_memory
from memext.tokenizer import Tokenizer, encode_documents


# --- the two kinds of model ---------------------------------------------------------------------
class _Reader:
    """A stream's forward through a live cache: ``read(inputs (1, T)) -> logits (1, T, vocab)``."""

    def read(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError

    def store_nbytes(self) -> int | None:
        return None

    def close(self) -> None:
        return None


class _MemextReader(_Reader):
    def __init__(self, model: LongLM, cache: str, options: dict[str, Any], n_inputs: int):
        self.model = model
        self.state = new_state(model, 1, n_inputs, cache, **options)

    def read(self, inputs: Tensor) -> Tensor:
        logits, self.state = self.model(inputs, self.state)
        return logits

    def nbytes(self) -> int:
        return self.state.cache.nbytes()

    def store_nbytes(self) -> int | None:
        store = getattr(self.state.cache, "store_nbytes", None)
        return store() if store is not None else None


class _HFReader(_Reader):
    def __init__(self, lm: Any, cache: str, options: dict[str, Any], n_inputs: int):
        from memext.hf.cache import PolicyCache

        self.lm = lm
        self.cache = PolicyCache(lm.config, cache, **_with_length(cache, options, n_inputs))
        self.cache.attach(lm)  # a policy that chooses by queries (retrieval) gets them
        self.dtype = next(lm.parameters()).dtype

    def read(self, inputs: Tensor) -> Tensor:
        from memext.hf.model import cache_kwargs

        start, t = self.cache.get_seq_length(), inputs.shape[1]
        positions = torch.arange(start, start + t, device=inputs.device)[None]
        # transformers builds a plain causal mask from the config; a chunk that reaches past the
        # window needs the policy's band (the explicit 4D mask ``memext.hf.cache.prefill`` gives).
        band = self.cache.band(start, t, inputs.device)
        mask = None
        if band is not None:
            mask = torch.zeros(band.shape, dtype=self.dtype, device=inputs.device)
            mask = mask.masked_fill(~band, torch.finfo(self.dtype).min)[None, None]
        out = self.lm(
            input_ids=inputs,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **cache_kwargs(self.lm, self.cache),
        )
        return out.logits

    def nbytes(self) -> int:
        return self.cache.nbytes()

    def store_nbytes(self) -> int | None:
        return self.cache.store_nbytes() if self.cache.reads_queries else None

    def close(self) -> None:
        self.cache.detach()


class _Net:
    """What the measurements need of a model: a cached reader and a fresh forward."""

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self.device = next(model.parameters()).device
        self.hf: Any = None
        if isinstance(model, LongLM):
            if model.segment_len:
                raise ValueError(
                    f"the model reads long input in {model.segment_len}-token segments through "
                    "its memory, not through a KV cache: there is no cache policy to stream"
                )
            return
        from memext.hf.model import HFCausalLM

        if not isinstance(model, HFCausalLM):
            raise TypeError(
                "streaming reads a memext LongLM or a Hugging Face causal LM (HFCausalLM), got "
                f"{type(model).__name__}"
            )
        self.hf = model.model

    def reader(self, cache: str, options: dict[str, Any], n_inputs: int) -> _Reader:
        if self.hf is not None:
            return _HFReader(self.hf, cache, options, n_inputs)
        return _MemextReader(self.module, cache, options, n_inputs)

    def last_logits(self, tokens: Tensor, k: int) -> Tensor:
        """(B, T) read from scratch (positions 0..T-1, no cache) -> logits of the last k."""
        if self.hf is not None:
            return self.hf(input_ids=tokens, use_cache=False, logits_to_keep=k).logits
        return self.module(tokens)[0][:, -k:]


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
    net = _Net(model)
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
    net = _Net(model)
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


def _with_length(cache: str, options: dict[str, Any], n_inputs: int) -> dict[str, Any]:
    # As ``new_state``: the stream supplies what the policy takes from it (its length).
    given = {"max_len": n_inputs}
    return {**{k: v for k, v in given.items() if k in CACHES.takes(cache)}, **options}


def stream_policy(cache: str, options: dict[str, Any], n_inputs: int) -> CachePolicy:
    """The policy a stream of ``n_inputs`` reads through: ``cache`` with ``options`` and what the
    stream supplies (``max_len``), checked as the stream checks it; a ValueError if refused."""
    return CACHES.build(cache, **_with_length(cache, options, n_inputs))


def tokens_seen(policy: CachePolicy) -> int | None:
    """The most tokens one query sees under ``policy`` (sinks + window): the window of the
    recomputation it is compared with. None for a policy that keeps no fixed number (``full``)
    or is no layout (``retrieval``)."""
    try:
        layout = policy.layout()
    except NotImplementedError:
        return None
    return None if layout.window is None else layout.sinks + layout.window


# --- the text -----------------------------------------------------------------------------------
def stream_text(
    texts: Sequence[str], tok: Tokenizer, tokens: int, log: Callable[[str], None] = print
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The token stream of ``texts`` read in order, at most ``tokens`` long.

    A text is ``stdlib`` (the built-in corpus's validation split: text memext runs do not train
    on) or a file, directory or glob (every file of it, in path order; ``memext.data.corpus``).
    Several texts share ``tokens`` equally; one shorter than its share leaves the rest to the
    others. Every document ends with the end-of-document token, and so does a text cut at its
    share when another follows. Returns the stream and one entry per text: ``text``, ``start``,
    ``tokens`` read and ``available``.
    """
    if not texts:
        raise ValueError("give at least one text to stream")
    if tokens < 2:
        raise ValueError(f"a stream needs at least 2 tokens, got tokens={tokens}")
    whole = [_text_ids(t, tok, log) for t in texts]
    shares = share(tokens, [len(w) for w in whole])
    eod = tok.special_id("<eod>")
    parts, pieces, start = [], [], 0
    for i, (text, ids, n) in enumerate(zip(texts, whole, shares, strict=True)):
        piece = ids[:n]
        if 0 < n < len(ids) and i + 1 < len(texts):
            piece = np.append(ids[: n - 1], np.asarray(eod, dtype=ids.dtype))
        pieces.append(piece)
        parts.append({"text": text, "start": start, "tokens": n, "available": len(ids)})
        start += n
    return np.concatenate(pieces), parts


def share(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` split equally over texts of ``sizes`` tokens, smallest first, each taking at
    most its size and leaving the rest to those after it (the remainder of a division goes to
    the larger ones)."""
    out, left = [0] * len(sizes), total
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    for rank, i in enumerate(order):
        out[i] = min(sizes[i], left // (len(sizes) - rank))
        left -= out[i]
    return out


def _text_ids(text: str, tok: Tokenizer, log: Callable[[str], None]) -> np.ndarray:
    from memext.config import DataConfig
    from memext.data import prepare_data
    from memext.data.corpus import read_corpus

    if text == "stdlib":
        store, _ = prepare_data(DataConfig(corpus="stdlib"), tok, log=log)
        return np.asarray(store.validation)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # No held-out share: the text is read whole. With val_percent 0 a corpus of several
        # files keeps them in path order (the last one as its "validation"); one file is cut
        # before its last byte, which is joined back here.
        corpus = read_corpus(text, val_percent=0.0)
    for w in caught:
        log(f"warning: {w.message}")
    docs = [d.data for d in corpus.train + corpus.validation]
    if len(corpus.train) == 1 and corpus.validation[0].name == corpus.train[0].name + "#validation":
        docs = [b"".join(docs)]
    return encode_documents(tok, docs)
