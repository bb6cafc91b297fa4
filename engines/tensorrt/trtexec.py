"""The ``trtexec`` command line equivalent to a :func:`~dtop_export.engines.tensorrt.builder.build_engine` call
(``dtop-export trt --print-trtexec``: works without a GPU)."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

from dtop_export.engines.tensorrt.profiles import Profile, format_shape


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
) -> str:
    """The trtexec command line equivalent to :func:`build_engine` (shell-quoted).

    ``typing``: ``strong`` (``--stronglyTyped``; the ONNX's types decide, a no-op default on 11.x) or
    ``weak`` (10.x: ``--fp16`` with ``fp32_layers`` pinned by ``--layerPrecisions``/``--layerOutputTypes``
    and ``--precisionConstraints=obey``).
    """
    if typing not in ("strong", "weak"):
        raise ValueError(f"typing must be 'strong' or 'weak', got {typing!r}")
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
        args.append("--stronglyTyped")
    else:
        args += ["--fp16", "--precisionConstraints=obey"]
        if fp32_layers:
            spec = ",".join(f"{name}*:fp32" for name in fp32_layers)
            args += [f"--layerPrecisions={spec}", f"--layerOutputTypes={spec}"]
    if not tf32:
        args.append("--noTF32")
    return shlex.join(args)
