"""A corpus job on a CPU against the bound of a perfect overlap (issue 31), before and after, in one run.

On a CPU decoding competes with the engine for the same cores, so with

    m  the model's seconds per image (``embed`` on the job's own batches as float32 tensors, the engine on its
       threads: every core),
    d  decode + EXIF + resize + normalise seconds per image on one core (the one preprocessing path, one thread),
    c  the cores this process may use,

a job that overlaps perfectly embeds 1 / (m + d/c) images/s: the model-only rate times m / (m + d/c). This script
measures m, d and c, then the corpus job end to end (``embed_corpus``, i.e. ``dtop-export embed MODEL SOURCE -o
DIR``) with this tree's code and with an earlier revision's (``--before-rev``, installed from ``git archive`` into the
work folder), each job in a fresh subprocess; everything interleaved over ``--repeats`` rounds, medians reported,
the load average recorded around every measurement. Engines: ONNX Runtime on the exported file, and whatever
``--precision auto`` picks for the checkpoint on this CPU (``dtop-export bench --recommend`` is run first if it has
not been).

    python benchmarks/cpu_feed.py --preset small --size 384 --batch 8 --images 240 --threads 2 --repeats 3 \\
        --before-rev e02e813 --workdir /tmp/cpu-feed --json benchmarks/results/cpu-epyc/cpu_feed.json

``--dry-run`` runs every stage once on a few images (a check of the script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
REPO = Path(__file__).resolve().parents[1]

# The job, run in a subprocess with the tree under test first on sys.path (and the editable install's finder of this
# tree removed, which would otherwise win); prints where dtop_export came from and the summary, as JSON.
JOB = """
import json, sys
code = sys.argv[2]
if code:
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
    sys.path.insert(0, code)
from pathlib import Path
import dtop_export
from dtop_export.corpus.embed import CorpusJob, embed_corpus
kw = json.loads(sys.argv[1])
kw["output"] = Path(kw["output"])
s = embed_corpus(CorpusJob(**kw))
print(json.dumps({"code": str(Path(dtop_export.__file__).parent), **s.to_dict()}))
"""


def install_revision(rev: str, work: Path) -> Path:
    """``dtop_export`` of git revision ``rev`` installed (no dependencies) into ``work/before-REV``; its path."""
    target = work / f"before-{rev}"
    if (target / "dtop_export").is_dir():
        return target
    src = work / f"src-{rev}"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    wheels = work / f"wheel-{rev}"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), *map(str, wheels.glob("*.whl"))], check=True)
    return target


class Foreign:
    """Cores the other processes of the machine used while the block ran (``/proc/stat``'s busy time less this
    process's and its finished children's): the shared machine's noise, recorded next to each measurement."""

    def __enter__(self) -> Foreign:
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self.t0
        self.cores = max(0.0, (_busy_s() - self.busy0 - (_own_s() - self.own0)) / wall) if wall > 0 else 0.0


def wait_quiet(threshold: float, max_wait: float) -> float:
    """Wait until the other processes use less than ``threshold`` cores over two 2-second samples in a row (this
    process idle meanwhile), at most ``max_wait`` seconds; returns the seconds waited."""
    t0, calm = time.perf_counter(), 0
    while calm < 2 and time.perf_counter() - t0 < max_wait:
        with Foreign() as fg:
            time.sleep(2.0)
        calm = calm + 1 if fg.cores < threshold else 0
    return time.perf_counter() - t0


def _busy_s() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_s() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def run_job(code: Path | None, kw: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """One corpus job in a fresh process; ``code``: a folder holding another ``dtop_export`` to run (None: this
    tree). Raises RuntimeError with the job's stderr if it fails."""
    import shutil

    shutil.rmtree(kw["output"], ignore_errors=True)
    cmd = [sys.executable, "-c", JOB, json.dumps(kw), str(code) if code is not None else ""]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"corpus job failed: {r.stderr.strip()[-2000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if code is not None and not out["code"].startswith(str(Path(code).resolve())):
        raise RuntimeError(f"the job ran {out['code']}, not the code in {code}")
    return out


def job_batches(paths: list[Path], cfg: Any, size: int, batch: int) -> tuple[list[Any], float]:
    """The job's batches, float32 (shape-grouped as the job groups them; decoded here once), and d: seconds per
    image of decoding + preprocessing (:func:`~dtop_export.preprocess.prepare`) on this thread alone."""
    from dtop_export.corpus.feed import decode_item
    from dtop_export.corpus.schedule import Batcher, plan, predicted_shapes
    from dtop_export.preprocess import normalize_pixels

    t0 = time.perf_counter()
    rows = [decode_item(str(p), cfg.to_dict(), size, (1.0,), None)[0] for p in paths]
    _ = [normalize_pixels(r, cfg.mean, cfg.std) for r in rows]  # = prepare(load_image(p)): the float32 input
    d = (time.perf_counter() - t0) / len(paths)

    class Item:
        def __init__(self, key: int) -> None:
            self.key = key

    shapes = [predicted_shapes(str(p), cfg, size, (1.0,)) for p in paths]
    order = plan([Item(i) for i in range(len(paths))], shapes)  # type: ignore[arg-type]
    batcher, out = Batcher(batch), []
    for item, _ in order:
        out += [b.pixels for b in batcher.add(item.key, 0, rows[item.key])]
    out += [b.pixels for b in batcher.flush()]
    return [normalize_pixels(b, cfg.mean, cfg.std) for b in out], d


def model_seconds(engine: Any, batches: list[Any]) -> float:
    """m: seconds per image of ``engine`` over ``batches`` (one untimed pass first)."""
    n = sum(len(b) for b in batches)
    for b in batches[:3]:
        engine.embed(b)
    t0 = time.perf_counter()
    for b in batches:
        engine.embed(b)
    return (time.perf_counter() - t0) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--threads", type=int, default=None, help="Engine threads (default: the cores).")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--engines",
        default="ort,auto",
        help="ort (the exported .onnx), ort-nospin (its threads sleep when idle), auto (--precision auto)",
    )
    ap.add_argument("--before-rev", default=None, help="Also run the job with this git revision's code.")
    ap.add_argument("--aspects", default="varied", help="'varied' crops, or width:height pairs: 4:3,3:4,3:2")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument(
        "--quiet-cores",
        type=float,
        default=0.0,
        help="Start each round once other processes use fewer cores than this (0: do not wait).",
    )
    ap.add_argument("--max-wait", type=float, default=900.0, help="Longest wait for a quiet machine, seconds.")
    ap.add_argument("--dry-run", action="store_true", help="Every stage once on 16 images: a check of the script.")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from cpp_client import write_photos

    from dtop_export.bench.harness import machine_info
    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.corpus.pool import default_workers
    from dtop_export.corpus.runtime import open_model
    from dtop_export.export import export_onnx

    if args.dry_run:
        args.images, args.repeats = 16, 1
    c = default_workers()
    threads = args.threads or c
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dtop-cpu-feed-"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.preset}.pt"
    if not ckpt.exists():
        random_checkpoint(args.preset, ckpt, seed=0, source="bench")
    onnx = work / f"{args.preset}.onnx"
    if not onnx.exists():
        export_onnx(ckpt, onnx)
    photos = work / f"photos-{args.images}-{args.aspects}"
    if not photos.exists():
        ratios = (
            None if args.aspects == "varied" else [tuple(int(v) for v in a.split(":")) for a in args.aspects.split(",")]
        )
        write_photos(photos, args.images, ratios)  # type: ignore[arg-type]
    paths = sorted(photos.glob("*.jpg"))
    engines = {"ort": (str(onnx), None), "ort-nospin": (f"{onnx}:spin=false", None), "auto": (str(ckpt), "auto")}
    wanted = [e.strip() for e in args.engines.split(",") if e.strip()]
    if "auto" in wanted:
        from dtop_export.bench.recommend import resolve_auto
        from dtop_export.errors import DToPError

        try:
            resolve_auto(ckpt)
        except DToPError:  # not measured on this CPU yet: let bench --recommend choose (minutes)
            sizes = str(args.size)
            cmd = [sys.executable, "-m", "dtop_export", "bench", "--recommend", str(ckpt), "--sizes", sizes, "--runs",
                   "1" if args.dry_run else "3", "--threads", str(threads), "--no-progress"]  # fmt: skip
            subprocess.run(cmd, check=True)
        engines["auto"] = (str(ckpt), "auto")
    before = install_revision(args.before_rev, work) if args.before_rev else None
    codes = {"after": None, **({"before": before} if before else {})}
    rounds: list[dict[str, Any]] = []
    resolved: dict[str, Any] = {}
    for rep in range(args.repeats):
        for name in wanted:
            model, precision = engines[name]
            waited = wait_quiet(args.quiet_cores, args.max_wait) if args.quiet_cores else 0.0
            row: dict[str, Any] = {"round": rep, "engine": name, "waited_s": waited}
            row["load"] = {"before": os.getloadavg()}
            with Foreign() as fg, open_model(model, threads, precision) as engine:
                resolved[name] = engine.describe()
                batches, d = job_batches(paths, engine.preprocess, args.size, args.batch)
                m_first = model_seconds(engine, batches)
            row["foreign_cores"] = {"m, d": fg.cores}
            for label, code in codes.items():
                kw = {"model": model, "source": str(photos), "output": str(work / f"out-{label}"),
                      "batch_size": args.batch, "image_size": args.size, "threads": threads, "precision": precision,
                      "progress": False}  # fmt: skip
                with Foreign() as fg:
                    s = run_job(code, kw)
                row["foreign_cores"][label] = fg.cores
                row[label] = {k: s.get(k) for k in ("images_per_s", "steady_images_per_s", "first_result_s", "wall_s",
                                                    "startup", "feed", "code")}  # fmt: skip
            with Foreign() as fg, open_model(model, threads, precision) as engine:
                m_last = model_seconds(engine, batches)  # m again after the jobs: the bound brackets them
            row["foreign_cores"]["m again"] = fg.cores
            m = (m_first + m_last) / 2
            row |= {"m_s": m, "m_first_s": m_first, "m_last_s": m_last, "d_s": d, "c": c,
                    "bound_images_per_s": 1 / (m + d / c), "model_images_per_s": 1 / m}  # fmt: skip
            for label in codes:
                row[label]["of_bound"] = row[label]["steady_images_per_s"] / row["bound_images_per_s"]
            row["load"]["after"] = os.getloadavg()
            rounds.append(row)
            line = ", ".join(f"{lb} {row[lb]['steady_images_per_s']:.2f} = {row[lb]['of_bound']:.2f} of the bound "
                             f"({row[lb]['images_per_s']:.2f} end to end)" for lb in codes)  # fmt: skip
            foreign = max(row["foreign_cores"].values())
            print(f"[{rep + 1}/{args.repeats}] {name}: m {m * 1e3:.1f} ms ({m_first * 1e3:.1f}/{m_last * 1e3:.1f}), "
                  f"d {d * 1e3:.1f} ms, c {c}, bound {row['bound_images_per_s']:.2f} img/s; job after start-up: "
                  f"{line}; other processes used up to {foreign:.2f} cores", flush=True)  # fmt: skip
    summary = {}
    for name in wanted:
        rs = [r for r in rounds if r["engine"] == name]
        keys = ("m_s", "d_s", "bound_images_per_s", "model_images_per_s")
        med = {k: statistics.median(r[k] for r in rs) for k in keys}
        med["foreign_cores_max"] = max(max(r["foreign_cores"].values()) for r in rs)
        for label in codes:
            for k in ("images_per_s", "steady_images_per_s"):
                med[f"{label}_{k}"] = statistics.median(r[label][k] for r in rs)
            med[f"{label}_of_bound"] = statistics.median(r[label]["of_bound"] for r in rs)  # per-round ratios
        summary[name] = {"engine": resolved.get(name), **med}
    report = {
        "machine": machine_info(),
        "preset": args.preset, "size": args.size, "batch": args.batch, "images": len(paths), "aspects": args.aspects,
        "threads": threads, "cores": c, "repeats": args.repeats, "before_rev": args.before_rev,
        "dry_run": args.dry_run, "summary": summary, "rounds": rounds, "command": " ".join(sys.argv),
    }  # fmt: skip
    print(f"\n{args.preset}, {len(paths)} JPEGs of 1024 px -> {args.size} px, batch {args.batch}, {threads} threads, "
          f"{c} cores; medians of {args.repeats} (job rates after start-up; end to end in brackets):")  # fmt: skip
    print(f"{'engine':<8} {'m ms':>7} {'d ms':>7} {'model':>8} {'bound':>8} " + " ".join(f"{lb:>22}" for lb in codes))
    for name, r in summary.items():
        cells = " ".join(
            f"{r[f'{lb}_steady_images_per_s']:7.2f} ({r[f'{lb}_of_bound']:.2f}) [{r[f'{lb}_images_per_s']:5.2f}]"
            for lb in codes
        )
        print(f"{name:<8} {r['m_s'] * 1e3:7.1f} {r['d_s'] * 1e3:7.1f} {r['model_images_per_s']:8.2f} "
              f"{r['bound_images_per_s']:8.2f} {cells}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
