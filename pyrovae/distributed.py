"""Data-parallel training on several processes: the process group, this process's rank
and device, and the few collectives the trainer needs.

``torchrun --nproc_per_node N -m pyrovae train ...`` starts N processes and tells
each, in the environment variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, where it stands; ``init_from_environment``
joins them into one ``torch.distributed`` process group (nccl on CUDA, one GPU per
process; gloo on CPU). In Python, initialize the group yourself
(``torch.distributed.init_process_group``) or with ``init_from_environment`` before
building the ``Trainer``. Every helper here also works in one process, as rank 0 of 1.
"""

from __future__ import annotations

import contextlib
import logging
import os

import numpy as np
import torch
import torch.distributed as dist

from pyrovae.errors import PyrovaeError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_distributed() -> bool:
    """Whether this process trains together with others."""
    return world_size() > 1


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: torch.device) -> torch.device:
    """Join the process group that torchrun's environment variables describe (nothing
    to do in a single process) and return this process's device: ``device``, or on
    CUDA the GPU of its local rank."""
    if launched() and not is_initialized():
        if not dist.is_available():
            raise PyrovaeError("this torch has no torch.distributed, which data-parallel "
                               "training needs; run a single process (python -m pyrovae).")
        if device.type == "cuda":
            local = _local_rank()
            if local >= torch.cuda.device_count():
                raise PyrovaeError(
                    f"process {local} on this machine has no GPU of its own: torch sees "
                    f"{torch.cuda.device_count()}. Start at most that many processes per "
                    f"machine (--nproc_per_node), or train on the CPU with --device cpu.")
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return local_device(device)


def local_device(device: torch.device) -> torch.device:
    """This process's device: under data-parallel training on CUDA, its own GPU."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", _local_rank() if "LOCAL_RANK" in os.environ
                            else torch.cuda.current_device())
    return device


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def shutdown() -> None:
    """Leave the process group, where one was joined."""
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """The sums over all processes of ``values`` (in float64, on ``device``: nccl reduces
    only GPU tensors)."""
    if not is_distributed():
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def all_gather(value) -> list:
    """``value`` of every process, in rank order (any picklable object)."""
    if not is_distributed():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every process gets here."""
    if is_distributed():
        dist.barrier()


def broadcast(value):
    """Rank 0's ``value``, on every process."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (a download, a cache to fill, a folder to claim), then
    the others. An error of rank 0 is raised on every process, so that all stop
    together instead of waiting for a rank that has left."""
    if not is_distributed():
        yield
        return
    if rank() != 0:
        failure = broadcast(None)
        if failure is not None:
            raise PyrovaeError(f"process 0 stopped: {failure}")
        yield
        return
    try:
        yield
    except BaseException as error:
        broadcast(f"{type(error).__name__}: {error}" if not isinstance(error, PyrovaeError)
                  else str(error))
        raise
    broadcast(None)


def stream_seed(seed: int, process: int) -> int:
    """The seed of process ``process``'s own Monte Carlo stream: rank 0 keeps ``seed``, so
    that one process trains as without torchrun; the others get independent streams
    from numpy's ``SeedSequence``, made for exactly this."""
    if process == 0:
        return seed
    return int(np.random.SeedSequence([seed, process]).generate_state(1, dtype=np.uint64)[0]
               % 2**63)


class _RankZeroOnly(logging.Filter):
    """Lets through, on ranks other than 0, only warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or rank() == 0


def quiet_other_ranks(logger: logging.Logger) -> None:
    """Only rank 0 logs progress; every rank still logs its warnings and errors."""
    if not any(isinstance(f, _RankZeroOnly) for f in logger.filters):
        logger.addFilter(_RankZeroOnly())
