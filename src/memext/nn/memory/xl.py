"""Transformer-XL segment recurrence: each layer keeps its last ``mem_len`` keys and values.

Keys are stored after rotary, at their absolute positions, so a query of a later segment sees
them at the right relative distance: rotary makes Transformer-XL's relative encoding free.
Nothing is detached here: the trainer cuts gradients every ``train.bptt`` segments, so
``bptt=1`` is the paper's stop-gradient and ``bptt=k`` carries gradients through k segments.

State: ``k.{layer}``, ``v.{layer}`` (B, H, M, D) and ``valid`` (B, M) — False for the slots of
rows that were reset at a document boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memext.nn.memory import Memory, MemoryState, MemoryStep, keep_rows, register_memory
from memext.registry import check_int


def read_with_memory(
    old: MemoryState, layer: int, k: Tensor, v: Tensor, prefix: str = ""
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(memory ++ k, memory ++ v, key padding or None, validity of the concatenation or None)."""
    mk = old.get(f"{prefix}k.{layer}")
    if mk is None:
        return k, v, None, None
    valid = old[f"{prefix}valid"]
    k_all = torch.cat((mk.to(k.dtype), k), dim=-2)
    v_all = torch.cat((old[f"{prefix}v.{layer}"].to(v.dtype), v), dim=-2)
    valid_all = torch.cat((valid, valid.new_ones(valid.shape[0], k.shape[-2])), dim=1)
    return k_all, v_all, valid_all, None if bool(valid.all()) else valid_all


@register_memory("xl")
class XLMemory(Memory):
    unbounded = True

    def __init__(self, mem_len: int = 0):
        super().__init__()
        XLMemory.check(mem_len)  # subclasses check it again, in their own name, beforehand
        self.mem_len = mem_len

    @classmethod
    def check(cls, mem_len: int) -> None:
        check_int(cls.name, "mem_len", mem_len, 0)

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
        k_all, v_all, valid_all, padding = read_with_memory(step.old, layer, k, v)
        y = kernel(q, k_all, v_all, causal=True, key_padding=padding)
        if self.mem_len:
            if valid_all is None:
                valid_all = k.new_ones(k.shape[0], k.shape[-2], dtype=torch.bool)
            step.new[f"k.{layer}"] = k_all[..., -self.mem_len :, :]
            step.new[f"v.{layer}"] = v_all[..., -self.mem_len :, :]
            step.new["valid"] = valid_all[:, -self.mem_len :]
        return y

    def reset(self, state: MemoryState, rows: Tensor) -> MemoryState:
        if "valid" not in state:
            return state
        return {**state, "valid": keep_rows(state["valid"], rows)}
