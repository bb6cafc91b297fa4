"""The INT8 contract where an INT8 artefact is made: its descriptors against the fp32 model's on check inputs (images
of the calibration source held out of calibration, :func:`~dtop_export.quantize.calibration_and_check`, or the
calibration inputs where the source has too few; ExecuTorch's dynamic INT8 calibrates nothing, so its images only
check), and one refusal below the contract's cosine floor, before anything is written.

The three INT8 makers use it: ``quantize`` (ONNX Runtime QDQ), ``openvino --int8`` (the IR) and ``executorch
--int8`` (the ``.pte``). Each runs its own artefact in its own runtime and passes the descriptors here; the report
(:func:`agreement`) travels in the artefact's ``dtop.quantization`` as ``check``, with what it ran on
(:class:`CheckInputs`) and the calibration images (:func:`calibration_files`), so that ``parity`` and ``evaluate`` can
say when they grade a model on images it was calibrated on (:func:`calibration_overlap_note`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.errors import DToPError
from dtop_export.parity import CONTRACTS

if TYPE_CHECKING:
    from dtop_export.contract import Engine

INT8_MIN_COSINE = CONTRACTS["int8"].cosine_min  # the INT8 contract's cosine floor (parity's, one value)


class BelowContract(DToPError):
    """An INT8 artefact refused where it was made (:func:`refuse_below_contract`); nothing was written."""

    def __init__(self, message: str, check: dict[str, Any]) -> None:
        super().__init__(message)
        self.check = check

    def reason(self) -> str:
        """A short why, for lists of skipped candidates."""
        c = self.check
        floor = INT8_MIN_COSINE
        return f"below the INT8 contract: cosine min {c['cosine_min']:.5f} < {floor:g} on {c['inputs']} inputs"


def agreement(fp32: Iterable[np.ndarray], int8: Iterable[np.ndarray], reference: str) -> dict[str, Any]:
    """Per-input cosine of the INT8 descriptors to the fp32 ones (float64, each pair flattened), summarised:
    ``{"inputs", "cosine_min", "cosine_mean", "reference"}``; ``reference`` says what the fp32 side ran in."""
    cos = []
    for a, b in zip(fp32, int8, strict=True):
        a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) or 1.0)))
    if not cos:
        raise DToPError("no inputs to check the INT8 model on")
    # np.min, not min(): a NaN cosine (a NaN descriptor) is the minimum, where min() skips it unless it comes first
    return {
        "inputs": len(cos),
        "cosine_min": float(np.min(cos)),
        "cosine_mean": float(np.mean(cos)),
        "reference": reference,
    }


def refuse_below_contract(
    check: dict[str, Any], artefact: str, source: str, remedies: Sequence[str], inputs: str = "calibration inputs"
) -> None:
    """:class:`BelowContract` when ``check`` (:func:`agreement`) is below :data:`INT8_MIN_COSINE`: the ``artefact``
    (e.g. "the INT8 IR (qdq)") is not written; the message names the ``inputs`` (what they were: calibration
    inputs, check images) and ``source``, the worst cosine and what to try (``remedies``)."""
    if check["cosine_min"] >= INT8_MIN_COSINE:  # False for NaN: refused
        return
    raise BelowContract(
        f"{artefact} breaks the INT8 contract on its {check['inputs']} {inputs}"
        f"{f' ({source})' if source else ''}: cosine min {check['cosine_min']:.5f} < {INT8_MIN_COSINE:g} to the "
        f"fp32 model, so nothing was written: try {', '.join(remedies[:-1])}{', or ' if len(remedies) > 1 else ''}"
        f"{remedies[-1]}",
        check,
    )


@dataclass
class CheckInputs:
    """What an INT8 artefact is checked on against the fp32 model: the input tensors, the images they come from, and
    whether those images were held out of calibration (recorded with the check in ``dtop.quantization``); and the
    images calibration ran on (``calibrated``: recorded as ``files``, :func:`calibration_files`)."""

    tensors: list[np.ndarray]
    images: int | None
    held_out: bool
    calibrated: list[Path] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The keys the check records: ``held_out``, ``images``."""
        return {"held_out": self.held_out, **({"images": self.images} if self.images is not None else {})}

    def what(self) -> str:
        """What the inputs are, for messages: ``held-out inputs`` or ``calibration inputs``."""
        return "held-out inputs" if self.held_out else "calibration inputs"


def describe_check(check: dict[str, Any]) -> str:
    """What a recorded check ran on, for the printed line: ``32 held-out inputs (16 images not used for
    calibration)``, or ``the 32 calibration inputs (...: an optimistic check)``."""
    if check.get("held_out"):
        return f"{check['inputs']} held-out inputs ({check['images']} images not used for calibration)"
    return f"the {check['inputs']} calibration inputs (too few images to hold any out: an optimistic check)"


def calibration_files(paths: Iterable[Path]) -> list[list[Any]]:
    """What ``dtop.quantization`` records of the images a model was calibrated on (``files``): each one's name and
    size in bytes, which tell the images of an evaluated set that calibrated it without reading any (wherever either
    was copied to): :func:`calibration_overlap_note`."""
    return [[p.name, p.stat().st_size] for p in paths]


def calibration_overlap_note(engine: Engine, images: Iterable[Path], graded: str) -> str | None:
    """One line when ``engine`` runs an INT8 model calibrated on images of the set it is graded on (``images``: its
    database and query images), whose ``graded`` figure (``ΔmAP``, ``mAP``) is then optimistic; None otherwise. The
    images are matched by the ``files`` of the model's ``dtop.quantization``; a model written before they were
    recorded, by its calibration ``source`` folder (the images of the set under it). Dynamic INT8 (ExecuTorch)
    calibrates nothing."""
    info = getattr(engine, "info", None)  # a TensorRT engine's sidecar
    meta = getattr(engine, "metadata", None) or getattr(info, "metadata", None) or {}
    model = engine.source.name if engine.source else engine.label
    try:
        record = json.loads(meta.get("dtop.quantization") or "{}")
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("recipe") == "dynamic":
        return None
    fix = f"its {graded} is optimistic (calibrate on other images: --calib DIR)"
    files = record.get("files")
    if isinstance(files, list) and files:
        wanted = {(str(f[0]), f[1]) for f in files if isinstance(f, list) and len(f) == 2}
        n = sum(1 for p in images if (p.name, _size(p)) in wanted)
        return f"note: {model} was calibrated on {n} image(s) of this set: {fix}" if n else None
    folder = _source_folder(str(record.get("source", "")))
    n = sum(1 for p in images if folder is not None and p.resolve().is_relative_to(folder))
    return (
        f"note: {model} was calibrated on images from {folder}, which holds {n} image(s) of this set: {fix}"
        if n
        else None
    )


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _source_folder(source: str) -> Path | None:
    """The folder a recorded calibration ``source`` names: ``--calib DIR`` as given, or the path in parentheses of a
    description (``embedded sample set, database images (FOLDER)``); None when it is no folder here."""
    m = re.search(r"\(([^()]+)\)$", source)
    folder = Path(m.group(1) if m else source).expanduser() if source else None
    return folder.resolve() if folder is not None and folder.is_dir() else None
