"""The builder: a ``ModelConfig`` becomes a ``LongLM``, an ``EncoderDecoder`` or an ``LSTMLM``."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from memext.config import ModelConfig
from memext.nn.attention import ATTENTION, build_attention
from memext.nn.block import Block, SelfAttention
from memext.nn.feedforward import SwiGLU
from memext.nn.memory import build_memory
from memext.nn.rotary import Rotary
from memext.nn.seq2seq import CrossAttention, DecoderBlock, EncoderDecoder
from memext.nn.transformer import LongLM


def build_model(cfg: ModelConfig, seed: int | None = 0) -> LongLM:
    """Build and initialise a model; ``seed`` makes the initial weights reproducible."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if cfg.arch == "lstm":
        return _build_lstm(cfg, seed)
    if cfg.arch == "seq2seq":
        return _build_seq2seq(cfg, gen)
    settings = dataclasses.asdict(cfg)
    blocks = [
        Block(
            SelfAttention(
                cfg.d_model,
                heads,
                build_attention(cfg.attention, settings),
                cfg.dropout,
                head_dim=cfg.head_dim,
            ),
            SwiGLU(cfg.d_model, cfg.ffn_hidden, cfg.dropout, chunk=cfg.ff_chunk),
            cfg.d_model,
            cfg.norm_eps,
        )
        for heads in cfg.layer_heads()
    ]
    model = LongLM(
        embed=nn.Embedding(cfg.vocab_size, cfg.d_model),
        blocks=blocks,
        norm=nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps),
        head=nn.Linear(cfg.d_model, cfg.vocab_size, bias=False),
        rotary=build_rotary(cfg),
        max_seq_len=cfg.max_seq_len,
        reversible=cfg.reversible,
        memory=build_memory(cfg.memory, settings),
    )
    _init(model, cfg, gen)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return model


def _build_seq2seq(cfg: ModelConfig, gen: torch.Generator | None) -> EncoderDecoder:
    """The encoder takes ``cfg.attention`` (bidirectional); the decoder's attention is dense."""
    settings = dataclasses.asdict(cfg)
    d, h, drop = cfg.d_model, cfg.n_heads, cfg.dropout

    def ffn() -> SwiGLU:
        return SwiGLU(d, cfg.ffn_hidden, drop, chunk=cfg.ff_chunk)

    encoder = [
        Block(
            SelfAttention(d, h, build_attention(cfg.attention, settings), drop, causal=False),
            ffn(),
            d,
            cfg.norm_eps,
        )
        for _ in range(cfg.encoder_layers or cfg.n_layers)
    ]
    decoder = [
        DecoderBlock(
            SelfAttention(d, h, build_attention("full"), drop),
            CrossAttention(d, h, drop),
            ffn(),
            d,
            cfg.norm_eps,
        )
        for _ in range(cfg.n_layers)
    ]
    # Global slots exist only where a kernel makes its first positions global.
    slots = cfg.global_tokens if "global_tokens" in ATTENTION.takes(cfg.attention) else 0
    model = EncoderDecoder(
        embed=nn.Embedding(cfg.vocab_size, d),
        encoder=encoder,
        decoder=decoder,
        encoder_norm=nn.RMSNorm(d, eps=cfg.norm_eps),
        norm=nn.RMSNorm(d, eps=cfg.norm_eps),
        head=nn.Linear(d, cfg.vocab_size, bias=False),
        rotary=build_rotary(cfg),
        max_seq_len=cfg.max_seq_len,
        max_target_len=cfg.max_target_len,
        global_slots=slots,
    )
    _init(model, cfg, gen)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return model


def build_rotary(cfg: ModelConfig) -> Rotary:
    """The rotary embedding of ``cfg``, scaling included (swapped per curriculum stage)."""
    return Rotary(
        cfg.head_dim,
        cfg.rope_base,
        scaling=cfg.rope_scaling,
        factor=cfg.rope_factor,
        original_len=cfg.rope_original_len,
        alpha=cfg.yarn_alpha,
        beta=cfg.yarn_beta,
    )


@torch.no_grad()
def _init(model: nn.Module, cfg: ModelConfig, gen: torch.Generator | None) -> None:
    # GPT-2 style: N(0, std) everywhere; projections that write into the residual stream are
    # scaled by 1/sqrt(2 * n_layers) so the stream's variance does not grow with depth.
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue  # norm gains stay at 1
        std = (
            residual_std
            if name.endswith(("attn.out.weight", "cross.out.weight", "ffn.down.weight"))
            else cfg.init_std
        )
        p.normal_(0.0, std, generator=gen)


def _build_lstm(cfg: ModelConfig, seed: int | None):
    from memext.nn.lstm import LSTMLM

    with torch.random.fork_rng():  # seed the init without touching the caller's RNG
        if seed is not None:
            torch.manual_seed(seed)
        return LSTMLM(
            cfg.vocab_size,
            cfg.d_model,
            cfg.n_layers,
            dropout=cfg.dropout,
            tie_embeddings=cfg.tie_embeddings,
            max_seq_len=cfg.max_seq_len,
        )
