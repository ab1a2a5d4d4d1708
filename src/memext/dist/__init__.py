"""Distributed training under torchrun: process groups, data parallelism, context parallelism.

- ``launch``: joining torchrun's process group (nccl on CUDA, gloo on CPU) as a ``World``, and
  the torchrun command that ``memext train --nproc N`` executes.
- ``strategy``: data parallelism, replicated (``ddp``: DistributedDataParallel) or sharded
  (``fsdp``: FSDP2's ``fully_shard``), behind the few calls the trainer makes.
- ``ring``, ``ulysses`` (and ``cp_common``): context-parallel attention over a process group.
- ``context``: the trainer's context parallelism (``train.context_parallel``): each rank's shard
  of a batch, and the model's attention and rotary hooks for it.

Which rows of a batch each data-parallel rank reads is ``memext.data.sampling.rows``; sharded
checkpoints are ``memext.dcp``. See docs/distributed.md.
"""
