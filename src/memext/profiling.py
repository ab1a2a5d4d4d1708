"""Peak allocator memory of a callable: the bytes tensors held, not the process's RSS.

On CUDA it is the caching allocator's own counter. On CPU PyTorch keeps no such counter, so the
call runs under the profiler with memory tracking, and the peak is the running sum of every
allocation and free the allocator reported, in time order (the same event tree torch's own memory
timeline is built from). The profiler slows the call down: measure time and memory in separate
runs.

It sits at the bottom of the layers (beside ``runtime``) because evaluations measure memory too,
not only ``memext bench``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes of tensor memory at the worst moment of ``fn()``, above what was live before it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    deltas: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            deltas.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, delta in sorted(deltas):
        live += delta
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's native code logs a start and stop line to file descriptor 2 on every call;
    a suite that measures many lengths would drown its own output in them."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real descriptor 2 (an embedded interpreter): nothing to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
