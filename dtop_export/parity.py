"""Parity: the same preprocessed images through every engine and the PyTorch reference, one report.

Per engine: per-image cosine similarity to the reference descriptors (min and mean over queries and
database images), the largest absolute difference of any descriptor component, top-10 neighbour
agreement (mean fraction of each query's 10 nearest database images that the reference also ranks in its
top 10), Easy/Medium/Hard mAP and its difference to the reference's, and pass/fail against the numerical
contract for the engine's precision (DESIGN.md):

=========  ================  =========  ==================
precision  per-image cosine  max-abs    |ΔmAP| (E, M, H)
=========  ================  =========  ==================
fp32       ≥ 0.99999         ≤ 1e-4     ≤ 0.05 points
fp16/bf16  ≥ 0.999           —          ≤ 0.2 points, or every flip a near-tie
int8       ≥ 0.99            —          ≤ 1.0 point
=========  ================  =========  ==================

Every image is loaded and preprocessed once (with the reference's preprocessing, or the square resize of
engines compiled for one input size: :func:`shared_preprocess`) and the identical tensor goes to every engine.
An engine whose preprocessing contract (mean, std, stride) differs from the reference's fails too: a deployment
would feed it different pixels.

A failing |ΔmAP| says where it comes from (:mod:`dtop_export.retrieval.flips`): how many queries were reordered,
how many positive/negative pairs flipped and how far apart the reference placed them, next to the engine's query·db
similarity error (rms). Flips within 3 rms of that error are near-ties, which any engine with that error
makes by chance: on a small query set one of them moves mAP by more than the reduced-precision contracts allow.
So the FP16/bf16 contracts pass a |ΔmAP| over their limit when every flip behind it is a near-tie, labelled
``PASS, near-ties: ...`` with each flip named; any other flip fails as before.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError
from dtop_export.retrieval.flips import SETUP_LETTERS, RankSwaps, rank_swaps

if TYPE_CHECKING:
    from dtop_export.contract import Engine
    from dtop_export.preprocess import PreprocessConfig
    from dtop_export.retrieval.datasets import RevisitopDataset


@dataclass(frozen=True)
class Contract:
    """Numerical contract of an artifact against the PyTorch fp32 reference (DESIGN.md)."""

    precision: str
    cosine_min: float
    max_abs: float | None
    map_delta: float
    near_ties_pass: bool = False  # a |ΔmAP| over the limit passes when every flip behind it is a near-tie


CONTRACTS: dict[str, Contract] = {
    "fp32": Contract("fp32", 0.99999, 1e-4, 0.05),
    "fp16": Contract("fp16", 0.999, None, 0.2, near_ties_pass=True),
    "bf16": Contract("bf16", 0.999, None, 0.2, near_ties_pass=True),  # DESIGN.md: as FP16
    "int8": Contract("int8", 0.99, None, 1.0),
}


def contract_for(precision: str) -> Contract:
    """The contract an engine of ``precision`` is held to."""
    try:
        return CONTRACTS[precision]
    except KeyError:
        raise DToPError(f"no parity contract for precision {precision!r}: known {', '.join(CONTRACTS)}") from None


@dataclass
class Check:
    """One metric against its limit."""

    metric: str
    value: float | str
    limit: float | str
    op: str  # ">=", "<=", "=="
    passed: bool

    why: str = ""  # what explains a failure, when known (e.g. the rank swaps behind a ΔmAP)
    near_ties: str = ""  # set when the check passed only because every flip behind it is a near-tie

    def describe(self) -> str:
        """E.g. ``cosine_min 0.99812 < 0.99999``."""
        if self.op == "==":
            return f"{self.metric} {self.value} (expected {self.limit})"
        bad = {">=": "<", "<=": ">"}[self.op]
        text = f"{self.metric} {_num(self.value)} {bad if not self.passed else self.op} {_num(self.limit)}"
        return f"{text} ({self.why})" if self.why and not self.passed else text


def _num(v: float | str) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


@dataclass
class EngineParity:
    """Parity of one engine against the reference."""

    label: str
    engine: dict[str, Any]
    contract: Contract
    cosine_min: float = float("nan")
    cosine_mean: float = float("nan")
    max_abs: float = float("nan")
    topk_agreement: float = float("nan")
    map: dict[str, float] = field(default_factory=dict)
    map_delta: dict[str, float] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    similarity_error_rms: float = float("nan")
    rank_swaps: dict[str, RankSwaps] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def finite(self) -> bool:
        """Every descriptor component is finite (no FP16 overflow turned into inf/NaN)."""
        return next((c.passed for c in self.checks if c.metric == "finite"), False)

    def failures(self) -> list[str]:
        """Descriptions of the failing checks."""
        return [c.describe() for c in self.checks if not c.passed]

    def near_ties(self) -> list[str]:
        """The checks that passed only by the near-tie rule, each with its flips."""
        return [c.near_ties for c in self.checks if c.passed and c.near_ties]

    def verdict(self) -> str:
        """``PASS``, ``PASS, near-ties: H: 1 pair in 1 query, ...`` or ``FAIL: cosine_min ...``."""
        if not self.passed:
            return "FAIL: " + "; ".join(self.failures())
        ties = self.near_ties()
        return "PASS, near-ties: " + "; ".join(ties) if ties else "PASS"

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "engine": self.engine,
            "contract": {
                "precision": self.contract.precision,
                "cosine_min": self.contract.cosine_min,
                "max_abs": self.contract.max_abs,
                "map_delta": self.contract.map_delta,
            },
            "cosine_min": _f(self.cosine_min),
            "cosine_mean": _f(self.cosine_mean),
            "max_abs": _f(self.max_abs),
            "top10_agreement": _f(self.topk_agreement),
            "map": {k: _f(v, 4) for k, v in self.map.items()},
            "map_delta": {k: _f(v, 4) for k, v in self.map_delta.items()},
            "similarity_error_rms": _f(self.similarity_error_rms),
            "rank_swaps": json_safe({k: asdict(v) for k, v in self.rank_swaps.items()}),
            "checks": [
                {"metric": c.metric, "value": json_safe(c.value), "limit": c.limit, "op": c.op, "passed": c.passed}
                for c in self.checks
            ],
            "passed": self.passed,
            "near_ties": self.near_ties(),
            "verdict": self.verdict(),
            "failures": self.failures(),
        }


def _f(v: float, digits: int | None = None) -> float | None:
    if v is None or not np.isfinite(v):
        return None
    return float(v) if digits is None else round(float(v), digits)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists, tuples) replaced by None, as strict JSON
    needs: a setup without positives has a NaN mAP, ``null`` in a report, never a bare ``NaN``."""
    if isinstance(value, float):
        return _f(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


@dataclass
class ParityReport:
    """Reference metrics plus one :class:`EngineParity` per engine."""

    dataset: str
    n_images: int
    n_queries: int
    scales: tuple[float, ...]
    image_size: int
    crop_queries: bool
    reference: dict[str, Any]
    engines: list[EngineParity]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(e.passed for e in self.engines)

    def failures(self) -> list[str]:
        """One line per failing engine: ``label: metric value < limit, ...``."""
        return [f"{e.label}: {', '.join(e.failures())}" for e in self.engines if not e.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n_images": self.n_images,
            "n_queries": self.n_queries,
            "scales": list(self.scales),
            "image_size": self.image_size,
            "crop_queries": self.crop_queries,
            "reference": json_safe(self.reference),
            "engines": [e.to_dict() for e in self.engines],
            "passed": self.passed,
            "failures": self.failures(),
            "seconds": round(self.seconds, 3),
        }

    def table(self) -> str:
        """Markdown: one row for the reference, one per engine."""
        head = (
            "| engine | precision | cos min | cos mean | max-abs | top-10 agree "
            "| mAP E / M / H | ΔmAP E / M / H | result |"
        )
        lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        ref_map = " / ".join(cell(self.reference["map"][s], ".2f") for s in SETUP_LETTERS)
        lines.append(f"| {self.reference['label']} (reference) | fp32 | — | — | — | — | {ref_map} | — | reference |")
        for e in self.engines:
            maps = " / ".join(cell(e.map[s], ".2f") for s in SETUP_LETTERS) if e.map else "—"
            deltas = " / ".join(cell(e.map_delta[s], "+.2f") for s in SETUP_LETTERS) if e.map_delta else "—"
            result = e.verdict()
            lines.append(
                f"| {e.label} | {e.contract.precision} | {cell(e.cosine_min, '.6f')} | {cell(e.cosine_mean, '.6f')} "
                f"| {cell(e.max_abs, '.2e')} | {cell(e.topk_agreement, '.3f')} | {maps} | {deltas} | {result} |"
            )
        return "\n".join(lines)


def cell(v: float, fmt: str) -> str:
    """``v`` formatted, or ``—`` when it is None or NaN (a table's empty cell)."""
    return "—" if v is None or np.isnan(v) else format(v, fmt)


# metrics --------------------------------------------------------------------------------------------


def cosine_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (NaN where a row is zero or not finite)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        c = num / den
    c[~np.isfinite(c)] = np.nan
    return c


def topk_agreement(ref_db: np.ndarray, ref_q: np.ndarray, db: np.ndarray, q: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |top-k(reference) ∩ top-k(engine)| / k, exact inner-product search."""
    from dtop_export.retrieval.search import knn

    k = min(k, len(ref_db))
    _, ref_ids = knn(ref_db, ref_q, k)
    _, ids = knn(db, q, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_ids, ids)]))


def _preprocess_mismatch(reference: Engine, engine: Engine) -> str | None:
    a, b = getattr(reference, "preprocess", None), getattr(engine, "preprocess", None)
    if a is None or b is None:
        return None
    for name in ("mean", "std"):
        va, vb = np.asarray(getattr(a, name), dtype=float), np.asarray(getattr(b, name), dtype=float)
        if va.shape != vb.shape or not np.allclose(va, vb, rtol=0, atol=1e-6):
            return f"{name} {list(vb)} vs reference {list(va)}"
    if a.stride != b.stride or engine.stride != reference.stride:
        return f"stride {engine.stride} vs reference {reference.stride}"
    if a.color_order != b.color_order:
        return f"colour order {b.color_order} vs reference {a.color_order}"
    return None


def shared_preprocess(reference: Engine, engines: Sequence[Engine]) -> PreprocessConfig:
    """The preprocessing every engine of a parity run is fed: the reference's, or the resize policy of the
    engines compiled for one input size (an ExecuTorch ``.pte``: the whole image squashed to its square), which
    the PyTorch reference runs as well; engines that need two different fixed inputs cannot share one run."""
    fixed = sorted({(e.preprocess.resize, e.preprocess.size) for e in engines if e.preprocess.resize != "longest_side"})
    if len(fixed) > 1:
        sizes = ", ".join(f"{policy} {size}" for policy, size in fixed)
        raise DToPError(f"the engines take different fixed inputs ({sizes}): check them in separate parity runs")
    return replace(reference.preprocess, resize=fixed[0][0], size=fixed[0][1]) if fixed else reference.preprocess


def compare(
    reference: tuple[np.ndarray, np.ndarray],
    candidate: tuple[np.ndarray, np.ndarray],
    gnd: Sequence[dict[str, Any]] | None,
    contract: Contract,
    ref_map: dict[str, float] | None,
    label: str,
    engine_info: dict[str, Any] | None = None,
    k: int = 10,
) -> EngineParity:
    """Compare an engine's (db, queries) descriptors with the reference's and apply ``contract``.

    Without ground truth (``gnd`` None: plain images, all of them passed as ``db`` and no queries) only the
    descriptor checks apply: finite, cosine, max-abs."""
    from dtop_export.retrieval.metrics import SETUPS, evaluate_descriptors

    (rdb, rq), (db, q) = reference, candidate
    res = EngineParity(label=label, engine=engine_info or {}, contract=contract)
    if db.shape[1] != rdb.shape[1]:
        res.checks.append(Check("descriptor_dim", int(db.shape[1]), int(rdb.shape[1]), "==", False))
        return res
    ref_all, all_ = np.concatenate([rdb, rq]), np.concatenate([db, q])
    cos = cosine_per_row(ref_all, all_)
    res.cosine_min = float(np.min(cos)) if len(cos) else float("nan")
    res.cosine_mean = float(np.mean(cos)) if len(cos) else float("nan")
    diff = np.abs(ref_all.astype(np.float64) - all_.astype(np.float64))
    res.max_abs = float(diff.max()) if np.isfinite(diff).all() else float("nan")
    finite = bool(np.isfinite(db).all() and np.isfinite(q).all())
    if finite and gnd is not None and ref_map is not None:
        res.topk_agreement = topk_agreement(rdb, rq, db, q, k)
        res.map = evaluate_descriptors(db, q, gnd)["map"]
        res.map_delta = {s: res.map[s] - ref_map[s] for s in SETUPS}
        res.similarity_error_rms, res.rank_swaps = rank_swaps((rdb, rq), (db, q), gnd)
    res.checks.append(Check("finite", "yes" if finite else "no", "yes", "==", finite))
    res.checks.append(
        Check("cosine_min", res.cosine_min, contract.cosine_min, ">=", bool(res.cosine_min >= contract.cosine_min))
    )
    if contract.max_abs is not None:
        res.checks.append(Check("max_abs", res.max_abs, contract.max_abs, "<=", bool(res.max_abs <= contract.max_abs)))
    for s in SETUPS if gnd is not None else ():
        undefined = _map_undefined(ref_map, res.map, s)
        if undefined:  # a setup where no query has positives has no mean: nothing to compare
            res.checks.append(_no_positives_check(s, undefined))
            continue
        d = res.map_delta.get(s, float("nan"))
        swaps = res.rank_swaps.get(s)
        why = swaps.describe(res.similarity_error_rms) if swaps else ""
        within = bool(abs(d) <= contract.map_delta + 1e-9)
        ties = ""
        if not within and contract.near_ties_pass and swaps and swaps.all_near_ties(res.similarity_error_rms):
            within, ties = True, swaps.near_tie_label(s, res.similarity_error_rms)
        res.checks.append(Check(f"map_delta_{s}", abs(d), contract.map_delta, "<=", within, why, ties))
    return res


def _map_undefined(ref_map: dict[str, float] | None, engine_map: dict[str, float], setup: str) -> str:
    """Which side's mAP of ``setup`` is NaN (no query of the setup has positives): ``both``, ``reference`` or
    ``engine``; "" when both are numbers or the engine's was not computed (non-finite descriptors)."""
    ref, eng = (ref_map or {}).get(setup), engine_map.get(setup)
    if ref is None or eng is None or not (np.isnan(ref) or np.isnan(eng)):
        return ""
    return "both" if np.isnan(ref) and np.isnan(eng) else "reference" if np.isnan(ref) else "engine"


def _no_positives_check(setup: str, side: str) -> Check:
    """A setup without positives has no mAP on either side: passed, nothing to compare. On one side only it fails
    (the same ground truth cannot give one engine positives and not the other)."""
    if side == "both":
        return Check(f"map_delta_{setup}", "no positives", "no positives", "==", True)
    other = "engine" if side == "reference" else "reference"
    return Check(f"map_delta_{setup}", f"{side} mAP undefined", f"a mAP as the {other}'s", "==", False)


def parity(
    reference: Engine,
    engines: Sequence[Engine],
    dataset: RevisitopDataset,
    scales: Sequence[float] = (1.0,),
    crop_queries: bool = True,
    batch_size: int = 1,
    progress: bool = True,
    image_size: int | None = None,
    k: int = 10,
) -> ParityReport:
    """Run ``dataset`` through ``reference`` (PyTorch fp32) and every engine; compare them."""
    from dtop_export.preprocess import input_size
    from dtop_export.retrieval.extract import extract_many
    from dtop_export.retrieval.metrics import evaluate_descriptors

    if reference.precision != "fp32":
        raise DToPError(f"the parity reference must run in fp32, got {reference.precision}")
    if not engines:
        raise DToPError("give at least one engine to compare with the reference")
    contracts = [contract_for(e.precision) for e in engines]
    t0 = time.perf_counter()
    cfg = shared_preprocess(reference, engines)
    size = input_size(cfg, image_size, dataset.image_size)
    if crop_queries and any(b is None for b in dataset.bboxes):
        raise DToPError(f"{dataset.name}: some queries have no bounding box: pass --no-crop")
    all_engines = [reference, *engines]
    common = {"preprocess": cfg, "scales": scales, "progress": progress, "image_size": size}
    bboxes = dataset.bboxes if crop_queries else None
    qs = extract_many(
        all_engines, dataset.queries, bboxes=bboxes, batch_size=batch_size, description="queries", **common
    )
    dbs = extract_many(all_engines, dataset.images, batch_size=batch_size, description="database", **common)
    ref_metrics = evaluate_descriptors(dbs[0], qs[0], dataset.gnd)
    results = []
    for i, (engine, contract) in enumerate(zip(engines, contracts), start=1):
        res = compare(
            (dbs[0], qs[0]),
            (dbs[i], qs[i]),
            dataset.gnd,
            contract,
            ref_metrics["map"],
            _label(engine),
            engine.describe(),
            k,
        )
        mismatch = _preprocess_mismatch(reference, engine)
        res.checks.insert(0, Check("preprocess", mismatch or "same", "same", "==", mismatch is None))
        results.append(res)
    return ParityReport(
        dataset=dataset.name,
        n_images=dataset.n_images,
        n_queries=dataset.n_queries,
        scales=tuple(float(s) for s in scales),
        image_size=size,
        crop_queries=crop_queries,
        reference={
            "label": _label(reference),
            "engine": reference.describe(),
            "map": ref_metrics["map"],
            "mp": {s: {str(k): v for k, v in d.items()} for s, d in ref_metrics["mp"].items()},
        },
        engines=results,
        seconds=time.perf_counter() - t0,
    )


def _label(engine: Engine) -> str:
    src = getattr(engine, "source", None)
    return f"{engine.label}" + (f" ({src.name})" if src is not None else "")
