"""C++ client vs Python, on the same model and the same files: the proof that ``dtop-embed`` computes the
descriptor ``dtop-export embed`` computes.

:func:`write_format_zoo` turns the photos scikit-image ships into every decoding case the Python side accepts
(odd sizes, grey, 1-bit, palette with and without transparency, RGBA, grey+alpha, 16-bit grey/RGB/RGBA/grey+alpha
PNG, CMYK, progressive and 4:4:4 JPEG, the eight EXIF orientations, a PNG without its IEND, portrait, landscape and
extreme-aspect photos at several sizes, whose shape decides the order of Pillow's resample passes) plus three bad
files. The hostile files (broken, huge, crafted) are :mod:`dtop_export.hostile`'s.
:func:`compare` runs the binary (``--dump-inputs``) and the model's Python engine through the Python preprocessing,
and reports per image: the cosine of the descriptors and the max-abs difference of the model inputs.

Imports numpy and PIL at the top; onnxruntime through the engine, inside :func:`compare`.
"""

from __future__ import annotations

import json
import struct
import subprocess
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.errors import DToPError

# The contract of the C++ client (tests/test_cpp.py, `dtop-export cpp parity`).
MIN_COSINE = 0.9999
# Model-input max-abs allowed, in 8-bit levels of the resized image: 0. The client reproduces Pillow's
# integer arithmetic (alpha compositing, CMYK, 16-bit scaling, the fixed-point resample) and decodes with the
# same libjpeg-turbo IDCT (ISLOW, fancy upsampling) and zlib, so any difference is a bug, not rounding.
MAX_LEVELS = 0.0
# The files of write_format_zoo that both sides must refuse.
BAD_FILES = ("text.jpg", "truncated.jpg", "truncated.png")


def _write_png16(path: Path, arr: np.ndarray) -> None:
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA by the channel count): Pillow cannot write 16-bit colour."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + np.ascontiguousarray(arr[y]).astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def write_format_zoo(folder: str | Path) -> dict[str, Path]:
    """Write the decoding cases into ``folder``; returns label -> file. :data:`BAD_FILES` are the ones both
    sides must skip; ``no_iend.png`` (pixels complete, trailing chunk missing) both must read."""
    import skimage
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = Path(skimage.data.__file__).parent
    astronaut = Image.open(photos / "astronaut.png").convert("RGB")
    coffee = Image.open(photos / "coffee.png").convert("RGB")
    cat = Image.open(photos / "chelsea.png").convert("RGB")
    grey = cat.convert("L")
    rng = np.random.default_rng(0)
    out: dict[str, Path] = {}

    def save(name: str, img: Image.Image, **kw: Any) -> None:
        out[name] = folder / name
        img.save(out[name], **kw)

    save("portrait_odd.jpg", astronaut.resize((301, 517)), quality=90)
    save("landscape.jpg", coffee, quality=85)
    save("progressive.jpg", astronaut, quality=80, progressive=True)
    save("subsampling_444.jpg", astronaut, quality=95, subsampling=0)
    save("grey.jpg", grey, quality=90)
    save("cmyk.jpg", cat.convert("CMYK"), quality=90)
    for o in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = o
        save(f"exif_orientation_{o}.jpg", coffee.resize((250, 170)), exif=exif, quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_orientation_6.png", cat, exif=exif)
    save("rgb.png", coffee.resize((333, 211)))
    save("grey.png", grey)
    save("bilevel.png", grey.convert("1"))
    save("palette.png", astronaut.convert("P", palette=Image.Palette.ADAPTIVE))
    save("palette_transparent.png", coffee.convert("P", palette=Image.Palette.ADAPTIVE), transparency=5)
    rgba = np.array(coffee.convert("RGBA"))
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)[None]
    save("rgba.png", Image.fromarray(rgba))
    la = np.stack([np.array(grey), np.full(grey.size[::-1], 200, np.uint8)], -1)
    la[:50, :, 1] = 0
    save("grey_alpha.png", Image.fromarray(la, "LA"))
    g16 = (np.array(grey).astype(np.uint16) * 257 + rng.integers(0, 257, grey.size[::-1])).astype(np.uint16)
    rgb16 = (np.array(astronaut).astype(np.uint16) * 257 + 123).astype(np.uint16)
    alpha16 = (np.arange(rgb16.shape[1])[None, :, None] * 100 % 65536).repeat(rgb16.shape[0], 0).astype(np.uint16)
    for name, arr in (
        ("grey16.png", g16),
        ("rgb16.png", rgb16),
        ("rgba16.png", np.concatenate([rgb16, alpha16], -1)),
        ("grey_alpha16.png", np.stack([g16, np.full_like(g16, 30000)], -1)),
    ):
        out[name] = folder / name
        _write_png16(out[name], arr)
    save("tiny.png", Image.new("RGB", (7, 3), (10, 200, 30)))
    # Phone-photo shapes and extremes: Pillow resamples vertically first when the height shrinks by more than
    # twice the pixels the width does (portraits), horizontally first otherwise; the 8-bit intermediate rounds
    # differently, so a client with the other order is 1 level off. The noise keeps every rounding visible.
    for (w, h), fmt in (((1080, 2400), "png"), ((900, 2000), "jpg"), ((333, 777), "png"), ((520, 760), "jpg"),
                        ((2400, 1080), "jpg"), ((1600, 900), "png"), ((3000, 40), "jpg"), ((50, 2500), "png"),
                        ((16, 1600), "png"), ((1999, 3), "png")):  # fmt: skip
        a = np.asarray(astronaut.resize((w, h)), dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
        photo = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
        kind = "portrait" if h > w else "landscape"
        save(f"{kind}_{w}x{h}.{fmt}", photo, **({"quality": 92} if fmt == "jpg" else {"compress_level": 1}))
    jpeg = out["landscape.jpg"].read_bytes()
    out["truncated.jpg"] = folder / "truncated.jpg"
    out["truncated.jpg"].write_bytes(jpeg[: len(jpeg) // 2])
    png = out["rgba.png"].read_bytes()
    out["truncated.png"] = folder / "truncated.png"
    out["truncated.png"].write_bytes(png[: len(png) // 2])
    out["no_iend.png"] = folder / "no_iend.png"
    out["no_iend.png"].write_bytes(png[:-12])  # the IEND chunk is 12 bytes
    out["text.jpg"] = folder / "text.jpg"
    out["text.jpg"].write_text("not an image\n")
    return out


@dataclass
class ImageParity:
    path: str
    cosine: float
    input_max_abs: float  # normalised model-input units
    input_levels: float  # the same, in 8-bit levels of the resized image
    same_shape: bool


@dataclass
class CppParityReport:
    model: str
    binary: str
    image_size: int
    scales: list[float]
    images: list[ImageParity] = field(default_factory=list)
    skipped_cpp: list[str] = field(default_factory=list)
    skipped_python: list[str] = field(default_factory=list)

    @property
    def cosine_min(self) -> float:
        return min((r.cosine for r in self.images), default=float("nan"))

    @property
    def levels_max(self) -> float:
        return max((r.input_levels for r in self.images), default=float("nan"))

    def failures(self) -> list[str]:
        out = []
        if self.skipped_cpp != self.skipped_python:
            out.append(f"skipped files differ: C++ {self.skipped_cpp} vs Python {self.skipped_python}")
        for r in self.images:
            if not r.same_shape:
                out.append(f"{r.path}: the C++ model input has another shape")
            elif r.input_levels > MAX_LEVELS:
                out.append(f"{r.path}: model input differs by {r.input_levels:g} levels (> {MAX_LEVELS:g})")
            if not r.cosine >= MIN_COSINE:
                out.append(f"{r.path}: cosine {r.cosine:.7f} < {MIN_COSINE}")
        if not self.images:
            out.append("no image was embedded by both sides")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "binary": self.binary,
            "image_size": self.image_size,
            "scales": self.scales,
            "cosine_min": self.cosine_min,
            "input_levels_max": self.levels_max,
            "passed": self.passed,
            "failures": self.failures(),
            "images": [r.__dict__ for r in self.images],
            "skipped_cpp": self.skipped_cpp,
            "skipped_python": self.skipped_python,
        }


def check_binary(binary: str | Path) -> Path:
    """``binary`` as a path to run (``./dtop-embed`` stays that file: a bare name would be looked up on PATH), once
    it is an executable file that answers ``--help`` with dtop-embed's usage; else a one-line :class:`DToPError`."""
    import os

    path = Path(binary)
    build = "build the C++ client with `dtop-export cpp build`"
    if not path.exists():
        raise DToPError(f"{binary} not found: {build}")
    if not path.is_file():
        raise DToPError(f"{binary} is not a file: give the dtop-embed binary (`dtop-export cpp build` prints its path)")
    if not os.access(path, os.X_OK):
        raise DToPError(f"{binary} is not executable: `chmod +x {binary}`, or {build}")
    path = path.absolute()
    try:
        r = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DToPError(f"cannot run {binary} ({e}): give the dtop-embed binary, or {build}") from e
    if "usage: dtop-embed" not in r.stdout:
        raise DToPError(f"{binary} is not dtop-embed (its --help does not print dtop-embed's usage): {build}")
    return path


def run_binary(binary: Path, args: list[str], timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    """Run ``dtop-embed`` (:func:`check_binary`) with ``args``."""
    path = check_binary(binary)
    try:
        # errors="replace": its messages name files as the OS has them, bytes that need not be UTF-8
        return subprocess.run([str(path), *args], capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise DToPError(f"{binary} did not finish within {timeout:g} s") from e


def compare(
    binary: str | Path,
    model: str | Path,
    images: list[Path],
    image_size: int = 384,
    scales: tuple[float, ...] = (1.0,),
    batch_size: int = 1,
    threads: int | None = None,
) -> CppParityReport:
    """Embed ``images`` with the C++ binary and with the model's Python engine (ONNX Runtime for an ``.onnx``,
    ExecuTorch for a ``.pte``) through the Python preprocessing; compare the descriptors (cosine per image), the model
    inputs of the first scale (max-abs) and the skipped files."""
    from dtop_export.engines import load_engine
    from dtop_export.preprocess import load_image, prepare
    from dtop_export.retrieval.extract import extract

    model, binary = Path(model), Path(binary)
    report = CppParityReport(str(model), str(binary), image_size, [float(s) for s in scales])
    with tempfile.TemporaryDirectory(prefix="dtop-cpp-parity-") as tmp:
        out = Path(tmp) / "cpp.npy"
        args = [str(model), *map(str, images), "-o", str(out), "--image-size", str(image_size), "--no-progress"]
        args += ["--scales", ",".join(repr(float(s)) for s in scales), "-b", str(batch_size), "--dump-inputs", tmp]
        if threads:
            args += ["--threads", str(threads)]
        r = run_binary(binary, args)
        if r.returncode != 0:
            raise DToPError(f"{binary.name} failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1:]}")
        if not out.is_file() or not out.with_suffix(".json").is_file():
            raise DToPError(f"{binary} exited 0 without writing {out.name} and its .json: is it dtop-embed?")
        cpp = np.load(out)
        try:
            side = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
        except ValueError as e:  # UnicodeDecodeError too: a client that wrote a file name's bytes as they were
            raise DToPError(f"{binary} wrote a sidecar that is not UTF-8 JSON ({e}): build it again with "
                            "`dtop-export cpp build`, or give --binary a current dtop-embed") from e  # fmt: skip
        report.skipped_cpp = [s["path"] for s in side["skipped"]]
        engine = load_engine(model, threads=threads)
        errors: list[tuple[int, str]] = []
        inputs: dict[str, np.ndarray] = {}  # the first scale's model input per image, from the one decode

        def load(path: Path) -> Any:
            img = load_image(path)
            inputs[str(path)] = prepare(img, engine.preprocess, image_size, scales[0])
            return img

        py = extract(
            engine, images, None, scales, None, False, image_size=image_size, batch_size=batch_size, errors=errors,
            load=load,
        )  # fmt: skip
        report.skipped_python = [str(images[i]) for i, _ in errors]
        skipped = {i for i, _ in errors}
        kept = [i for i in range(len(images)) if i not in skipped]
        if [str(images[i]) for i in kept] != side["images"] or cpp.shape != py.shape:
            report.skipped_python.append("(the embedded image lists differ)")
            return report
        levels = 255.0 * np.asarray(engine.preprocess.std, np.float32)[:, None, None]
        for row, i in enumerate(kept):
            x = inputs[str(images[i])]
            y = np.load(Path(tmp) / f"{i}.npy")
            same = x.shape == y.shape
            diff = np.abs(x - y) if same else np.zeros(1, np.float32)
            report.images.append(
                ImageParity(
                    path=str(images[i]),
                    cosine=float(np.dot(cpp[row].astype(np.float64), py[row].astype(np.float64))),
                    input_max_abs=float(diff.max()),
                    # 1/255 of a level is float32 rounding of (x/255 - mean)/std, not a pixel difference
                    input_levels=float(np.round((diff * levels).max(), 3)) if same else float("inf"),
                    same_shape=same,
                )
            )
    return report
