"""Data parallelism behind the few calls the trainer makes: replicated (``ddp``) or sharded
(``fsdp``, FSDP2's ``fully_shard``).

The trainer builds its model, lets the strategy ``shard`` it (FSDP: in place, before the optimizer
sees the parameters), calls the module ``wrap`` returns (DDP: the wrapper), runs each backward
inside ``sync(final)``, and asks for ``mean`` losses and the ``grad_norm``. In a world of one
every call is the identity, so single-process training runs the code it always ran.

Gradients are the global mean. Each rank's loss is the sum over its rows divided by the global
denominator over W (``memext.data.mixture.Batch.denom``), and DDP and FSDP average gradients over
the W ranks, so the averaged gradient is the single-process gradient of the whole batch.

A step's micro-batches (and segments cut by truncated backprop) each call backward. DDP
synchronises only the step's last backward: the ones before run under ``no_sync`` (forward
included: DDP decides at forward time) and their gradients accumulate locally. FSDP
reduce-scatters every backward, so a rank holds sharded gradients only, never a whole one.

The data-parallel ranks are the mesh's ``dp`` dimension (``data_mesh``). With context parallelism
(``train.context_parallel=N``) the mesh is (dp, cp): the N ranks of a ``cp`` group read the same
rows and each keeps its shard of the sequence (``memext.dist.context``). DDP still goes over every
rank, since the ranks of a context group hold different tokens of the same sequences and their
gradients must be summed too; each rank's loss is its share of the global mean, so DDP's average
over dp x cp ranks is the gradient of the whole batch's mean.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from contextlib import AbstractContextManager

import torch
import torch.distributed as dist
from torch import nn

from memext.dist.launch import World
from memext.errors import MemextError

STRATEGIES = ("ddp", "fsdp")


class Strategy:
    """A world of one (or a strategy's single-process fallback): the module as it is."""

    sharded = False  # parameters and optimizer state are DTensor shards (fsdp on >1 rank)

    def __init__(self, name: str, world: World, context_parallel: int = 1):
        self.name = name
        self.world = world
        self.dp_rank, self.dp_size = world.rank, world.size
        # Context parallelism: this rank's place in its group of ``cp_size`` ranks, which read
        # the same rows and split each sequence (None: no such group).
        self.cp_rank, self.cp_size = 0, 1
        self.cp_group: dist.ProcessGroup | None = None
        if context_parallel > 1:
            mesh = data_mesh(world, context_parallel)
            self.dp_rank, self.dp_size = mesh.get_local_rank("dp"), mesh.size(0)
            self.cp_rank, self.cp_size = mesh.get_local_rank("cp"), context_parallel
            self.cp_group = mesh["cp"].get_group()

    def shard(self, model: nn.Module) -> None:
        """Shard ``model`` in place (FSDP); call before building the optimizer."""

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the training step calls (DDP: its wrapper)."""
        return model

    def sync(self, final: bool) -> AbstractContextManager:
        """Around a forward and its backward: ``final`` is the step's last backward."""
        return contextlib.nullcontext()

    def mean(self, values: list[float]) -> list[float]:
        """Each value averaged over the ranks (every rank gets the same numbers)."""
        if self.world.size == 1 or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.world.device)
        dist.all_reduce(t)
        return (t / self.world.size).tolist()

    def grad_norm(self, params: Iterable[nn.Parameter], clip: float) -> float:
        """Clip the gradients to the global norm ``clip`` (0: no clipping); returns the norm
        before clipping, the same on every rank."""
        norm = torch.nn.utils.clip_grad_norm_(list(params), clip or math.inf)
        full = getattr(norm, "full_tensor", None)  # a DTensor when the gradients are sharded
        return float(full() if full is not None else norm)


class Replicated(Strategy):
    """DDP: every rank holds the whole model; gradients are all-reduced."""

    def __init__(self, name: str, world: World, context_parallel: int = 1):
        super().__init__(name, world, context_parallel)
        self._ddp: nn.parallel.DistributedDataParallel | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        # device_ids stays None: the trainer moves its inputs itself, and DDP would otherwise
        # rebuild the State dataclass passed into forward. The buffers (rotary tables) are the
        # same on every rank: no broadcast before each forward.
        self._ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)
        return self._ddp

    def sync(self, final: bool) -> AbstractContextManager:
        if final or self._ddp is None:
            return contextlib.nullcontext()
        return self._ddp.no_sync()


class Sharded(Strategy):
    """FSDP2: each rank holds 1/W of every parameter, gradient and optimizer state; each block
    is gathered for its forward and backward and resharded after."""

    sharded = True

    def __init__(self, name: str, world: World, mixed_precision: bool):
        super().__init__(name, world)
        self.mixed_precision = mixed_precision

    def shard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = data_mesh(self.world)
        # bf16 parameters in forward and backward, fp32 gradient reduction and master weights.
        policy = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.mixed_precision
            else MixedPrecisionPolicy()
        )
        for unit in shard_units(model):
            fully_shard(unit, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)


def make_strategy(
    name: str, world: World, mixed_precision: bool = False, context_parallel: int = 1
) -> Strategy:
    """The strategy ``name`` (``train.strategy``) for ``world``. A world of one runs unwrapped
    whatever the name (the name still decides the checkpoint format). ``mixed_precision``:
    FSDP's bf16 policy (on CUDA, where the trainer's precision asks for bf16).
    ``context_parallel``: ranks per context group (``train.context_parallel``; DDP only), which
    must divide the world."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
    if context_parallel > 1:
        check_context_world(context_parallel, world.size)
        if name != "ddp":
            raise MemextError(
                f"train.context_parallel={context_parallel} runs with train.strategy='ddp', "
                f"not {name!r}"
            )
        return Replicated(name, world, context_parallel)
    if world.size == 1:
        return Strategy(name, world)
    if name == "ddp":
        return Replicated(name, world)
    return Sharded(name, world, mixed_precision)


def check_context_world(context_parallel: int, world_size: int) -> None:
    """Refuse a world that does not divide into groups of ``context_parallel`` ranks."""
    n = context_parallel
    if world_size % n == 0:
        return
    hint = (
        f"start it with --nproc {n} (or a multiple of {n}), or set train.context_parallel=1 to "
        "train in one process"
        if world_size == 1
        else f"start a multiple of {n} ranks, or set train.context_parallel to a divisor of "
        f"{world_size}"
    )
    raise MemextError(
        f"train.context_parallel={n} splits each sequence over {n} ranks, but this job has "
        f"{world_size} rank{'s' if world_size > 1 else ''}, not a multiple of {n}: {hint}"
    )


def data_mesh(world: World, context_parallel: int = 1):
    """The device mesh of the ranks: ``dp`` alone, or (``dp``, ``cp``) with context
    parallelism, where rank ``r`` is replica ``r // cp``, place ``r % cp`` of its context group.
    Only ``dp`` splits the batch."""
    from torch.distributed.device_mesh import init_device_mesh

    if context_parallel == 1:
        return init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("dp",))
    shape = (world.size // context_parallel, context_parallel)
    return init_device_mesh(world.device.type, shape, mesh_dim_names=("dp", "cp"))


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards on their own (each gathered for its own forward): the elements
    of the outermost ``ModuleList``s (a model's blocks, an encoder's and a decoder's). What
    lies outside them (embedding, final norm, head) is the root's unit."""
    units: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(True for _ in child.parameters()):
                    units.append(child)
                inside.update(id(m) for m in child.modules())
    return units


def held_bytes(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of parameters and optimizer state this rank holds (a DTensor counts its local
    shard only): what sharding saves, measured rather than assumed."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    state = 0
    if opt is not None:
        for per_param in opt.state.values():
            for v in per_param.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:  # step counters are scalars
                    state += local(v).numel() * local(v).element_size()
    return {"params": params, "optimizer": state}
