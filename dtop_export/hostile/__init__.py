"""The hostile image set: files a hostile user would upload, generated (deterministic, nothing stored), and the
harness that holds the C++ client's decoder to the Python side (``preprocess.load_image``, i.e. Pillow) on them.

:func:`hostile_cases` builds ~800 JPEG/PNG files from a few small photos scikit-image ships: valid seeds of every
format (every PNG mode and bit depth, interlaced, palettes with tRNS, APNG, JPEG baseline / progressive / 4:4:4 /
grey / CMYK / restart markers), their truncations and byte flips, enlarged headers (decompression bombs in a few
KB), chunk and marker lengths that lie, EXIF / XMP / eXIf / tRNS / PLTE variants that decide the orientation and
colours, progressive JPEGs with hundreds or thousands of scans, and Pillow's own edge cases. Each case says what
it is and whether the CI subset (``Case.ci``: every seed and rule case, one in sixteen of the mutations) carries it.

:func:`run_hostile` runs ``dtop-embed`` once per file (its own process: peak RSS from ``wait4``, CPU time, exit
status, a timeout that catches a hang) and ``load_image`` + ``prepare`` in this process, and compares: the same
files refused, the same model inputs where both accept (0 levels), no crash, peak RSS within the decode budget.
:data:`KNOWN_DIFFERENCES` lists the differences left and why (the README repeats them).

``build`` (bytes of PNG, JPEG and TIFF structures), ``cases`` (seeds and mutations), ``rules`` and ``exif`` (one
Pillow rule per case), ``harness`` (the runs and the report). Imports ``preprocess`` and ``contract``; numpy, PIL
and scikit-image inside the functions, ``onnx`` for :func:`tiny_model` only.
"""

from dtop_export.hostile.build import Case, many_scans_jpeg
from dtop_export.hostile.cases import hostile_cases, write_hostile_set
from dtop_export.hostile.harness import (
    KNOWN_DIFFERENCES,
    CaseResult,
    HostileReport,
    format_report,
    run_hostile,
    run_measured,
    tiny_model,
    write_report,
)

__all__ = [
    "KNOWN_DIFFERENCES",
    "Case",
    "CaseResult",
    "HostileReport",
    "format_report",
    "hostile_cases",
    "many_scans_jpeg",
    "run_hostile",
    "run_measured",
    "tiny_model",
    "write_hostile_set",
    "write_report",
]
