"""Data parallelism over ``torch.distributed``: which calibration micro-batches a rank owns, and the all-reduces.

Every rank builds the same calibration set (same text, same seed) and owns the micro-batches ``k`` with
``k % world_size == rank`` (round robin, so ranks differ by at most one micro-batch). Everything that decides (layer
scores, losses and token counts, leave-one-out NLLs, mean shifts, Gram matrices) is a SUM over micro-batches, so
all-reducing the per-rank sums gives exactly the single-process sum (up to floating-point summation order), and every
rank takes the same decisions. Rank 0 alone writes files and shows progress bars (:attr:`DataParallel.is_main`).

Backends: NCCL for CUDA tensors, gloo for CPU tensors (the process group is created by the caller, e.g. ``torchrun``
plus :func:`init_from_environment`). Tensors are all-reduced on the device the backend needs (gloo: CPU) and copied
back.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


class DataParallel:
    """The calling process's place in the process group (or a single process when none is initialised).

    Args:
        group: a ``torch.distributed`` process group; ``None`` uses the default group if one is initialised.

    Attributes:
        rank, world_size: this process's rank and the number of processes (0 and 1 without a group).
    """

    def __init__(self, group=None):
        self.group = group
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self.backend = dist.get_backend(group) if self.active else None

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes files, logs progress and shows the bars)."""
        return self.rank == 0

    def owns(self, micro_batch_index: int) -> bool:
        """Whether this rank computes micro-batch ``micro_batch_index`` (round robin)."""
        return micro_batch_index % self.world_size == self.rank

    def shard(self, items: list) -> list:
        """The items (micro-batches) this rank owns, in order."""
        return [x for k, x in enumerate(items) if self.owns(k)]

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks in place (a no-op for one process) and return it.

        gloo reduces CPU tensors; a CUDA tensor under gloo is reduced through a CPU copy (and NCCL needs CUDA
        tensors: a CPU tensor under NCCL goes through the current CUDA device).
        """
        if self.world_size == 1:
            return tensor
        if self.backend == "nccl" and tensor.device.type != "cuda":
            work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        elif self.backend != "nccl" and tensor.device.type != "cpu":
            work = tensor.cpu()
        else:
            work = tensor
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
        if work is not tensor:
            tensor.copy_(work)
        return tensor

    def sum_floats(self, *values: float) -> list[float]:
        """All-reduce a few Python floats (fp64) and return their sums, in order."""
        t = torch.tensor(values, dtype=torch.float64)
        return self.all_reduce_(t).tolist()

    def barrier(self) -> None:
        """Wait for every rank (a no-op for one process)."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def broadcast_object(self, obj, src: int = 0):
        """Rank ``src``'s ``obj`` on every rank (pickled; a no-op for one process)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]


def init_from_environment(device: str | torch.device) -> DataParallel:
    """Initialise the default process group from ``torchrun``'s environment (``WORLD_SIZE`` > 1), if not done yet.

    The backend is NCCL when ``device`` is CUDA, else gloo; on CUDA each rank then computes on ``cuda:LOCAL_RANK``
    (:func:`rank_device`). Without ``WORLD_SIZE`` (a plain ``python -m gradmap``) nothing is initialised.

    Returns:
        The :class:`DataParallel` of the default group (one process when not under ``torchrun``).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=2))
    return DataParallel()


def rank_device(device: str | torch.device) -> torch.device:
    """The device this rank computes on: ``cuda:LOCAL_RANK`` for a bare ``cuda`` under ``torchrun``, else ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return dev
