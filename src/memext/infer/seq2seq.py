"""Greedy decoding for an encoder-decoder (``memext.nn.seq2seq.EncoderDecoder``).

The source is encoded once and each decoder layer's cross-attention keys and values are
projected once (``Seq2SeqState.cross``); the decoder's own keys and values go to a KV-cache
policy of ``memext.infer.cache`` (``full`` by default), so each new token costs one decoder step.
``cache=None`` recomputes everything (encoder and the whole target prefix) at every step: the slow twin the tests
compare the cached path with. ``encode_chunk`` and ``cross_topk`` read the source with retrieval
cross-attention (``memext.nn.seq2seq``), a test-time method, on either path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from memext.infer.cache import CACHES, build_cache
from memext.nn.seq2seq import EncoderDecoder, Seq2SeqState, check_retrieval


def decoder_state(
    model: EncoderDecoder, batch: int, cache: str = "full", **options: Any
) -> Seq2SeqState:
    """A fresh decoding state whose self-attention cache is the policy ``cache``, sized for the
    model's ``max_target_len`` (``options`` are the policy's own and override that)."""
    attn = model.decoder[0].attn
    p = next(model.parameters())
    context = {"max_len": model.max_target_len, "rotary": model.rotary}
    taken = {k: v for k, v in context.items() if k in CACHES.takes(cache)}
    built = build_cache(
        cache,
        len(model.decoder),
        batch,
        attn.n_heads,
        attn.head_dim,
        dtype=p.dtype,
        device=p.device,
        **{**taken, **options},
    )
    return Seq2SeqState(cache=built)


@torch.no_grad()
def greedy_decode(
    model: EncoderDecoder,
    src: Tensor,
    bos: int,
    eos: int,
    max_new_tokens: int,
    cache: str | None = "full",
    encode_chunk: int | None = None,
    cross_topk: int | None = None,
) -> list[list[int]]:
    """The greedy target of each source row: src (B, S) -> B lists of ids, each ending before
    ``eos`` (not included) or after ``max_new_tokens`` ids. ``cache=None`` recomputes.
    ``encode_chunk``: encode the source in chunks of that many tokens (it may then exceed
    ``max_seq_len``); ``cross_topk``: each cross-attention query reads its top-k encoder keys
    only. None: the plain model."""
    check_retrieval(model.max_seq_len, encode_chunk, cross_topk)
    retrieval = {"encode_chunk": encode_chunk, "cross_topk": cross_topk}
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    limit = model.max_target_len - 1  # the start token takes one position
    if max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the decoder's limit: max_target_len="
            f"{model.max_target_len} holds the start token and {limit} more"
        )
    b = src.shape[0]
    tgt = torch.full((b, 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    state = decoder_state(model, b, cache) if cache is not None else None
    fed = tgt
    for _ in range(max_new_tokens):
        if state is not None:
            logits, state = model(src if state.cross is None else None, fed, state, **retrieval)
        else:  # recompute everything, encoder included: the twin the cached path must equal
            logits, _ = model(src, tgt, **retrieval)
        nxt = logits[:, -1].argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
        done |= nxt == eos
        tgt = torch.cat([tgt, nxt[:, None]], dim=1)
        fed = nxt[:, None]
        if bool(done.all()):
            break
    out = []
    for row in tgt[:, 1:].tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out
