"""Structured attention-head pruning: score heads, choose whole KV groups, cut the projections.

A layer's attention is described by ``HeadSlots``: the output projection whose input is the
heads' outputs side by side (``n_heads`` blocks of ``head_dim`` columns), and ``group``, the
query heads that share one key/value head (1 without GQA). Everything here works on that, so
memext's ``SelfAttention`` and a Hugging Face Llama layer (``memext.hf.prune``) share it.

- **Gates** (``gate_heads``): each head's output is multiplied by a gate ξ before the output
  projection. ξ = 1 is the model; ξ = 0 masks the head (the reference a pruned model must equal).
- **Importance** (``head_importance``): Michel et al. (2019), I_h = |∂L/∂ξ_h| at ξ = 1, which is
  |Σ_t ⟨head output, ∂L/∂head output⟩| (gradient × activation), summed over batches of text.
- **Choice** (``choose_groups``): the unit removed is a whole KV group (its key/value head and
  its query heads), scored by the sum of its query heads. Each layer's scores are divided by
  their L2 norm (as Michel et al. do) before one global ranking; every layer keeps at least one
  group, and a request that cannot leave one is refused.
- **Cutting** (``keep_rows``, ``keep_cols``, ``prune_self_attention``): smaller ``nn.Linear``
  layers holding the kept rows (q, k, v) and columns (out). The pruned model computes exactly
  what the gated one does with the removed heads' gates at 0: the kept heads' arithmetic is
  unchanged, and a zeroed head adds exact zeros to the output projection's sums.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class HeadSlots:
    """One attention layer as pruning sees it. ``out``: the output projection, whose input is
    ``n_heads`` heads of ``head_dim`` features; ``group``: query heads per key/value head."""

    out: nn.Module
    n_heads: int
    head_dim: int
    group: int = 1

    @property
    def n_groups(self) -> int:
        return self.n_heads // self.group


@contextlib.contextmanager
def gate_heads(layers: Sequence[HeadSlots], gates: Sequence[Tensor]) -> Iterator[None]:
    """Multiply each head's output by its gate (``gates[i]``: (n_heads,) of layer i) before the
    output projection, while the context is open."""
    handles = []
    for slots, gate in zip(layers, gates, strict=True):
        if gate.shape != (slots.n_heads,):
            raise ValueError(f"a gate of shape {tuple(gate.shape)} for {slots.n_heads} heads")

        def hook(module: nn.Module, args: tuple, slots=slots, gate=gate) -> tuple:
            x = args[0]  # (..., n_heads * head_dim)
            shaped = x.unflatten(-1, (slots.n_heads, slots.head_dim))
            return ((shaped * gate.to(x.dtype)[:, None]).flatten(-2), *args[1:])

        handles.append(slots.out.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def head_importance(
    layers: Sequence[HeadSlots], loss: Callable[[Tensor], Tensor], batches: Iterable[Tensor]
) -> list[Tensor]:
    """Each head's importance, |∂L/∂ξ_h| summed over ``batches`` (Michel et al.): a list of
    (n_heads,) float64 tensors, one per layer. ``loss(tokens)`` runs the model and returns a
    scalar; the model's own parameters get no gradient."""
    scores = [torch.zeros(s.n_heads, dtype=torch.float64) for s in layers]
    device = next(iter(layers[0].out.parameters())).device
    for tokens in batches:
        gates = [torch.ones(s.n_heads, device=device, requires_grad=True) for s in layers]
        with gate_heads(layers, gates):
            value = loss(tokens)
        grads = torch.autograd.grad(value, gates)
        for score, grad in zip(scores, grads, strict=True):
            score += grad.detach().abs().double().cpu()
    return scores


def group_scores(slots: HeadSlots, head_scores: Tensor) -> Tensor:
    """(n_groups,): the summed scores of each KV group's query heads (heads are grouped in
    order: query head h reads key/value head h // group)."""
    return head_scores.view(slots.n_groups, slots.group).sum(dim=1)


def check_fraction(fraction: float) -> None:
    """A ValueError unless ``fraction`` (of the heads to remove) is in (0, 1)."""
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction < 1):
        raise ValueError(
            f"--heads {fraction}: expected the fraction of heads to remove, in (0, 1) "
            "(0.25 removes a quarter; 1.0 would leave no heads)"
        )


def groups_to_remove(fraction: float, layers: Sequence[HeadSlots]) -> int:
    """How many KV groups ``fraction`` of the heads is, rounded to the nearest (a ValueError
    when the fraction is outside (0, 1), rounds to none, or leaves some layer no group)."""
    check_fraction(fraction)
    total = sum(s.n_groups for s in layers)
    n = round(fraction * total)
    unit = "head" if all(s.group == 1 for s in layers) else "KV group"
    if n == 0:
        raise ValueError(
            f"--heads {fraction} of {total} {unit}s removes none: give a larger fraction"
        )
    most = total - len(layers)  # one group stays in every layer
    if n > most:
        raise ValueError(
            f"--heads {fraction} removes {n} of {total} {unit}s, which leaves 0 heads in some "
            f"layer: every layer keeps at least one {unit}, so at most {most} can go "
            f"(--heads <= {most / total:.3f})"
        )
    return n


def choose_groups(layers: Sequence[HeadSlots], scores: Sequence[Tensor], n: int) -> list[list[int]]:
    """The KV groups each layer keeps (sorted indices) after removing the ``n`` least important
    of all, each layer's group scores divided by their L2 norm first; at least one group stays
    in every layer (the layer's best)."""
    ranked: list[tuple[float, int, int]] = []
    for i, (slots, score) in enumerate(zip(layers, scores, strict=True)):
        per_group = group_scores(slots, score)
        norm = float(per_group.norm()) or 1.0
        best = int(per_group.argmax())
        ranked += [(float(v) / norm, i, g) for g, v in enumerate(per_group) if g != best]
    ranked.sort()
    if n > len(ranked):
        raise ValueError(f"{n} groups to remove, but only {len(ranked)} can go")
    gone = {(i, g) for _, i, g in ranked[:n]}
    return [[g for g in range(s.n_groups) if (i, g) not in gone] for i, s in enumerate(layers)]


def group_heads(slots: HeadSlots, groups: Sequence[int]) -> list[int]:
    """The query heads of KV groups ``groups``, in order."""
    return [g * slots.group + j for g in groups for j in range(slots.group)]


def head_gates(layers: Sequence[HeadSlots], keep: Sequence[Sequence[int]]) -> list[Tensor]:
    """Gates that mask every head outside the kept groups: 1 for a kept head, 0 otherwise."""
    gates = []
    for slots, groups in zip(layers, keep, strict=True):
        gate = torch.zeros(slots.n_heads)
        gate[group_heads(slots, groups)] = 1.0
        gates.append(gate)
    return gates


def feature_index(heads: Sequence[int], head_dim: int, offset: int = 0) -> Tensor:
    """The rows (or columns) of heads ``heads`` in a projection laid out head by head."""
    return torch.tensor(
        [offset + h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long
    )


@torch.no_grad()
def keep_rows(linear: nn.Linear, rows: Tensor) -> nn.Linear:
    """A new ``nn.Linear`` of ``linear``'s output rows ``rows`` (its bias too)."""
    new = nn.Linear(
        linear.in_features,
        len(rows),
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    new.weight.copy_(linear.weight[rows.to(linear.weight.device)])
    if linear.bias is not None:
        new.bias.copy_(linear.bias[rows.to(linear.bias.device)])
    return new


@torch.no_grad()
def keep_cols(linear: nn.Linear, cols: Tensor) -> nn.Linear:
    """A new ``nn.Linear`` reading only input columns ``cols`` of ``linear`` (same bias)."""
    new = nn.Linear(
        len(cols),
        linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    new.weight.copy_(linear.weight[:, cols.to(linear.weight.device)])
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    return new


def prune_self_attention(attn: nn.Module, heads: Sequence[int]) -> None:
    """Keep only heads ``heads`` of a memext ``SelfAttention`` (in place): qkv keeps their q,
    k and v rows, out their columns; ``n_heads`` becomes ``len(heads)``."""
    if not heads:
        raise ValueError("a layer must keep at least one head")
    d, h = attn.head_dim, attn.n_heads
    width = h * d
    rows = torch.cat([feature_index(heads, d, part * width) for part in range(3)])
    attn.qkv = keep_rows(attn.qkv, rows)
    attn.out = keep_cols(attn.out, feature_index(heads, d))
    attn.n_heads = len(heads)


def self_attention_slots(model: nn.Module) -> list[HeadSlots]:
    """A memext ``LongLM``'s attention layers (multi-head: a group is one head)."""
    return [HeadSlots(b.attn.out, b.attn.n_heads, b.attn.head_dim) for b in model.blocks]
