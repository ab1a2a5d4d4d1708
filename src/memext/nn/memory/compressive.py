"""Compressive Transformer (Rae et al. 2019): Transformer-XL whose evicted memories are compressed.

Each layer keeps the XL memory of its most recent keys and values (rotated, as in ``xl``) and a
second, coarser memory: whatever falls out of the XL memory is compressed at rate c
(``cmem_rate``), c memories into one slot, and the last ``cmem_len`` slots are kept. Attention
reads [compressed memory ++ memory ++ current segment], every memory slot before every query.

Eviction moves whole groups of c only: the remainder stays in the XL memory until its group is
complete, so the XL memory holds between ``mem_len`` and ``mem_len + c - 1`` slots once full.
Every layer sees the same segment lengths and so evicts the same slots: the layers share one
validity mask per memory, as in ``xl``.

Training follows the paper: the compressor learns only from the attention-reconstruction loss
``mse(attn(q, old), attn(q, compress(old)))``, appended to ``step.aux`` per layer, with queries and
evicted memories detached; the compressed memories written to the state are detached too, so the
language-modelling loss never reaches the compressor. ``compress="mean"`` has nothing to learn and
adds no loss.

State: the XL state (``k.{layer}``, ``v.{layer}`` (B, H, M, D), ``valid`` (B, M)) plus
``ck.{layer}``, ``cv.{layer}`` (B, H, C, D) and ``cvalid`` (B, C), present once something was
compressed. A compressed slot is valid only when all c memories it summarises were: a group that
mixes memories from before and after a reset is dropped, so nothing of the old document leaks
(the new document may lose up to c - 1 of its first memories from the compressed memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memext.nn.memory import MemoryState, MemoryStep, keep_rows, register_memory
from memext.nn.memory.xl import XLMemory, read_with_memory
from memext.registry import SettingError, check_choice, check_int

COMPRESS = ("conv", "mean")


@register_memory("compressive")
class CompressiveMemory(XLMemory):
    """XL memory plus ``cmem_len`` compressed slots per layer, each summarising ``cmem_rate``
    evicted memories by a learned strided convolution (``"conv"``) or their mean (``"mean"``)."""

    # Its convolution compresses all heads' features at once (n_heads * head_dim wide).
    prunable = False

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_layers: int,
        mem_len: int = 0,
        cmem_len: int = 0,
        cmem_rate: int = 4,
        compress: str = "conv",
    ):
        self.check(d_model, n_heads, mem_len, cmem_len, cmem_rate, compress)
        super().__init__(mem_len)
        self.cmem_len = cmem_len
        self.rate = cmem_rate
        self.compress = compress
        # Parameters only where they are used: with cmem_len=0 this is exactly ``xl``. No bias,
        # like the q/k/v projections whose outputs it compresses (and a bias would escape the
        # seeded initialisation of ``build_model``, which redraws only weights of dim >= 2).
        learned = compress == "conv" and cmem_len > 0
        self.compress_k = nn.ModuleList(
            nn.Conv1d(d_model, d_model, cmem_rate, stride=cmem_rate, bias=False)
            for _ in range(n_layers if learned else 0)
        )
        self.compress_v = nn.ModuleList(
            nn.Conv1d(d_model, d_model, cmem_rate, stride=cmem_rate, bias=False)
            for _ in range(n_layers if learned else 0)
        )

    @classmethod
    def check(
        cls, d_model: int, n_heads: int, mem_len: int, cmem_len: int, cmem_rate: int, compress: str
    ) -> None:
        super().check(mem_len)
        check_int(cls.name, "cmem_len", cmem_len, 0)
        check_int(cls.name, "cmem_rate", cmem_rate, 1)
        check_choice(cls.name, "compress", compress, COMPRESS)
        if d_model % n_heads:
            raise SettingError(cls.name, "d_model", d_model, f"a multiple of n_heads={n_heads}")

    def squeeze(self, x: Tensor, conv: nn.Conv1d | None) -> Tensor:
        """(B, H, n * c, D) memories -> (B, H, n, D) compressed slots, group by group."""
        b, h, t, d = x.shape
        if conv is None:
            return x.view(b, h, t // self.rate, self.rate, d).mean(dim=3)
        # The convolution mixes heads, as the paper's does on the layer's (B, T, d_model) memory.
        y = conv(x.transpose(1, 2).reshape(b, t, h * d).transpose(1, 2))  # (B, H*D, n)
        return y.view(b, h, d, -1).permute(0, 1, 3, 2)

    def attend(
        self,
        layer: int,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kernel: nn.Module,
        step: MemoryStep,
        q_raw: Tensor,
        k_raw: Tensor,
    ) -> Tensor:
        if not self.cmem_len:
            return super().attend(layer, q, k, v, kernel, step, q_raw, k_raw)
        old = step.old
        mk, mv, mvalid, _ = read_with_memory(old, layer, k, v)  # XL memory ++ current
        if mvalid is None:
            mvalid = k.new_ones(k.shape[0], mk.shape[-2], dtype=torch.bool)
        k_all, v_all, _, _ = read_with_memory(old, layer, mk, mv, prefix="c")
        valid_all = torch.cat((old["cvalid"], mvalid), dim=1) if "cvalid" in old else mvalid
        padding = None if bool(valid_all.all()) else valid_all
        y = kernel(q, k_all, v_all, causal=True, key_padding=padding)

        # Evict the oldest whole groups of c beyond mem_len; the remainder waits for its group.
        n_evict = max(mk.shape[-2] - self.mem_len, 0) // self.rate * self.rate
        if n_evict:
            self._compress(layer, q, mk[..., :n_evict, :], mv[..., :n_evict, :], step)
            gvalid = mvalid[:, :n_evict].view(mvalid.shape[0], -1, self.rate).all(dim=-1)
            cvalid = torch.cat((old["cvalid"], gvalid), dim=1) if "cvalid" in old else gvalid
            step.new["cvalid"] = cvalid[:, -self.cmem_len :]
        elif f"ck.{layer}" in old:  # no group completed: the compressed memory stays as it is
            for name in (f"ck.{layer}", f"cv.{layer}", "cvalid"):
                step.new[name] = old[name]
        if mk.shape[-2] > n_evict:  # no empty tensors in the state (mem_len=0, whole groups)
            step.new[f"k.{layer}"] = mk[..., n_evict:, :]
            step.new[f"v.{layer}"] = mv[..., n_evict:, :]
            step.new["valid"] = mvalid[:, n_evict:]
        return y

    def _compress(self, layer: int, q: Tensor, ek: Tensor, ev: Tensor, step: MemoryStep) -> None:
        """Compress the evicted ``ek``/``ev`` into ``step.new`` and add the reconstruction loss."""
        learned = self.compress == "conv"
        # Detached: the reconstruction loss trains the compressor and nothing upstream of it.
        q, ek, ev = q.detach(), ek.detach(), ev.detach()
        ck = self.squeeze(ek, self.compress_k[layer] if learned else None)
        cv = self.squeeze(ev, self.compress_v[layer] if learned else None)
        if learned:
            # Dense attention without a mask: every evicted memory precedes every query, and the
            # layer's kernel (a sliding window, say) would not see far enough back to judge.
            target = F.scaled_dot_product_attention(q, ek, ev)
            got = F.scaled_dot_product_attention(q, ck.to(q.dtype), cv.to(q.dtype))
            step.aux.append(F.mse_loss(got.float(), target.float()))
        for name, new in ((f"ck.{layer}", ck), (f"cv.{layer}", cv)):
            # Detached: the paper keeps the language-modelling loss away from the compressor.
            new = new.detach().to(ek.dtype)
            if name in step.old:
                new = torch.cat((step.old[name].to(new.dtype), new), dim=-2)
            step.new[name] = new[..., -self.cmem_len :, :]

    def reset(self, state: MemoryState, rows: Tensor) -> MemoryState:
        state = super().reset(state, rows)
        if "cvalid" not in state:
            return state
        return {**state, "cvalid": keep_rows(state["cvalid"], rows)}
