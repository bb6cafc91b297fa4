"""What this machine gives the process: the CPUs it may run on, the cache folder of what dtop-export can rebuild."""

from __future__ import annotations

import os
from pathlib import Path


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity (``taskset``, a cgroup cpuset), not the host's count. A CPU quota
    (``docker --cpus``, cgroup ``cpu.max``) keeps the affinity and is not seen here."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/dtop-export/<parts>``; ``~/.cache`` stands for ``$XDG_CACHE_HOME`` when it is unset, empty
    or relative (the XDG base directory specification ignores a relative path). Nothing is created."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = str(Path.home() / ".cache")
    return Path(base, "dtop-export", *parts)
