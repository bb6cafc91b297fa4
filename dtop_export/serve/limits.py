"""What the service accepts and how much of it: upload size, images per request, pixels per image, ``k``/``nprobe``,
the bounded queue. Every refusal is a :class:`RequestError` carrying its HTTP status and one line that says what
to do; the app turns it into ``{"error": ..., "status": ...}``.

Uploads are read through a byte cap (``--max-upload-mb``) before anything is parsed, the image header is checked
against ``--max-pixels`` and the decode budget derived from it (:func:`decode_budget`) before decoding (a
decompression bomb is refused without allocating it), and decoding itself is
:func:`dtop_export.preprocess.load_image` (the one decoding path) on the bytes. The server never fetches a URL a
client names. Imports starlette/PIL inside the functions that need them.
"""

from __future__ import annotations

import io
import math
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from dtop_export.decode_budget import MIB, DecodeBudget
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import numpy as np

    from dtop_export.preprocess import PreprocessConfig

RAW_TYPES = ("application/octet-stream",)  # besides image/*
MULTIPART = "multipart/form-data"
RETRY_AFTER_S = 1.0  # what a 503 for overload tells the client to wait (the app's, and Ray's proxy's)
# Bytes a pixel may cost while it decodes (DecodeBudget.max_decode_mb): RGB and its rotated copy (6) plus the
# decoder's own, up to 6 more (a progressive 4:4:4 JPEG's coefficients; an interlaced RGBA PNG's raw image: 4).
DECODE_BYTES_PER_PIXEL = 12


class RequestError(DToPError):
    """A request the service refuses: ``status`` (4xx, or 503 for overload) and a one-line message."""

    def __init__(self, status: int, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after_s = retry_after_s

    def payload(self) -> dict[str, Any]:
        return {"error": self.message, "status": self.status}


@dataclass(frozen=True)
class Limits:
    """The service's bounds (the ``serve`` options of the same names)."""

    max_upload_mb: float = 20.0
    max_images: int = 16
    max_pixels: int = 40_000_000
    max_k: int = 100
    max_queue: int = 64
    request_timeout_s: float = 30.0
    max_uploads: int = 64
    decode_threads: int = 0  # images the ingress decodes at once; 0: 4 (serve.intake.DECODE_THREADS)

    def __post_init__(self) -> None:
        checks = {
            "--max-upload-mb": math.isfinite(self.max_upload_mb) and self.max_upload_mb > 0,
            "--max-images": self.max_images >= 1,
            "--max-pixels": self.max_pixels >= 1,
            "--max-k": self.max_k >= 1,
            "--max-queue": self.max_queue >= 0,
            "--request-timeout": math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0,
            "--max-uploads": self.max_uploads >= 1,
            "--decode-threads": self.decode_threads >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            zero = "--max-queue and --decode-threads may be 0"
            raise DToPError(f"{', '.join(bad)} must be positive, finite numbers ({zero}): got {self}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_budget(limits: Limits) -> DecodeBudget:
    """What decoding one upload may cost on this service: ``--max-pixels``, and the memory an image of that many
    pixels may take while it decodes (:data:`DECODE_BYTES_PER_PIXEL` a pixel, plus the file): every JPEG, PNG,
    WebP, BMP, GIF or TIFF under ``--max-pixels`` fits, bar a progressive CMYK JPEG near the limit."""
    need = DECODE_BYTES_PER_PIXEL * limits.max_pixels + limits.max_upload_bytes
    return DecodeBudget(max_pixels=limits.max_pixels, max_decode_mb=-(-need // MIB))


def media_type(content_type: str | None) -> str:
    """``image/jpeg; q=1`` -> ``image/jpeg``."""
    return (content_type or "").split(";")[0].strip().lower()


def check_length(content_length: str | None, limits: Limits) -> None:
    """Refuse a declared body over the limit before reading it (413)."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError as e:
        raise RequestError(400, f"bad Content-Length {content_length!r}") from e
    if n > limits.max_upload_bytes:
        raise RequestError(413, _too_large(n, limits))


def _too_large(n: int | None, limits: Limits) -> str:
    size = f"{n / 2**20:.1f} MiB" if n is not None else "more"
    return f"upload of {size} is over the server's limit of {limits.max_upload_mb:g} MiB (--max-upload-mb)"


async def capped(stream: AsyncIterator[bytes], limits: Limits) -> AsyncIterator[bytes]:
    """``stream`` passed through, refused (413) the moment it exceeds ``limits.max_upload_bytes``: a chunked upload
    without Content-Length is never buffered past the limit."""
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limits.max_upload_bytes:
            raise RequestError(413, _too_large(None, limits))
        yield chunk


async def read_images(
    content_type: str | None, headers: Any, stream: AsyncIterator[bytes], limits: Limits, field: str = "upload"
) -> list[tuple[str, bytes]]:
    """(name, bytes) of the images of a request: the raw body (``image/*`` or ``application/octet-stream``, one image)
    or the file parts of a ``multipart/form-data`` body (at most ``limits.max_images``). Errors: 415 for another
    content type, 413 over the size or count limits, 400 for an empty body or a form without files."""
    kind = media_type(content_type)
    body = capped(stream, limits)
    if kind.startswith("image/") or kind in RAW_TYPES:
        data = b"".join([chunk async for chunk in body])
        if not data:
            raise RequestError(400, "empty body: send the image's bytes (or a multipart form with image files)")
        return [(field, data)]
    if kind != MULTIPART:
        raise RequestError(
            415,
            f"unsupported content type {kind or '(none)'!r}: send image/* or application/octet-stream (one image) "
            f"or {MULTIPART} (up to {limits.max_images} images)",
        )
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    parser = MultiPartParser(headers, body, max_files=limits.max_images, max_fields=limits.max_images)
    try:
        form = await parser.parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            status, message = 413, f"more than {limits.max_images} images in one request (--max-images): split it"
        elif "Too many fields" in e.message:  # text parts: the service reads none of them
            status = 400
            message = f"the form holds more than {limits.max_images} text fields: send only the images, as file parts"
        else:
            status, message = 400, f"malformed multipart body: {e.message}"
        raise RequestError(status, message) from e
    files = [(v.filename or k, v) for k, v in form.multi_items() if isinstance(v, UploadFile)]
    try:
        out = [(name, await f.read()) for name, f in files]
    finally:
        await form.close()
    if not out:
        raise RequestError(400, f"the {MULTIPART} body holds no files: add the images as file parts")
    empty = [name for name, data in out if not data]
    if empty:
        raise RequestError(400, f"empty image part(s): {', '.join(empty)}")
    return out


NOT_AN_IMAGE = "send a JPEG, PNG, WebP, BMP, GIF, TIFF or PPM file"


def check_header(name: str, data: bytes, limits: Limits) -> None:
    """Refuse an upload whose header names no image format the service decodes (400), or whose image is over the
    server's limits (413): more than ``limits.max_pixels`` pixels, or over the decode budget
    (:func:`decode_budget`: too many JPEG scans, too much memory to decode). A decompression bomb, a small file
    that decodes to gigabytes, is refused before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    from dtop_export.decode_budget import OverBudget, check_budget, open_image

    try:
        with open_image(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_pixels:
                raise RequestError(
                    413,
                    f"image {name} is {w}x{h} = {w * h / 1e6:.0f} MP, over the server's limit of "
                    f"{limits.max_pixels / 1e6:g} MP (--max-pixels): downscale it before sending",
                )
            check_budget(im, data, decode_budget(limits))
    except OverBudget as e:
        if e.limit == "scans":
            message = f"a JPEG of {e.need} scans, over the server's limit of {e.allowed}: send it as a baseline JPEG"
        else:
            message = (
                f"{e.need} MB to decode, over the server's limit of {e.allowed} MB an image (from --max-pixels): "
                "downscale it before sending"
            )
        raise RequestError(413, f"image {name} is {message}") from e
    except Image.DecompressionBombError as e:  # over twice Pillow's own limit
        raise RequestError(413, f"image {name} is a decompression bomb ({e}): downscale it before sending") from e
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"{name} is not an image: {NOT_AN_IMAGE}") from e


def decode(
    name: str, data: bytes, cfg: PreprocessConfig, image_size: int, scales: tuple[float, ...], limits: Limits
) -> list[np.ndarray]:
    """The model inputs [3, H, W] of one uploaded image, one per scale: the header checks, then the one decoding and
    preprocessing path (:func:`~dtop_export.preprocess.load_image` on the bytes, within :func:`decode_budget`;
    :func:`~dtop_export.preprocess.prepare`). A file whose pixels do not decode (truncated, damaged) is a 400.
    Saves and restores no warning filters: this runs in worker threads, and ``warnings.catch_warnings`` changes the
    process's filters for every thread (see :func:`~dtop_export.decode_budget.open_image`)."""
    from PIL import UnidentifiedImageError

    from dtop_export.preprocess import load_image, prepare

    check_header(name, data, limits)
    try:
        img = load_image(name, data=data, budget=decode_budget(limits))
        return [prepare(img, cfg, image_size, s) for s in scales]
    except DToPError as e:
        if isinstance(e.__cause__, UnidentifiedImageError):
            raise RequestError(400, f"{name} is not an image: {NOT_AN_IMAGE}") from e
        raise RequestError(400, f"{e}: the file is damaged or incomplete: send the complete file") from e


def bounded_int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    """Query parameter ``name`` as an int in [low, high] (422 otherwise)."""
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError as e:
        raise RequestError(422, f"{name} must be an integer, got {value!r}") from e
    if not low <= n <= high:
        raise RequestError(422, f"{name}={n} is out of range: use {low}..{high}")
    return n


class Admission:
    """A bounded count: at most ``capacity`` requests inside at once (the model's queue: requests uploaded and
    being decoded or embedded; or, with ``what``, the uploads being received), the rest refused with 503 +
    Retry-After instead of piling up."""

    def __init__(
        self, capacity: int, retry_after_s: float = RETRY_AFTER_S, what: str = "at capacity ({n} requests in flight)"
    ) -> None:
        self.capacity = capacity
        self.inside = 0
        self.retry_after_s = retry_after_s
        self.what = what

    @property
    def full(self) -> bool:
        return self.inside >= self.capacity

    def check(self) -> None:
        """503 when full, without entering."""
        if self.full:
            raise RequestError(
                503,
                f"the service is {self.what.format(n=self.capacity)}: retry after {self.retry_after_s:g} s",
                retry_after_s=self.retry_after_s,
            )

    def enter(self) -> None:
        self.check()
        self.inside += 1

    def leave(self) -> None:
        self.inside = max(0, self.inside - 1)
