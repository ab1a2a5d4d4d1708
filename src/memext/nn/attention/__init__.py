"""Attention kernels behind one small contract, registered by the name ``ModelConfig.attention`` uses.

Contract (``AttentionKernel``): ``forward(q, k, v, *, causal) -> out`` on ``(B, H, T, D)`` tensors.
Queries are the *last* ``Tq`` positions of the ``Tk`` keys (bottom-right alignment), which is what
a KV cache or chunked prefill produces; with ``Tq == Tk`` it is ordinary self-attention.

A new variant is a sibling module that subclasses ``AttentionKernel`` and decorates itself with
``@register_attention("name")``; the model and trainer do not change.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

ATTENTION: dict[str, type[AttentionKernel]] = {}


class AttentionKernel(nn.Module):
    """Computes softmax(q kᵀ / sqrt(D) + mask) v for some mask family, fast."""

    #: True when keys must equal queries (shared-QK attention such as LSH); the caller passes q as k.
    shared_qk: bool = False

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True) -> Tensor:
        raise NotImplementedError


def register_attention(name: str) -> Callable[[type[AttentionKernel]], type[AttentionKernel]]:
    def deco(cls: type[AttentionKernel]) -> type[AttentionKernel]:
        if name in ATTENTION:
            raise ValueError(f"attention {name!r} is registered twice")
        ATTENTION[name] = cls
        cls.name = name
        return cls

    return deco


def build_attention(name: str, **kwargs) -> AttentionKernel:
    if name not in ATTENTION:
        raise ValueError(
            f"unknown attention {name!r}: expected one of {', '.join(sorted(ATTENTION))}"
        )
    return ATTENTION[name](**kwargs)


# Variants register themselves on import.
from memext.nn.attention import full  # noqa: E402, F401
