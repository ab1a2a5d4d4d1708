"""Attention kernels behind one small contract, registered by the name ``ModelConfig.attention`` uses.

Contract (``AttentionKernel``): ``forward(q, k, v, *, causal, key_padding) -> out`` on
``(B, H, T, D)`` tensors. Queries are the *last* ``Tq`` positions of the ``Tk`` keys (bottom-right
alignment), which is what a KV cache or chunked prefill produces; with ``Tq == Tk`` it is ordinary
self-attention. ``key_padding`` is an optional ``(B, Tk)`` bool tensor, True for real keys; a
kernel that cannot honour it raises ``ValueError`` rather than ignore it.

A new variant is a sibling module that subclasses ``AttentionKernel`` and decorates itself with
``@register_attention("name")``, plus its name in the import in the import at the bottom of this file; the model
and trainer do not change. Its settings are keyword arguments of ``__init__`` named exactly like
``ModelConfig`` fields (``window``, ``lsh_chunk``...), with their defaults (the config reads them
from here), and a class method ``check`` validates them (``memext.registry``).

Every variant has a naive twin in ``memext.nn.reference`` (a dense mask and a plain softmax).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from memext.registry import Registry

ATTENTION: Registry[type[AttentionKernel]] = Registry("attention")
register_attention = ATTENTION.register


class AttentionKernel(nn.Module):
    """Computes softmax(q kᵀ / sqrt(D) + mask) v for some mask family, fast."""

    #: True when keys must equal queries (shared-QK attention such as LSH); the caller passes q as k.
    shared_qk: bool = False
    #: True when a prefix's outputs depend on that prefix alone. Every kernel is causal in that no
    #: query attends to a later key, but LSH's choice of *which* earlier keys share a query's chunk
    #: depends on where later tokens hash, so it sets this False.
    prefix_exact: bool = True
    #: True when the kernel honours ``causal=False`` (every key may be seen, as an encoder
    #: needs); an encoder-decoder refuses a kernel that sets it False, by name.
    bidirectional: bool = True

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        causal: bool = True,
        key_padding: Tensor | None = None,
    ) -> Tensor:
        raise NotImplementedError


def check_inputs(
    name: str, q: Tensor, k: Tensor, v: Tensor, key_padding: Tensor | None = None
) -> None:
    """Refuse inputs outside the contract with a ValueError naming the kernel and the shapes."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{name}: expected q (B, H, Tq, D) and k, v (B, H, Tk, D) with the same B, H and D, "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    tq, tk = q.shape[2], k.shape[2]
    if not 0 < tq <= tk:
        raise ValueError(
            f"{name}: queries must be the last Tq of the Tk keys: need 0 < Tq <= Tk, "
            f"got Tq={tq}, Tk={tk}"
        )
    if key_padding is not None and tuple(key_padding.shape) != (q.shape[0], tk):
        raise ValueError(
            f"{name}: key_padding must be (B, Tk) = {(q.shape[0], tk)}, "
            f"got {tuple(key_padding.shape)}"
        )


def build_attention(
    name: str, config: Mapping[str, Any] | None = None, /, **settings: Any
) -> AttentionKernel:
    """The kernel registered as ``name``: the values of ``config`` (e.g. a whole ``ModelConfig``
    as a dict) that its ``__init__`` names, overridden by ``settings``, each of which it must
    take."""
    return ATTENTION.build(name, config, **settings)


# Variants register themselves on import.
from memext.nn.attention import block_sparse, chunked, full, lsh, sliding  # noqa: E402, F401
