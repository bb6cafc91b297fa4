"""The INT8 contract where an INT8 artefact is made: its descriptors against the fp32 model's on check inputs (images
of the calibration source held out of calibration, :func:`~dtop_export.quantize.calibration_and_check`, or the
calibration inputs where the source has too few; ExecuTorch's dynamic INT8 calibrates nothing, so its images only
check), and one refusal below the contract's cosine floor, before anything is written.

The three INT8 makers use it: ``quantize`` (ONNX Runtime QDQ), ``openvino --int8`` (the IR) and ``executorch
--int8`` (the ``.pte``). Each runs its own artefact in its own runtime and passes the descriptors here; the report
(:func:`agreement`) travels in the artefact's ``dtop.quantization`` as ``check``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from dtop_export.errors import DToPError
from dtop_export.parity import CONTRACTS

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
