"""The one preprocessing path: how image files become the model's input tensor, for every consumer.

Engines (through :mod:`dtop_export.retrieval.extract`), INT8 calibration, whitening, training's final tensor
step, ``embed`` and the demo all go through here: decoding with EXIF orientation within a decode budget
(:class:`DecodeBudget`, measured in :mod:`dtop_export.decode_budget`), any PIL mode to 8-bit RGB (alpha composited
on white, 16-bit scaled), the ``longest_side`` resize with sides rounded to the stride (``floor(v + 0.5)``) or the
``square`` one of a fixed-size program (a query cropped to its box is never enlarged: :func:`crop_side`),
``(x / 255 - mean) / std``, and :func:`list_images` with one suffix set.
The contract's values (:class:`PreprocessConfig`) travel in the checkpoint and in every exported model's metadata.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.decode_budget import EXIF_TRANSPOSE, MIB, DecodeBudget, check_budget, open_image
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
# The image files every command reads (folders are searched recursively for these suffixes).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class PreprocessConfig:
    """What a deployer must do to an image before the model sees it.

    mean/std: per-channel normalisation of [0, 1] RGB pixels, from the backbone's pretraining.
    color_order: channel order of the input tensor (always ``RGB``).
    resize: ``longest_side`` resizes keeping the aspect ratio so the longer side is ``size``
        (1024 in the ROxford/RParis protocol), then rounds both sides to a multiple of ``stride``;
        ``square`` resizes the whole image to ``size``×``size`` (aspect ratio not kept, nothing cropped):
        the input of a program compiled for one fixed size (an ExecuTorch ``.pte``).
    stride: the model's total stride; H and W of the input must be multiples of it.
    interpolation: PIL resampling filter used for the resize.
    """

    mean: tuple[float, float, float] = INCEPTION_MEAN
    std: tuple[float, float, float] = INCEPTION_STD
    color_order: str = "RGB"
    resize: str = "longest_side"
    size: int = 1024
    stride: int = 16
    interpolation: str = "bilinear"
    layout: str = "NCHW"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def validate(self) -> None:
        """Raise :class:`DToPError` for values no image can be prepared with (a file's, checked on load)."""
        if self.stride < 1 or self.size < 1:
            raise DToPError(f"preprocessing stride and size must be >= 1, got stride {self.stride}, size {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise DToPError(f"preprocessing mean/std need 3 values each, std > 0: got {self.mean}, {self.std}")
        if self.resize not in ("longest_side", "square"):
            raise DToPError(f"unknown preprocessing resize {self.resize!r}: longest_side or square")
        if self.interpolation not in _RESAMPLE:
            raise DToPError(f"unknown interpolation {self.interpolation!r}: choose one of {', '.join(_RESAMPLE)}")
        if (self.color_order, self.layout) != ("RGB", "NCHW"):
            raise DToPError(f"preprocessing must be RGB, NCHW; got {self.color_order}, {self.layout}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise DToPError(f"unknown preprocessing field(s) {', '.join(unknown)}: upgrade dtop-export")
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", INCEPTION_MEAN)), tuple(d.get("std", INCEPTION_STD))
        return cls(**d)


def default_preprocess(backbone: str, stride: int) -> PreprocessConfig:
    """The normalisation the backbone was pretrained with (timm's pretrained config), else Inception's."""
    mean, std = INCEPTION_MEAN, INCEPTION_STD
    try:
        import timm

        if timm.is_model(backbone):
            pc = timm.get_pretrained_cfg(backbone)
            if pc is not None and pc.mean and pc.std:
                mean, std = tuple(pc.mean), tuple(pc.std)
    except ImportError:  # pragma: no cover - timm is a hard dependency
        pass
    return PreprocessConfig(mean=mean, std=std, stride=stride)


# Image loading and the resize/normalise steps every engine shares -----------------------------------

_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_WHITE = (255, 255, 255)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB.

    Alpha (RGBA, LA, PA, palette with transparency) is composited on white; 16-bit (``I;16*``) and 32-bit
    integer (``I``, read as the 16-bit range 0..65535 that 16-bit PNG/TIFF decode to) are scaled to 8 bits;
    float (``F``) is taken as [0, 1] when its maximum is at most 1, else as [0, 255]; CMYK, YCbCr, LAB,
    HSV, 1-bit and grayscale go through PIL's RGB conversion.
    """
    import numpy as np
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.float64)
        a = np.clip(a, 0, 65535) / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        a = np.asarray(img).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0)
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.round(np.clip(a, 0, 255)).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def _upright(img: Image.Image) -> Image.Image:
    """``img`` turned by its EXIF orientation: what ``ImageOps.exif_transpose`` does to the pixels (the same
    ``getexif()`` decides), without its rewrite of the metadata, which can fail on a crafted EXIF block."""
    from PIL import Image

    method = EXIF_TRANSPOSE.get(img.getexif().get(0x0112, 1))
    return img if method is None else img.transpose(Image.Transpose(method))


def load_image(
    path: str | Path, apply_exif: bool = True, data: bytes | None = None, budget: DecodeBudget | None = None
) -> Image.Image:
    """Read an image file as 8-bit RGB, with its EXIF orientation applied (see :func:`to_rgb`).

    ``data``: the file's bytes, already read (e.g. from object storage); ``path`` then only names it in errors.
    ``budget``: what decoding may cost (:class:`DecodeBudget`; default: its defaults), checked from the header
    before the pixels are decoded. An unreadable, truncated, over-budget or non-image file, whatever the
    decoder raised, is one :class:`DToPError` line naming the file.
    """
    import io

    from PIL import UnidentifiedImageError

    budget = budget or DecodeBudget()
    try:
        if data is None:
            size = Path(path).stat().st_size
            if size > budget.max_decode_mb * MIB:
                raise DToPError(
                    f"the file has {-(-size // MIB)} MB, over the decode budget of {budget.max_decode_mb} MB "
                    "(raise it with --max-decode-mb or DecodeBudget.max_decode_mb)"
                )
            data = Path(path).read_bytes()
        img = open_image(io.BytesIO(data))  # the budget decides, not Pillow's DecompressionBombWarning
        with img:
            check_budget(img, data, budget)
            img.load()
            return to_rgb(_upright(img) if apply_exif else img).copy()
    except FileNotFoundError as e:
        raise DToPError(f"image {path} not found") from e
    except DToPError as e:
        raise DToPError(f"cannot read image {path}: {e}") from e
    except UnidentifiedImageError as e:
        raise DToPError(f"cannot read image {path}: not an image file Pillow can read") from e
    except Exception as e:  # every decoder failure (OSError, SyntaxError, struct.error, ...) is one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DToPError(f"cannot read image {path}: {reason}") from e


RESIZE_POLICIES = ("longest_side", "square")


def model_size(
    width: int, height: int, cfg: PreprocessConfig, size: float | None = None, scale: float = 1.0
) -> tuple[int, int]:
    """(width, height) the model sees: longer side ``size*scale`` keeping aspect, sides rounded to the stride
    (``longest_side``), or a ``size*scale`` square rounded to the stride (``square``)."""
    if cfg.resize not in RESIZE_POLICIES:
        raise DToPError(f"resize policy {cfg.resize!r} is not supported: only {', '.join(RESIZE_POLICIES)}")
    target = (size or cfg.size) * scale
    if target <= 0 or width <= 0 or height <= 0:
        raise DToPError(f"cannot resize a {width}x{height} image to a longer side of {target:g}")
    stride = cfg.stride
    if cfg.resize == "square":
        side = max(stride, int(math.floor(target / stride + 0.5)) * stride)
        return side, side
    f = target / max(width, height)

    def snap(v: float) -> int:
        return max(stride, int(math.floor(v * f / stride + 0.5)) * stride)

    return snap(width), snap(height)


def resize_for_model(
    img: Image.Image, cfg: PreprocessConfig, size: float | None = None, scale: float = 1.0
) -> Image.Image:
    """Resize so the longer side is ``size*scale`` (default ``cfg.size``) keeping the aspect ratio, then round
    each side to the nearest multiple of ``cfg.stride`` (at least one stride); a ``square`` policy resizes the
    whole image to that side squared (:func:`model_size`)."""
    resample = _RESAMPLE.get(cfg.interpolation)
    if resample is None:
        raise DToPError(f"unknown interpolation {cfg.interpolation!r}: choose one of {', '.join(_RESAMPLE)}")
    w, h = model_size(img.width, img.height, cfg, size, scale)
    if (w, h) == img.size:
        return img
    return img.resize((w, h), resample=resample)


def input_size(cfg: PreprocessConfig, requested: int | None = None, dataset: int | None = None) -> int:
    """The size images are resized to: ``requested`` (``--image-size``), else a data set's own evaluation size,
    else the model's; a model compiled for one square size (``square`` policy) takes its own over a data set's."""
    if requested:
        return requested
    if cfg.resize == "square":
        return cfg.size
    return dataset or cfg.size


def normalize(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """8-bit RGB image -> float32 [3, H, W]: pixels scaled to [0, 1], then ``(x - mean) / std``."""
    import numpy as np

    return normalize_pixels(np.asarray(to_rgb(img)), mean, std)


def normalize_pixels(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 RGB pixels [..., H, W, 3] -> float32 [..., 3, H, W], ``(x / 255 - mean) / std`` in float32: the one
    normalisation arithmetic (engines that take uint8 batches repeat it elementwise, so their input is this)."""
    import numpy as np

    a = np.asarray(pixels, dtype=np.float32) / 255.0
    a = (a - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(np.moveaxis(a, -1, -3), dtype=np.float32)


def to_tensor(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    return normalize(img, cfg.mean, cfg.std)  # 8-bit RGB image -> float32 [3, H, W] (:func:`normalize`)


def crop_bbox(img: Image.Image, bbx: Sequence[float]) -> Image.Image:
    """Crop to a revisitop query box ``(x1, y1, x2, y2)`` in pixels, rounded like PIL, clamped to the image."""
    try:
        values = [float(v) for v in bbx]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise DToPError(f"a bounding box has 4 finite numbers (x1, y1, x2, y2), got {list(bbx)}")
    x1, y1, x2, y2 = (int(round(v)) for v in values)
    x1, x2 = max(0, min(x1, img.width)), max(0, min(x2, img.width))
    y1, y2 = max(0, min(y1, img.height)), max(0, min(y2, img.height))
    if x2 <= x1 or y2 <= y1:
        raise DToPError(f"bounding box {list(bbx)} is empty inside a {img.width}x{img.height} image")
    return img.crop((x1, y1, x2, y2))


def prepare(
    img: Image.Image,
    cfg: PreprocessConfig,
    size: int | None = None,
    scale: float = 1.0,
    bbx: Sequence[float] | None = None,
) -> np.ndarray:
    """crop (optional) -> resize -> normalise: the model input [3, H, W] for one image at one scale."""
    return normalize_pixels(prepare_pixels(img, cfg, size, scale, bbx), cfg.mean, cfg.std)


def prepare_pixels(img: Image.Image, cfg: PreprocessConfig, size: int | None = None, scale: float = 1.0,
                   bbx: Sequence[float] | None = None) -> np.ndarray:  # fmt: skip
    """:func:`prepare` before the normalisation: uint8 RGB [H, W, 3] (a quarter of the float32 bytes), for engines
    that normalise a batch themselves (``Engine.embed_pixels``). A query cropped to ``bbx`` is resized as
    :func:`crop_side` says (never enlarged, as in cirtorch); without a box the image's longer side becomes
    ``size * scale``."""
    import numpy as np

    if bbx is not None:
        full = img.size
        img = crop_bbox(img, bbx)
        if cfg.resize == "longest_side":  # a square program takes its one size, crop or not
            size = crop_side(full, img.size, size or cfg.size)
    return np.asarray(resize_for_model(to_rgb(img), cfg, size, scale), dtype=np.uint8)


def crop_side(full: tuple[int, int], crop: tuple[int, int], size: float) -> float:
    """The longer side a query crop is resized to (before the scale, then rounded to the stride like any image):
    the crop at the scale its whole image gets at ``size``, never enlarged, i.e.
    ``max(crop) * min(1, size / max(full))``: cirtorch's ``ImagesFromList`` (crop, then ``thumbnail`` to
    ``size * max(crop) / max(full)``), which revisitop's evaluation uses; multi-scale then rescales that image."""
    return max(crop) * min(1.0, size / max(full))


def prepare_square(img: Image.Image, cfg: PreprocessConfig, side: int) -> np.ndarray:
    """The model input [3, S, S] of a centre square: the shorter side resized to ``S`` (``side`` rounded down
    to the stride, at least one stride) keeping the aspect ratio, the longer side rounded like
    :func:`model_size`, then the centre ``S×S`` crop. For calibrators that need one input shape."""
    resample = _RESAMPLE.get(cfg.interpolation)
    if resample is None:
        raise DToPError(f"unknown interpolation {cfg.interpolation!r}: choose one of {', '.join(_RESAMPLE)}")
    img = to_rgb(img)
    s = max(cfg.stride, side // cfg.stride * cfg.stride)
    f = s / min(img.width, img.height)
    w, h = (max(s, int(math.floor(v * f + 0.5))) for v in img.size)
    if (w, h) != img.size:
        img = img.resize((w, h), resample=resample)
    left, top = (w - s) // 2, (h - s) // 2
    return to_tensor(img.crop((left, top, left + s, top + s)), cfg)


# image files ----------------------------------------------------------------------------------------------


def image_size(path: str | Path, header_only: bool = False) -> tuple[int, int] | None:
    """(width, height) of the image as :func:`load_image` will return it (EXIF orientation applied), read
    from the file's header without decoding; None for a missing or non-image file, one the decoder fails on, or
    one too large for the default :class:`DecodeBudget` (whose EXIF a PNG would decode the pixels to find).
    ``header_only``: never decode; a PNG whose EXIF follows its pixels is then taken as unrotated."""

    budget = DecodeBudget()
    try:
        im = open_image(path)
        with im:
            w, h = im.size
            if not budget.fits_header(w, h):
                return None
            late_exif = header_only and im.format == "PNG" and "exif" not in im.info  # Pillow would decode it
            orientation = 1 if late_exif else im.getexif().get(0x0112, 1)
    except Exception:  # any decoder failure: load_image would refuse the file too
        return None
    if EXIF_TRANSPOSE.get(orientation) in (2, 4, 5, 6):  # turned by 90° or transposed: the sides swap
        w, h = h, w
    return (int(w), int(h)) if w > 0 and h > 0 else None


def is_image_file(path: Path) -> bool:
    """A file whose suffix is one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted); a missing folder or one without images is a
    :class:`DToPError` naming the suffixes looked for."""
    folder = Path(folder)
    if folder.is_file():
        raise DToPError(f"{folder} is a file, not a folder of images")
    if not folder.is_dir():
        raise DToPError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not paths:
        raise DToPError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    return paths


def expand_images(items: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the images under them (:func:`list_images` order); an empty folder
    contributes nothing."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if is_image_file(f)))
        else:
            out.append(p)
    return out
