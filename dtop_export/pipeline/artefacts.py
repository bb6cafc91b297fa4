"""The artefact chain: checkpoint -> ONNX -> ORT-optimized / INT8 / FP16 variants -> TensorRT engine.

Each builder takes files and writes files (atomically, through the makers it calls) and returns what the
maker reports; ``derive_specs`` strings them together for ``bench --derive``; the demo
(:mod:`dtop_export.pipeline.demo`) and the ``quantize`` command use the same builders, so an INT8 model is
calibrated the same way wherever it is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.engines.tensorrt.builder import BuildResult
    from dtop_export.engines.tensorrt.profiles import Profile
    from dtop_export.quantize import QuantizeResult

DERIVE_KINDS = ("bf16", "bf16-compiled", "onnx", "optimized", "int8")
DEFAULT_CALIB_SIZES = (320, 512)
DEFAULT_CALIB_COUNT = 16


def build_int8(
    onnx_path: Path,
    output: Path,
    *,
    calib_paths: Sequence[Path] | None = None,
    calib_source: str = "",
    calib_sizes: Sequence[int] = DEFAULT_CALIB_SIZES,
    calib_count: int = DEFAULT_CALIB_COUNT,
    method: str = "minmax",
    keep_float: Sequence[str] | None = None,
    on_calibration: Callable[[int], Callable[[], None] | None] | None = None,
    on_check: Callable[[int], Callable[[], None] | None] | None = None,
) -> QuantizeResult:
    """Statically quantise ``onnx_path`` to ``output`` with calibration images run through the one
    preprocessing path (the model's own contract, read from its metadata).

    ``calib_paths`` default to the embedded calibration set (:func:`~dtop_export.quantize.default_calibration_images`:
    no image of the embedded evaluation set, which grades the model). A model that is not the fp32 export is refused
    before the calibration images are read. ``minmax`` calibrates at every size
    of ``calib_sizes`` (longer side); the histogram methods need one shape, so they take square crops at the
    largest size. ``on_calibration(total)`` may return a callback invoked once per calibration image, and
    ``on_check(total)`` one invoked once per input of the INT8 check (the INT8 contract, refused below it), which
    runs on images of the same source held out of calibration where it has enough (:func:`calibration_and_check`).
    """
    from dtop_export.contract import preprocess_from_metadata, read_metadata
    from dtop_export.quantize import (
        CALIBRATION_METHODS,
        DEFAULT_FLOAT_ROLES,
        ROLES,
        calibration_and_check,
        default_calibration_images,
        quantize_int8,
        require_fp32,
    )

    roles = list(DEFAULT_FLOAT_ROLES if keep_float is None else keep_float)
    bad = sorted(set(roles) - set(ROLES))
    if bad:
        raise DToPError(f"unknown node role(s) {', '.join(bad)} in --keep-float: choose from {', '.join(ROLES)}")
    if method not in CALIBRATION_METHODS:
        raise DToPError(f"unknown --method {method!r}: choose {', '.join(CALIBRATION_METHODS)}")
    meta = read_metadata(onnx_path)
    require_fp32(meta, onnx_path)
    pp = preprocess_from_metadata(meta)
    if calib_paths is None:
        calib_paths, calib_source = default_calibration_images()
    square = method != "minmax"
    sizes = [max(calib_sizes)] if square and calib_sizes else list(calib_sizes)
    tensors, check_inputs = calibration_and_check(calib_paths, pp, sizes, calib_count, square=square)
    on_item = on_calibration(len(tensors)) if on_calibration else None
    return quantize_int8(
        onnx_path, output, tensors, method=method, keep_float=roles, calibration_source=calib_source,
        on_item=on_item, on_check=on_check, check_inputs=check_inputs,
    )  # fmt: skip


def build_tensorrt_fp16(onnx_path: Path, plan: Path, profiles: Sequence[Profile]) -> BuildResult:
    """A strongly typed FP16 engine (FP32 islands as casts) of ``onnx_path`` with ``profiles``."""
    from dtop_export.engines.tensorrt.builder import build_engine

    return build_engine(onnx_path, plan, fp16=True, profiles=profiles)


def derive_specs(
    checkpoint: Path,
    kinds: Sequence[str],
    workdir: Path,
    *,
    calib_paths: Sequence[Path] | None = None,
    calib_source: str = "",
    calib_sizes: Sequence[int] = DEFAULT_CALIB_SIZES,
    calib_count: int = DEFAULT_CALIB_COUNT,
    on_stage: Callable[[str], None] | None = None,
    refused: list[tuple[str, str]] | None = None,
) -> list[EngineSpec]:
    """Build the artefacts a deployer would use from ``checkpoint`` and return their bench specs, timing each
    build: ``bf16`` (PyTorch deployment path, nothing to build), ``bf16-compiled`` (the same through
    ``torch.compile(mode="max-autotune")``, one static graph per shape, compiled on the first call),
    ``onnx`` (export), ``optimized`` (ORT CPU graph rewrites), ``int8`` (static quantisation of the
    optimized model, else the plain export). An ``int8`` model below the INT8 contract is not written: with
    ``refused`` given, ``("int8", why)`` is appended to it and the other specs are returned, else it raises."""
    from dtop_export.bench.spec import EngineSpec
    from dtop_export.export import export_onnx

    bad = sorted(set(kinds) - set(DERIVE_KINDS))
    if bad:
        raise DToPError(f"unknown --derive kind(s) {', '.join(bad)}: choose from {', '.join(DERIVE_KINDS)}")
    say = on_stage or (lambda _s: None)
    workdir.mkdir(parents=True, exist_ok=True)
    stem = checkpoint.stem
    specs: list[EngineSpec] = []
    if "bf16" in kinds:
        specs.append(EngineSpec(checkpoint, {"precision": "bf16"}))
    if "bf16-compiled" in kinds:
        specs.append(EngineSpec(checkpoint, {"precision": "bf16", "compile": "max-autotune", "dynamic": False}))
    onnx_path = workdir / f"{stem}.onnx"
    if any(k in kinds for k in ("onnx", "optimized", "int8")):
        say(f"exporting {onnx_path.name}")
        res = export_onnx(checkpoint, onnx_path)
        if "onnx" in kinds:
            specs.append(EngineSpec(onnx_path, build_seconds=res.seconds, derived_from=checkpoint.name))
    parent = onnx_path
    if "optimized" in kinds or "int8" in kinds:
        from dtop_export.optimize import optimize_onnx

        opt_path = workdir / f"{stem}.opt.onnx"
        say(f"optimising {opt_path.name}")
        ores = optimize_onnx(onnx_path, opt_path)
        if "optimized" in kinds:
            specs.append(EngineSpec(opt_path, build_seconds=ores.seconds, derived_from=onnx_path.name))
        parent = opt_path
    if "int8" in kinds:
        int8_path = workdir / f"{parent.stem}.int8.onnx"

        def announce(total: int) -> None:
            say(f"quantising {int8_path.name} ({total} calibration images)")

        from dtop_export.int8_check import BelowContract

        try:
            qres = build_int8(
                parent, int8_path, calib_paths=calib_paths, calib_source=calib_source, calib_sizes=calib_sizes,
                calib_count=calib_count, on_calibration=announce,
            )  # fmt: skip
        except BelowContract as e:
            if refused is None:
                raise
            refused.append(("int8", e.reason()))
        else:
            specs.append(EngineSpec(int8_path, build_seconds=qres.seconds, derived_from=parent.name))
    return specs
