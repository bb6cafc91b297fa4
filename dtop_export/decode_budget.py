"""What decoding one image may cost (:class:`DecodeBudget`), read from its header before any pixel buffer is
allocated: the arithmetic the C++ client's ``dtop::DecodeLimits`` shares (``cpp/src/decode*.cpp``), so that both
sides refuse the same files. :func:`dtop_export.preprocess.load_image` checks it; this module only measures.

Imports the errors only; PIL images come in already opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from PIL import Image

MIB = 1 << 20
# Pillow's DecompressionBombError threshold (2 * PIL.Image.MAX_IMAGE_PIXELS): Image.open refuses larger images.
PILLOW_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)
# The formats Image.open may try (the ones IMAGE_SUFFIXES names): no exotic plugin parses an untrusted file.
DECODE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM")
EXIF_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}  # orientation -> PIL.Image.Transpose value
# 0xFF and a marker byte: not a stuffed zero, TEM, RSTn, SOI or more fill (a marker with a length, or EOI)
_JPEG_MARKER = re.compile(rb"\xff[\x02-\xcf\xd9-\xfe]")


def open_image(fp: object, formats: tuple[str, ...] = DECODE_FORMATS) -> Image.Image:
    """``PIL.Image.open`` without Pillow's DecompressionBombWarning (an image between 1x and 2x its
    ``MAX_IMAGE_PIXELS``): the decode budget decides, and the warning would only repeat it. The warning is ignored by
    one filter added to the process's list (once; ``append``: the caller's own filters come first), not by
    ``warnings.catch_warnings`` around each open, which saves and restores every filter of the process and is not
    thread-safe: images decode in worker threads (a corpus job's, the service's)."""
    import warnings

    from PIL import Image

    # looked up first: filterwarnings itself, even a no-op, resets every "once per location" registry (each
    # image would then show again the warnings a job shows once)
    if ("ignore", None, Image.DecompressionBombWarning, None, 0) not in warnings.filters:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, append=True)
    return Image.open(fp, formats=formats)


class OverBudget(DToPError):
    """An image over a :class:`DecodeBudget`, refused by :func:`check_budget`: ``limit`` names the bound
    (``"pixels"``, ``"scans"`` or ``"decode_mb"``), ``need`` what the image takes and ``allowed`` the budget's
    value, so that a caller (the service) can word the refusal for its own options."""

    def __init__(self, message: str, limit: str, need: int, allowed: int) -> None:
        super().__init__(message)
        self.limit, self.need, self.allowed = limit, need, allowed


@dataclass(frozen=True)
class DecodeBudget:
    """What decoding one image may cost; an image over it is refused before any pixel buffer is allocated.

    The C++ client's ``dtop::DecodeLimits`` with the same defaults and the same arithmetic
    (:func:`decode_bytes`), so that both sides refuse the same files.

    max_pixels: width x height (Pillow refuses more than :data:`PILLOW_MAX_PIXELS` on its own).
    max_decode_mb: MiB of every buffer that coexists while decoding: the file, the decoded RGB image and its
        rotated copy (6 bytes a pixel), plus the decoder's own: a progressive (or multi-scan) JPEG's
        coefficients, 128 bytes per component and image column of libjpeg's row buffers, an interlaced PNG's
        full-size raw image, 32 bytes per PNG column for its rows.
    max_scans: start-of-scan markers of a JPEG (a progressive JPEG re-reads every block in every scan: a few
        KB of crafted scans cost minutes); encoders write 1 to about 20.
    """

    max_pixels: int = PILLOW_MAX_PIXELS
    max_decode_mb: int = 1024
    max_scans: int = 100

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_decode_mb", "max_scans"):
            if int(getattr(self, name)) < 1:
                raise DToPError(f"{name} must be >= 1, got {getattr(self, name)}")

    def fits_header(self, width: int, height: int) -> bool:
        """Whether an image of this size may be decoded, by its header alone (pixels, and 6 bytes a pixel)."""
        return width * height <= self.max_pixels and 6 * width * height <= self.max_decode_mb * MIB


def jpeg_scans(data: bytes) -> tuple[int, int]:
    """(start-of-scan markers before the end of image, components of the first scan or 0) of a JPEG, walking
    its segments the way libjpeg's marker reader does (entropy-coded data skipped up to the next marker).
    The C++ client walks it the same way (``cpp/src/decode_jpeg.cpp``)."""
    scans, first, pos, n = 0, 0, 2, len(data)
    while (m := _JPEG_MARKER.search(data, pos)) is not None:
        pos = m.end()
        if data[pos - 1] == 0xD9 or pos + 2 > n:
            break
        length = (data[pos] << 8) | data[pos + 1]
        if data[pos - 1] == 0xDA:
            scans += 1
            if scans == 1 and pos + 2 < n:
                first = data[pos + 2]
        if length < 2:
            break
        pos += length
    return scans, first


def decode_bytes(file_size: int, width: int, height: int, work: int) -> int:
    """Bytes of every buffer that coexists while an image decodes: the file, RGB and a rotated copy (6 bytes a
    pixel) and the decoder's ``work`` (:func:`_decoder_work`)."""
    return file_size + 6 * width * height + work


def _decoder_work(img: Image.Image, data: bytes) -> tuple[int, int]:
    """(the decoder's own bytes, JPEG scans) for an opened image, from its header (see :class:`DecodeBudget`)."""
    w, h = img.size
    if img.format in ("JPEG", "MPO"):
        scans, first_components = jpeg_scans(data)
        layers = [(max(1, hs), max(1, vs)) for _, hs, vs, _ in getattr(img, "layer", [])]
        work = 128 * len(layers) * (w + 64)
        if layers and (img.info.get("progressive") or first_components < getattr(img, "layers", 0)):
            hmax, vmax = max(hs for hs, _ in layers), max(vs for _, vs in layers)
            for hs, vs in layers:  # libjpeg's whole-image coefficient arrays: 64 x 2 bytes a block
                bw, bh = -(-w * hs // (8 * hmax)), -(-h * vs // (8 * vmax))
                work += -(-bw // hs) * hs * (-(-bh // vs) * vs) * 128
        return work, scans
    if img.format == "PNG":
        raw = w * h * _PNG_RAW_BYTES.get(img.mode, 4) if img.info.get("interlace") else 0
        return raw + 32 * w, 0
    pixel = 1 if img.mode in ("1", "L", "P") else 2 if img.mode.startswith("I;16") else 4
    return w * h * pixel, 0


# An interlaced PNG's full-size raw image, by Pillow mode (16-bit samples kept only for grey).
_PNG_RAW_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "LA": 2, "RGB": 3, "RGBA": 4}


def check_budget(img: Image.Image, data: bytes, budget: DecodeBudget) -> None:
    """Refuse (:class:`DToPError`) an opened, not yet decoded image over ``budget``, from its header."""
    w, h = img.size
    if w * h > budget.max_pixels:
        raise OverBudget(
            f"{w} x {h} = {w * h} pixels, over the limit of {budget.max_pixels} "
            "(raise it with --max-pixels or DecodeBudget.max_pixels)",
            "pixels", w * h, budget.max_pixels,
        )  # fmt: skip
    work, scans = _decoder_work(img, data)
    if scans > budget.max_scans:
        raise OverBudget(
            f"{scans} JPEG scans, over the limit of {budget.max_scans} "
            "(raise it with --max-scans or DecodeBudget.max_scans)",
            "scans", scans, budget.max_scans,
        )  # fmt: skip
    need = decode_bytes(len(data), w, h, work)
    if need > budget.max_decode_mb * MIB:
        raise OverBudget(
            f"decoding needs {-(-need // MIB)} MB, over the budget of {budget.max_decode_mb} MB "
            "(raise it with --max-decode-mb or DecodeBudget.max_decode_mb)",
            "decode_mb", -(-need // MIB), budget.max_decode_mb,
        )  # fmt: skip
