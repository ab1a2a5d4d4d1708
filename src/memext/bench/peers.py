"""The contenders of ``memext bench attention``: memext's kernels and the peers people would pick.

Each contender turns a sequence length into a closure that runs one forward pass on fresh random
inputs and returns the output; the harness times it alone and with a backward pass. Two levels of
comparison, each matched on both sides:

- *kernel*: q, k, v of shape (B, H, T, D) -> (B, H, T, D). memext's kernels, PyTorch SDPA,
  x-transformers' ``Attend``, lucidrains' ``local-attention`` (x-transformers' author's local
  attention; x-transformers itself no longer ships one), reformer-pytorch's ``LSHAttention``.
- *layer*: hidden states (B, T, H·D) -> context (B, T, H·D), i.e. the q/k/v projections plus the
  attention, without output projection: what Hugging Face's ``LongformerSelfAttention`` and
  ``BigBirdBlockSparseAttention`` compute. memext's side is ``ProjectedAttention`` below.

Peers are imported only when asked for; a missing one is reported, not fatal.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from memext.nn.attention import ATTENTION, build_attention

Run = Callable[[], Tensor]


@dataclass(frozen=True)
class Shape:
    """The inputs every contender gets. The kernels' settings default to the kernels' own, except
    the window: the published figures (docs/attention.md) are measured at W = 512."""

    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    window: int = 512
    lsh_chunk: int = ATTENTION.default("lsh_chunk")
    lsh_rounds: int = ATTENTION.default("lsh_rounds")
    block_size: int = ATTENTION.default("block_size")
    random_blocks: int = ATTENTION.default("random_blocks")
    seed: int = 0
    device: str = "cpu"

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class Contender:
    name: str
    group: str  # contenders are compared within a group: same inputs, same semantics
    package: str  # the PyPI distribution it needs ("memext" for ours)
    build: Callable[[Shape, int], tuple[Run, list[Tensor]]]  # -> (run, tensors needing grads)
    note: str = ""


def _qkv(s: Shape, t: int) -> list[Tensor]:
    gen = torch.Generator().manual_seed(s.seed)
    shape = (s.batch, s.heads, t, s.head_dim)
    return [torch.randn(shape, generator=gen).to(s.device).requires_grad_() for _ in range(3)]


def _hidden(s: Shape, t: int) -> Tensor:
    gen = torch.Generator().manual_seed(s.seed)
    return torch.randn(s.batch, t, s.d_model, generator=gen).to(s.device).requires_grad_()


def _grads(module: nn.Module, *extra: Tensor) -> list[Tensor]:
    return [*extra, *module.parameters()]


class ProjectedAttention(nn.Module):
    """q/k/v projections + a memext kernel: the twin of Hugging Face's self-attention modules."""

    def __init__(self, s: Shape, kernel: nn.Module, causal: bool):
        super().__init__()
        self.heads, self.causal, self.kernel = s.heads, causal, kernel
        self.qkv = nn.Linear(s.d_model, 3 * s.d_model)  # HF's q, k, v Linear layers have biases

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if getattr(self.kernel, "shared_qk", False):
            k = q
        out = self.kernel(q, k, v, causal=self.causal)
        return out.transpose(1, 2).reshape(b, t, d)


# --- memext ---------------------------------------------------------------------------------------
def _memext_kernel(name: str, causal: bool) -> Callable:
    def build(s: Shape, t: int) -> tuple[Run, list[Tensor]]:
        kernel = build_attention(name, _settings(s)).to(s.device).train()
        q, k, v = _qkv(s, t)
        if kernel.shared_qk:
            return (lambda: kernel(q, q, v, causal=causal)), [q, v]
        return (lambda: kernel(q, k, v, causal=causal)), [q, k, v]

    return build


def _memext_layer(name: str, overrides: Callable[[Shape], dict] | None = None) -> Callable:
    def build(s: Shape, t: int) -> tuple[Run, list[Tensor]]:
        settings = {**_settings(s), **(overrides(s) if overrides else {})}
        layer = ProjectedAttention(s, build_attention(name, settings), False).to(s.device)
        x = _hidden(s, t)
        return (lambda: layer(x)), _grads(layer, x)

    return build


def _settings(s: Shape) -> dict:
    return {
        "window": s.window,
        "lsh_chunk": s.lsh_chunk,
        "lsh_rounds": s.lsh_rounds,
        "block_size": s.block_size,
        "random_blocks": s.random_blocks,
    }


# --- peers ------------------------------------------------------------------------------------------
def _xt_full(s: Shape, t: int) -> tuple[Run, list[Tensor]]:
    from x_transformers.attend import Attend

    attend = Attend(causal=True, flash=True).to(s.device)
    q, k, v = _qkv(s, t)
    return (lambda: attend(q, k, v)[0]), [q, k, v]


def _local_attention(s: Shape, t: int) -> tuple[Run, list[Tensor]]:
    from local_attention import LocalAttention

    # window_size w with one block of look-back and exact_windowsize: keys i-w .. i.
    attn = LocalAttention(
        window_size=s.window,
        causal=True,
        look_backward=1,
        exact_windowsize=True,
        use_rotary_pos_emb=False,
        autopad=True,
    ).to(s.device)
    q, k, v = _qkv(s, t)
    return (lambda: attn(q, k, v)), [q, k, v]


def _reformer_lsh(s: Shape, t: int) -> tuple[Run, list[Tensor]]:
    from reformer_pytorch.reformer_pytorch import LSHAttention

    # reformer-pytorch: bucket_size = chunk length, buckets per round = T / bucket_size.
    attn = LSHAttention(bucket_size=s.lsh_chunk, n_hashes=s.lsh_rounds, causal=True).to(s.device)
    q, _, v = _qkv(s, t)
    qk, vv = (x.reshape(s.batch * s.heads, t, s.head_dim) for x in (q, v))
    return (lambda: attn(qk, vv)[0]), [q, v]


def _hf_longformer(s: Shape, t: int) -> tuple[Run, list[Tensor]]:
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    cfg = LongformerConfig(
        hidden_size=s.d_model,
        num_attention_heads=s.heads,
        attention_window=[s.window],
        attention_probs_dropout_prob=0.0,
    )
    layer = LongformerSelfAttention(cfg, layer_id=0).to(s.device)
    x = _hidden(s, t)
    zeros = torch.zeros(s.batch, t, device=s.device)
    no = torch.zeros(s.batch, t, dtype=torch.bool, device=s.device)

    def run() -> Tensor:
        return layer(
            x,
            attention_mask=zeros,
            is_index_masked=no,
            is_index_global_attn=no,
            is_global_attn=False,
        )[0]

    return run, _grads(layer, x)


def _hf_bigbird(s: Shape, t: int) -> tuple[Run, list[Tensor]]:
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import (
        BigBirdBlockSparseAttention,
        BigBirdModel,
    )

    cfg = BigBirdConfig(
        hidden_size=s.d_model,
        num_attention_heads=s.heads,
        attention_type="block_sparse",
        block_size=s.block_size,
        num_random_blocks=s.random_blocks,
        max_position_embeddings=max(4096, t),
        attention_probs_dropout_prob=0.0,
    )
    layer = BigBirdBlockSparseAttention(cfg, seed=s.seed).to(s.device)
    x = _hidden(s, t)
    blocked, band, from_mask, to_mask = BigBirdModel.create_masks_for_block_sparse_attn(
        torch.ones(s.batch, t, device=s.device), s.block_size
    )

    def run() -> Tensor:
        with contextlib.redirect_stderr(io.StringIO()):
            return layer(
                x,
                band_mask=band,
                from_mask=from_mask,
                to_mask=to_mask,
                from_blocked_mask=blocked,
                to_blocked_mask=blocked,
            )[0]

    return run, _grads(layer, x)


def contenders() -> list[Contender]:
    """Every contender, grouped; within a group the settings mean the same thing."""
    kernel_c, layer_b, lsh = "causal kernel", "bidirectional layer", "lsh kernel"
    return [
        Contender("memext full", kernel_c, "memext", _memext_kernel("full", True)),
        Contender("memext sliding", kernel_c, "memext", _memext_kernel("sliding", True)),
        Contender("x-transformers full", kernel_c, "x-transformers", _xt_full),
        Contender("local-attention", kernel_c, "local-attention", _local_attention, "keys i-W..i"),
        Contender("memext full (bidir)", layer_b, "memext", _memext_layer("full")),
        Contender("memext sliding (bidir)", layer_b, "memext", _memext_layer("sliding")),
        Contender(
            "memext block_sparse",
            layer_b,
            "memext",
            # BigBird's layout: one block each side, the first block global, random blocks.
            _memext_layer(
                "block_sparse",
                lambda s: {"window": 2 * s.block_size, "global_tokens": s.block_size},
            ),
            "band of 1 block each side, first block global",
        ),
        Contender("HF Longformer", layer_b, "transformers", _hf_longformer),
        Contender(
            "HF BigBird", layer_b, "transformers", _hf_bigbird, "3-block band, 2 global blocks"
        ),
        Contender("memext lsh", lsh, "memext", _memext_kernel("lsh", True)),
        Contender("reformer-pytorch lsh", lsh, "reformer-pytorch", _reformer_lsh),
    ]
