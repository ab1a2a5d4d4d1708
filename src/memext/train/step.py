"""One training step: the optimizer, a batch of sequences read in segments, and the step over
a step's micro-batches.

``sequence_backward`` is segment-wise training with memory: a batch is read in segments that
carry the model's state, and the gradient flows through that state for ``train.bptt`` segments
(truncated backprop through time). ``train_step`` weighs each source's micro-batches by its
share and skips a step whose loss or gradient norm is not finite.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F

from memext import checkpoint as ckpt
from memext.config import Config, TrainConfig
from memext.data.mixture import Batch
from memext.dist.strategy import Strategy
from memext.runtime import autocast
from memext.train.distill import Distillation

# Around each segment's forward (and the backward that follows it): given True for the segments
# whose backward is the batch's last one (a data-parallel strategy synchronises only the step's
# last backward).
Sync = Callable[[bool], AbstractContextManager]


def _no_sync(final: bool) -> AbstractContextManager:
    return contextlib.nullcontext()


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not norms, not the embedding)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    t = cfg.train
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": t.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=t.lr,
        betas=(t.beta1, t.beta2),
    )


def sequence_backward(
    fwd: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    t: TrainConfig,
    device: torch.device,
    *,
    scale: float = 1.0,
    weights: torch.Tensor | None = None,
    reset_id: int | None = None,
    denom: float | None = None,
    sync: Sync = _no_sync,
    distill: Distillation | None = None,
    parts: dict[str, float] | None = None,
) -> float:
    """Forward and backward one batch of sequences; returns its mean loss (before ``scale``).

    With ``t.segment_len`` the sequences are read in segments carrying the model's state, and
    the gradient flows through that state for ``t.bptt`` segments before it is cut (truncated
    backprop through time; 0 = never cut). ``weights`` (B, T) weighs each target (a task's answer
    more than its filler); ``reset_id`` is the document-boundary token: a row whose segment held
    one starts the next segment with empty memory. A memory's auxiliary loss (compressive
    memory's reconstruction) is added to the loss it belongs to but not to the returned mean.
    ``denom``: the mean's denominator when these rows are a data-parallel rank's share of a
    batch (``Batch.denom``); ``sync(final)`` is entered around each segment, ``final`` for
    those whose backward ends the batch.

    ``distill``: the teacher's soft targets join the loss (``memext.train.distill``); the
    teacher reads each whole sequence once, and its logits are cut at the segments' bounds.
    ``parts``, when given, receives ``ce`` and ``kd``, the two terms' means, times ``scale``.
    """
    x, y = x.to(device), y.to(device)
    seg = t.segment_len or x.shape[1]
    n = x.shape[1] // seg
    w = None if weights is None else weights.to(device).float()
    if denom is None:
        denom = float(w.sum()) if w is not None else float(y.numel())
    memory = ckpt.unwrap(fwd).memory  # the variant's rules for cutting and forgetting state
    # The first segment of the last truncated-backprop window: its backward ends the batch.
    last_window = ((n - 1) // t.bptt) * t.bptt if t.bptt else 0
    soft = distill.targets(x) if distill is not None else None  # (B, T, vocab), the teacher's
    state, pending, total, ce_sum, kd_sum = None, None, 0.0, 0.0, 0.0
    for i in range(n):
        xs, ys = x[:, i * seg : (i + 1) * seg], y[:, i * seg : (i + 1) * seg]
        with sync(i >= last_window):
            with autocast(device, t.precision):
                logits, state = fwd(xs, state)
            nll = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), ys.reshape(-1), reduction="none"
            )
            if soft is not None:
                assert distill is not None
                ce = nll
                nll, kd = distill.mix(logits, nll, soft[:, i * seg : (i + 1) * seg])
            if w is not None:
                nll = nll * w[:, i * seg : (i + 1) * seg].reshape(-1)
            if soft is not None and parts is not None:
                seg_w = 1.0 if w is None else w[:, i * seg : (i + 1) * seg].reshape(-1)
                ce_sum += float((ce.detach() * seg_w).sum()) / denom
                kd_sum += float((kd.detach() * seg_w).sum()) / denom
            loss = nll.sum() / denom
            total += float(loss.detach())
            if state.aux_loss is not None:
                loss = loss + state.aux_loss / n
            pending = loss if pending is None else pending + loss
            if i == n - 1 or (t.bptt and (i + 1) % t.bptt == 0):
                (pending * scale).backward()
                pending = None
                if i < n - 1 and state.memory:
                    state.memory = memory.detach(state.memory)
        if reset_id is not None and i < n - 1 and state.memory:
            rows = (xs == reset_id).any(dim=1)
            if bool(rows.any()):
                state.memory = memory.reset(state.memory, rows)
    if soft is not None and parts is not None:
        parts["ce"] = parts.get("ce", 0.0) + scale * ce_sum
        parts["kd"] = parts.get("kd", 0.0) + scale * kd_sum
    return total


def pair_backward(
    fwd: torch.nn.Module,
    src: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    t: TrainConfig,
    device: torch.device,
    *,
    scale: float = 1.0,
    denom: float | None = None,
    sync: Sync = _no_sync,
) -> float:
    """An encoder-decoder's forward and backward on one batch: sources (B, S), decoder inputs
    and targets (B, T), ``weights`` (B, T) on the targets (0 on padding). Returns the weighted
    mean loss (before ``scale``); ``denom`` and ``sync`` as in ``sequence_backward``."""
    src, x, y, w = src.to(device), x.to(device), y.to(device), weights.to(device).float()
    with sync(True):
        with autocast(device, t.precision):
            logits, _ = fwd(src, x)
        nll = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none"
        )
        loss = (nll * w.reshape(-1)).sum() / (w.sum() if denom is None else denom)
        (loss * scale).backward()
    return float(loss.detach())


def train_step(
    fwd: torch.nn.Module,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    batches: Sequence[Batch | tuple[torch.Tensor, torch.Tensor]],
    lr: float,
    t: TrainConfig,
    device: torch.device,
    reset_id: int | None = None,
    losses: dict[str, float] | None = None,
    strategy: Strategy | None = None,
    distill: Distillation | None = None,
    terms: dict[str, float] | None = None,
) -> tuple[float, float]:
    """One optimizer step over ``batches``; returns (loss, grad norm).

    ``batches`` are the step's micro-batches: the mixture's ``Batch``es (each source's loss
    weighted by its share, shares normalised within the step) or plain (inputs, targets) pairs
    of text, accumulated with equal weights. ``losses``, when given, receives each source's mean
    loss. ``fwd`` is the module to call (``model`` itself, or its torch.compile wrapper).

    The step is skipped, leaving the weights those of the last good step, when the loss or the
    gradient norm is not finite. ``strategy``: the data parallelism the batches are this rank's
    share of (``memext.dist.strategy``); the returned losses and norm are then the whole
    batch's, the same on every rank, so every rank takes or skips the step alike.
    ``distill``: the teacher whose soft targets join every text batch's loss; ``terms``, when
    given, receives the step's two terms, ``ce`` and ``kd`` (weighted as the loss is).
    """
    parts = [b if isinstance(b, Batch) else Batch("lm", 1.0, *b, resets=True) for b in batches]
    for group in opt.param_groups:
        group["lr"] = lr
    shares = sum(b.share for b in parts)
    total, by_name, counts, split = 0.0, {}, {}, {}
    for k, b in enumerate(parts):
        weight = b.share / shares
        sync = _step_sync(strategy, last=k == len(parts) - 1)
        if b.src is not None:
            assert b.weights is not None, "an encoder-decoder batch weighs its targets"
            loss = pair_backward(
                fwd, b.src, b.x, b.y, b.weights, t, device, scale=weight, denom=b.denom, sync=sync
            )
        else:
            loss = sequence_backward(
                fwd,
                b.x,
                b.y,
                t,
                device,
                scale=weight,
                weights=b.weights,
                reset_id=reset_id if b.resets else None,
                denom=b.denom,
                sync=sync,
                distill=distill,
                parts=split,
            )
        total += weight * loss
        by_name[b.name] = by_name.get(b.name, 0.0) + loss
        counts[b.name] = counts.get(b.name, 0) + 1
    if strategy is not None:  # one collective for every number the step reports
        names, keys = list(by_name), list(split)
        total, *means = strategy.mean(
            [total, *(by_name[k] for k in names), *(split[k] for k in keys)]
        )
        by_name = dict(zip(names, means[: len(names)], strict=True))
        split = dict(zip(keys, means[len(names) :], strict=True))
    if losses is not None:
        losses.update({k: v / counts[k] for k, v in by_name.items()})
    if terms is not None:
        terms.update(split)
    if not math.isfinite(total):
        opt.zero_grad(set_to_none=True)
        return total, math.nan
    if strategy is not None:
        gnorm = strategy.grad_norm(model.parameters(), t.grad_clip)
    else:
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or math.inf))
    if not math.isfinite(gnorm):
        opt.zero_grad(set_to_none=True)
        return total, gnorm
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total, gnorm


def _step_sync(strategy: Strategy | None, last: bool) -> Sync:
    """The ``sync`` of one micro-batch: only the last micro-batch's last backward is final."""
    if strategy is None:
        return _no_sync
    return lambda final: strategy.sync(last and final)
