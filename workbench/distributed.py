"""Data-parallel calibration over torch.distributed.

Under `torchrun --nproc-per-node N -m workbench prune ...`, or inside any initialised process
group, the driver (`workbench.prune`) runs as N cooperating processes ("ranks"):

- each rank takes a disjoint, contiguous slice of the calibration windows (`local_windows`) and
  runs only that slice through every block, so each rank's activations are 1/N of the set;
- after a block's statistics are collected, their running sums and token counts are all-reduced
  (`all_reduce_stats`), so every rank holds the statistics of the whole set;
- the block's per-layer solves are split across ranks (`split_solves`): each rank solves the
  layers assigned to it, then every result is broadcast from its owner, so every rank ends the
  block with the same weights and masks as a single process would compute.

Outside a process group (or in a group of one) every function here is the identity, so the
single-process path is unchanged. Backends: gloo for CPU tensors, NCCL for CUDA ones (the
collectives run on the device the process group's backend needs).
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in the process group (rank 0 of 1 outside one)."""

    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's rank and the group size, from the default process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints, logs progress and writes."""
    return current().is_main


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (torchrun sets these)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def backend_for(device: str) -> str:
    """NCCL when the work runs on CUDA devices, gloo otherwise (CPU)."""
    return "nccl" if str(device).startswith("cuda") and torch.cuda.is_available() else "gloo"


def init_from_environment(device: str = "cpu") -> bool:
    """Join the process group that torchrun describes, unless there is none or one already
    exists; returns True when this call created it (the caller then destroys it at the end).
    With NCCL each rank uses the GPU numbered by its LOCAL_RANK."""
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    log.info("rank %d of %d joined the %s process group", dist.get_rank(), dist.get_world_size(),
             backend)
    return True


def join_for_command(device: str = "cpu") -> Ranks:
    """For a command-line run: join torchrun's process group (left again at exit) and make
    every rank but 0 quiet (stdout to /dev/null, only errors logged). Returns this rank."""
    if init_from_environment(device):
        atexit.register(shutdown)
    ranks = current()
    if not ranks.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
        logging.getLogger().setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its loading bars go to stderr
    return ranks


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _needs_gradients(method: str) -> bool:
    from workbench.methods import METHODS

    record = METHODS.get(method)
    return record is not None and record.needs_gradients


def check_supported(method: str, out_of_core: bool = False, ranks: Ranks | None = None) -> None:
    """Refuse what does not split across ranks, with the workaround."""
    ranks = ranks or current()
    if ranks.active and out_of_core:
        raise ValueError("an out-of-core prune (blocks read from and written to disk) runs in one "
                         "process: run it without torchrun, or with --offload none when the model "
                         "fits in each process's memory")
    if ranks.active and _needs_gradients(method):
        raise ValueError(f"{method}'s Fisher pass back-propagates through the whole model and "
                         "is not split across processes: run it in a single process (without "
                         "torchrun), or use method 'wanda' or 'magnitude' for channel/head "
                         "patterns under torchrun")


def window_range(count: int, ranks: Ranks) -> tuple[int, int]:
    """[start, stop) of the windows rank `ranks.rank` takes out of `count`: contiguous slices,
    sizes differing by at most one, the same on every run."""
    if count < ranks.world:
        raise ValueError(f"{count} calibration windows cannot be shared by {ranks.world} "
                         f"processes: use nsamples >= {ranks.world} or fewer processes")
    return ranks.rank * count // ranks.world, (ranks.rank + 1) * count // ranks.world


def local_windows(ids: torch.Tensor, ranks: Ranks | None = None) -> torch.Tensor:
    """This rank's slice of the calibration windows (all of them in a single process)."""
    ranks = ranks or current()
    if not ranks.active:
        return ids
    start, stop = window_range(ids.shape[0], ranks)
    return ids[start:stop]


def _collective_device(like: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors; gloo moves CPU tensors (and CUDA ones, through the host)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like if like.type == "cpu" else torch.device("cpu")


def all_reduce_stats(stats: dict, ranks: Ranks | None = None) -> None:
    """Sum every accumulator's running sums and token count across ranks, in place. Linears that
    share one accumulator (q/k/v, gate/up) are reduced once. One all-reduce carries all the sums
    (a flat fp32 buffer), a second the token counts (int64, exact)."""
    ranks = ranks or current()
    if not ranks.active or not stats:
        return
    unique = {}
    for name in sorted(stats):  # the same order on every rank, whatever order the hooks ran in
        unique.setdefault(id(stats[name]), stats[name])
    accumulators = list(unique.values())
    sums = [tensor for acc in accumulators for tensor in acc.sums()]
    home = sums[0].device
    device = _collective_device(home)
    flat = torch.cat([tensor.reshape(-1).to(device) for tensor in sums])
    tokens = torch.tensor([acc.tokens for acc in accumulators], dtype=torch.int64, device=device)
    dist.all_reduce(flat)
    dist.all_reduce(tokens)
    offset = 0
    for tensor in sums:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    for acc, total in zip(accumulators, tokens.tolist()):
        acc.tokens = int(total)


def total(count: int, ranks: Ranks | None = None) -> int:
    """`count` summed over the ranks (itself in a single process)."""
    ranks = ranks or current()
    if not ranks.active:
        return count
    summed = torch.tensor([count], dtype=torch.int64, device=_collective_device(torch.device("cpu")))
    dist.all_reduce(summed)
    return int(summed.item())


def solve_cost(weight: torch.Tensor) -> float:
    """A layer's relative solve cost: SparseGPT's inverse Hessian is in^3 and its lazy updates
    out * in^2; for the cheap methods the ordering by size is all that matters."""
    out_features, in_features = weight.shape[0], weight.shape[-1]
    return float(in_features) ** 2 * (in_features + out_features)


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank per layer, balancing total cost: the costliest layer first, each to the rank
    with the least work so far (ties to the lower rank, then the lower index): deterministic."""
    load = [0.0] * world
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[index] = rank
        load[rank] += costs[index]
    return owners


def split_solves(method: Callable[..., tuple[torch.Tensor, torch.Tensor]], weights: Sequence[torch.Tensor],
                 stats: Sequence, *args, ranks: Ranks | None = None,
                 **options) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(new weight, keep mask) of `method(weights[i], stats[i], *args, **options)` for every
    layer i. In a single process that is all it does. Under a process group each rank solves
    only the layers it owns (`assign_owners`), then each result is broadcast from its owner, so
    every rank returns every layer's result. `weights[i]` (layer i's dense fp32 weight) also
    gives the shape and device of what is received."""
    ranks = ranks or current()
    if not ranks.active:
        return [method(w, st, *args, **options) for w, st in zip(weights, stats)]
    owners = assign_owners([solve_cost(w) for w in weights], ranks.world)
    mine = {i: method(weights[i], stats[i], *args, **options)
            for i, owner in enumerate(owners) if owner == ranks.rank}
    results = []
    for i, (weight, owner) in enumerate(zip(weights, owners)):
        device = _collective_device(weight.device)
        if owner == ranks.rank:
            new_weight, keep = mine[i]
            sent_weight = new_weight.to(device, torch.float32).contiguous()
            sent_keep = keep.to(device, torch.uint8).contiguous()  # gloo has no bool collectives
        else:
            sent_weight = torch.empty(weight.shape, dtype=torch.float32, device=device)
            sent_keep = torch.empty(weight.shape, dtype=torch.uint8, device=device)
        dist.broadcast(sent_weight, src=owner)
        dist.broadcast(sent_keep, src=owner)
        if owner == ranks.rank:
            results.append((new_weight, keep))
        else:
            results.append((sent_weight.to(weight.device), sent_keep.to(weight.device, torch.bool)))
    return results


def broadcast_weights(tensors: Sequence[torch.Tensor], src: int = 0, ranks: Ranks | None = None) -> None:
    """Overwrite `tensors` on every rank with rank `src`'s values, in place (for choices that
    every rank computes itself but must agree on bit for bit, such as channel/head masks)."""
    ranks = ranks or current()
    if not ranks.active:
        return
    for tensor in tensors:
        device = _collective_device(tensor.device)
        sent = tensor.to(device, torch.uint8 if tensor.dtype == torch.bool else tensor.dtype).contiguous()
        dist.broadcast(sent, src=src)
        tensor.copy_(sent.to(tensor.device, tensor.dtype))
