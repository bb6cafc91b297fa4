"""How would this model fare in FP16? ``dtop-export check --fp16-audit``, on the CPU.

The float32 export runs once instrumented (:func:`~dtop_export.fp16.emulate.instrument_ranges`) as the
reference, and its FP16 conversion runs emulated (:func:`~dtop_export.fp16.emulate.emulate_fp16`), both as
:class:`~dtop_export.engines.ort.OnnxRuntimeEngine` s on in-memory models. Every variant is compared with the
reference by :func:`dtop_export.parity.compare` against the FP16 row of the parity ``Contract`` table
(cosine, finiteness, |ΔmAP| when the images are a revisitop set). The tensors whose FP32 values leave FP16
range (|x| > 65504, or too many non-zero values flushed to zero) are reported, and the nodes touching them
become the list the TensorRT builder keeps in FP32 (``dtop-export trt --fp16 --keep-fp32``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.contract import OUTPUT_NAME, load_onnx, metadata_of, preprocess_from_metadata
from dtop_export.errors import DToPError
from dtop_export.fp16.convert import DEFAULT_KEEP_FP32_OPS
from dtop_export.fp16.emulate import FP16_MAX

if TYPE_CHECKING:
    import onnx

    from dtop_export.contract import Engine
    from dtop_export.parity import EngineParity
    from dtop_export.retrieval.datasets import RevisitopDataset


@dataclass
class RangeFinding:
    """A tensor whose FP32 values leave FP16 range on the audit images."""

    tensor: str
    node: str
    op: str
    max_abs: float
    flush_share: float
    reason: str


@dataclass
class Fp16AuditResult:
    """What :func:`fp16_audit` found; ``keep_fp32_nodes`` is the list for ``dtop-export trt --keep-fp32``.

    ``runs``: one :class:`~dtop_export.parity.EngineParity` per FP16 variant (its ``engine`` dict holds the
    variant's ``fp32_nodes`` count), the last one being what the builder would produce."""

    model: str
    images: int
    queries: int
    image_size: int | None
    shapes: list[str]
    watched_tensors: int
    findings: list[RangeFinding]
    keep_fp32_nodes: list[str]
    runs: list[EngineParity]
    map_fp32: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def final(self) -> EngineParity:
        """The variant the builder would produce (default islands + the audit's nodes)."""
        return self.runs[-1]

    @property
    def passed(self) -> bool:
        """The final variant meets the FP16 contract (finite, cosine, |ΔmAP|)."""
        return self.final.passed

    def to_dict(self) -> dict[str, Any]:
        from dtop_export.parity import json_safe

        d = {k: json_safe(v) for k, v in asdict(self).items() if k != "runs"}
        d["runs"] = [{**r.to_dict(), "finite": r.finite, "fp32_nodes": r.engine.get("fp32_nodes")} for r in self.runs]
        d["cosine_contract"] = self.final.contract.cosine_min
        d["map_contract"] = self.final.contract.map_delta
        d["passed"] = self.passed
        d["near_ties"] = self.final.near_ties()
        return d

    @property
    def map_evaluated(self) -> bool:
        """Whether mAP was compared at all (a revisitop set; a plain image folder has no queries)."""
        return bool(self.map_fp32)

    def table(self) -> str:
        """Markdown: one row per FP16 variant, then the out-of-range tensors."""
        from dtop_export.parity import cell

        setups = list(self.map_fp32)
        head = "| variant | FP32 nodes | cosine min | cosine mean | finite | result |"
        head += "".join(f" ΔmAP {s[0].upper()} |" for s in setups)
        lines = [head, "|---|---:|---:|---:|:---:|---|" + "---:|" * len(setups)]
        for r in self.runs:
            finite = "yes" if r.finite else "NO"
            result = r.verdict()
            row = (
                f"| {r.label} | {r.engine.get('fp32_nodes')} | {cell(r.cosine_min, '.6f')} "
                f"| {cell(r.cosine_mean, '.6f')} | {finite} | {result} |"
            )
            row += "".join(f" {cell(r.map_delta.get(s, float('nan')), '+.2f')} |" for s in setups)
            lines.append(row)
        if self.findings:
            lines += ["", "| tensor | node | op | max abs | flushed to 0 | reason |", "|---|---|---|---:|---:|---|"]
            for f in self.findings:
                lines.append(
                    f"| {f.tensor} | {f.node} | {f.op} | {f.max_abs:.4g} | {100 * f.flush_share:.2f}% | {f.reason} |"
                )
        return "\n".join(lines)


def _image_source(images: str | Path | Sequence[str | Path] | RevisitopDataset) -> tuple[Any, list[Path]]:
    """(a revisitop data set, or None with the image paths)."""
    from dtop_export.preprocess import list_images
    from dtop_export.retrieval.datasets import RevisitopDataset, resolve_dataset

    if isinstance(images, RevisitopDataset):
        return images, []
    if isinstance(images, (str, Path)):
        p = Path(images)
        if str(images) == "sample" or (p.is_dir() and any(p.glob("gnd_*.pkl"))):
            return resolve_dataset(str(images)), []
        return None, list_images(p)
    paths = [Path(q) for q in images]
    if not paths:
        raise DToPError("no audit images given")
    return None, paths


def fp16_audit(
    onnx_path: str | Path,
    images: str | Path | Sequence[str | Path] | RevisitopDataset,
    *,
    image_size: int | None = None,
    keep_fp32_ops: Sequence[str] = DEFAULT_KEEP_FP32_OPS,
    keep_fp32_nodes: Sequence[str] = (),
    underflow_threshold: float = 0.01,
    scales: Sequence[float] = (1.0,),
    crop_queries: bool = True,
    batch_size: int = 1,
    limit: int | None = None,
    progress: bool = False,
    threads: int | None = None,
) -> Fp16AuditResult:
    """Audit the float32 dtop-export ONNX ``onnx_path`` for FP16 (see the module docstring).

    ``images``: a revisitop-layout folder (``gnd_*.pkl`` + ``jpg/``: mAP is reported too), ``sample`` (the
    embedded sample set), a plain image folder or a list of paths. Two FP16 variants are compared with
    FP32: the default islands only, and the default islands plus the nodes the audit finds out of range
    (|x| > 65504, or more than ``underflow_threshold`` of the non-zero values flushed to 0) together with
    the nodes that read those tensors (so that they never pass through FP16).
    """
    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.fp16.convert import (
        convert_to_fp16,
        is_fp16_model,
        name_nodes,
        plan_fp32_islands,
        refuse_derived,
    )
    from dtop_export.fp16.emulate import emulate_fp16, instrument_ranges
    from dtop_export.parity import compare, contract_for
    from dtop_export.preprocess import input_size
    from dtop_export.retrieval.extract import extract_many
    from dtop_export.retrieval.metrics import evaluate_descriptors

    if limit is not None and limit < 1:
        raise DToPError(f"the audit's image limit must be >= 1, got {limit}")
    if not 0 <= underflow_threshold < 1:
        raise DToPError(f"the underflow share must be >= 0 and < 1 (a share of values), got {underflow_threshold:g}")
    t0 = time.perf_counter()
    onnx_path = Path(onnx_path)
    model = load_onnx(onnx_path)
    name_nodes(model)
    if is_fp16_model(model):
        raise DToPError(f"{onnx_path} is already FP16: audit the float32 export it was made from")
    refuse_derived(model, onnx_path, "audit")
    if not any(o.name == OUTPUT_NAME for o in model.graph.output):
        raise DToPError(f"{onnx_path} is not a dtop-export model: no output '{OUTPUT_NAME}'")
    pp = preprocess_from_metadata(metadata_of(model))

    dataset, paths = _image_source(images)
    if dataset is not None:
        groups = [
            ("queries", dataset.queries, dataset.bboxes if crop_queries else None),
            ("database", dataset.images, None),
        ]
        size = input_size(pp, image_size, dataset.image_size)  # a square --static export: its own size
        if crop_queries and any(b is None for b in dataset.bboxes):
            raise DToPError(f"{dataset.name}: some queries have no bounding box: pass --no-crop")
    else:
        if limit:
            paths = [paths[i] for i in np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int)]
        groups = [("images", paths, None)]
        size = input_size(pp, image_size)

    # FP32 reference with range statistics
    stats_model, watched = instrument_ranges(model)
    amax = np.zeros(len(watched))
    flushed = np.zeros(len(watched))
    nonzero = np.zeros(len(watched))
    shapes: set[str] = set()

    def collect(x: np.ndarray, res: dict[str, np.ndarray]) -> None:
        shapes.add(f"{x.shape[2]}x{x.shape[3]}")
        for i, (t, _, _) in enumerate(watched):
            amax[i] = max(amax[i], float(np.nan_to_num(res[f"{t}__amax"], nan=np.inf)))
            flushed[i] += float(np.nan_to_num(res[f"{t}__flush"]))  # NaN tensors: reported by their max
            nonzero[i] += float(np.nan_to_num(res[f"{t}__nz"]))

    def session(m: onnx.ModelProto, **kw: Any) -> OnnxRuntimeEngine:
        engine = OnnxRuntimeEngine(m, threads=threads, graph_optimization="basic", **kw)
        engine.source = onnx_path  # an in-memory variant of this file: its errors name it
        return engine

    reference = session(stats_model, on_run=collect)
    del stats_model
    base_plan = plan_fp32_islands(model, keep_fp32_ops, keep_fp32_nodes)
    baseline = session(emulate_fp16(convert_to_fp16(model, keep_fp32_ops, keep_fp32_nodes)))

    def extract(engines: list[Engine]) -> list[np.ndarray]:
        outs: list[list[np.ndarray]] = [[] for _ in engines]
        for desc, group, bboxes in groups:
            res = extract_many(
                engines, group, pp, scales, bboxes, progress=progress, image_size=size,
                batch_size=batch_size, description=f"fp16 audit: {desc}",
            )  # fmt: skip
            for o, r in zip(outs, res):
                o.append(r)
        return [np.concatenate(o) for o in outs]

    ref, base = extract([reference, baseline])
    # what leaves FP16 range
    findings: list[RangeFinding] = []
    bad_tensors: list[str] = []
    for i, (t, node, op) in enumerate(watched):
        share = flushed[i] / nonzero[i] if nonzero[i] else 0.0
        reason = ""
        if not np.isfinite(amax[i]) or amax[i] > FP16_MAX:
            reason = "overflow (> 65504)"
        elif share > underflow_threshold:
            reason = f"underflow (> {100 * underflow_threshold:g}% of non-zero values flush to 0)"
        if reason:
            findings.append(RangeFinding(t, node, op, float(amax[i]), float(share), reason))
            bad_tensors.append(t)
    keep = _nodes_touching(model, bad_tensors)
    keep = [n for n in keep if n not in base_plan.islands or n in set(keep_fp32_nodes)]
    all_keep = list(dict.fromkeys([*keep_fp32_nodes, *keep]))

    variants = [("FP16, default FP32 islands", base, len(base_plan.islands))]
    if keep:
        audited = session(emulate_fp16(convert_to_fp16(model, keep_fp32_ops, all_keep)))
        (aud,) = extract([audited])
        n_islands = len(plan_fp32_islands(model, keep_fp32_ops, all_keep).islands)
        variants.append(("FP16, + audit's FP32 nodes", aud, n_islands))

    n_q = len(dataset.queries) if dataset is not None else 0
    gnd = dataset.gnd if dataset is not None else None
    map_ref = evaluate_descriptors(ref[n_q:], ref[:n_q], gnd)["map"] if gnd is not None else {}
    contract = contract_for("fp16")
    runs = [
        compare(
            (ref[n_q:], ref[:n_q]),
            (d[n_q:], d[:n_q]),
            gnd,
            contract,
            map_ref or None,
            label,
            {"name": "onnxruntime (FP16 emulated on the CPU)", "precision": "fp16", "fp32_nodes": n_islands},
        )  # fmt: skip
        for label, d, n_islands in variants
    ]
    return Fp16AuditResult(
        model=str(onnx_path),
        images=len(ref),
        queries=n_q,
        image_size=size,
        shapes=sorted(shapes),
        watched_tensors=len(watched),
        findings=findings,
        keep_fp32_nodes=all_keep,
        runs=runs,
        map_fp32=map_ref,
        seconds=time.perf_counter() - t0,
    )


def _nodes_touching(model: onnx.ModelProto, tensors: Sequence[str]) -> list[str]:
    """Producers and consumers of ``tensors``: keeping all of them FP32 keeps the tensor out of FP16."""
    wanted = set(tensors)
    out: list[str] = []
    for n in model.graph.node:
        if wanted & set(n.output) or (wanted & set(n.input) and n.op_type not in ("Shape", "Size")):
            out.append(n.name)
    return list(dict.fromkeys(out))
