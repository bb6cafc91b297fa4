"""The C++ client's decoder on the whole hostile set (dtop_export.hostile): crashes, hangs, peak RSS against the
decode budget, and every accept/refuse or model-input difference from the Python side (Pillow), with the reason.

    python benchmarks/decode_hostile.py MODEL.onnx [--binary dtop-embed] [--budget-mb 64] [--ci] \
        [--json results/decode_hostile.json] [--md results/decode_hostile.md]

MODEL only lends its preprocessing contract: the runs use a one-layer model with the same metadata
(hostile.tiny_model), so that hundreds of processes measure the decoder, not the network. Exit 1 when a case
crashes, hangs, goes over the budget or differs from Python without a reason in hostile.KNOWN_DIFFERENCES.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name and its vector extensions (the README names them next to every figure)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    model = re.search(r"model name\s*:\s*(.+)", info)
    flags = set(re.search(r"flags\s*:\s*(.+)", info).group(1).split()) if "flags" in info else set()
    ext = [n for f, n in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX512-BF16"), ("avx512_vnni", "VNNI"),
                          ("amx_tile", "AMX")) if f in flags]  # fmt: skip
    return f"{model.group(1).strip() if model else platform.machine()} ({', '.join(ext) or 'no AVX-512'})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path, help="a dtop-export .onnx (its metadata: the preprocessing contract)")
    ap.add_argument("--binary", type=Path, help="dtop-embed (default: the one `dtop-export cpp build` made)")
    ap.add_argument("--budget-mb", type=int, default=64, help="--max-decode-mb for both sides (default 64)")
    ap.add_argument("--image-size", type=int, default=64, help="longer side of the model input (default 64)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a case counts as a hang")
    ap.add_argument("--ci", action="store_true", help="only the CI subset")
    ap.add_argument("--only", help="only cases whose name contains this")
    ap.add_argument("--no-limit-flags", action="store_true", help="give dtop-embed no --max-* flags (an older client)")
    ap.add_argument("--json", type=Path, help="write every case's result here")
    ap.add_argument("--md", type=Path, help="write the Markdown table here")
    args = ap.parse_args()

    from dtop_export.cpp import EMBED_TOOL, default_build_dir
    from dtop_export.hostile import format_report, hostile_cases, run_hostile, tiny_model, write_report
    from dtop_export.preprocess import DecodeBudget

    binary = args.binary or default_build_dir() / EMBED_TOOL
    cases = [c for c in hostile_cases() if (c.ci or not args.ci) and (not args.only or args.only in c.name)]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(args.model, Path(tmp) / "tiny.onnx")

        def progress(done: int, total: int) -> None:
            if done % 50 == 0 or done == total:
                print(f"  {done}/{total} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

        report = run_hostile(binary, model, cases, DecodeBudget(max_decode_mb=args.budget_mb),
                             image_size=args.image_size, timeout=args.timeout, progress=progress,
                             limit_flags=[] if args.no_limit_flags else None)  # fmt: skip
    report.model = str(args.model)
    table = format_report(report)
    header = (f"{len(cases)} cases, {time.perf_counter() - t0:.0f} s wall, {cpu_name()}; "
              f"`python benchmarks/decode_hostile.py {args.model.name} --budget-mb {args.budget_mb}"
              f"{' --ci' if args.ci else ''}`")  # fmt: skip
    print(header)
    print(table)
    if args.json:
        write_report(report, args.json)
    if args.md:
        from dtop_export.atomic import atomic_write_text

        atomic_write_text(args.md, header + "\n\n" + table + "\n")
    failures = report.failures()
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
