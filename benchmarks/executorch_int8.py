"""Static vs dynamic INT8 for the ExecuTorch program (XNNPACK, PT2E quantizer): which recipe keeps the INT8 contract.

    python benchmarks/executorch_int8.py CKPT.pt --size 256 --calib-count 16 --json out.json

Builds, from the same XNNPACK form of the checkpoint (dtop_export.edge.xnnpack_form):

* ``static_all``: XNNPACK's static per-channel config on every op it quantises (linear, conv, add, mul, cat),
  calibrated on ``--calib-count`` images of the embedded sample set through the one preprocessing path;
* ``static_linear_conv``: static, linear and conv only (what `dtop-export quantize` does for ONNX Runtime);
* ``dynamic_<float roles>``: the recipe `dtop-export executorch --int8` uses, with several block layers kept float.

and reports per variant: whether XNNPACK compiles and runs it, its size, and the cosine of its descriptors to the
fp32 model's on the calibration images plus as many other images of the set (min and mean). `dtop-export parity`
gives the mAP side for the programs worth keeping.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def static_program(module: Any, example: Any, calib: list[Any], only_linear_conv: bool) -> bytes:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from dtop_export.edge.xnnpack_form import STATISTICS_MODULES, xnnpack_glue_pass

    cfg = get_symmetric_quantization_config(is_per_channel=True)
    q = XNNPACKQuantizer()
    if only_linear_conv:
        q.set_operator_type(torch.ops.aten.linear.default, cfg)
        q.set_operator_type(torch.ops.aten.conv2d.default, cfg)
    else:
        q.set_global(cfg)
    for kind in STATISTICS_MODULES:
        q.set_module_type(kind, None)
    prepared = prepare_pt2e(torch.export.export(module, (example,), strict=False).module(), q)
    with torch.no_grad():
        for x in calib:
            prepared(x)
    ep = torch.export.export(convert_pt2e(prepared), (example,), strict=False)
    edge = to_edge_transform_and_lower(ep, transform_passes=[xnnpack_glue_pass()], partitioner=[XnnpackPartitioner()])
    return edge.to_executorch().buffer


def dynamic_program(module: Any, example: Any, keep_float: list[str]) -> bytes:
    from dtop_export.edge.pte import emit_program, lower_to_xnnpack, quantize_dynamic

    edge, _ = lower_to_xnnpack(quantize_dynamic(module, example, keep_float))
    return emit_program(edge, {"dtop.format": "benchmark"})


def cosines(fp32: Any, data: bytes, tensors: list[Any]) -> dict[str, Any]:
    import torch

    from dtop_export.engines.executorch import load_program_bytes, native_log

    with native_log() as log, torch.no_grad():
        try:
            program = load_program_bytes(data, "the program")
            method = program.load_method("forward")
            cos = []
            for x in tensors:
                a, b = fp32(x).double(), method.execute([x])[0].double()
                cos.append(float((a * b).sum() / (a.norm() * b.norm())))
        except Exception as e:  # noqa: BLE001 - report XNNPACK's refusal as a result
            return {"runs": False, "error": str(e).splitlines()[0], "log": log[-3:]}
    return {"runs": True, "cosine_min": min(cos), "cosine_mean": float(np.mean(cos)), "images": len(cos)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--calib-count", type=int, default=16)
    ap.add_argument("--variants", default="static_all,static_linear_conv,dynamic_,dynamic_fc2")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.edge.pte import square_preprocess
    from dtop_export.edge.xnnpack_form import xnnpack_form
    from dtop_export.engines.executorch import set_threads
    from dtop_export.quantize import calibration_tensors, default_calibration_images

    set_threads(2)
    ckpt = load_checkpoint(args.checkpoint)
    paths, source = default_calibration_images()
    pp = square_preprocess(ckpt.preprocess, args.size)
    tensors = [torch.from_numpy(t) for t in calibration_tensors(paths, pp, [args.size], 2 * args.calib_count)]
    calib = tensors[::2]
    module, _ = xnnpack_form(ckpt, args.size)
    example = torch.zeros(1, 3, args.size, args.size)
    out: dict[str, Any] = {"checkpoint": str(args.checkpoint), "size": args.size, "source": source, "variants": {}}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        m = copy.deepcopy(module)
        if name.startswith("static"):
            data = static_program(m, example, calib, only_linear_conv=name == "static_linear_conv")
        else:
            data = dynamic_program(m, example, [r for r in name.removeprefix("dynamic_").split("_") if r])
        row = {"build_s": round(time.perf_counter() - t0, 1), "size_mb": round(len(data) / 2**20, 2)}
        row |= cosines(module, data, tensors)
        out["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
