"""Load test of ``dtop-export serve`` on loopback: closed loop at fixed concurrency, open loop at fixed request rates,
a replica SIGKILLed mid-load, and ``dtop-export embed`` on the same engine as the reference throughput.

The service runs as a user starts it (a subprocess: a local Ray cluster, Serve's proxy on 127.0.0.1, the model
replicas); the clients are threads of this process sending 4:3 JPEG photos (longer side 1024, so every request has
the same input shape at ``--image-size``) as raw ``image/jpeg`` bodies over keep-alive connections; a closed-loop
client waits a 503's Retry-After before its next request, an open-loop one does not. Per point:
throughput (answers 200 per second), p50/p95/p99 latency of the 200s (open loop: from the scheduled send time, so
client queueing counts), answers by status code, forward-pass sizes (the service's ``dtop_serve_batch_size``
histogram, per forward pass), CPU and RSS of the service's process tree and this client's CPU. Bounded: every point
stops after ``--seconds`` or ``--max-requests``, whichever comes first.

    python benchmarks/serve_load.py MODEL --image-size 384 --threads 2 --max-batch-size 8 \\
        --json benchmarks/results/cpu-epyc/serve_load_small.json

The saturation rate is the best closed-loop throughput; ``--rates auto`` then offers 0.5, 0.9, 1.2 and 2x of it in
open loop (past saturation the bounded queue sheds the excess as 503 + Retry-After). The machine is shared: numbers
are medians of a loaded 2-core machine, compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).parent))
from cpp_client import write_photos  # noqa: E402 - the same photos as the C++ and corpus benchmarks

from dtop_export.serve.client import free_port, start_service, stop_service  # noqa: E402


class Connection:
    """One keep-alive HTTP connection (reconnects after an error)."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port, self.timeout, self.conn = port, timeout, None

    def post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "image/jpeg"}
                self.conn.request("POST", "/v1/embed?encoding=base64", body=body, headers=headers)
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                try:
                    return r.status, json.loads(data)
                except json.JSONDecodeError:
                    return r.status, {}
            except (OSError, http.client.HTTPException) as e:
                self.close()
                if attempt:
                    return -1, {"error": type(e).__name__}
        return -1, {}

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def batch_histogram(port: int) -> dict[str, float]:
    """The service's forward-pass size histogram: cumulative bucket counts (``le``), ``sum`` and ``count``."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    text = get(port, "/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        if family.name == "dtop_serve_batch_size":
            for s in family.samples:
                key = s.labels.get("le") or s.name.rsplit("_", 1)[-1]
                out[key] = float(s.value)
    return out


def batch_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Forward passes by size between two histograms: {"1": n, "2": n, "3-4": n, ...} and the mean size."""
    edges = sorted((float(k), k) for k in after if k not in ("sum", "count", "+Inf"))
    out, prev_le, prev_count = {}, 0.0, 0.0
    for le, key in edges:
        count = after.get(key, 0) - before.get(key, 0)
        if count - prev_count:
            lo = int(prev_le) + 1
            out[str(int(le)) if lo == int(le) else f"{lo}-{int(le)}"] = int(count - prev_count)
        prev_le, prev_count = le, count
    passes = after.get("count", 0) - before.get("count", 0)
    images = after.get("sum", 0) - before.get("sum", 0)
    return {"passes": int(passes), "by_size": out, "mean": round(images / passes, 2) if passes else None}


class Sampler(threading.Thread):
    """CPU (percent of one core, summed over the tree) and RSS of the service's processes, and this process's CPU,
    every 0.5 s."""

    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root, self.stop, self.cpu, self.rss, self.client_cpu = root, threading.Event(), [], [], []
        self.procs: dict[int, psutil.Process] = {}
        self.me = psutil.Process()

    def tree(self) -> list[psutil.Process]:
        try:
            now = [psutil.Process(self.root), *psutil.Process(self.root).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        for p in now:
            if p.pid not in self.procs:
                self.procs[p.pid] = p
                p.cpu_percent(None)
        return [self.procs[p.pid] for p in now]

    def run(self) -> None:
        self.me.cpu_percent(None)
        self.tree()
        while not self.stop.wait(0.5):
            cpu = rss = 0.0
            for p in self.tree():
                try:
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
                except psutil.Error:
                    continue
            self.cpu.append(cpu)
            self.rss.append(rss)
            self.client_cpu.append(self.me.cpu_percent(None))

    def summary(self) -> dict[str, Any]:
        self.stop.set()
        self.join()
        med = statistics.median
        return {
            "service_cpu_pct": round(med(self.cpu), 1) if self.cpu else None,
            "service_rss_mib_max": round(max(self.rss) / 2**20) if self.rss else None,
            "client_cpu_pct": round(med(self.client_cpu), 1) if self.client_cpu else None,
        }


def summarize(records: list[tuple[float, float, int, dict[str, Any]]], wall: float) -> dict[str, Any]:
    """records: (start, latency s, status, body) -> throughput, latency percentiles of the 200s, codes."""
    ok = np.array([lat for _, lat, status, _ in records if status == 200])
    codes = collections.Counter(str(status) for _, _, status, _ in records)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(ok, q)) * 1000, 1) if len(ok) else None

    return {
        "requests": len(records),
        "ok_per_s": round(len(ok) / wall, 2),
        "p50_ms": pct(50),
        "p95_ms": pct(95),
        "p99_ms": pct(99),
        "codes": dict(sorted(codes.items())),
        "wall_s": round(wall, 1),
    }


def closed_loop(
    port: int, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int, honor_retry_after: bool = True
) -> Any:
    """``concurrency`` clients, each sending its next request when the last one is answered (after a 503, when its
    Retry-After has passed)."""
    records: list[tuple[float, float, int, dict[str, Any]]] = []
    lock = threading.Lock()
    t_end = time.perf_counter() + seconds
    sent = iter(range(max_requests))

    def client(i: int) -> None:
        conn = Connection(port, 120)
        k = i
        while time.perf_counter() < t_end:
            with lock:
                if next(sent, None) is None:
                    break
            t0 = time.perf_counter()
            status, doc = conn.post(bodies[k % len(bodies)])
            with lock:
                records.append((t0, time.perf_counter() - t0, status, doc))
            k += concurrency
            if status == 503 and honor_retry_after:  # a well-behaved client waits as told (1 s) before the next
                time.sleep(1.0)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    return records, time.perf_counter() - t0


def open_loop(port: int, bodies: list[bytes], rate: float, seconds: float, max_requests: int, workers: int) -> Any:
    """Requests scheduled every 1/rate s; latency from the scheduled time (a late send counts as waiting)."""
    records: list[tuple[float, float, int, dict[str, Any]]] = []
    lock = threading.Lock()
    todo: queue.Queue[tuple[float, int] | None] = queue.Queue()
    n = min(max_requests, int(rate * seconds))
    t0 = time.perf_counter() + 0.2

    def worker() -> None:
        conn = Connection(port, 120)
        while (job := todo.get()) is not None:
            due, k = job
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            status, doc = conn.post(bodies[k % len(bodies)])
            with lock:
                records.append((due, time.perf_counter() - due, status, doc))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    [t.start() for t in threads]
    for k in range(n):
        todo.put((t0 + k / rate, k))
    for _ in threads:
        todo.put(None)
    [t.join() for t in threads]
    return records, max(time.perf_counter() - t0, n / rate)


def measure(root: int, port: int, run: Any) -> dict[str, Any]:
    """One load point: ``run()`` -> (records, wall), with the service's CPU/RSS sampled and its forward passes."""
    sampler, before = Sampler(root), batch_histogram(port)
    sampler.start()
    records, wall = run()
    return summarize(records, wall) | sampler.summary() | {"batches": batch_delta(before, batch_histogram(port))}


def replica_pid(port: int) -> int:
    status, data = get(port, "/readyz")
    if status != 200:
        raise RuntimeError(f"/readyz answered {status}")
    return int(json.loads(data)["pid"])


def kill_run(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop with the model replica SIGKILLed a third of the way in: answers by code, the time until the
    first 200 from the new replica and until /readyz says 200 again."""
    old = replica_pid(port)
    out: dict[str, Any] = {}
    result: dict[str, Any] = {}

    def load() -> None:
        result["records"], result["wall"] = closed_loop(port, bodies, concurrency, seconds, 10**6)

    t = threading.Thread(target=load)
    t.start()
    time.sleep(seconds / 3)
    killed = time.perf_counter()
    os.kill(old, signal.SIGKILL)
    ready_after = None
    while time.perf_counter() - killed < seconds:
        try:
            status, data = get(port, "/readyz")
            if status == 200 and int(json.loads(data)["pid"]) != old:
                ready_after = time.perf_counter() - killed
                break
        except OSError:
            pass
        time.sleep(0.1)
    t.join()
    records = result["records"]
    after = [r for r in records if r[0] >= killed]
    in_flight = [r for r in records if r[0] < killed <= r[0] + r[1]]
    first_new = next(
        (r[0] + r[1] - killed for r in sorted(after, key=lambda r: r[0] + r[1])
         if r[2] == 200 and str(old) not in r[3].get("timing", {}).get("replicas", [str(old)])),
        None,
    )  # fmt: skip
    out.update(summarize(records, result["wall"]))
    out["codes_in_flight_at_kill"] = dict(collections.Counter(str(r[2]) for r in in_flight))
    out["codes_sent_after_kill"] = dict(collections.Counter(str(r[2]) for r in after))
    out["longest_s"] = round(max(r[1] for r in records), 2)
    out["first_200_from_new_replica_s"] = round(first_new, 2) if first_new is not None else None
    out["readyz_200_again_s"] = round(ready_after, 2) if ready_after is not None else None
    out["concurrency"] = concurrency
    return out


def embed_reference(model: str, photos: Path, size: int, threads: int, batch: int, precision: str | None) -> Any:
    """``dtop-export embed MODEL PHOTOS -o DIR`` on the same engine, threads and batch, over half the photos and
    over all of them: its images/s after start-up, and its marginal CPU seconds and wall seconds per image (the
    difference of the two runs, start-up cancelled out). On a shared machine CPU seconds per image compare fairly;
    images/s depends on how much of the contended CPU each process gets."""
    import resource

    files = sorted(photos.glob("*.jpg"))
    runs = []
    for n in (len(files) // 2, len(files)):
        with tempfile.TemporaryDirectory() as d:
            src = Path(d) / "src"
            src.mkdir()
            for f in files[:n]:
                (src / f.name).symlink_to(f)
            cmd = [sys.executable, "-m", "dtop_export", "embed", model, str(src), "-o", f"{d}/shards",
                   "--image-size", str(size), "--threads", str(threads), "-b", str(batch), "--no-progress",
                   "--json", f"{d}/s.json"] + (["--precision", precision] if precision else [])  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            s = json.loads(Path(f"{d}/s.json").read_text())
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            runs.append({"images": n, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                         "steady_images_per_s": s.get("steady_images_per_s")})  # fmt: skip
    (a, b) = runs
    return {
        "command": " ".join(["dtop-export", *cmd[3:]]),
        "runs": runs,
        "steady_images_per_s": b["steady_images_per_s"],
        "cpu_s_per_image": round((b["cpu_s"] - a["cpu_s"]) / (b["images"] - a["images"]), 3),
        "wall_s_per_image": round((b["wall_s"] - a["wall_s"]) / (b["images"] - a["images"]), 3),
    }


def _batches(b: dict[str, Any]) -> str:
    sizes = ", ".join(f"{k}: {v}" for k, v in b["by_size"].items())
    return f"{b['mean']} ({sizes})" if b["mean"] is not None else "-"


def tables(report: dict[str, Any]) -> str:
    """The Markdown tables of a saved report (``--tables FILE.json``)."""
    head = ("| load | answers 200/s | p50 ms | p95 ms | p99 ms | answers by code | pass size: mean (passes by size) "
            "| service CPU % | service RSS MiB |\n|---|---:|---:|---:|---:|---|---|---:|---:|")  # fmt: skip
    rows = [head]
    for kind, points in (("closed", report["closed"]), ("open", report["open"])):
        for key, p in points.items():
            load = f"closed, {key} clients" if kind == "closed" else f"open, {p['offered_per_s']:g} req/s offered"
            codes = ", ".join(f"{c}: {n}" for c, n in p["codes"].items())
            rows.append(
                f"| {load} | {p['ok_per_s']:g} | {p['p50_ms']} | {p['p95_ms']} | {p['p99_ms']} | {codes} | "
                f"{_batches(p['batches'])} | {p['service_cpu_pct']} | {p['service_rss_mib_max']} |"
            )
    k, e = report["replica_killed"], report["embed"]
    rows.append("")
    ratio = report["service_vs_embed"]
    rows.append(
        f"Saturation {report['saturation_ok_per_s']:g} answers/s at {report['service_cpu_s_per_image']:g} CPU-s per "
        f"image (the service's whole process tree); `dtop-export embed` on the same engine "
        f"{e['steady_images_per_s']:g} images/s after start-up, {e['cpu_s_per_image']:g} CPU-s per image (marginal, "
        f"{e['runs'][0]['images']} vs {e['runs'][1]['images']} images): service / embed = {ratio['images_per_s']:g}x "
        f"the throughput at {ratio['cpu_s_per_image']:g}x the CPU per image. Replica SIGKILLed mid-load "
        f"({k['concurrency']} clients): in flight at the "
        f"kill {k['codes_in_flight_at_kill']}, sent after it {k['codes_sent_after_kill']}; /readyz 200 again after "
        f"{k['readyz_200_again_s']} s, first answer from the new replica after {k['first_200_from_new_replica_s']} s, "
        f"longest request {k['longest_s']} s (none hung)."
    )
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--tables":
        print(tables(json.loads(Path(sys.argv[2]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2, help="engine threads per replica (and for embed)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--rates", default="auto", help="requests/s, comma-separated, or auto (fractions of saturation)")
    ap.add_argument("--seconds", type=float, default=20.0, help="per point")
    ap.add_argument("--max-requests", type=int, default=2000, help="per point")
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--kill-seconds", type=float, default=30.0)
    ap.add_argument("--decode-threads", type=int, default=0, help="the service's --decode-threads (0: its default)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    from dtop_export.bench.harness import machine_info

    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    photos = write_photos(work / "photos", args.photos, aspects=[(4, 3)])
    bodies = [p.read_bytes() for p in photos]
    port = free_port()
    serve_args = [args.model, "--image-size", str(args.image_size), "--threads", str(args.threads),
                  "--replicas", str(args.replicas), "--max-batch-size", str(args.max_batch_size),
                  "--batch-wait-ms", str(args.batch_wait_ms), "--max-queue", str(args.max_queue),
                  "--request-timeout", "60", "--decode-threads", str(args.decode_threads)] + (
                     ["--precision", args.precision] if args.precision else [])  # fmt: skip
    report: dict[str, Any] = {
        "machine": machine_info(),  # the CPU and its features (the figures of results/cpu-epyc/ came from an EPYC)
        "command": " ".join(["dtop-export", "serve", *serve_args, "--port", str(port)]),
        "benchmark": " ".join(["python", "benchmarks/serve_load.py", *sys.argv[1:]]),
        "photos": f"{len(photos)} JPEG q90, 4:3, 1024 px longer side (one input shape at --image-size)",
        "closed": {},
        "open": {},
    }
    t0 = time.perf_counter()
    proc = start_service(serve_args, work / "serve.log", port, timeout_s=600)
    report["start_s"] = round(time.perf_counter() - t0, 1)
    try:
        report["model"] = json.loads(get(port, "/v1/model")[1])
        closed_loop(port, bodies, 2, 3.0, 20)  # warm the path (connections, threads)
        for c in (int(x) for x in args.concurrency.split(",")):
            point = measure(proc.pid, port, lambda c=c: closed_loop(port, bodies, c, args.seconds, args.max_requests))
            report["closed"][str(c)] = point
            print(f"closed c={c}: {point}", flush=True)
        saturation = max(p["ok_per_s"] for p in report["closed"].values())
        report["saturation_ok_per_s"] = saturation
        rates = ([round(f * saturation, 2) for f in (0.5, 0.9, 1.2, 2.0)] if args.rates == "auto"
                 else [float(r) for r in args.rates.split(",")])  # fmt: skip
        for rate in rates:
            point = measure(
                proc.pid, port, lambda rate=rate: open_loop(port, bodies, rate, args.seconds, args.max_requests, 96)
            )
            point["offered_per_s"] = rate
            report["open"][str(rate)] = point
            print(f"open {rate}/s: {point}", flush=True)
        report["replica_killed"] = kill_run(port, bodies, 8, args.kill_seconds)
        print(f"kill: {report['replica_killed']}", flush=True)
    finally:
        stop_service(proc)
    ref = embed_reference(args.model, work / "photos", args.image_size, args.threads, args.max_batch_size,
                          args.precision)  # fmt: skip
    report["embed"] = ref
    best = max(report["closed"].values(), key=lambda p: p["ok_per_s"])
    report["service_cpu_s_per_image"] = round(best["service_cpu_pct"] / 100 / best["ok_per_s"], 3)
    report["service_vs_embed"] = {
        "images_per_s": round(saturation / ref["steady_images_per_s"], 3) if ref["steady_images_per_s"] else None,
        "cpu_s_per_image": round(report["service_cpu_s_per_image"] / ref["cpu_s_per_image"], 3),
    }
    print(f"embed: {ref}; service / embed = {report['service_vs_embed']}", flush=True)
    shutil.rmtree(work, ignore_errors=True)  # photos and the service's log (kept when a run fails)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
