"""LSTMLM: a recurrent language model, a baseline trained and evaluated exactly like ``LongLM``.

It follows ``LongLM``'s forward contract (tokens in; logits and the next ``State`` out), so the
trainer, the evaluators and the checkpoint code take it unchanged. The recurrent state ``(h, c)``
travels in ``State.memory`` as a flat ``dict[str, Tensor]`` (keys ``"h"`` and ``"c"``, each
``(n_layers, B, d_model)``), the same form memory variants use, so safetensors can save it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from memext.nn.memory import Memory, MemoryState
from memext.nn.transformer import State


class RecurrentState(Memory):
    """The LSTM's ``(h, c)`` seen through the memory contract, so segment training detaches and
    resets it like any memory variant. Not registered: it is not a choice for ``model.memory``."""

    name = "lstm"
    unbounded = True

    def reset(self, state: MemoryState, rows: Tensor) -> MemoryState:
        """A reset row starts again from the zero state (h, c are (layers, B, d))."""
        keep = (~rows).to(state["h"].device)[None, :, None]
        return {k: v * keep.to(v.dtype) for k, v in state.items()}


class LSTMLM(nn.Module):
    """Embedding, input RMSNorm, a stacked ``nn.LSTM``, final RMSNorm, head (tied when asked).

    The input norm is there because the embedding is initialised small (std 0.02, so that a tied
    head starts with near-uniform logits) and an LSTM, unlike a pre-norm Transformer block, feeds
    its input straight into the gates: without the norm the inputs are ~50x smaller than the
    U(+-1/sqrt(d)) weights expect and training sits on a unigram plateau for tens of steps.

    ``max_seq_len`` is kept because evaluators read it, but it is no limit: a recurrence has no
    positions, so any length per call (and any number of calls) is accepted.
    ``activation_checkpointing`` is accepted and ignored (the recurrence is one fused ``nn.LSTM``
    call, with no blocks to checkpoint); ``reversible`` is always False.

    Nothing inside detaches the carried state: gradients flow into the previous call's graph
    unless the caller detaches ``state.memory`` (as truncated backprop between windows does).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        max_seq_len: int = 8192,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.in_norm = nn.RMSNorm(d_model, eps=1e-5)
        # nn.LSTM applies its dropout between layers only, and warns when there is no "between".
        self.lstm = nn.LSTM(
            d_model, d_model, n_layers, batch_first=True, dropout=dropout if n_layers > 1 else 0.0
        )
        self.drop = nn.Dropout(dropout)  # on the embedding and on the last layer's output
        self.norm = nn.RMSNorm(d_model, eps=1e-5)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.n_layers = n_layers
        self.d_model = d_model
        self.max_seq_len = max_seq_len
        self.segment_len: int | None = None  # set by memext.checkpoint.load; see LongLM
        self.memory = RecurrentState()
        self.activation_checkpointing = False
        self.reversible = False
        self.init_weights()
        if tie_embeddings:
            self.head.weight = self.embed.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Embedding and head N(0, std); LSTM U(-1/sqrt(d), 1/sqrt(d)) as PyTorch does, but drawn
        from ``generator`` (or the global RNG) so a seed fixes it; forget-gate bias 1."""
        self.embed.weight.normal_(0.0, std, generator=generator)
        if self.head.weight is not self.embed.weight:
            self.head.weight.normal_(0.0, std, generator=generator)
        bound = 1.0 / math.sqrt(self.d_model)
        d = self.d_model
        for name, p in self.lstm.named_parameters():
            p.uniform_(-bound, bound, generator=generator)
            if name.startswith("bias"):
                # Gates are stacked (input, forget, cell, output). A forget bias of 1 (split as
                # 1 + 0 over bias_ih + bias_hh) starts the gate at sigmoid(1) ~ 0.73 instead of
                # 0.5, so early in training the cell keeps what it holds for several steps and
                # gradients reach further back (Gers et al. 2000; Jozefowicz et al. 2015).
                p.zero_()
                if name.startswith("bias_ih"):
                    p[d : 2 * d] = 1.0
        self.in_norm.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """tokens (B, T) int64 -> logits (B, T, vocab), and the next State (pos advanced by T,
        ``memory`` = the final ``{"h", "c"}``). ``state.memory is None`` means a zero state."""
        state = state or State()
        t = tokens.shape[1]
        x = self.drop(self.in_norm(self.embed(tokens)))
        hx = None  # nn.LSTM's own zero state
        if state.memory is not None:
            # Cast to the input's dtype: a state made under autocast may be half precision.
            hx = (state.memory["h"].to(x.dtype), state.memory["c"].to(x.dtype))
        y, (h, c) = self.lstm(x, hx)
        logits = self.head(self.norm(self.drop(y)))
        # A fresh State, not replace(): fields this model does not produce (a memory variant's
        # aux_loss, say) fall back to their defaults instead of carrying the caller's value on.
        return logits, State(pos=state.pos + t, cache=state.cache, memory={"h": h, "c": c})

    def num_params(self, exclude_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights count once
        return n - self.embed.weight.numel() if exclude_embedding else n
