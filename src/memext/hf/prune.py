"""Head pruning of a Hugging Face Llama-style model (``q_proj``, ``k_proj``, ``v_proj``,
``o_proj`` per layer; SmolLM2), on ``memext.nn.prune``'s slots.

Whole KV groups go: a key/value head and the query heads that read it. Removing a group keeps
every layer a standard grouped-query attention with the same number of query heads per
key/value head (``num_key_value_groups``), which transformers' attention reads from the module
and never from the projections' widths (they are viewed as ``(..., -1, head_dim)``), so the
smaller layer runs unchanged. Removing query heads instead would keep the keys and values (and
the KV cache) whole, and could leave groups of unequal size, which transformers cannot run.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from memext.nn.prune import HeadSlots, feature_index, group_heads, keep_cols, keep_rows

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def attention_layers(lm: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers causal LM (``model.layers[i].self_attn``);
    a ValueError when the model is not laid out that way."""
    body = getattr(lm, "model", None)
    layers = getattr(body, "layers", None)
    attns = [getattr(layer, "self_attn", None) for layer in layers or ()]
    if not attns or not all(
        a is not None and all(isinstance(getattr(a, p, None), nn.Linear) for p in _PROJECTIONS)
        for a in attns
    ):
        kind = type(lm).__name__
        raise ValueError(
            f"{kind} has no Llama-style attention (model.layers[i].self_attn with q_proj, k_proj, "
            "v_proj, o_proj): head pruning reads that layout only"
        )
    return attns


def llama_slots(lm: nn.Module) -> list[HeadSlots]:
    """Each layer's heads: query heads by ``o_proj``'s input width, groups of
    ``num_key_value_groups`` query heads per key/value head."""
    slots = []
    for attn in attention_layers(lm):
        d, group = attn.head_dim, attn.num_key_value_groups
        slots.append(HeadSlots(attn.o_proj, attn.o_proj.in_features // d, d, group))
    return slots


def prune_llama_attention(attn: nn.Module, groups: Sequence[int]) -> None:
    """Keep only KV groups ``groups`` of one Llama attention layer (in place)."""
    if not groups:
        raise ValueError("a layer must keep at least one key/value group")
    d, group = attn.head_dim, attn.num_key_value_groups
    heads = group_heads(HeadSlots(attn.o_proj, attn.o_proj.in_features // d, d, group), groups)
    attn.q_proj = keep_rows(attn.q_proj, feature_index(heads, d))
    attn.k_proj = keep_rows(attn.k_proj, feature_index(groups, d))
    attn.v_proj = keep_rows(attn.v_proj, feature_index(groups, d))
    attn.o_proj = keep_cols(attn.o_proj, feature_index(heads, d))


def prune_llama(lm: nn.Module, keep: Sequence[Sequence[int]]) -> None:
    """Keep KV groups ``keep[i]`` in layer i of a transformers Llama-style model (in place)."""
    for attn, groups in zip(attention_layers(lm), keep, strict=True):
        prune_llama_attention(attn, groups)
