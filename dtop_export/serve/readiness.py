"""Readiness of the model replicas, asked of the replicas themselves rather than through Serve's request queue.

Serve counts every call through a deployment handle against the replica's ``max_ongoing_requests``, a status call
as much as an embed call, so a saturated replica took the readiness call after the embed calls queued before it:
``/readyz`` answered 503 for a busy, healthy service (a Kubernetes readiness probe would pull the pod and move its
load onto the others, which then fail theirs too). Ray Serve 2.60 has no call that bypasses that count, but every
Ray actor answers ``__ray_call__`` (Ray's developer API: run a function on the actor), a Ray actor call outside
Serve's routing and count; the engine's passes run in a thread and block no event loop. So the app keeps the
replicas it has heard from (every embed answer and status names the replica and its Ray actor) and asks them
directly: a warm replica that answers is ready however busy it is; a dead one fails the call at once (Ray: the
actor died) and is forgotten, so readiness never names a killed replica. Only when none it knows answers does it
ask through Serve (a replica it has not heard from: the first one, a replacement), as before.

Busy is not unready: overload is answered request by request (503 + Retry-After), not by readiness. ray is imported
inside the functions.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

Address = tuple[str, str]  # a replica's Ray actor: (namespace, name)
Ask = Callable[[str, Address], Awaitable[dict[str, Any] | None]]

ASK_TIMEOUT_S = 1.0  # a direct call waits for no queue: it answers in milliseconds or the replica is wedged
KEEP = 64  # replicas remembered (autoscaling adds and removes them; the dead ones are forgotten when asked)


class Replicas:
    """The model replicas the app has heard from (Serve's replica id -> its actor's address), most recent last, and
    the direct readiness question to them. ``ask`` (tests) replaces the Ray call."""

    def __init__(self, ask: Ask | None = None, timeout_s: float = ASK_TIMEOUT_S) -> None:
        self.known: OrderedDict[str, Address] = OrderedDict()
        self.handles: dict[str, Any] = {}
        self.ask = ask or self._ask_actor
        self.timeout_s = timeout_s

    def heard(self, replica: Any, address: Any) -> None:
        """``replica`` answered (an embed result or a status): remember where to ask it."""
        if not isinstance(replica, str) or not isinstance(address, (tuple, list)) or len(address) != 2:
            return  # outside Serve a replica has no actor
        self.known[replica] = (str(address[0]), str(address[1]))
        self.known.move_to_end(replica)
        while len(self.known) > KEEP:
            self.forget(next(iter(self.known)))

    def forget(self, replica: str) -> None:
        self.known.pop(replica, None)
        self.handles.pop(replica, None)

    async def ready(self, stuck_s: float = float("inf")) -> tuple[dict[str, Any] | None, str | None]:
        """The status of the most recently heard replica that answers directly, is warm and is not stuck (its
        forward pass has run over ``stuck_s``), or None and why the last stuck one is not ready. The known replicas
        are asked at once, each for at most ``timeout_s``; one that fails (dead, or no longer in its process) is
        forgotten; one that does not answer in time, or is stuck, is kept (asked again next time)."""
        replicas = list(reversed(self.known))
        answers = await asyncio.gather(
            *(asyncio.wait_for(self.ask(r, self.known[r]), self.timeout_s) for r in replicas), return_exceptions=True
        )
        ready, why = None, None
        for replica, answer in zip(replicas, answers):
            if isinstance(answer, asyncio.TimeoutError):
                continue
            if isinstance(answer, BaseException) or not isinstance(answer, dict) or answer.get("replica") != replica:
                self.forget(replica)
            elif stuck(answer, stuck_s):
                why = stuck(answer, stuck_s)
            elif ready is None and answer.get("warm"):
                ready = answer
        return ready, None if ready else why

    async def _ask_actor(self, replica: str, address: Address) -> dict[str, Any] | None:
        """:func:`dtop_export.serve.deployment.local_status` run on the replica's actor by Ray's ``__ray_call__``."""
        import ray

        from dtop_export.serve.deployment import local_status

        handle = self.handles.get(replica)
        if handle is None:  # a lookup in Ray's GCS, once per replica
            handle = await asyncio.to_thread(ray.get_actor, address[1], namespace=address[0])
            self.handles[replica] = handle
        return await handle.__ray_call__.remote(local_status, replica)


def stuck(status: dict[str, Any], stuck_s: float) -> str | None:
    """Why a replica whose forward pass has run over ``stuck_s`` (``--request-timeout``: every request waiting for
    it has timed out) is not ready (its engine may hang: readiness through Serve's queue saw it as a timeout), or
    one that is wedged (its health check fails: Serve is replacing it)."""
    if status.get("wedged"):
        return f"{status['wedged']}: Serve replaces it"
    pass_s = float(status.get("pass_s") or 0.0)
    if pass_s <= stuck_s:
        return None
    why = f"replica {status.get('replica')}'s forward pass has run {pass_s:.1f} s, over --request-timeout"
    after = status.get("replaced_after_s")
    return why if after is None else f"{why} (Serve replaces the replica if it runs {float(after):g} s)"


async def check(
    replicas: Replicas, embedder: Any, routed_timeout_s: float, stuck_s: float = float("inf")
) -> dict[str, Any]:
    """``/readyz``'s answer: ``ready`` and the replica's status with ``via`` (``direct``: a replica heard from,
    asked directly; ``serve``: asked through Serve, within ``routed_timeout_s``), or ``ready: false`` and why. A
    replica whose forward pass has run over ``stuck_s`` is not ready."""
    status, why = await replicas.ready(stuck_s)
    if status is not None:
        return {"ready": True, **status, "via": "direct"}
    try:
        status = await asyncio.wait_for(embedder.status.remote(), routed_timeout_s)
    except Exception as e:  # noqa: BLE001 - no replica answered: not ready, whatever the reason
        timeout = isinstance(e, asyncio.TimeoutError)
        return {"ready": False, "reason": why or (f"no warm replica answered within {routed_timeout_s:g} s" if timeout
                else type(e).__name__)}  # fmt: skip
    replicas.heard(status.get("replica"), status.get("actor"))
    why = stuck(status, stuck_s)
    if why:
        return {"ready": False, "reason": why, "replica": status.get("replica"), "via": "serve"}
    return {**status, "ready": bool(status.get("warm")), "via": "serve"}
