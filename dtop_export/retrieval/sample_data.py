"""The embedded default data set: a small instance-retrieval set in the revisitop layout, built offline.

There is no internet on our machines, so tests, the demo and CI evaluate on a set made from the real
photos scikit-image ships (``skimage/data``). Each *object* is one photo; its database views and query
views are made by crops, scaling, rotation, perspective, colour and JPEG changes, and labelled by how
hard they are, as the Revisited Oxford/Paris protocol labels real photos:

- **easy**: the object's region of interest (ROI) is fully visible; mild scale/crop/colour/JPEG changes.
- **hard**: the object is visible but strongly changed: large rotation, strong perspective, a partial crop
  holding about half of the ROI, heavy colour change and low JPEG quality.
- **junk**: the object is barely recognisable: a corner crop holding under a fifth of the ROI, grey and
  heavily compressed. Junk images are ignored by the protocol.

``motorcycle_left``/``motorcycle_right`` are a real stereo pair: the motorcycle's queries come from the
left view and its database views from the right one, so that object has a genuine viewpoint change.
Distractors are crops of unrelated photos and textures (brick, grass, gravel, cells, text, ...).

The result (``<root>/sample/gnd_sample.pkl`` + ``<root>/sample/jpg/*.jpg``) loads exactly like
revisitop's ``gnd_roxford5k.pkl``: keys ``imlist``, ``qimlist``, ``gnd[i]`` with ``bbx``/``easy``/``hard``/
``junk``, plus ``image_size`` (the longer side to evaluate at, 256: the small preset's native size) and
``ext``/``qext``. Building is deterministic (fixed seed) and cached: a second call reuses the files
unless ``force=True``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export.atomic import new_folder_mode
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

NAME = "sample"
VERSION = 1  # bump whenever the generated content changes, so stale caches are rebuilt
SEED = 20230103
MAX_SIDE = 512
IMAGE_SIZE = 256
GREY = (124, 116, 104)


@dataclass(frozen=True)
class _Object:
    name: str
    query_file: str
    db_file: str
    roi: tuple[float, float, float, float]  # fractions of the source image: x1, y1, x2, y2


OBJECTS: tuple[_Object, ...] = (
    _Object("astronaut", "astronaut.png", "astronaut.png", (0.2, 0.05, 0.8, 0.75)),
    _Object("camera", "camera.png", "camera.png", (0.2, 0.08, 0.75, 0.85)),
    _Object("chelsea", "chelsea.png", "chelsea.png", (0.25, 0.05, 0.85, 0.9)),
    _Object("coffee", "coffee.png", "coffee.png", (0.1, 0.05, 0.9, 0.9)),
    _Object("coins", "coins.png", "coins.png", (0.05, 0.05, 0.95, 0.95)),
    _Object("hubble", "hubble_deep_field.jpg", "hubble_deep_field.jpg", (0.15, 0.15, 0.85, 0.85)),
    _Object("ihc", "ihc.png", "ihc.png", (0.1, 0.1, 0.9, 0.9)),
    _Object("moon", "moon.png", "moon.png", (0.1, 0.1, 0.9, 0.9)),
    _Object("motorcycle", "motorcycle_left.png", "motorcycle_right.png", (0.1, 0.1, 0.9, 0.95)),
    _Object("rocket", "rocket.jpg", "rocket.jpg", (0.3, 0.05, 0.7, 0.95)),
)
DISTRACTORS: tuple[str, ...] = (
    "brick.png",
    "grass.png",
    "gravel.png",
    "cell.png",
    "clock_motion.png",
    "color.png",
    "page.png",
    "text.png",
    "phantom.png",
    "retina.jpg",
)


def skimage_data_dir() -> Path:
    """The folder holding scikit-image's bundled sample photos."""
    try:
        import skimage.data
    except ImportError as e:
        raise DToPError("the sample data set needs scikit-image: pip install scikit-image") from e
    return Path(skimage.data.__file__).parent


def _source(name: str) -> Image.Image:
    from dtop_export.preprocess import load_image

    path = skimage_data_dir() / name
    if not path.exists():
        raise DToPError(f"scikit-image's sample photo {path} is missing: reinstall scikit-image")
    img = load_image(path)
    if max(img.size) > MAX_SIDE:
        f = MAX_SIDE / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), resample=3)
    return img


# image operations ------------------------------------------------------------------------------------


def _scale(img: Image.Image, f: float) -> Image.Image:
    w, h = max(16, round(img.width * f)), max(16, round(img.height * f))
    f = min(1.0, MAX_SIDE / max(w, h))
    return img.resize((max(16, round(w * f)), max(16, round(h * f))), resample=3)


def _colour(img: Image.Image, brightness: float, contrast: float, saturation: float, hue: float) -> Image.Image:
    import numpy as np
    from PIL import Image, ImageEnhance

    img = ImageEnhance.Brightness(img).enhance(brightness)
    img = ImageEnhance.Contrast(img).enhance(contrast)
    img = ImageEnhance.Color(img).enhance(saturation)
    if hue:
        hsv = np.asarray(img.convert("HSV")).copy()
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + round(hue * 255)) % 256).astype(np.uint8)
        img = Image.fromarray(hsv, mode="HSV").convert("RGB")
    return img


def _rotate(img: Image.Image, degrees: float) -> Image.Image:
    return img.rotate(degrees, resample=3, expand=True, fillcolor=GREY)


def _perspective(img: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """Warp so the corners move inwards by up to ``strength`` of the side (a tilted view of a plane)."""
    import numpy as np
    from PIL import Image

    w, h = img.size
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    jitter = rng.uniform(0.3, 1.0, size=(4, 2)) * strength * np.array([w, h])
    src = dst + jitter * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    # coefficients mapping output (dst) pixels to input (src) pixels
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(dst, src):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    coeffs = np.linalg.solve(np.array(rows), np.array(rhs))
    return img.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coeffs), resample=3, fillcolor=GREY)


def _crop_frac(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    w, h = img.size
    return img.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))


def _window_around(
    roi: tuple[float, float, float, float], rng: np.random.Generator, margin: float
) -> tuple[float, float, float, float]:
    """A crop window (fractions) containing ``roi`` with up to ``margin`` of context on each side."""
    x1, y1, x2, y2 = roi
    m = rng.uniform(0.2, 1.0, size=4) * margin
    return (max(0.0, x1 - m[0]), max(0.0, y1 - m[1]), min(1.0, x2 + m[2]), min(1.0, y2 + m[3]))


def _partial(
    roi: tuple[float, float, float, float], rng: np.random.Generator, keep: float
) -> tuple[float, float, float, float]:
    """A window holding about ``keep`` of the ROI's area, anchored at a random corner of it."""
    x1, y1, x2, y2 = roi
    side = keep**0.5
    w, h = (x2 - x1) * side, (y2 - y1) * side
    corner = int(rng.integers(4))
    cx = x1 if corner in (0, 3) else x2 - w
    cy = y1 if corner in (0, 1) else y2 - h
    # extend outwards from the ROI so the view still looks like a photo, not a tile of the object
    ox = 0.6 * w if corner in (0, 3) else 0.0
    oy = 0.6 * h if corner in (0, 1) else 0.0
    return (max(0.0, cx - ox), max(0.0, cy - oy), min(1.0, cx + w + (0.6 * w - ox)), min(1.0, cy + h + (0.6 * h - oy)))


def _jpeg(img: Image.Image, path: Path, quality: int, grey: bool = False) -> None:
    out = img.convert("L") if grey else img.convert("RGB")
    out.save(path, format="JPEG", quality=quality, optimize=False, progressive=False)


# building --------------------------------------------------------------------------------------------


def _build(folder: Path) -> dict[str, Any]:
    """Write the images into ``folder/jpg`` and return the revisitop ground truth."""
    import numpy as np

    jpg = folder / "jpg"
    jpg.mkdir(parents=True)
    imlist: list[str] = []
    qimlist: list[str] = []
    gnd: list[dict[str, Any]] = []

    def add_db(img: Image.Image, name: str, quality: int, grey: bool = False) -> int:
        _jpeg(img, jpg / f"{name}.jpg", quality, grey)
        imlist.append(name)
        return len(imlist) - 1

    for oi, obj in enumerate(OBJECTS):
        rng = np.random.default_rng([SEED, oi])
        qsrc = _source(obj.query_file)
        dsrc = _source(obj.db_file) if obj.db_file != obj.query_file else qsrc
        roi = obj.roi
        easy: list[int] = []
        hard: list[int] = []
        junk: list[int] = []

        # easy: the whole ROI visible, mild changes
        v = _scale(dsrc, rng.uniform(0.65, 0.85))
        easy.append(add_db(v, f"{obj.name}_easy_scale", 90))
        v = _scale(_crop_frac(dsrc, _window_around(roi, rng, 0.1)), rng.uniform(0.7, 1.0))
        easy.append(add_db(v, f"{obj.name}_easy_crop", 85))
        v = _colour(dsrc, *rng.uniform([0.85, 0.85, 0.8, -0.03], [1.15, 1.15, 1.2, 0.03]))
        v = _scale(_rotate(v, rng.uniform(-8, 8)), rng.uniform(0.6, 0.8))
        easy.append(add_db(v, f"{obj.name}_easy_colour_rot", 80))

        # hard: visible but strongly changed
        v = _scale(_rotate(dsrc, rng.choice([-1, 1]) * rng.uniform(25, 40)), rng.uniform(0.45, 0.6))
        hard.append(add_db(v, f"{obj.name}_hard_rot", 70))
        v = _colour(_perspective(dsrc, rng, 0.3), *rng.uniform([0.6, 0.6, 0.4, 0.08], [0.75, 0.8, 0.6, 0.15]))
        hard.append(add_db(_scale(v, rng.uniform(0.5, 0.7)), f"{obj.name}_hard_persp_colour", 60))
        v = _scale(_crop_frac(dsrc, _partial(roi, rng, 0.5)), rng.uniform(0.8, 1.2))
        hard.append(add_db(v, f"{obj.name}_hard_partial_q25", 25))

        # junk: barely there
        v = _scale(_crop_frac(dsrc, _partial(roi, rng, 0.15)), rng.uniform(0.5, 0.8))
        junk.append(add_db(v, f"{obj.name}_junk_corner", 12, grey=True))

        # queries: two views of the object, the ROI boxed
        for qi in range(2):
            if qi == 0:
                f = rng.uniform(0.85, 1.0)
                window = (0.0, 0.0, 1.0, 1.0)
                view = _colour(qsrc, *rng.uniform([0.95, 0.95, 0.95, 0.0], [1.05, 1.05, 1.05, 0.0]))
            else:
                f = rng.uniform(0.9, 1.1)
                window = _window_around(roi, rng, 0.12)
                view = _colour(_crop_frac(qsrc, window), *rng.uniform([0.9, 0.9, 0.9, 0.0], [1.1, 1.1, 1.1, 0.0]))
            view = _scale(view, f)
            ww, wh = window[2] - window[0], window[3] - window[1]
            bbx = [
                round((roi[0] - window[0]) / ww * view.width, 1),
                round((roi[1] - window[1]) / wh * view.height, 1),
                round((roi[2] - window[0]) / ww * view.width, 1),
                round((roi[3] - window[1]) / wh * view.height, 1),
            ]
            name = f"query_{obj.name}_{qi}"
            _jpeg(view, jpg / f"{name}.jpg", 92)
            qimlist.append(name)
            gnd.append({"bbx": bbx, "easy": list(easy), "hard": list(hard), "junk": list(junk)})

    for di, fname in enumerate(DISTRACTORS):
        rng = np.random.default_rng([SEED, 1000 + di])
        src = _source(fname)
        stem = Path(fname).stem
        for k in range(2):
            x0, y0 = rng.uniform(0, 0.3, size=2)
            box = (x0, y0, x0 + rng.uniform(0.6, 0.7), y0 + rng.uniform(0.6, 0.7))
            v = _scale(_crop_frac(src, box), rng.uniform(0.7, 1.2))
            if k:
                v = _colour(v, *rng.uniform([0.8, 0.8, 0.8, -0.05], [1.2, 1.2, 1.2, 0.05]))
            add_db(v, f"distractor_{stem}_{k}", 85)

    return {
        "imlist": imlist,
        "qimlist": qimlist,
        "gnd": gnd,
        "ext": ".jpg",
        "qext": ".jpg",
        "image_size": IMAGE_SIZE,
        "description": "dtop-export embedded sample set (scikit-image photos), revisitop layout",
        "version": VERSION,
    }


def _cached(folder: Path) -> bool:
    info = folder / "sample_info.json"
    if not ((folder / f"gnd_{NAME}.pkl").exists() and info.exists()):
        return False
    try:
        meta = json.loads(info.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("version") != VERSION or meta.get("seed") != SEED:
        return False
    jpg = folder / "jpg"
    return all((jpg / f"{n}.jpg").exists() for n in meta.get("files", [])) and bool(meta.get("files"))


def build_sample_dataset(root: str | Path, force: bool = False) -> Path:
    """Build (or reuse) the sample set under ``root``; returns ``root/sample``.

    Deterministic; built in a temporary folder beside the destination and renamed into place, so an
    interrupted build never leaves a half-written set. ``force=True`` rebuilds even if a valid cache exists.
    """
    root = Path(root)
    folder = root / NAME
    if not force and _cached(folder):
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DToPError(f"cannot create the data folder {root}: {e.strerror or e}") from e
    if folder.exists() and not (folder / f"gnd_{NAME}.pkl").exists() and any(folder.iterdir()):
        raise DToPError(f"{folder} exists and is not a sample data set: remove it or choose another folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}.", dir=root))
    try:
        os.chmod(tmp, new_folder_mode())  # mkdtemp's 0700 would outlive the rename
        cfg = _build(tmp)
        with open(tmp / f"gnd_{NAME}.pkl", "wb") as fh:
            pickle.dump(cfg, fh, protocol=4)
        files = cfg["imlist"] + cfg["qimlist"]
        info = {"version": VERSION, "seed": SEED, "files": files, "source": str(skimage_data_dir())}
        (tmp / "sample_info.json").write_text(json.dumps(info, indent=1))
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{NAME}.old.", dir=root))
            os.replace(folder, old / NAME)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
