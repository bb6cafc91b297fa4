"""Where an ExecuTorch program spends its time, and what stays outside the XNNPACK delegate: per-operator times from
ExecuTorch's own profiler (ETDump; the wheel's XNNPACK backend reports each of its operators too), for three ways of
building the same checkpoint at one size:

* ``plain``: the deploy-folded model as it is (position embedding resampled in the graph, timm's attention, native
  LayerNorm/GroupNorm, ``F.normalize``): what a first attempt gets;
* ``fixed_pe``: the position embedding precomputed for the size, nothing else changed;
* ``xnnpack_form``: what ``dtop-export executorch`` writes (dtop_export.edge.xnnpack_form + the glue pass).

    python benchmarks/executorch_profile.py CKPT.pt --size 384 --threads 2 --runs 10 --json out.json

Per variant: lowering time, partitions, the operators left outside (count and median ms each), the median wall
time of ``Method::execute`` and the share inside the delegate, the XNNPACK operator types by time. Each variant
runs ``--runs`` times in turn, in one process (medians: the machine is shared; compare shares, not milliseconds,
across runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np


def build(ckpt: Any, size: int, variant: str) -> tuple[bytes, dict[str, Any]]:
    """The .pte bytes of ``variant`` and how it lowered."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from dtop_export.edge.pte import delegation_of
    from dtop_export.edge.xnnpack_form import FixedPosEmbed, xnnpack_form, xnnpack_glue_pass
    from dtop_export.fold import fold_for_deployment

    passes = []
    if variant == "xnnpack_form":
        module, _ = xnnpack_form(ckpt, size)
        passes = [xnnpack_glue_pass()]
    else:
        module, _ = fold_for_deployment(ckpt.build_model(), ckpt.whitening)
        if variant == "fixed_pe":
            enc = module.model.encoder
            enc.pos_embed = FixedPosEmbed(enc.pos_embed, (size // enc.stride, size // enc.stride))
    x = torch.zeros(1, 3, size, size)
    t0 = time.perf_counter()
    ep = torch.export.export(module.eval(), (x,), strict=False)
    edge = to_edge_transform_and_lower(ep, transform_passes=passes, partitioner=[XnnpackPartitioner()])
    lower_s = time.perf_counter() - t0
    d = delegation_of(edge)
    return edge.to_executorch().buffer, {"lower_s": round(lower_s, 1), "partitions": d.partitions, "outside": d.outside}


def profile(data: bytes, x: Any, runs: int) -> dict[str, Any]:
    """One program's ETDump over ``runs`` executions: wall ms, delegate share, outside ops, XNNPACK op types."""
    from executorch.devtools import Inspector
    from executorch.runtime import Runtime

    with tempfile.TemporaryDirectory() as tmp:
        program = Runtime.get().load_program(data, enable_etdump=True, debug_buffer_size=0)
        method = program.load_method("forward")
        for _ in range(runs):
            method.execute([x])
        etdump = Path(tmp) / "run.etdp"
        program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        df = Inspector(etdump_path=str(etdump)).to_dataframe()
    df = df[df["event_block_name"] == "Execute"]

    def med(rows: Any) -> float:
        return float(statistics.median(rows)) if len(rows) else 0.0

    wall = med(next(iter(df[df["event_name"] == "Method::execute"]["raw"]), []))
    delegate = sum(med(r) for r in df[df["event_name"] == "DELEGATE_CALL"]["raw"])
    outside: dict[str, list[float]] = defaultdict(list)
    for name, raw in zip(df["event_name"], df["raw"]):
        if str(name).startswith("native_call_"):
            outside[str(name).removeprefix("native_call_")].append(med(raw))
    xnn: dict[str, float] = defaultdict(float)
    for name, raw, delegated in zip(df["event_name"], df["raw"], df["is_delegated_op"]):
        if delegated:
            xnn[str(name).split(" #")[0]] += med(raw)
    return {
        "execute_ms": round(wall, 3),
        "delegate_ms": round(delegate, 3),
        "outside_ms": round(sum(sum(v) for v in outside.values()), 3),
        "outside_ops": {k: {"count": len(v), "ms": round(sum(v), 3)} for k, v in sorted(outside.items())},
        "xnnpack_ops_ms": {k: round(v, 3) for k, v in sorted(xnn.items(), key=lambda kv: -kv[1])[:15]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--variants", default="plain,fixed_pe,xnnpack_form")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from dtop_export.bench.harness import machine_info
    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.engines.executorch import native_log, set_threads

    set_threads(args.threads)
    ckpt = load_checkpoint(args.checkpoint)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, args.size, args.size), dtype=np.float32))
    out: dict[str, Any] = {
        "checkpoint": str(args.checkpoint),
        "size": args.size,
        "threads": args.threads,
        "runs": args.runs,
        "machine": machine_info(),
        "variants": {},
    }
    for variant in args.variants.split(","):
        data, lowered = build(ckpt, args.size, variant)
        with native_log():
            prof = profile(data, x, args.runs)
        out["variants"][variant] = lowered | prof | {"size_mb": round(len(data) / 2**20, 2)}
        p = out["variants"][variant]
        print(
            f"{variant:13s} {p['execute_ms']:8.1f} ms, delegate {p['delegate_ms']:8.1f}, outside {p['outside_ms']:.2f} "
            f"({sum(o['count'] for o in p['outside_ops'].values())} ops, {p['partitions']} partitions)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
