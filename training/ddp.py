"""A training run's DDP plumbing under torchrun: the process group and this process's device, gathering an object
from every process, checking that the replicas ended bit-identical, and telling a lost peer from an error of one's
own. In a single process each is a no-op (or the obvious answer)."""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dtop_export.errors import DToPError

# how long a collective waits for the other processes (seconds): they wait in one while rank 0 scans a first run's
# image headers (hours for millions of files on a network disk) and while it validates; NCCL's own default is 10 min
TIMEOUT_ENV = "DTOP_EXPORT_DDP_TIMEOUT"
DEFAULT_TIMEOUT_S = 6 * 3600


def group_timeout() -> timedelta:
    """The process group's timeout: ``$DTOP_EXPORT_DDP_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise DToPError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds > 0 (default {DEFAULT_TIMEOUT_S})")
    return timedelta(seconds=seconds)


def init_process(world: int, local_rank: int) -> torch.device:
    """Join the process group if there is one and not yet joined (NCCL on GPUs, gloo on CPU, with
    :func:`group_timeout`); this process's device: GPU ``local_rank``, or the CPU."""
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=group_timeout())
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def any_process(flag: bool, world: int, device: torch.device) -> bool:
    """Whether ``flag`` is true on any process (a collective under DDP: every process calls it); ``flag`` alone."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() > 0


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
