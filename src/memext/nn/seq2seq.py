"""An encoder-decoder: a bidirectional encoder reads the source once, a causal decoder writes the
target while it cross-attends to the encoder's output.

- Encoder: pre-norm blocks (``memext.nn.block.Block``) whose self-attention is non-causal, with
  any kernel that can be (``AttentionKernel.bidirectional``): full, sliding + global tokens,
  block_sparse, lsh, chunked. It prepends ``global_slots`` learned vectors to the source: with a
  kernel that makes its first positions global (sliding, block_sparse) they are the global tokens
  that see and are seen by every position. The model adds them itself, so there is no
  ``global_attention_mask`` for a caller to forget (Longformer-Encoder-Decoder's pitfall).
- Decoder: pre-norm blocks of causal self-attention (dense: targets are short), cross-attention
  to every encoder state (slots included), and a SwiGLU feed-forward.
- Rotary positions: the encoder's run over slots and source (0 .. G+S-1); the decoder's over the
  target. Cross-attention has none: which source position a target token reads is decided by
  content, as in T5 and BART.

Decoding state (``Seq2SeqState``): the decoder's self-attention KV cache (any policy of
``memext.infer.cache``) and the cross-attention keys and values, projected from the encoder
output once per input and reused for every generated token.

Retrieval cross-attention (Unlimiformer, Bertsch et al. 2023), a test-time reading of a trained
model; nothing in training changes. Both are options of ``forward`` (None = the plain model):

- ``encode_chunk``: the encoder reads the source in chunks of that many tokens, each as if it
  were a whole source (its own global slots first, rotary positions from 0, as SLED and
  Unlimiformer do), so a source longer than ``max_seq_len`` can be read; chunks do not overlap.
  Every chunk's states are kept, slots included (a chunk's slots summarize it), in source
  order: [slots, chunk 1, slots, chunk 2, ...]. A chunk at least as long as the source gives
  exactly ``encode``'s states.
- ``cross_topk``: each decoder query, per head, attends over only the ``cross_topk`` encoder
  keys of highest q.k (exact top-k, softmax over those alone). Queries are scored in blocks
  (``topk_attention``), so the (B, H, T, N) logits are never all held at once. With
  ``cross_topk`` >= N it is the full cross-attention, summed in another order.
- ``trained_len``: the source length the model was trained at. Cross-attention logits are
  scaled by log N / log(trained_len + G) for N encoder states, so a query's attention is as
  sharp over 4x the states as it was in training (the log-length scaling of Chiang & Cholak
  2022 and of Scalable-Softmax, Nakanishi 2025, applied at test time). A trained decoder's
  cross-attention is diffuse: a small weight on each of thousands of states adds up (on the
  seq2seq-digest preset, a query's top 1,024 of 4,100 states hold 40-82% of its weight), so
  four times the states dilute the weight on the ones that matter, and ``cross_topk``, which
  drops that background, changes what the decoder reads (docs/results.md#seq2seq).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memext.nn.block import Block, SelfAttention
from memext.nn.memory.knn import CHUNK_ELEMENTS
from memext.nn.rotary import Rotary

#: Per decoder layer, the cross-attention keys and values, each (B, H, N, D): N = G + S encoder
#: states, or n * G + S when the source is encoded in n chunks.
CrossKV = list[tuple[Tensor, Tensor]]


@dataclass
class Seq2SeqState:
    """``pos``: target tokens read so far; ``cache``: the decoder's self-attention KV cache (or
    None: no incremental decoding); ``cross``: the encoder's keys and values per decoder layer,
    computed on the first call and reused after."""

    pos: int = 0
    cache: Any = None
    cross: CrossKV | None = None


class CrossAttention(nn.Module):
    """Queries from the decoder, keys and values from the encoder output; no rotary, no mask."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, S, d_model) -> keys, values each (B, H, S, D)."""
        b, s, _ = memory.shape
        kv = self.kv(memory).view(b, s, 2, self.n_heads, self.head_dim)
        k, v = kv.permute(2, 0, 3, 1, 4)
        # Made contiguous once per source: every decoding step reads them, and SDPA on CPU reads
        # permuted views 2.6x slower (6.9 against 2.6 ms a call at 16k).
        return k.contiguous(), v.contiguous()

    def forward(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        topk: int | None = None,
        log_base: int | None = None,
    ) -> Tensor:
        """``topk``: attend over each query's ``topk`` best keys only (``topk_attention``);
        ``log_base``: scale the logits by log N / log(log_base) for N keys."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if log_base is not None:
            q = q * (math.log(k.shape[-2]) / math.log(log_base))
        if topk is None:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = topk_attention(q, k, v, topk)
        return self.dropout(self.out(y.transpose(1, 2).reshape(b, t, -1)))


def topk_attention(q: Tensor, k: Tensor, v: Tensor, topk: int) -> Tensor:
    """Each query attends over its ``topk`` keys of highest q.k alone, scale 1/sqrt(D):
    q (B, H, T, D), k and v (B, H, N, D) -> (B, H, T, D). Exact top-k; ``topk`` >= N is the
    full attention.

    Queries go in blocks whose logits hold at most ``CHUNK_ELEMENTS`` (the kNN memory's budget)
    or one query's row. The keys outside a query's top-k are masked, not gathered as
    ``knn_attention`` does: gathered keys and values take D times the logits' memory when k
    nears N.
    """
    b, h, t, d = q.shape
    n = k.shape[-2]
    block = max(1, CHUNK_ELEMENTS // max(1, b * h * n))
    out = []
    for s in range(0, t, block):
        scores = q[:, :, s : s + block] @ k.transpose(-2, -1) / math.sqrt(d)
        if topk < n:
            best = scores.topk(topk, dim=-1).indices
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, best, True)
            scores = scores.masked_fill(~keep, float("-inf"))
        out.append(torch.softmax(scores.float(), dim=-1).to(v.dtype) @ v)
    return torch.cat(out, dim=2)


def check_retrieval(
    max_seq_len: int,
    encode_chunk: int | None = None,
    cross_topk: int | None = None,
    trained_len: int | None = None,
) -> None:
    """Refuse retrieval options the model cannot take; None is always accepted."""
    named = (
        ("encode_chunk", encode_chunk),
        ("cross_topk", cross_topk),
        ("trained_len", trained_len),
    )
    for name, value in named:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{name}={value!r} must be a positive int or None")
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be positive")
    if encode_chunk is not None and encode_chunk > max_seq_len:
        raise ValueError(
            f"encode_chunk={encode_chunk} exceeds the model's limit max_seq_len={max_seq_len}: "
            "a chunk is read as a whole source"
        )


class DecoderBlock(nn.Module):
    """x + self_attn(norm(x)), then x + cross(norm(x), encoder), then x + ffn(norm(x))."""

    def __init__(
        self,
        attn: SelfAttention,
        cross: CrossAttention,
        ffn: nn.Module,
        d_model: int,
        norm_eps: float,
    ):
        super().__init__()
        if not attn.causal:
            raise ValueError("a decoder block's self-attention must be causal")
        self.attn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = attn
        self.cross_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.cross = cross
        self.ffn_norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.ffn = ffn

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        cross_kv: tuple[Tensor, Tensor],
        cache: Any = None,
        layer: int = 0,
        cross_topk: int | None = None,
        log_base: int | None = None,
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        x = x + self.cross(self.cross_norm(x), *cross_kv, cross_topk, log_base)
        return x + self.ffn(self.ffn_norm(x))


class EncoderDecoder(nn.Module):
    """Shared embedding, encoder blocks + norm, decoder blocks + norm, head (tied or not).

    ``max_seq_len`` bounds the source (slots not counted), ``max_target_len`` the target the
    decoder reads (its start token included); longer input is refused, not truncated.
    """

    def __init__(
        self,
        embed: nn.Embedding,
        encoder: list[Block],
        decoder: list[DecoderBlock],
        encoder_norm: nn.Module,
        norm: nn.Module,
        head: nn.Linear,
        rotary: Rotary,
        max_seq_len: int,
        max_target_len: int,
        global_slots: int = 0,
    ):
        super().__init__()
        for block in encoder:
            if block.attn.causal:
                raise ValueError("encoder blocks must attend bidirectionally (causal=False)")
        self.embed = embed
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        self.encoder_norm = encoder_norm
        self.norm = norm
        self.head = head
        self.rotary = rotary
        self.max_seq_len = max_seq_len
        self.max_target_len = max_target_len
        d_model = embed.embedding_dim
        self.global_slots = (
            nn.Parameter(torch.zeros(global_slots, d_model)) if global_slots else None
        )
        self.activation_checkpointing = False  # set by the trainer; blocks are small enough

    @property
    def n_slots(self) -> int:
        return 0 if self.global_slots is None else self.global_slots.shape[0]

    def encode(self, src: Tensor, chunk: int | None = None) -> Tensor:
        """src (B, S) int64 -> encoder states (B, G + S, d_model): the G global slots first.

        ``chunk``: read the source in chunks of that many tokens, each encoded as a whole source
        (slots, positions from 0) and all kept: (B, n * G + S, d_model) for n chunks, and the
        source may exceed ``max_seq_len``.
        """
        if chunk is None:
            return self._encode_whole(src)
        check_retrieval(self.max_seq_len, encode_chunk=chunk)
        if src.shape[1] < 1:
            raise ValueError("the source is empty: an encoder-decoder needs at least one token")
        # One chunk at a time: activations for one chunk's attention, not the whole source's.
        parts = [self._encode_whole(src[:, i : i + chunk]) for i in range(0, src.shape[1], chunk)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _encode_whole(self, src: Tensor) -> Tensor:
        b, s = src.shape
        if s < 1:
            raise ValueError("the source is empty: an encoder-decoder needs at least one token")
        if s > self.max_seq_len:
            raise ValueError(
                f"source of {s} tokens exceeds the model's limit max_seq_len={self.max_seq_len}"
            )
        x = self.embed(src)
        if self.global_slots is not None:
            slots = self.global_slots.to(x.dtype).expand(b, -1, -1)
            x = torch.cat([slots, x], dim=1)
        n = x.shape[1]
        cos, sin = self.rotary(torch.arange(n, device=src.device), seq_len=n)
        for block in self.encoder:
            x = block(x, cos, sin)
        return self.encoder_norm(x)

    def cross_kv(self, memory: Tensor) -> CrossKV:
        """Each decoder layer's cross-attention keys and values of encoder states ``memory``."""
        return [block.cross.keys_values(memory) for block in self.decoder]

    def forward(
        self,
        src: Tensor | None,
        tgt: Tensor,
        state: Seq2SeqState | None = None,
        *,
        encode_chunk: int | None = None,
        cross_topk: int | None = None,
        trained_len: int | None = None,
    ) -> tuple[Tensor, Seq2SeqState]:
        """src (B, S), tgt (B, T) int64 -> logits (B, T, vocab) and the next state.

        With a state that holds ``cross`` (after the first call of a decoding), ``src`` is not
        read again and may be None; the target continues at ``state.pos``. ``encode_chunk`` and
        ``cross_topk``, ``trained_len``: retrieval cross-attention (see the module's docstring);
        a decoding passes the same ``cross_topk`` and ``trained_len`` at every call.
        """
        check_retrieval(self.max_seq_len, encode_chunk, cross_topk, trained_len)
        log_base = None if trained_len is None else trained_len + self.n_slots
        if log_base is not None and log_base < 2:
            raise ValueError(f"trained_len={trained_len}: need trained_len + global slots >= 2")
        state = state or Seq2SeqState()
        cross = state.cross
        if cross is None:
            if src is None:
                raise ValueError("the first call of a decoding needs the source")
            cross = self.cross_kv(self.encode(src, encode_chunk))
        t = tgt.shape[1]
        end = state.pos + t
        if end > self.max_target_len:
            raise ValueError(
                f"target of {end} tokens exceeds the decoder's limit "
                f"max_target_len={self.max_target_len}"
            )
        x = self.embed(tgt)
        cos, sin = self.rotary(torch.arange(state.pos, end, device=tgt.device), seq_len=end)
        for i, block in enumerate(self.decoder):
            x = block(x, cos, sin, cross[i], state.cache, i, cross_topk, log_base)
        if state.cache is not None:
            state.cache.advance(t)
        logits = self.head(self.norm(x))
        return logits, replace(state, pos=end, cross=cross)

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        return n - self.embed.weight.numel() if exclude_embedding else n
