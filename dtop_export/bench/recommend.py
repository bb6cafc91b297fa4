"""``bench --recommend``: the fastest deployable CPU path that meets its contract *on this machine*, and
``--precision auto``, which runs it.

From a checkpoint, the candidates a deployer has: PyTorch eager fp32 (the reference), the ONNX export in ONNX
Runtime and in OpenVINO, and — only where the CPU has the instructions for them — PyTorch's bf16 deployment path
and an OpenVINO bf16 hint (AVX512-BF16 or AMX-BF16; even then bf16 may be slower than fp32, e.g. 0.7x on an
Intel Xeon without AMX, which is why it is measured), an OpenVINO f16 hint (AVX512-FP16 or AMX-FP16; the FP32
islands of the FP16 ONNX kept FP32), and the static INT8 (QDQ) file in ONNX Runtime and OpenVINO (VNNI or
AMX-INT8). All are timed side by side (interleaved, same threads; the bench
harness) and checked against the fp32 reference on the embedded set (the parity contracts); :func:`pick` takes
the fastest that passes, and never one slower than the reference; one less exact than fp32 (bf16, fp16, int8) only
when it is :data:`LOSSY_MARGIN` times as fast as the reference and as the fastest fp32 candidate (the timings are
medians of a few runs on a possibly busy machine: their spread is stored with each row). The choice is stored per
checkpoint (sha256) and CPU (name + features) under ``~/.cache/dtop-export/recommend/``, the files it measured
next to it (one folder per checkpoint and CPU, :func:`models_dir`); ``--precision auto`` reads it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from dtop_export.bench.spec import EngineSpec

FORMAT = "dtop-export/recommendation"
# How much faster than the reference, and than the fastest exact (fp32) candidate that qualified, a candidate less
# exact than fp32 (bf16, fp16, int8) must measure to be chosen: a median of a few runs at batch 1 on a shared machine
# moves by a few percent, and a lossy path is not worth a gain the noise can make.
LOSSY_MARGIN = 1.05


@dataclass
class Measured:
    """One candidate as measured: speed-up over PyTorch eager fp32 (same run) and its parity contract."""

    label: str
    path: str
    options: dict[str, Any]
    precision: str
    speedup: float
    cosine_min: float = 1.0
    map_delta_max: float = 0.0
    passed: bool = True
    reference: bool = False
    # latency at the recommendation's size, batch 1 (ms): the spread of the timed runs behind ``speedup``
    p10_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None

    @property
    def exact(self) -> bool:
        """Held to the fp32 contract (the reference, an fp32 export): no margin needed to be chosen."""
        return self.precision == "fp32"


@dataclass
class Recommendation:
    """The measured candidates, the skipped ones (with why) and the choice."""

    cpu: str
    features: list[str]
    threads: int
    size: int
    rows: list[Measured]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    choice: Measured | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        return d


def qualifies(row: Measured, ref: Measured) -> bool:
    """A candidate may be chosen: it passed its contract and did not measure slower than the reference; one less
    exact than fp32 measured at least :data:`LOSSY_MARGIN` times as fast."""
    return row.passed and row.speedup >= ref.speedup * (1.0 if row.exact else LOSSY_MARGIN)


def fastest(ok: Sequence[Measured]) -> Measured:
    """The fastest of rows that :func:`qualifies`: the fastest exact one (the reference on a tie), unless a less
    exact one is at least :data:`LOSSY_MARGIN` times as fast as it."""
    exact = [r for r in ok if r.exact]
    best = max(exact, key=lambda r: (r.speedup, r.reference)) if exact else None
    lossy = [r for r in ok if not r.exact and (best is None or r.speedup >= best.speedup * LOSSY_MARGIN)]
    if lossy:
        return max(lossy, key=lambda r: r.speedup)
    if best is None:
        raise ValueError("no row qualifies")
    return best


def pick(rows: Sequence[Measured]) -> Measured:
    """The :func:`fastest` row that :func:`qualifies` (the reference always does)."""
    ref = next((r for r in rows if r.reference), None)
    if ref is None:
        raise ValueError("no reference row")
    return fastest([r for r in rows if qualifies(r, ref)])


def native_bf16(features: Sequence[str]) -> bool:
    """The CPU has bf16 instructions (AVX512-BF16 or AMX-BF16): a bf16 path is worth timing, not assumed fast."""
    return "AMX-BF16" in features or "AVX512-BF16" in features


def native_fp16(features: Sequence[str]) -> bool:
    """The CPU has FP16 arithmetic (AVX512-FP16 or AMX-FP16): OpenVINO runs an f16 hint in FP16 (elsewhere in f32)."""
    return "AMX-FP16" in features or "AVX512-FP16" in features


def plan_candidates(features: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(``derive_specs`` kinds to build, [(candidate, why it is skipped)]) for a CPU with ``features``."""
    kinds, skipped = ["onnx"], []
    if native_bf16(features):
        # Native bf16 is no promise of speed (an Intel Xeon with AVX512-BF16 and no AMX ran it at 0.69-0.76x fp32,
        # a Zen 4 EPYC at 1.8-2.0x): measured, and kept only if it is faster here.
        kinds.append("bf16")
    else:
        reason = "no AVX512-BF16 / AMX-BF16: bf16 would be emulated, slower than fp32"
        skipped += [("pytorch bf16", reason), ("openvino bf16", reason)]
    if not native_fp16(features):
        skipped.append(("openvino fp16", "no AVX512-FP16 / AMX-FP16: OpenVINO would run the f16 hint in f32"))
    if "VNNI" in features or "AMX-INT8" in features:
        kinds.append("int8")
    else:
        skipped += [("int8 (onnxruntime, openvino)", "no VNNI / AMX-INT8: int8 matmuls have no fast path")]
    return kinds, skipped


def candidate_specs(checkpoint: Path, built: Sequence[EngineSpec], features: Sequence[str]) -> list[EngineSpec]:
    """The reference, the built files, and each ONNX file again in OpenVINO (with a bf16 hint on native bf16, an
    f16 hint on native FP16)."""
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.contract import read_metadata

    specs = [EngineSpec(checkpoint, label="pytorch fp32 (reference)")]
    for s in built:
        if s.kind == "onnx":
            int8 = read_metadata(s.path).get("dtop.precision") == "int8"  # what the file is, whatever its name
            specs.append(EngineSpec(s.path, dict(s.options), label=f"onnxruntime {'int8' if int8 else 'fp32'}"))
            specs.append(EngineSpec(s.path, {"runtime": "openvino"}, label=f"openvino {'int8' if int8 else 'fp32'}"))
            if not int8 and native_bf16(features):
                specs.append(EngineSpec(s.path, {"runtime": "openvino", "precision": "bf16"}, label="openvino bf16"))
            if not int8 and native_fp16(features):
                specs.append(EngineSpec(s.path, {"runtime": "openvino", "precision": "fp16"}, label="openvino fp16"))
        else:
            specs.append(EngineSpec(s.path, dict(s.options), label=f"pytorch {s.options.get('precision', 'fp32')}"))
    return specs


def measure(
    checkpoint: Path,
    workdir: Path,
    size: int = 512,
    threads: int | None = None,
    runs: int = 3,
    image_size: int | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> Recommendation:
    """Build, time (at ``size``², batch 1) and check every candidate for ``checkpoint``; returns the
    recommendation (not yet stored). ``image_size`` is the parity check's (default: the embedded set's)."""
    import numpy as np

    from dtop_export.bench.harness import cpu_features, machine_info, run_bench
    from dtop_export.engines import load_engine
    from dtop_export.parity import parity
    from dtop_export.pipeline.artefacts import derive_specs
    from dtop_export.retrieval.datasets import resolve_dataset

    say = on_stage or (lambda _s: None)
    features = cpu_features()
    kinds, skipped = plan_candidates(features)
    refused: list[tuple[str, str]] = []
    built = derive_specs(checkpoint, kinds, workdir, on_stage=say, refused=refused)
    skipped += [("int8 (onnxruntime, openvino)", why) for _kind, why in refused]
    specs = candidate_specs(checkpoint, built, features)
    from dtop_export.host import usable_cpus

    n = threads or usable_cpus()
    say(f"timing {len(specs)} candidates at {size}x{size}")
    report = run_bench(specs, [size], [1], runs=runs, warmup=1, threads=n, count_flops=False)
    say("checking each against the fp32 reference on the embedded set")
    engines = [load_engine(s.path, **{**s.options, "threads": n}) for s in specs]
    try:
        par = parity(engines[0], engines[1:], resolve_dataset("sample", None), progress=False, image_size=image_size)
    finally:
        for e in engines:
            e.close()
    rows = []
    for i, (spec, res) in enumerate(zip(specs, report.engines)):
        t = res.timing(size, 1)
        speed = float(t.speedup) if t is not None and t.speedup is not None else 0.0
        row = Measured(spec.label or res.label, str(spec.path.resolve()), dict(spec.options), res.precision, speed)
        if t is not None:
            row.p10_ms, row.p50_ms, row.p90_ms = (
                round(float(np.percentile(t.times_s, q)) * 1e3, 3) for q in (10, 50, 90)
            )
        if i == 0:
            row.reference = True
        else:
            p = par.engines[i - 1]
            row.cosine_min = float(p.cosine_min)
            row.map_delta_max = max((abs(v) for v in p.map_delta.values() if v == v), default=0.0)  # NaN: no positives
            row.passed = p.passed
        rows.append(row)
    info = machine_info()
    rec = Recommendation(info["cpu"], features, n, size, rows, skipped)
    rec.choice = pick(rows)
    return rec


def models_dir(checkpoint: Path, cpu: str, features: Sequence[str]) -> Path:
    """Where :func:`recommend` keeps the files it measured for ``checkpoint`` on this CPU (``--precision auto`` runs
    them): ``recommend/<sha256 of the checkpoint>/<hash of the CPU signature>/``, next to the stored choice."""
    import hashlib

    sig = hashlib.sha256(cpu_signature(cpu, features).encode()).hexdigest()[:16]
    return store_path(checkpoint).with_suffix("") / sig


def recommend(
    checkpoint: Path,
    size: int = 512,
    threads: int | None = None,
    runs: int = 3,
    workdir: Path | None = None,
    on_stage: Callable[[str], None] | None = None,
) -> tuple[Recommendation, Path]:
    """:func:`measure` and :func:`save`: returns the recommendation and the file it is stored in.

    The checkpoint is read first (a bad file is refused before any folder exists). The candidates are built in
    ``workdir``, by default in :func:`models_dir`, next to the stored choice (a temporary folder would vanish
    under ``--precision auto``): built beside it and swapped in once measured, so a failed or interrupted run
    leaves the earlier files and choice as they were, and nothing of its own. Two runs for the same checkpoint
    and CPU at once: the second is refused."""
    import shutil
    import tempfile

    from dtop_export.bench.harness import cpu_features, machine_info
    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.corpus.lock import folder_lock

    load_checkpoint(checkpoint)
    if workdir is not None:
        made = not workdir.exists()
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            rec = measure(checkpoint, workdir, size, threads, runs, on_stage=on_stage)
        except BaseException:
            if made:
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        return rec, save(checkpoint, rec)
    final = models_dir(checkpoint, machine_info()["cpu"], cpu_features())
    final.parent.mkdir(parents=True, exist_ok=True)
    with folder_lock(final.parent, "bench --recommend of this checkpoint"):
        build = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            rec = measure(checkpoint, build, size, threads, runs, on_stage=on_stage)
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if final.exists():
                final.rename(old)
            build.rename(final)
            for row in rec.rows:
                row.path = row.path.replace(str(build.resolve()), str(final.resolve()))
            stored = save(checkpoint, rec)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(build, ignore_errors=True)  # gone after the rename; left by a failure: removed
    return rec, stored


def cpu_signature(cpu: str, features: Sequence[str]) -> str:
    """The key a recommendation is stored under: CPU name and speed features (same model of CPU, same choice)."""
    return f"{cpu} [{', '.join(features)}]"


def store_path(checkpoint: Path) -> Path:
    """``$XDG_CACHE_HOME/dtop-export/recommend/<sha256 of the checkpoint>.json``."""
    from dtop_export.corpus.shards import file_sha256

    h = file_sha256(checkpoint)  # streamed: a full checkpoint is ~0.5 GB
    from dtop_export.host import cache_dir

    return cache_dir("recommend", f"{h}.json")


def save(checkpoint: Path, rec: Recommendation) -> Path:
    """Store ``rec`` for ``checkpoint`` on this CPU (other CPUs' entries are kept); returns the file."""
    from dtop_export.atomic import atomic_write_text

    path = store_path(checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = _read(path)
    entries[cpu_signature(rec.cpu, rec.features)] = rec.to_dict()
    atomic_write_text(path, json.dumps(entries, indent=2) + "\n")
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def recommended(checkpoint: Path, runtime: str | None = None) -> dict[str, Any]:
    """The row ``bench --recommend`` chose for ``checkpoint`` on this CPU (a :class:`Measured` as a dict), or a
    :class:`DToPError` saying how to measure it. ``runtime`` (e.g. ``openvino``, what the C++ client runs) limits
    the choice to the candidates of that runtime, by the same rule as :func:`pick`: the fastest that met its
    contract, and none that measured slower than the fp32 reference."""
    from dtop_export.bench.harness import cpu_features, machine_info

    if checkpoint.suffix.lower() not in (".pt", ".pth", ".ckpt"):
        raise DToPError(f"--precision auto starts from the checkpoint (.pt) that was measured, not {checkpoint.name}")
    if not checkpoint.is_file():
        raise DToPError(f"checkpoint {checkpoint} not found")
    sig = cpu_signature(machine_info()["cpu"], cpu_features())
    entry = _read(store_path(checkpoint)).get(sig)
    if not entry or not entry.get("choice"):
        raise DToPError(
            f"no recommendation for {checkpoint.name} on this CPU ({sig}): run `dtop-export bench --recommend "
            f"{checkpoint}` first (it builds, times and checks every candidate)"
        )
    choice = entry["choice"]
    if runtime is not None:
        rows = [Measured(**r) for r in entry.get("rows", [])]
        ref = next((r for r in rows if r.reference), None)
        ok = [r for r in rows if ref is not None and r.options.get("runtime") == runtime and qualifies(r, ref)]
        if not ok:
            raise DToPError(
                f"no {runtime} candidate for {checkpoint.name} met its contract and beat PyTorch fp32 on this CPU "
                f"(the recommendation here is {choice['label']}): deploy that, or export the fp32 file"
            )
        choice = asdict(fastest(ok))
    if not Path(choice["path"]).is_file():
        raise DToPError(
            f"the recommended file {choice['path']} is gone: run `dtop-export bench --recommend {checkpoint}` again"
        )
    return choice


def resolve_auto(checkpoint: Path) -> tuple[Path, dict[str, Any]]:
    """(file, engine options) of the path ``bench --recommend`` chose for ``checkpoint`` on this CPU."""
    choice = recommended(checkpoint)
    return Path(choice["path"]), dict(choice["options"])
