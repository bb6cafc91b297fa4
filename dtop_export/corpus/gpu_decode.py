"""Optional JPEG decoding on the engine's CUDA device (``embed --gpu-decode``; off by default).

nvJPEG through ``torchvision.io.decode_jpeg(..., device="cuda")`` and the contract's resize done on the device:
Pillow's bilinear (a triangle filter widened by the reduction factor, i.e. antialiased) as
``torch.nn.functional.interpolate(mode="bilinear", antialias=True)``, in Pillow's two passes (horizontal, then
vertical) each rounded half up to uint8 (in float32, not Pillow's 22-bit fixed point: on photos 0.1-0.5% of the
values differ, by one level). Another decoder (other IDCT and chroma upsampling than Pillow's libjpeg-turbo) and
another resize arithmetic: it has its own parity contract, as the C++ client has (DESIGN.md: another decoder),
:data:`DECODER_COSINE` per image against the CPU path, checked by :func:`decoder_parity`.

The CPU still does, per file, what needs no pixels: read the bytes, Pillow's header, the decode budget
(:func:`~dtop_export.preprocess.check_budget`: the same files are refused), the EXIF orientation. Baseline RGB or
grayscale JPEGs go to the device; everything else (PNG and the other formats, CMYK, progressive JPEGs, a file
nvJPEG refuses) is decoded on the CPU as without the option. torch and torchvision are imported inside.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.contract import Engine
    from dtop_export.preprocess import DecodeBudget, PreprocessConfig

DECODER_COSINE = 0.9999  # per-image descriptor cosine against the CPU decoder (the C++ client's contract)


@dataclass
class Encoded:
    """A JPEG the device will decode: its bytes and EXIF orientation (checked against the budget already)."""

    data: bytes
    orientation: int


def inspect_jpeg(path: str, budget: DecodeBudget | None = None) -> Encoded | None:
    """The file as :class:`Encoded` when the device can decode it, None when the CPU should (any other format, a
    mode or coding nvJPEG's RGB path does not take, a file Pillow's header reader refuses: the CPU path then
    reports it as usual). Raises :class:`DToPError` for a file over ``budget``, as the CPU path does."""

    from dtop_export.corpus.source import read_bytes
    from dtop_export.decode_budget import DecodeBudget, check_budget, open_image

    budget = budget or DecodeBudget()
    try:
        data = read_bytes(path)
        img = open_image(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - the CPU path decodes it, or says why it cannot
        return None
    with img:
        if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.info.get("progressive"):
            return None
        try:
            check_budget(img, data, budget)
        except DToPError as e:
            raise DToPError(f"cannot read image {path}: {e}") from e
        try:
            orientation = int(img.getexif().get(0x0112, 1))
        except Exception:  # noqa: BLE001 - a damaged EXIF block: the CPU path handles it
            return None
    return Encoded(data, orientation)


class DeviceJpegDecoder:
    """Decodes :class:`Encoded` JPEGs on ``device`` and resizes them as the contract does: per image, uint8
    [H, W, 3] tensors on the device, one per scale. ``device="cpu"`` runs the same code with libjpeg (tests and
    dry runs); the CLI only offers ``cuda``."""

    def __init__(self, cfg: PreprocessConfig, image_size: int, scales: Sequence[float], device: str = "cuda") -> None:
        import torch

        if cfg.interpolation != "bilinear":
            raise DToPError(
                f"--gpu-decode reproduces the bilinear resize only; this model's contract uses {cfg.interpolation!r}"
            )
        if torch.device(device).type == "cuda":
            from dtop_export.engines.pytorch import check_device

            check_device(device)
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except ImportError as e:  # pragma: no cover - torchvision is a dependency
            raise DToPError("--gpu-decode needs torchvision.io.decode_jpeg: pip install torchvision") from e
        self.cfg, self.image_size, self.scales = cfg, image_size, tuple(scales)
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def decode(self, items: Sequence[Encoded]) -> list[list[Any] | None]:
        """Per item: its tensors per scale, or None where the device decoder failed (decode it on the CPU)."""
        import contextlib
        import warnings

        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if not items:
            return []
        data = [torch.frombuffer(bytearray(e.data), dtype=torch.uint8) for e in items]
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with ctx, torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29: "deprecated, use TorchCodec"
            try:
                images: list[Any] = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
            except RuntimeError:  # one bad file fails the batch: decode one by one to find it
                images = []
                for d in data:
                    try:
                        images.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=self.device))
                    except RuntimeError:
                        images.append(None)
            out = [None if img is None else [self.resize(orient(img, e.orientation), s) for s in self.scales]
                   for img, e in zip(images, items)]  # fmt: skip
        if self.stream is not None:
            self.stream.synchronize()  # the tensors are complete before another stream reads them
            caller = torch.cuda.current_stream(self.device)
            for tensor in (t for rows in out if rows is not None for t in rows):
                # read on the caller's stream (a batch's stack, queued behind the model): their memory, allocated on
                # self.stream, must not go to the next decode before that read has run
                tensor.record_stream(caller)
        return out

    def resize(self, img: Any, scale: float) -> Any:
        """uint8 [3, h, w] -> the model's [H, W, 3] at ``scale`` (:func:`~dtop_export.preprocess.model_size`), as
        Pillow resizes: the horizontal pass, rounded half up to uint8, then the vertical pass, rounded again."""
        import torch
        import torch.nn.functional as F

        from dtop_export.preprocess import model_size

        h, w = img.shape[-2:]
        out_w, out_h = model_size(int(w), int(h), self.cfg, self.image_size, scale)
        x = img[None]
        for size, changes in (((h, out_w), out_w != w), ((out_h, out_w), out_h != h)):
            if changes:
                y = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
                x = torch.floor(y + 0.5).clamp_(0, 255).to(torch.uint8)
        return x[0].permute(1, 2, 0)


def orient(img: Any, orientation: int) -> Any:
    """uint8 [3, h, w] turned by its EXIF ``orientation`` as Pillow's ``transpose`` turns it on the CPU
    (:data:`~dtop_export.preprocess.EXIF_TRANSPOSE`: 0 flip left-right, 1 flip top-bottom, 2/3/4 rotate 90/180/270
    counter-clockwise, 5 transpose, 6 transverse)."""
    import torch

    from dtop_export.preprocess import EXIF_TRANSPOSE

    method = EXIF_TRANSPOSE.get(orientation)
    if method is None:
        return img
    if method == 0:
        return img.flip(-1)
    if method == 1:
        return img.flip(-2)
    if method in (2, 3, 4):
        return torch.rot90(img, method - 1, dims=(-2, -1))
    if method == 5:
        return img.transpose(-2, -1)
    return img.transpose(-2, -1).flip(-1).flip(-2)


def decoder_parity(engine: Engine, paths: Sequence[str], image_size: int, device: str = "cuda") -> dict[str, Any]:
    """Descriptors of ``paths`` from the device decoder against the CPU path, same engine, one image at a time:
    per-image cosine, the pass/fail of :data:`DECODER_COSINE`, and the files the device left to the CPU."""
    import numpy as np

    from dtop_export.corpus.source import load_item
    from dtop_export.preprocess import prepare_pixels

    decoder = DeviceJpegDecoder(engine.preprocess, image_size, (1.0,), device)
    rows, on_cpu = [], []
    for p in paths:
        cpu = engine.embed_pixels(prepare_pixels(load_item(p), engine.preprocess, image_size)[None])[0]
        enc = inspect_jpeg(p)
        dev = decoder.decode([enc])[0] if enc is not None else None
        if dev is None:
            on_cpu.append(p)
            continue
        got = engine.embed_pixels(dev[0][None].contiguous() if engine.device != "cpu" else dev[0][None].cpu().numpy())[
            0
        ]
        rows.append((p, float(np.dot(cpu, got) / (np.linalg.norm(cpu) * np.linalg.norm(got)))))
    cosines = [c for _, c in rows]
    worst = min(rows, key=lambda r: r[1]) if rows else None
    return {
        "contract_cosine": DECODER_COSINE,
        "images": len(rows),
        "decoded_on_cpu": on_cpu,
        "cosine_min": min(cosines) if cosines else None,
        "cosine_mean": float(np.mean(cosines)) if cosines else None,
        "worst": worst[0] if worst else None,
        "passed": bool(cosines) and min(cosines) >= DECODER_COSINE,
        "per_image": dict(rows),
    }
