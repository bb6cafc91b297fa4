"""A training run's DDP plumbing under torchrun: the process group and this process's device, gathering an object
from every process, checking that the replicas ended bit-identical, and telling a lost peer from an error of one's
own. In a single process each is a no-op (or the obvious answer)."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dtop_export.errors import DToPError


def init_process(world: int, local_rank: int) -> torch.device:
    """Join the process group if there is one and not yet joined (NCCL on GPUs, gloo on CPU); this process's
    device: GPU ``local_rank``, or the CPU."""
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def gather(obj: Any, world: int) -> list[Any]:
    """``obj`` of every process, by rank (a collective under DDP: every process calls it); ``[obj]`` alone."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def check_replicas(model: nn.Module, world: int) -> dict[str, Any]:
    """Under DDP: every process's weights must be bit-identical at the end; returns their digests (recorded in
    provenance as ``ddp_rank_weight_sha256``), ``{}`` in one process. A collective."""
    if world == 1:
        return {}
    # batch-norm running stats are updated after DDP's per-forward broadcast: take rank 0's
    for b in model.buffers():
        dist.broadcast(b.data, 0)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests = gather(h.hexdigest(), world)
    if len(set(digests)) != 1:
        raise DToPError(f"DDP replicas diverged: weight digests differ across ranks {digests}")
    return {"ddp_rank_weight_sha256": digests}


def lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the group went away (it exited on its own error)."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        m in text for m in ("closed by peer", "reset by peer", "broken pipe", "communicator was aborted")
    )
