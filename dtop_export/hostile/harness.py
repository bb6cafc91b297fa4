"""Runs the hostile set through ``dtop-embed`` (one process per file: exit status, peak RSS and CPU time of that
process alone, a timeout for hangs) and through ``preprocess.load_image`` + ``prepare``, and compares them."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError
from dtop_export.hostile.build import PNG_SIGNATURE, Case
from dtop_export.preprocess import DecodeBudget

# The differences left between the client and Pillow, by case name prefix: why each cannot be closed.
KNOWN_DIFFERENCES: dict[str, str] = {
    "jpeg.lossless": "lossless JPEG (SOF3): Pillow's wheel bundles libjpeg-turbo 3, which decodes it; the client "
    "links the system's libjpeg-turbo (2.1.5 on Debian 12), which refuses it (libjpeg-turbo >= 3 reads it)",
}


def tiny_model(src: str | Path, dest: str | Path) -> Path:
    """An ONNX with ``src``'s dtop metadata (the preprocessing contract) whose graph is a global average pool:
    runs in microseconds, so that a run over hundreds of files measures the decoder, not the model."""
    import onnx
    from onnx import TensorProto, helper

    from dtop_export.contract import metadata_of, set_metadata

    meta = metadata_of(onnx.load(str(src), load_external_data=False))
    meta["dtop.descriptor_dim"] = "3"
    x = helper.make_tensor_value_info(meta["dtop.input_name"], TensorProto.FLOAT, ["batch", 3, "height", "width"])
    y = helper.make_tensor_value_info(meta["dtop.output_name"], TensorProto.FLOAT, ["batch", 3])
    nodes = [
        helper.make_node("GlobalAveragePool", [x.name], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("LpNormalization", ["flat"], [y.name], axis=1, p=2),
    ]
    model = helper.make_model(helper.make_graph(nodes, "tiny", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(model, meta)
    onnx.save(model, str(dest))
    return Path(dest)


@dataclass
class CaseResult:
    name: str
    kind: str
    size: int
    python_ok: bool
    python_error: str
    cpp_ok: bool
    cpp_error: str
    exit_code: int  # negative: killed by that signal
    timed_out: bool
    peak_rss_mb: float
    cpu_s: float
    wall_s: float
    levels: float | None = None  # model-input max difference in 8-bit levels where both accept
    same_shape: bool = True

    @property
    def crashed(self) -> bool:
        return self.exit_code < 0 or self.exit_code not in (0, 2) or (self.exit_code == 2 and self.cpp_ok)

    @property
    def known(self) -> str | None:
        return next((why for prefix, why in KNOWN_DIFFERENCES.items() if self.name.startswith(prefix)), None)


@dataclass
class HostileReport:
    binary: str
    model: str
    budget_mb: int
    baseline_rss_mb: float
    results: list[CaseResult] = field(default_factory=list)

    def accept_refuse_diffs(self) -> list[CaseResult]:
        return [r for r in self.results if not r.crashed and not r.timed_out and r.python_ok != r.cpp_ok]

    def input_diffs(self) -> list[CaseResult]:
        return [r for r in self.results if r.python_ok and r.cpp_ok and (not r.same_shape or (r.levels or 0) > 0)]

    def rss_over(self, slack_mb: float) -> list[CaseResult]:
        return [r for r in self.results if r.peak_rss_mb > self.baseline_rss_mb + self.budget_mb + slack_mb]

    def failures(self, slack_mb: float = 24.0) -> list[str]:
        out = [f"{r.name}: dtop-embed crashed (exit {r.exit_code}): {r.cpp_error}" for r in self.results if r.crashed]
        out += [f"{r.name}: no answer within the timeout ({r.wall_s:.0f} s)" for r in self.results if r.timed_out]
        out += [f"{r.name}: peak RSS {r.peak_rss_mb:.0f} MB > {self.baseline_rss_mb:.0f} + {self.budget_mb} + "
                f"{slack_mb:.0f} MB" for r in self.rss_over(slack_mb)]  # fmt: skip
        for r in self.accept_refuse_diffs() + self.input_diffs():
            if r.known is None:
                what = f"model inputs differ ({r.levels} levels)" if r.same_shape else "model input shapes differ"
                if r.python_ok != r.cpp_ok:
                    side = "C++" if r.cpp_ok else "Python"
                    what = f"only {side} accepts it (Python: {r.python_error or 'ok'}; C++: {r.cpp_error or 'ok'})"
                out.append(f"{r.name}: {what}")
        return out

    def summary(self) -> dict[str, Any]:
        ar, mi = self.accept_refuse_diffs(), self.input_diffs()
        return {
            "cases": len(self.results),
            "accepted_by_both": sum(r.python_ok and r.cpp_ok for r in self.results),
            "refused_by_both": sum(not r.python_ok and not r.cpp_ok for r in self.results),
            "crashes": sum(r.crashed for r in self.results),
            "hangs": sum(r.timed_out for r in self.results),
            "peak_rss_mb_max": round(max((r.peak_rss_mb for r in self.results), default=0.0), 1),
            "peak_rss_over_baseline_mb_max": round(
                max((r.peak_rss_mb for r in self.results), default=0.0) - self.baseline_rss_mb, 1
            ),
            "baseline_rss_mb": round(self.baseline_rss_mb, 1),
            "budget_mb": self.budget_mb,
            "cpu_s_max": round(max((r.cpu_s for r in self.results), default=0.0), 2),
            "accept_refuse_differences": len(ar),
            "accept_refuse_differences_unexplained": sum(r.known is None for r in ar),
            "model_input_differences": len(mi),
            "model_input_differences_unexplained": sum(r.known is None for r in mi),
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary, counts by kind, every difference, and the cases that cost the most memory and time."""
        kinds: dict[str, dict[str, int]] = {}
        for r in self.results:
            k = kinds.setdefault(r.kind, {"cases": 0, "python_reads": 0, "cpp_reads": 0})
            k["cases"] += 1
            k["python_reads"] += r.python_ok
            k["cpp_reads"] += r.cpp_ok

        def brief(r: CaseResult) -> dict[str, Any]:
            return asdict(r) | {"crashed": r.crashed, "known": r.known}

        diffs = self.accept_refuse_diffs() + self.input_diffs()
        return {
            "binary": self.binary,
            "model": self.model,
            "summary": self.summary(),
            "by_kind": kinds,
            "differences": [brief(r) for r in diffs],
            "failures": self.failures(),
            "most_memory": [brief(r) for r in sorted(self.results, key=lambda r: -r.peak_rss_mb)[:10]],
            "most_cpu": [brief(r) for r in sorted(self.results, key=lambda r: -r.cpu_s)[:10]],
        }


# Runs the command in a grandchild and reports its own rusage: a child forked from this (large) Python process
# would inherit this process's peak RSS through fork/vfork + exec (Linux keeps ru_maxrss across exec).
_LAUNCHER = """
import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump([os.waitstatus_to_exitcode(status), ru.ru_maxrss, ru.ru_utime + ru.ru_stime], fh)
"""


def run_measured(cmd: Sequence[str], timeout: float, log: Path) -> tuple[int, bool, float, float, float]:
    """(exit code or -signal, timed out, peak RSS MB, CPU s, wall s) of ``cmd`` (stdout and stderr to ``log``),
    killed after ``timeout`` seconds."""
    import sys

    usage = log.with_suffix(".rusage.json")
    usage.unlink(missing_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage), *cmd], stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -signal.SIGKILL, True, 0.0, 0.0, time.perf_counter() - t0
    wall = time.perf_counter() - t0
    code, rss_kb, cpu = json.loads(usage.read_text())
    return int(code), False, rss_kb / 1024.0, float(cpu), wall


def run_hostile(
    binary: str | Path,
    model: str | Path,
    cases: Sequence[Case],
    budget: DecodeBudget,
    image_size: int = 64,
    timeout: float = 120.0,
    progress: Callable[[int, int], None] | None = None,
    limit_flags: Sequence[str] | None = None,
) -> HostileReport:
    """Each case through ``dtop-embed`` (one process per file, ``--max-*`` from ``budget``, one thread) and
    through ``load_image`` + ``prepare`` here with the same budget; see :class:`HostileReport`.
    ``limit_flags`` replaces the ``--max-*`` flags (``[]`` for a client that predates them)."""
    import numpy as np

    from dtop_export.contract import preprocess_from_metadata, read_metadata
    from dtop_export.preprocess import load_image, prepare

    binary, model = Path(binary), Path(model)
    if not binary.is_file():
        raise DToPError(f"{binary} not found: build the C++ client with `dtop-export cpp build`")
    cfg = preprocess_from_metadata(read_metadata(model))
    levels_scale = 255.0 * np.asarray(cfg.std, np.float32)[:, None, None]
    flags = ["--max-pixels", str(budget.max_pixels), "--max-decode-mb", str(budget.max_decode_mb),
             "--max-scans", str(budget.max_scans)] if limit_flags is None else list(limit_flags)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="dtop-hostile-") as tmp:
        tmpd = Path(tmp)
        base_img = tmpd / "baseline.png"
        from PIL import Image

        Image.new("RGB", (32, 24), (90, 140, 30)).save(base_img)

        def cpp(path: Path) -> tuple[list[str], Path]:
            dump = tmpd / "dump"
            shutil.rmtree(dump, ignore_errors=True)
            for previous in ("out.npy", "out.json"):  # dtop-embed keeps an existing output (--force: a newer client)
                (tmpd / previous).unlink(missing_ok=True)
            cmd = [str(binary), str(model), str(path), "-o", str(tmpd / "out.npy"), "--image-size", str(image_size),
                   "--no-progress", "--threads", "1", "--dump-inputs", str(dump), *flags]  # fmt: skip
            return cmd, dump

        baseline = 0.0
        for _ in range(3):
            cmd, _ = cpp(base_img)
            code, _, rss, _, _ = run_measured(cmd, timeout, tmpd / "log.txt")
            if code != 0:
                raise DToPError(f"{binary.name} failed on a plain PNG: {(tmpd / 'log.txt').read_text()[-500:]}")
            baseline = max(baseline, rss)
        report = HostileReport(str(binary), str(model), budget.max_decode_mb, baseline)
        for k, case in enumerate(cases):
            path = tmpd / ("case" + (".png" if case.data.startswith(PNG_SIGNATURE) else ".jpg"))
            path.write_bytes(case.data)
            cmd, dump = cpp(path)
            code, timed_out, rss, cpu, wall = run_measured(cmd, timeout, tmpd / "log.txt")
            log = (tmpd / "log.txt").read_text(errors="replace")
            lines = [ln for ln in log.splitlines() if ln.startswith(("skipped: ", "error: "))]
            cpp_ok = code == 0 and (dump / "0.npy").is_file()
            cpp_error = "" if cpp_ok else (lines[0].split(": ", 1)[1] if lines else log.strip()[-300:])
            cpp_error = cpp_error.replace(f"cannot read image {path}: ", "")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Pillow's warnings about broken files: the refusals say it
                    img = load_image(path, budget=budget)
                x = prepare(img, cfg, image_size)
                py_ok, py_error = True, ""
            except DToPError as e:
                py_ok, py_error, x = False, str(e).replace(f"cannot read image {path}: ", ""), None
            r = CaseResult(case.name, case.kind, len(case.data), py_ok, py_error, cpp_ok, cpp_error, code, timed_out,
                           round(rss, 1), round(cpu, 3), round(wall, 3))  # fmt: skip
            if py_ok and cpp_ok and x is not None:
                y = np.load(dump / "0.npy")
                r.same_shape = x.shape == y.shape
                if r.same_shape:
                    r.levels = float(np.round((np.abs(x - y) * levels_scale).max(), 3))
            report.results.append(r)
            if progress:
                progress(k + 1, len(cases))
    return report


def format_report(report: HostileReport) -> str:
    """The Markdown table of a run: the summary and every difference with its reason."""
    s = report.summary()
    lines = [
        "| cases | accepted by both | refused by both | crashes | hangs | peak RSS max (over baseline) | "
        "accept/refuse differences | model-input differences |",
        "|---|---|---|---|---|---|---|---|",
        f"| {s['cases']} | {s['accepted_by_both']} | {s['refused_by_both']} | {s['crashes']} | {s['hangs']} | "
        f"{s['peak_rss_mb_max']} MB ({s['peak_rss_over_baseline_mb_max']:+} MB; budget {s['budget_mb']} MB) | "
        f"{s['accept_refuse_differences']} ({s['accept_refuse_differences_unexplained']} unexplained) | "
        f"{s['model_input_differences']} ({s['model_input_differences_unexplained']} unexplained) |",
    ]
    diffs = report.accept_refuse_diffs() + report.input_diffs()
    if diffs:
        lines += ["", "| case | Python | C++ | why |", "|---|---|---|---|"]
        for r in diffs:
            py = "reads it" if r.python_ok else f"refuses: {r.python_error[:70]}"
            cp = "reads it" if r.cpp_ok else f"refuses: {r.cpp_error[:70]}"
            if r.python_ok and r.cpp_ok:
                cp = f"{r.levels} levels off" if r.same_shape else "another input shape"
            lines.append(f"| {r.name} | {py} | {cp} | {r.known or '**unexplained**'} |")
    return "\n".join(lines)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    return str(o)


def write_report(report: HostileReport, path: str | Path) -> None:
    from dtop_export.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(report.to_dict(), indent=1, default=_json_default) + "\n")
