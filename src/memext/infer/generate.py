"""Sampling with a KV cache: prefill the prompt once, then one token per forward pass."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from memext.infer.cache import CACHES, build_cache
from memext.infer.prefill import prefill
from memext.nn.transformer import LongLM, State


def new_state(
    model: LongLM, batch: int, max_len: int | None = None, cache: str = "full", **options: Any
) -> State:
    """A fresh State with the KV cache policy ``cache`` (``memext.infer.cache.CACHES``).

    The model supplies the options a policy takes from it (``max_len``, default
    ``model.max_seq_len``; ``rotary``) and the parameters' dtype and device; ``options`` are the
    policy's own (``window``, ``sinks``...) and override those.
    """
    attn = model.blocks[0].attn
    p = next(model.parameters())
    context = {"max_len": max_len if max_len is not None else model.max_seq_len}
    context["rotary"] = model.rotary
    taken = {k: v for k, v in context.items() if k in CACHES.takes(cache)}
    built = build_cache(
        cache,
        len(model.blocks),
        batch,
        [block.attn.n_heads for block in model.blocks],  # per layer: pruned layers hold fewer
        attn.head_dim,
        dtype=p.dtype,
        device=p.device,
        **{**taken, **options},
    )
    return State(cache=built)


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass.
        drop = probs.cumsum(dim=-1) - probs > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model: LongLM,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    cache: str = "full",
    cache_options: dict[str, Any] | None = None,
    chunk: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` ids continuing ``prompt``.

    ``cache`` names a KV-cache policy and ``cache_options`` its options (``{"window": 512}``);
    the bounded ones (window, sinks) read prompts and outputs of any length. ``chunk`` reads the
    prompt that many tokens per forward (all at once when None).
    """
    if not prompt:
        raise ValueError("the prompt is empty: give at least one token")
    options = dict(cache_options or {})
    if getattr(model, "segment_len", None):
        if cache != "full" or options or chunk:
            raise ValueError(
                "this model reads in segments through its memory, without a KV cache: "
                "cache, cache_options and chunk apply to models without memory"
            )
        yield from _generate_in_segments(
            model, prompt, max_new_tokens, model.segment_len, temperature, top_k, top_p, seed
        )
        return
    total = len(prompt) + max_new_tokens

    def check_total() -> None:
        if total > model.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds the model's limit max_seq_len={model.max_seq_len}"
            )

    if cache == "full":  # before allocating a cache that size
        check_total()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    state = new_state(model, 1, total, cache, **options)
    if not getattr(state.cache, "unbounded", False):
        check_total()
    ids = torch.tensor([list(prompt)], device=device)
    # One forward by default; a bounded cache may read a prompt longer than one forward allows.
    logits, state = prefill(model, ids, state, chunk or min(len(prompt), model.max_seq_len))
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        yield int(nxt)
        if i + 1 < max_new_tokens:  # the last token needs no forward pass
            step, state = model(nxt[:, None], state)
            logits = step[:, -1]


def generate_text(
    model: LongLM,
    tok,
    prompt: str,
    max_new_tokens: int,
    *,
    stop: Sequence[str] = (),
    **sampling,
) -> Iterator[str]:
    """Yield decoded text pieces; stops at (and leaves out) the first stop string or <eod>."""
    ids = generate_ids(model, tok.encode(prompt), max_new_tokens, **sampling)
    yield from text_pieces(tok, ids, stop)


def text_pieces(tok, ids: Iterable[int], stop: Sequence[str] = ()) -> Iterator[str]:
    """Decode generated ``ids`` as they come into text pieces, stopping at (and leaving out) the
    first stop string or <eod>; any model's generation loop can feed it."""
    stop = [s for s in stop if s]  # an empty stop string would end before the first token
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    eod = tok.special_id("<eod>")
    hold = max((len(s) for s in stop), default=1) - 1  # text that might begin a stop string
    text, emitted = "", 0
    for i in ids:
        if i == eod:
            break
        text += decoder.decode(tok.decode_bytes([i]))
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            yield text[emitted : min(hits)]
            return
        if len(text) - hold > emitted:
            yield text[emitted : len(text) - hold]
            emitted = len(text) - hold
    text += decoder.decode(b"", final=True)
    yield text[emitted:]


@torch.no_grad()
def _generate_in_segments(
    model: torch.nn.Module,
    prompt: Sequence[int],
    max_new_tokens: int,
    segment_len: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
) -> Iterator[int]:
    """Decoding for models that read in segments (memory variants, the LSTM): unbounded input.

    Text is committed to the memory one whole segment at a time, exactly as in training; the
    unfinished segment is re-read from the committed state for every new token. That costs up to
    one segment of recompute per token but keeps the segmentation identical to training's,
    which a memory that writes once per call (RMT) needs.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    committed, tail = None, list(prompt)
    for _ in range(max_new_tokens):
        while len(tail) > segment_len:
            _, committed = model(torch.tensor([tail[:segment_len]], device=device), committed)
            tail = tail[segment_len:]
        logits, _ = model(torch.tensor([tail], device=device), committed)
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, gen)
        yield int(nxt)
        tail.append(int(nxt))
