"""The ``trtexec`` command line equivalent to a :func:`~dtop_export.engines.tensorrt.builder.build_engine` call
(``dtop-export trt --print-trtexec [--trt-version 10|11]``: works without a GPU).

Per TensorRT major version, using only flags that version has:

* 11: every network is strongly typed; ``--fp16``, ``--precisionConstraints``, ``--layerPrecisions`` and
  ``--layerOutputTypes`` are gone and ``--stronglyTyped`` is a no-op, so the line carries none of them: the
  FP16 ONNX (FP32 islands as casts) decides every type.
* 10: ``--stronglyTyped`` opts in to the same; weak typing (``--fp16 --precisionConstraints=obey``) pins
  exactly the layers the Python build pins, by full name (no ``name*`` wildcards, which would also match
  other layers whose names start alike).
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from dtop_export.engines.tensorrt.profiles import Profile, format_shape
from dtop_export.errors import DToPError

TRT_MAJORS = (10, 11)


def default_trt_major() -> int:
    """The installed TensorRT's major version when it is importable, else 11 (what ``pip`` installs today)."""
    try:
        from dtop_export.engines.tensorrt.install import import_tensorrt, version_tuple

        major = version_tuple(import_tensorrt().__version__)[0]
    except (DToPError, IndexError):
        return 11
    return major if major in TRT_MAJORS else 11


def layer_spec(layers: Sequence[str], precision: str = "fp32") -> str:
    """``--layerPrecisions`` / ``--layerOutputTypes`` value naming each layer exactly."""
    for name in layers:
        if any(c in name for c in ",:*"):
            raise DToPError(
                f"layer {name!r} has a ',', ':' or '*' in its name, which trtexec's layer specs cannot express: "
                "build with `dtop-export trt` instead"
            )
    return ",".join(f"{name}:{precision}" for name in layers)


def trtexec_command(
    onnx_path: str | Path,
    plan_path: str | Path,
    profiles: Sequence[Profile],
    *,
    input_name: str = "images",
    typing: str = "strong",
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
    fp32_layers: Sequence[str] = (),
    tf32: bool = True,
    trt_major: int = 11,
) -> str:
    """The trtexec command line equivalent to :func:`build_engine` on TensorRT ``trt_major`` (shell-quoted).

    ``typing``: ``strong`` (the ONNX's types decide: ``--stronglyTyped`` on 10, nothing on 11) or ``weak``
    (10 only: ``--fp16 --precisionConstraints=obey`` with ``fp32_layers``, the exact TensorRT layer names the
    builder pins, in ``--layerPrecisions``/``--layerOutputTypes``).
    """
    if typing not in ("strong", "weak"):
        raise ValueError(f"typing must be 'strong' or 'weak', got {typing!r}")
    if trt_major not in TRT_MAJORS:
        raise DToPError(f"--trt-version must be one of {', '.join(map(str, TRT_MAJORS))}, got {trt_major}")
    if typing == "weak" and trt_major != 10:
        raise DToPError(f"weak typing exists on TensorRT 10 only: TensorRT {trt_major} builds strongly typed")
    args = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={plan_path}"]
    for p in profiles:
        args += [
            f"--minShapes={input_name}:{format_shape(p.min)}",
            f"--optShapes={input_name}:{format_shape(p.opt)}",
            f"--maxShapes={input_name}:{format_shape(p.max)}",
        ]
    args.append(f"--memPoolSize=workspace:{round(workspace_gb * 1024)}")
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    if typing == "strong":
        if trt_major == 10:
            args.append("--stronglyTyped")
    else:
        args += ["--fp16", "--precisionConstraints=obey"]
        if fp32_layers:
            spec = layer_spec(fp32_layers)
            args += [f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    if not tf32:
        args.append("--noTF32")
    return shlex.join(args)
