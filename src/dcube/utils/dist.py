"""Several processes (GPUs, nodes) through Hugging Face Accelerate; a no-op in one process.

A run started by ``accelerate launch`` or ``torchrun`` has WORLD_SIZE > 1 in its environment;
:func:`state` then builds Accelerate's :class:`~accelerate.PartialState`, which reads the
launcher's variables (torchrun, accelerate, SLURM/MPI), initialises ``torch.distributed``
(NCCL on GPUs, gloo on CPUs) and picks this process's device. Without a launcher nothing of it
is created and every function below returns at once (rank 0 of 1), so a single-process run
computes exactly what it computed before this module existed.

How the stages use it (the same code runs on every rank):

* data: a batch (or a split) is dealt out rank-strided, :func:`shard_indices`; every rank
  draws the same seeded batch order, noise and timesteps for the whole batch and keeps its rows,
  so the step counter and the batch order do not depend on the number of processes and a
  checkpoint written by N processes resumes with M;
* gradients: :func:`sync_gradients`, one flat all-reduce per optimiser step (see its docstring
  for why not DistributedDataParallel);
* results: :func:`gather_ordered` puts per-rank rows back in the original order, padding
  dropped, so features, predictions and metrics equal the single-process ones;
* files: :func:`dcube.utils.io.atomic_write` writes on rank 0 only, between two barriers.
"""

from __future__ import annotations

import os

import torch

_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """True when a launcher started several processes (the environment says so)."""
    return any(int(os.environ.get(v, "1") or 1) > 1 for v in _WORLD_VARS)


def state(cpu: bool | None = None):
    """Accelerate's process state (initialises torch.distributed once), or None in one process.

    `cpu`: use gloo and the CPU even when CUDA is present; only the first call decides
    (default: CPU when no CUDA device is visible)."""
    if not launched():
        return None
    from accelerate import PartialState

    if cpu is None:
        cpu = not torch.cuda.is_available()
    return PartialState(cpu=cpu)


def rank() -> int:
    s = state()
    return s.process_index if s is not None else 0


def world_size() -> int:
    s = state()
    return s.num_processes if s is not None else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    s = state()
    if s is not None:
        s.wait_for_everyone()


def local_device(device: torch.device) -> torch.device:
    """This process's device: with several processes on GPUs, ``cuda:<local rank>``."""
    device = torch.device(device)
    if device.type != "cuda" or not launched():
        return device
    return state(cpu=False).device


def shard_indices(n: int, block: int = 1, rank_: int | None = None, world: int | None = None) -> torch.Tensor:
    """This rank's rows of ``range(n)``: blocks of `block` consecutive rows dealt out in turn
    (block ``b`` goes to rank ``b % world``), like torch's DistributedSampler without shuffling
    but never padded, so no row is counted twice; :func:`gather_ordered` undoes it.

    ``block=1`` strides single rows (a batch dealt to the ranks); ``block=batch_size`` hands out
    whole batches, so every batch is computed exactly as in one process."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    i = torch.arange(n)
    return i if world == 1 else i[(i // block) % world == rank_]


def gather_ordered(tensor: torch.Tensor, n_total: int, block: int = 1) -> torch.Tensor:
    """Every rank's rows ``shard_indices(n_total, block)`` -> all `n_total` rows, original order.

    Each rank's rows are padded to the longest shard (``accelerate.utils.pad_across_processes``),
    all-gathered (``accelerate.utils.gather``, on this rank's device), and row i is picked from
    its owner; the padding is never picked. Identity in one process."""
    world = world_size()
    if world == 1:
        return tensor
    from accelerate.utils import gather, pad_across_processes

    mine = len(shard_indices(n_total, block))
    if len(tensor) != mine:
        raise ValueError(f"gather_ordered: this rank holds {len(tensor)} rows, its shard of {n_total} has {mine}")
    home = tensor.device
    x = gather(pad_across_processes(tensor.to(state().device).contiguous(), dim=0))  # rank 0's rows, rank 1's, ...
    m = x.shape[0] // world
    i = torch.arange(n_total)
    b = i // block
    where = (b % world) * m + (b // world) * block + i % block  # owner's offset + position in its shard
    return x[where.to(x.device)].to(home)


def gather_objects(items: list) -> list:
    """The lists of (picklable) `items` of all ranks, concatenated in rank order; identity in one process."""
    if world_size() == 1:
        return list(items)
    from accelerate.utils import gather_object

    return gather_object(list(items))


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum of a (small) tensor over all ranks; identity in one process."""
    if world_size() == 1:
        return values
    from accelerate.utils import reduce

    return reduce(values.to(state().device), reduction="sum").to(values.device)


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (as DistributedDataParallel does at
    construction), so replicas start identical whatever each rank's random initialisation."""
    if world_size() == 1:
        return
    from accelerate.utils import broadcast

    dev = state().device
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.copy_(broadcast(t.detach().to(dev).contiguous()).to(t.device))


def sync_gradients(module: torch.nn.Module) -> None:
    """Average the gradients (and the floating-point buffers, e.g. batch-norm running statistics)
    of `module` over all ranks with ONE flat all-reduce; nothing in one process.

    Why not DistributedDataParallel (or ``Accelerator.prepare``): the step-2 head runs twice per
    step (images and their flips) and the cycle loss runs the frozen denoiser inside the graph,
    which DDP's reducer (one forward per backward) rejects; the losses here are already weighted
    so that the *average* of the per-rank gradients is the gradient of the whole batch (uneven
    shards, micro-batches), which is explicit rather than hidden in a wrapper; and a one-process
    run does not go through any wrapper, so its numbers are bit-identical to before. The cost is
    that communication does not overlap the backward pass (one bucket per step); for the model
    sizes of dcube (1-30 M parameters) that is small next to the compute.

    A parameter without a gradient on every rank keeps ``grad = None`` (the optimiser then skips
    it, as in one process). Call after the last backward of the step, before ``optimizer.step``.
    """
    world = world_size()
    if world == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not params and not bufs:
        return
    dev = state().device
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    parts += [flags.to(dev)] + [b.reshape(-1).float() for b in bufs]
    flat = torch.cat([t.to(dev) for t in parts])
    torch.distributed.all_reduce(flat)
    flat /= world
    out = iter(torch.split(flat, [t.numel() for t in parts]))
    grads = [next(out) for _ in params]
    has_grad = next(out) > 0
    for p, g, has in zip(params, grads, has_grad.tolist()):
        p.grad = g.view_as(p).to(p.device, p.dtype) if has else None
    with torch.no_grad():
        for b in bufs:
            b.copy_(next(out).view_as(b))
