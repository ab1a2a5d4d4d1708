"""Greedy and beam-search decoding for an encoder-decoder (``memext.nn.seq2seq.EncoderDecoder``).

The source is encoded once and each decoder layer's cross-attention keys and values are
projected once (``Seq2SeqState.cross``); the decoder's own keys and values go to a KV-cache
policy of ``memext.infer.cache`` (``full`` by default), so each new token costs one decoder step.
``cache=None`` recomputes everything (encoder and the whole target prefix) at every step: the slow twin the tests
compare the cached path with. ``encode_chunk`` and ``cross_topk`` read the source with retrieval
cross-attention (``memext.nn.seq2seq``), a test-time method, on either path.

Beam search (``beam_decode``) reads one source, encoded once and shared by every beam. The
decoder's cache holds one row per beam and is reordered by beam index after each step
(``reorder_cache``): the ``full`` cache and the policies built on ``KVLayer`` stores (``window``,
``sinks``, ``quantized``, ``kivi``) reorder their rows in place; a cache with a ``reorder(index)``
method is asked to; any other (``snapkv``, ``retrieval``) is rebuilt and fed the reordered
prefixes again, one token at a time, as it first read them: exact, at the cost of a decoder pass
per token read so far, each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from memext.infer.cache import CACHES, FullCache, KeptCache, build_cache
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


def check_decoding(
    model: EncoderDecoder,
    max_new_tokens: int,
    encode_chunk: int | None = None,
    cross_topk: int | None = None,
    trained_len: int | None = None,
) -> None:
    """Refuse a decoding the model cannot run: retrieval options it cannot take, or more new
    tokens than its decoder reads after the start token."""
    check_retrieval(model.max_seq_len, encode_chunk, cross_topk, trained_len)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be positive")
    limit = model.max_target_len - 1  # the start token takes one position
    if max_new_tokens > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} exceeds the decoder's limit: max_target_len="
            f"{model.max_target_len} holds the start token and {limit} more"
        )


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
    cache_options: dict[str, Any] | None = None,
    trained_len: int | None = None,
) -> list[list[int]]:
    """The greedy target of each source row: src (B, S) -> B lists of ids, each ending before
    ``eos`` (not included) or after ``max_new_tokens`` ids. ``cache=None`` recomputes;
    ``cache_options`` are the cache policy's own (``{"window": 16}``).
    ``encode_chunk``: encode the source in chunks of that many tokens (it may then exceed
    ``max_seq_len``); ``cross_topk``: each cross-attention query reads its top-k encoder keys
    only; ``trained_len``: scale cross-attention logits for the number of encoder states
    (``memext.nn.seq2seq``). None: the plain model."""
    check_decoding(model, max_new_tokens, encode_chunk, cross_topk, trained_len)
    retrieval = {"encode_chunk": encode_chunk, "cross_topk": cross_topk, "trained_len": trained_len}
    b = src.shape[0]
    tgt = torch.full((b, 1), bos, dtype=torch.long, device=src.device)
    done = torch.zeros(b, dtype=torch.bool, device=src.device)
    state = decoder_state(model, b, cache, **(cache_options or {})) if cache is not None else None
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


@dataclass(frozen=True)
class Hypothesis:
    """One target of a beam search. ``tokens``: the ids written, ``eos`` not included;
    ``ended``: whether it ended with ``eos`` (else it ran to ``max_new_tokens``); ``logprob``:
    the sum of its tokens' log-probabilities, ``eos``'s included when it ended; ``score``:
    ``logprob / length ** length_penalty``, ``length`` the number of tokens that sum counts."""

    tokens: list[int]
    ended: bool
    logprob: float
    score: float


def reorder_cache(cache: Any, index: Tensor) -> bool:
    """Make row i of a decoder cache what row ``index[i]`` was, in place; False when the cache
    has no known way to (the caller then rebuilds it, see ``beam_decode``).

    A ``KVLayer``'s stores hold every tensor with the batch first (``memext.infer.kv_store``'s
    contract, which ``kivi``'s store keeps), so their tensors are indexed whatever the store.
    ``KeptCache``'s own tables (the band mask, the rotation) are the same for every row."""
    if callable(getattr(cache, "reorder", None)):
        cache.reorder(index)
        return True
    if isinstance(cache, FullCache):
        cache.k = [t.index_select(0, index) for t in cache.k]
        cache.v = [t.index_select(0, index) for t in cache.v]
        return True
    if isinstance(cache, KeptCache):
        for layer in cache.layers:
            for store in (layer.recent, layer.sink_store):
                if store is not None:
                    _reorder_rows(store, index)
        return True
    return False


def _reorder_rows(store: Any, index: Tensor) -> None:
    for name, value in vars(store).items():
        if isinstance(value, Tensor):
            setattr(store, name, value.index_select(0, index))
        elif type(value).__module__.startswith("memext.") and hasattr(value, "__dict__"):
            _reorder_rows(value, index)  # a store's parts (``Int8Ring``'s token rings)


@torch.no_grad()
def beam_decode(
    model: EncoderDecoder,
    src: Tensor,
    bos: int,
    eos: int,
    max_new_tokens: int,
    beams: int,
    cache: str | None = "full",
    length_penalty: float = 1.0,
    encode_chunk: int | None = None,
    cross_topk: int | None = None,
    cache_options: dict[str, Any] | None = None,
    trained_len: int | None = None,
) -> list[Hypothesis]:
    """Beam search over the target of ONE source, src (1, S) or (S,): up to ``beams``
    hypotheses, best score first (``Hypothesis``; ``score`` is GNMT's and Hugging Face's
    length-normalised ``logprob / length ** length_penalty``: 0 ranks by log-probability, above
    0 favours longer targets).

    Hugging Face's rules (``num_beams``, ``early_stopping=False``): each step the ``beams``
    running hypotheses are extended by every token; of the best ``2 * beams`` extensions, an
    ``eos`` among the best ``beams`` finishes a hypothesis (the best ``beams`` finished are
    kept), the best ``beams`` others run on. The search stops when ``beams`` hypotheses have
    finished and the best running one, scored at its current length, does not beat the worst
    of them, or after ``max_new_tokens`` tokens (the running ones then finish unended). With
    ``beams=1`` this is greedy decoding (``greedy_decode``); with ``beams`` at least the number
    of targets of up to ``max_new_tokens`` tokens it is exhaustive.

    ``cache``, ``cache_options``, ``encode_chunk``, ``cross_topk``, ``trained_len``: as
    ``greedy_decode``'s
    (``cache=None`` recomputes encoder and decoder at every step); the cache holds one row per
    beam, reordered each step as the module's doc says.
    """
    check_decoding(model, max_new_tokens, encode_chunk, cross_topk, trained_len)
    reading = {"cross_topk": cross_topk, "trained_len": trained_len}  # every decoder call's
    if isinstance(beams, bool) or not isinstance(beams, int) or beams < 1:
        raise ValueError(f"beams={beams!r} must be a positive int")
    src = src.reshape(1, -1) if src.dim() == 1 else src
    if src.dim() != 2 or src.shape[0] != 1:
        raise ValueError(
            f"beam_decode reads one source row, (1, S) or (S,); got {tuple(src.shape)}"
        )
    options = dict(cache_options or {})
    state = None
    if cache is not None:
        state = decoder_state(model, beams, cache, **options)
        # Every beam reads the same source: encoded once, its keys and values shared as views.
        cross = model.cross_kv(model.encode(src, encode_chunk))
        state.cross = [(k.expand(beams, -1, -1, -1), v.expand(beams, -1, -1, -1)) for k, v in cross]
    device = src.device
    tokens = torch.full((beams, 1), bos, dtype=torch.long, device=device)
    # One hypothesis at first: the other rows are copies whose extensions must never be chosen.
    sums = [0.0] + [float("-inf")] * (beams - 1)
    finished: list[Hypothesis] = []
    stopped = False
    for step in range(1, max_new_tokens + 1):
        if state is not None:
            logits, state = model(None, tokens[:, -1:], state, **reading)
        else:
            logits, _ = model(src.expand(beams, -1), tokens, encode_chunk=encode_chunk, **reading)
        logp = torch.log_softmax(logits[:, -1].float(), dim=-1)
        vocab = logp.shape[-1]
        totals = (torch.tensor(sums, device=device)[:, None] + logp).view(-1)
        best, where = totals.topk(min(2 * beams, totals.numel()))
        rows: list[int] = []
        nxt: list[int] = []
        kept: list[float] = []
        for rank, (total, i) in enumerate(zip(best.tolist(), where.tolist(), strict=True)):
            if total == float("-inf"):
                break  # only the copies' extensions are left
            row, token = divmod(i, vocab)
            if token == eos:
                if rank < beams:
                    score = total / step**length_penalty
                    finished.append(Hypothesis(tokens[row, 1:].tolist(), True, total, score))
                continue
            rows.append(row)
            nxt.append(token)
            kept.append(total)
            if len(rows) == beams:
                break
        finished = sorted(finished, key=lambda h: -h.score)[:beams]
        if not rows:
            stopped = True
            break
        if len(finished) == beams and kept[0] / step**length_penalty <= finished[-1].score:
            stopped = True
            break
        pad = beams - len(rows)  # fewer live extensions than beams: copies that never win
        rows, nxt, kept = rows + rows[:1] * pad, nxt + nxt[:1] * pad, kept + [float("-inf")] * pad
        index = torch.tensor(rows, device=device)
        tokens = torch.cat([tokens[index], torch.tensor(nxt, device=device)[:, None]], dim=1)
        sums = kept
        if step == max_new_tokens:
            break
        if state is not None and not reorder_cache(state.cache, index):
            state = _reread(model, state.cross, tokens[:, :-1], cache, options, reading)
    if not stopped:
        for row, total in enumerate(sums):
            if total > float("-inf"):
                score = total / max_new_tokens**length_penalty
                finished.append(Hypothesis(tokens[row, 1:].tolist(), False, total, score))
    return sorted(finished, key=lambda h: -h.score)[:beams]


def _reread(
    model: EncoderDecoder,
    cross: Any,
    prefix: Tensor,
    cache: str,
    options: dict[str, Any],
    reading: dict[str, Any],
) -> Seq2SeqState:
    """A fresh state that has read ``prefix`` one token at a time, as the cache it replaces
    did: for a policy whose cache cannot reorder its rows."""
    state = decoder_state(model, prefix.shape[0], cache, **options)
    state.cross = cross
    for j in range(prefix.shape[1]):
        _, state = model(None, prefix[:, j : j + 1], state, **reading)
    return state
