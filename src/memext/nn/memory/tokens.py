"""Recurrent Memory Transformer (Bulatov et al. 2022), the decoder variant: memory as tokens.

Each segment is read as ``[read memory (m), segment (T), write memory (m)]``; both memory groups
start from the same m embeddings. Under causal attention the segment sees the read tokens (what
earlier segments left) and the write tokens see the whole segment, so the write tokens' final
hidden states summarise it; they become the read (and write) tokens of the next segment. The
blocks are untouched: only ``enter`` and ``leave`` change, so any attention kernel works.

Rotary positions restart at 0 in every segment (``position_offset``): each segment is its own
sequence, which is how RMT reads unbounded input with a bounded position range. The positions one
call uses are 0..T+2m-1, so ``segment_len + 2 * mem_tokens`` must stay within the positions the
model was trained on (``max_seq_len``); ``LongLM`` checks only the token count T.

Nothing is detached here: the trainer cuts gradients every ``train.bptt`` segments, so gradients
flow back through k segments of memory (the paper's BPTT depth) and, at the first segment of a
document, into the learned initial memory.

State: ``mem`` (B, m, d_model), the memory the next segment reads. ``mem_tokens = 0`` is exactly
the plain model (no parameter, empty state), with every call its own sequence.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from memext.nn.memory import Memory, MemoryState, MemoryStep, register_memory
from memext.registry import check_int


@register_memory("tokens")
class TokenMemory(Memory):
    unbounded = True

    def __init__(self, d_model: int, mem_tokens: int = 0):
        super().__init__()
        self.check(d_model, mem_tokens)
        self.d_model = d_model
        self.mem_tokens = mem_tokens
        # No parameter at m = 0, so the state dict is the plain model's. build_model re-draws it
        # as N(0, init_std) like the token embeddings, which the memory tokens stand beside.
        self.initial = nn.Parameter(torch.randn(mem_tokens, d_model) * 0.02) if mem_tokens else None

    @classmethod
    def check(cls, d_model: int, mem_tokens: int) -> None:
        check_int(cls.name, "d_model", d_model, 1)
        check_int(cls.name, "mem_tokens", mem_tokens, 0)

    def _initial(self, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        # Expanded, not copied: the graph stays connected to the parameter, so it is learned.
        assert self.initial is not None
        return self.initial.to(device=device, dtype=dtype).expand(batch, -1, -1)

    def init(self, batch: int, device: torch.device, dtype: torch.dtype) -> MemoryState:
        if not self.mem_tokens:
            return {}
        return {"mem": self._initial(batch, device, dtype)}

    def position_offset(self, pos: int) -> int:
        return 0

    def enter(self, x: Tensor, step: MemoryStep) -> Tensor:
        if not self.mem_tokens:
            return x
        mem = step.old.get("mem")
        if mem is None:  # a state without memory (e.g. written by another variant): start fresh
            mem = self._initial(x.shape[0], x.device, x.dtype)
        expected = (x.shape[0], self.mem_tokens, self.d_model)
        if tuple(mem.shape) != expected:
            raise ValueError(
                f"memory state 'mem' has shape {tuple(mem.shape)}: expected {expected} "
                f"(batch, mem_tokens, d_model)"
            )
        mem = mem.to(x.dtype)
        return torch.cat((mem, x, mem), dim=1)

    def leave(self, x: Tensor, step: MemoryStep) -> Tensor:
        m = self.mem_tokens
        if not m:
            return x
        step.new["mem"] = x[:, -m:].contiguous()  # contiguous: safetensors saves the state
        return x[:, m:-m]

    def reset(self, state: MemoryState, rows: Tensor) -> MemoryState:
        mem = state.get("mem")
        if mem is None:
            return state
        initial = self._initial(mem.shape[0], mem.device, mem.dtype)
        return {**state, "mem": torch.where(rows.to(mem.device)[:, None, None], initial, mem)}
