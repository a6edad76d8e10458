"""Data parallelism through torch.distributed, started by ``torchrun``.

``torchrun --nproc_per_node=N -m capsrun train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; :func:`init` joins the process group (NCCL on GPUs,
gloo on CPUs). Every rank draws the same global batch of ``trainer.batch_size`` examples from the
same seeded loader and keeps its share (:class:`ShardedLoader`), so the data, the augmentation
and, with ``DistributedDataParallel`` averaging the gradients of per-rank mean losses, the update
are those of one process with the same global batch. Metrics are summed across ranks
(:func:`all_reduce_sum`); only rank 0 writes logs, TensorBoard and checkpoints.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()  # one process


def from_env() -> World:
    """The rank and world size torchrun put in the environment (one process without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(use_cuda: bool) -> World:
    """Join the process group of a torchrun launch (a no-op for one process)."""
    world = from_env()
    if world.distributed and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (the tensor itself for one process)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true on any rank, so that all ranks stop together."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    """The process group torn down after a run every rank finished; the caller has dropped its
    ``DistributedDataParallel`` model first. Its reducer holds the gloo process group, so a model
    still alive is freed only while the interpreter shuts down, and gloo's worker threads then
    abort the process ("terminate called without an active exception", exit -6, one run in ten
    under load). ``gc.collect`` frees it now, whatever cycles it is in. The barrier: a rank that
    tears down while another is still in its last collective closes the connection under it."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


class ShardedLoader:
    """Rank ``rank``'s share of every batch of ``loader``: example ``rank``, ``rank + size``, ...
    Every rank replays the same global batches (same seed), so the shards partition them. A last
    batch with fewer examples than ranks is skipped by all ranks."""

    def __init__(self, loader, world: World):
        self.loader, self.world = loader, world

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_examples(self) -> int:
        return self.loader.num_examples

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple]:
        r, n = self.world.rank, self.world.size
        for batch in self.loader.epoch(epoch, start=start):
            if len(batch[0]) < n:  # a last batch too small to give every rank an example
                continue
            yield tuple(t[r::n] for t in batch)

    def __iter__(self):
        return self.epoch(0)
