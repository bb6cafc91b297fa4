"""The self-test's report (one :class:`Check` per step, the verdict and exit code) and the steps every mode shares:
running a step, exporting the small test model, the photos it runs on, the builder's warnings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("dtop_export.engines.tensorrt")  # the builder's warnings are read from this logger

EXIT_MISSING = 2
EXIT_BUILT_NOT_RUN = 3
SMALL_PROFILE = ("1x3x128x128", "2x3x256x256", "4x3x384x384")
BUILD_ONLY_TARGETS = "sm86,sm89"  # GPU-less builds (TensorRT-RTX): Ampere and Ada, the commonest RTX GPUs
NOT_RUN = "built, not run: needs a GPU"


@dataclass
class Check:
    """One self-test step: ``status`` is ``pass``, ``fail``, ``skip`` (with the reason in ``detail``) or
    ``notrun`` (needs a GPU this machine does not have)."""

    name: str
    status: str
    detail: str
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class SelfTestReport:
    environment: dict[str, Any]
    full: bool
    checks: list[Check] = field(default_factory=list)

    targets: list[str] = field(default_factory=list)  # GPU-less build targets (TensorRT-RTX without a GPU)

    @property
    def passed(self) -> bool:
        """At least one check ran and none failed."""
        return any(c.status == "pass" for c in self.checks) and not any(c.status == "fail" for c in self.checks)

    @property
    def not_run(self) -> int:
        """Steps that need a GPU and did not run."""
        return sum(c.status == "notrun" for c in self.checks)

    def exit_code(self) -> int:
        """0 everything passed, 1 a failure, 3 what could run passed but GPU steps did not run."""
        if not self.passed:
            return 1
        return EXIT_BUILT_NOT_RUN if self.not_run else 0

    def verdict(self) -> str:
        """The last line: ``self-test PASS: 9 passed, 0 failed, 1 skipped (TensorRT 10.13 on NVIDIA H100)``, or
        ``self-test PASS (built, not run: needs a GPU): 7 passed, ... 5 not run (TensorRT-RTX 1.7 ...)``."""
        n = {s: sum(c.status == s for c in self.checks) for s in ("pass", "fail", "skip")}
        env = self.environment
        gpu = (env.get("gpu") or {}).get("name")
        where = f"{env.get('tensorrt_flavour', 'TensorRT')} {env.get('tensorrt', '?')} " + (
            f"on {gpu}" if gpu else "on no usable GPU"
        )
        if self.targets:
            where += f"; built for {', '.join(self.targets)}"
        word = "PASS" if self.passed else "FAIL"
        if self.passed and self.not_run:
            word += f" ({NOT_RUN})"
        counts = f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped"
        if self.not_run:
            counts += f", {self.not_run} not run"
        return f"self-test {word}: {counts} ({where})"

    def table(self) -> str:
        """Markdown: one row per check."""
        lines = ["| check | result | seconds | detail |", "|---|---|---:|---|"]
        for c in self.checks:
            mark = {"pass": "PASS", "fail": "**FAIL**", "skip": "skip", "notrun": "not run"}[c.status]
            lines.append(f"| {c.name} | {mark} | {c.seconds:.1f} | {c.detail} |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "full": self.full,
            "targets": self.targets,
            "passed": self.passed,
            "exit_code": self.exit_code(),
            "verdict": self.verdict(),
            "checks": [asdict(c) for c in self.checks],
        }


def step(report: SelfTestReport, name: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> Check:
    """Run one check; an exception is a failed check with its one-line message (the log has the rest)."""
    t0 = time.perf_counter()
    try:
        status, detail, data = fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes a row of the report
        log.debug("self-test step %s failed", name, exc_info=True)
        status, detail, data = "fail", f"{e.__class__.__name__}: {' '.join(str(e).split())[:300]}", {}
    check = Check(name, status, detail, round(time.perf_counter() - t0, 2), data)
    report.checks.append(check)
    return check


def export_step(report: SelfTestReport, work: Path, state: dict[str, Any]) -> bool:
    """The first step of every mode: the random-init small preset (whitened) exported to ``work/small.onnx``;
    ``state["ref"]``/``state["images"]`` are ONNX Runtime and its inputs. True when it passed."""
    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.export import export_onnx

    onnx_path = work / "small.onnx"

    def export() -> tuple[str, str, dict[str, Any]]:
        export_onnx(random_checkpoint("small", work / "small.pt", source="dtop-export trt --self-test"), onnx_path)
        ref = OnnxRuntimeEngine(onnx_path)
        state["onnx"], state["ref"] = onnx_path, ref
        state["images"] = sample_images(ref.preprocess, (256, 384), 3)
        return "pass", f"random-init small preset -> {onnx_path.name}", {}

    return step(report, "export small model", export).status == "pass"


PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "hubble_deep_field.jpg", "camera.png")


def sample_images(preprocess: Any, sizes: Sequence[int], n: int) -> list[np.ndarray]:
    """``n`` photos that scikit-image ships, decoded and prepared like every engine's input at each of
    ``sizes`` (no downloads)."""
    from dtop_export.preprocess import load_image, prepare
    from dtop_export.retrieval.sample_data import skimage_data_dir

    photos = [load_image(skimage_data_dir() / name) for name in PHOTOS[:n]]
    return [prepare(img, preprocess, size) for size in sizes for img in photos]


class captured_warnings:  # noqa: N801 - used as a context manager
    """Collect WARNING records of the TensorRT logger (the builder's fallbacks)."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        lines = self.lines

        class _H(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                if record.levelno >= logging.WARNING:
                    lines.append(record.getMessage())

        self.handler = _H()
        log.addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc: object) -> None:
        log.removeHandler(self.handler)
