"""Chunked prefill: read a prompt into a KV cache a few tokens per forward.

Peak memory then follows the chunk, not the prompt: with a bounded cache (window, sinks,
quantized window/sinks) a prompt of any length is read in the memory of one chunk of activations,
logits and attention scores (chunk x (kept + chunk)) plus what the cache holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from memext.nn.transformer import LongLM, State


def spans(length: int, chunk: int, tail: int = 0) -> list[tuple[int, int]]:
    """[start, end) of the forwards reading ``length`` tokens ``chunk`` at a time; the last
    ``tail`` tokens (when 0 < tail < length) are a forward of their own, so that a policy that
    chooses what to read by a chunk's queries (``retrieval``) chooses for the prompt's end, where
    the question sits, by the question's queries alone."""
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of tokens, got {chunk}")
    body = length - tail if 0 < tail < length else length
    cuts = [(a, min(a + chunk, body)) for a in range(0, body, chunk)]
    return cuts + ([(body, length)] if body < length else [])


def prompt_tail(policy: object) -> int:
    """The tokens at a prompt's end that ``policy`` wants read as a forward of their own."""
    return int(getattr(policy, "tail", 0) or 0)


@torch.no_grad()
def prefill(
    model: LongLM, ids: Tensor, state: State, chunk: int, *, all_logits: bool = False
) -> tuple[Tensor, State]:
    """Feed ``ids`` (B, T) or (T,) through ``state`` ``chunk`` tokens per forward (the last
    ``tail`` of the cache's policy alone: ``spans``).

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
    tail = prompt_tail(getattr(state.cache, "policy", None))
    for a, b in spans(ids.shape[1], chunk, tail):
        logits, state = model(ids[:, a:b], state)
        if all_logits:
            outs.append(logits)
        else:
            outs = [logits[:, -1]]  # only the newest chunk's logits stay alive
    return (torch.cat(outs, dim=1) if all_logits else outs[0]), state
