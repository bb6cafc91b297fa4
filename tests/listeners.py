"""Which TCP ports a process tree listens on, by process name (psutil): the security tests of local Ray clusters."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Listener:
    pid: int
    name: str
    ip: str
    port: int

    @property
    def loopback(self) -> bool:
        ip = ipaddress.ip_address(self.ip)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.is_loopback


def listeners(root: int) -> list[Listener]:
    """Listening TCP sockets of process ``root`` and all its descendants."""
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            name = p.name()
            conns = p.net_connections("inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out += [Listener(p.pid, name, c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


# The Ray processes that listened on all interfaces (or on the machine's address) in a local cluster started with
# ray.init(_node_ip_address="127.0.0.1") on Ray 2.60 (measured): the ones the cluster helper closes.
RAY_PROCESSES = ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
