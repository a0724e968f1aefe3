"""Data-parallel plumbing for recipes: the rendezvous the job's child hosts, each rank's process
group (NCCL on GPUs, gloo on CPUs), and the few collectives a training loop needs to keep every
rank's decisions identical.

One process per device: rank r trains on `cuda:r` within CUDA_VISIBLE_DEVICES, or on the CPU when
no GPU is visible. Only the job's child and recipes import this module, so torch is imported at
the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

MASTER_ADDR = "127.0.0.1"
# How long a rank waits for the others to join, and for a collective, before it gives up; the
# child's supervisor ends the ranks much sooner when one of them dies.
TIMEOUT = timedelta(minutes=10)


def host_rendezvous() -> dist.TCPStore:
    """The store the ranks meet at, listening on a free port the OS picks (its `.port`), so two
    jobs on one machine never race for a port. The caller keeps it open until the ranks end."""
    return dist.TCPStore(MASTER_ADDR, 0, None, True, TIMEOUT, wait_for_workers=False)


def init(rank: int, world_size: int, port: int) -> str:
    """Join the process group as `rank`; the torch device this rank trains on."""
    store = dist.TCPStore(MASTER_ADDR, port, None, False, TIMEOUT)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group(
            "nccl", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT, device_id=device
        )
        return str(device)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    return "cpu"


def teardown(*, finished: bool) -> None:
    """Leave the process group. A rank that `finished` (its task returned, as every rank's does
    at the same step) first waits for the others, so none closes its connections while a peer's
    last collective still uses them: gloo aborts the peer (SIGABRT) when that happens. A rank
    that failed leaves at once; the others' collectives time out or the supervisor ends them."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0, or when there is no process group (one process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def wrap(model: nn.Module) -> nn.Module:
    """`model` (already on this rank's device) wrapped so that backward averages the gradients
    over the ranks; the model itself when there is one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def _device() -> torch.device:
    """Where collective tensors live: NCCL reduces only GPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (waits for all of them)."""
    tensor = torch.tensor([int(flag)], dtype=torch.int32, device=_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over the ranks, in place, without waiting for the device."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.div_(dist.get_world_size())


def broadcast_floats(values: Sequence[float]) -> list[float]:
    """Rank 0's `values` on every rank; each rank passes a sequence of the same length."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=_device())
    dist.broadcast(tensor, src=0)
    return tensor.tolist()
