"""A benchmark's results: per engine and shape timings, load/memory/file facts; Markdown, JSON and PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtop_export.atomic import atomic_path, atomic_write_text


@dataclass
class Timing:
    """Latency of one engine at one (size, batch)."""

    size: int
    batch: int
    times_s: list[float]
    p50_s: float
    p90_s: float
    images_per_s: float
    speedup: float | None = None
    gflops_per_s: float | None = None
    cosine_min: float | None = None
    peak_pct: float | None = None  # GFLOP/s as % of the measured matmul ceiling of the engine's device + precision


@dataclass
class EngineResult:
    """Everything measured for one engine."""

    label: str
    name: str
    precision: str
    file: str
    kind: str
    options: dict[str, Any]
    load_s: float
    first_call_s: float
    load_rss_mb: float
    peak_rss_mb: float
    file_mb: float
    build_seconds: float | None
    derived_from: str | None
    timings: list[Timing] = field(default_factory=list)

    def timing(self, size: int, batch: int) -> Timing | None:
        return next((t for t in self.timings if t.size == size and t.batch == batch), None)


@dataclass
class BenchReport:
    """A benchmark run: settings, machine, load, per-engine results."""

    sizes: list[int]
    batches: list[int]
    runs: int
    warmup: int
    threads: int
    reference: str
    machine: dict[str, Any]
    load_before: list[float]
    load_after: list[float]
    gflops_per_image: dict[int, float]
    engines: list[EngineResult]
    seconds: float = 0.0
    matmul_peaks: dict[str, float] = field(default_factory=dict)  # "cuda fp16" -> GFLOP/s, measured this run
    flops_model: str | None = None  # the checkpoint gflops_per_image counts (rows of other models have no GFLOP/s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gflops_per_image"] = {str(k): v for k, v in self.gflops_per_image.items()}
        d["format"] = "dtop-export/bench"
        d["format_version"] = 1
        return d

    def to_markdown(self) -> str:
        """Two tables: latency per engine and shape, then per-engine load/memory/file facts."""
        m = self.machine
        lines = [
            f"{m.get('cpu')} ({', '.join(m.get('cpu_features') or ['features unknown'])}), {m.get('cores')} cores, "
            f"{self.threads} threads; torch {m.get('torch')}, "
            f"onnxruntime {m.get('onnxruntime')}; load average before {_fmt_load(self.load_before)}, "
            f"after {_fmt_load(self.load_after)}; median of {self.runs} runs after {self.warmup} warm-up "
            f"(+1 in the load pass), interleaved. Speed-up is images/s against {self.reference}.",
            "",
            "| engine | size | batch | p50 ms | p90 ms | images/s | speed-up | GFLOP/s | % of peak | cos min vs ref |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for b in self.batches:
            for s in self.sizes:
                for e in self.engines:
                    t = e.timing(s, b)
                    if t is None:
                        continue
                    lines.append(
                        f"| {e.label} | {s}² | {b} | {t.p50_s * 1e3:.0f} | {t.p90_s * 1e3:.0f} | "
                        f"{t.images_per_s:.2f} | {_fmt(t.speedup, '{:.2f}×')} | {_fmt(t.gflops_per_s, '{:.0f}')} | "
                        f"{_fmt(t.peak_pct, '{:.1f}%')} | {_fmt(t.cosine_min, '{:.5f}')} |"
                    )
        lines += [
            "",
            "| engine | file | file MB | build s | load s | first call s | load RSS MB | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in self.engines:
            build = _fmt(e.build_seconds, "{:.1f}")
            if e.derived_from:
                build += f" (from {e.derived_from})"
            lines.append(
                f"| {e.label} | {Path(e.file).name} | {e.file_mb:.1f} | {build} | {e.load_s:.2f} | "
                f"{e.first_call_s:.2f} | {e.load_rss_mb:.0f} | {e.peak_rss_mb:.0f} |"
            )
        if self.gflops_per_image:
            per = ", ".join(f"{s}²: {g:.1f}" for s, g in sorted(self.gflops_per_image.items()))
            of = f" of {self.flops_model}" if self.flops_model else ""
            lines += ["", f"Forward GFLOP per image{of} (torch.utils.flop_counter): {per}."]
            others = [e.label for e in self.engines if all(t.gflops_per_s is None for t in e.timings)]
            if others:
                lines.append(f"No GFLOP/s for {', '.join(others)}: another model than the one counted.")
        if self.matmul_peaks:
            peaks = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in self.matmul_peaks.items())
            lines += [f"Matmul ceilings measured in this run (square GEMMs, the % of peak column): {peaks}."]
        return "\n".join(lines) + "\n"

    def write_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    def write_plot(self, path: str | Path) -> None:
        """PNG: p50 latency vs image size, one line per engine, one panel per batch size."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n_rows = len(self.engines)
        fig, axes = plt.subplots(
            1, len(self.batches), figsize=(6 * len(self.batches), 4.5 + 0.22 * n_rows), squeeze=False
        )
        for ax, b in zip(axes[0], self.batches):
            for e in self.engines:
                pts = [(t.size, t.p50_s * 1e3) for t in sorted(e.timings, key=lambda t: t.size) if t.batch == b]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=e.label)
            ax.set_title(f"batch {b}")
            ax.set_xlabel("image size (square side, px)")
            ax.set_ylabel("p50 latency per batch (ms)")
            ax.set_xticks(self.sizes)
            if len(self.sizes) > 1:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        # one legend under the plots, so no curve is hidden behind it
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=1, fontsize=8, frameon=False)
        fig.suptitle(f"dtop-export bench: {self.machine.get('cpu')}, {self.threads} threads", fontsize=10)
        fig.tight_layout(rect=(0, 0.04 * n_rows, 1, 1))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)


def _fmt(v: float | None, pattern: str) -> str:
    return "—" if v is None else pattern.format(v)


def _fmt_load(load: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in load) if load else "n/a"
