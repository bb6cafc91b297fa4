"""Forward latency of a DToP preset in PyTorch eager (CPU), median of several runs after warm-up.

    python benchmarks/forward_time.py --preset r50-vitb16 --sizes 384 512 --runs 5

Prints a Markdown table and, with --json, writes the raw timings. This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from dtop_export.model import build_model, get_preset, parameter_counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="r50-vitb16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write raw timings here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(get_preset(args.preset)).eval()
    counts = parameter_counts(model)
    rows = []
    with torch.inference_mode():
        for s in args.sizes:
            x = torch.randn(args.batch, 3, s, s)
            for _ in range(args.warmup):
                model(x)
            times = []
            for _ in range(args.runs):
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
            rows.append({"size": s, "batch": args.batch, "median_s": statistics.median(times), "times_s": times})
    print(
        f"preset {args.preset}: {counts['total'] / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}"
    )
    print("| size | batch | median s | min s | max s |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']}² | {r['batch']} | {r['median_s']:.3f} | {min(r['times_s']):.3f} | {max(r['times_s']):.3f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"preset": args.preset, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
