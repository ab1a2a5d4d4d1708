"""Chunked prefill: read a prompt into a KV cache a few tokens per forward.

Peak memory then follows the chunk, not the prompt: with a bounded cache (window, sinks,
quantized window/sinks) a prompt of any length is read in the memory of one chunk of activations,
logits and attention scores (chunk x (kept + chunk)) plus what the cache holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memext.nn.transformer import LongLM, State


@torch.no_grad()
def prefill(
    model: LongLM, ids: Tensor, state: State, chunk: int, *, all_logits: bool = False
) -> tuple[Tensor, State]:
    """Feed ``ids`` (B, T) or (T,) through ``state`` ``chunk`` tokens per forward.

    Returns the logits of the last position (B, vocab) and the next state; ``all_logits`` returns
    every position's logits (B, T, vocab) instead, which costs memory in proportion to T.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"prefill needs token ids shaped (B, T) with T >= 1, got {tuple(ids.shape)}"
        )
    outs: list[Tensor] = []
    for a in range(0, ids.shape[1], chunk):
        logits, state = model(ids[:, a : a + chunk], state)
        if all_logits:
            outs.append(logits)
        else:
            outs = [logits[:, -1]]  # only the newest chunk's logits stay alive
    return (torch.cat(outs, dim=1) if all_logits else outs[0]), state
