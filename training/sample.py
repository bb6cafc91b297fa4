"""The embedded offline training set: class-per-folder views of real photos that scikit-image ships.

There is no internet at run time, so a newcomer trains on views made from the photos of an installed
package: one class per photo (the motorcycle stereo pair is one class, two real viewpoints), each view a
random crop of varying aspect ratio and scale, a small rotation, an illumination change and JPEG
re-compression. Built on demand, deterministic given the seed, cached (a marker file records the recipe).

The embedded *evaluation* set (``dtop_export.retrieval.sample_data``) is made from the same kind of photos with
other crops: training here and validating there measures retrieval of seen objects under new views,
which is enough to show that training works, not a benchmark.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from dtop_export.atomic import new_folder_mode
from dtop_export.errors import DToPError

RECIPE_VERSION = 2
# class name -> photo files in skimage/data (real photographs; grey ones are converted to RGB)
PHOTOS: dict[str, tuple[str, ...]] = {
    "astronaut": ("astronaut.png",),
    "camera": ("camera.png",),
    "chelsea": ("chelsea.png",),
    "coffee": ("coffee.png",),
    "coins": ("coins.png",),
    "hubble": ("hubble_deep_field.jpg",),
    "ihc": ("ihc.png",),
    "moon": ("moon.png",),
    "motorcycle": ("motorcycle_left.png", "motorcycle_right.png"),
    "rocket": ("rocket.jpg",),
    "brick": ("brick.png",),
    "grass": ("grass.png",),
    "gravel": ("gravel.png",),
    "cell": ("cell.png",),
    "clock_motion": ("clock_motion.png",),
    "color": ("color.png",),
    "page": ("page.png",),
    "text": ("text.png",),
    "phantom": ("phantom.png",),
    "retina": ("retina.jpg",),
}


def default_root() -> Path:
    """``train-sample`` next to the embedded evaluation set, in
    :func:`~dtop_export.retrieval.datasets.default_data_root` (``$DTOP_EXPORT_DATA``, else
    ``$XDG_CACHE_HOME/dtop-export/data``, ``~/.cache/dtop-export/data`` without it), as the demo lays out its data
    folder; ``$DTOP_EXPORT_CACHE/train-sample`` where that is set (earlier releases)."""
    from dtop_export.retrieval.datasets import default_data_root

    legacy = os.environ.get("DTOP_EXPORT_CACHE")
    return (Path(legacy) if legacy else default_data_root()) / "train-sample"


def _photo_dir() -> Path:
    try:
        import skimage
    except ImportError as e:
        raise DToPError("the embedded training set is made from scikit-image's photos: pip install scikit-image") from e
    return Path(skimage.__file__).parent / "data"


def build_training_sample(
    root: str | Path | None = None, views_per_class: int = 24, seed: int = 0, max_side: int = 320
) -> Path:
    """Write (or reuse) ``root/<class>/<view>.jpg`` and return ``root``."""
    root = Path(root).expanduser() if root else default_root()
    recipe = {"version": RECIPE_VERSION, "views": views_per_class, "seed": seed, "max_side": max_side}
    marker = root / "RECIPE.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == recipe:
                return root
        except json.JSONDecodeError:
            pass
    if root.exists() and (not root.is_dir() or any(_foreign(p, marker.name) for p in root.iterdir())):
        raise DToPError(f"{root} exists and is not the embedded image set: remove it or choose another folder")
    src = _photo_dir()
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    except OSError as e:
        raise DToPError(f"cannot build the embedded image set {root}: {e.strerror or e}") from e
    try:  # built beside root and renamed into place: never half-written, and two builds at once do not mix
        os.chmod(tmp, new_folder_mode())  # mkdtemp's 0700 would outlive the rename
        _write_views(tmp, src, views_per_class, seed, max_side)
        (tmp / marker.name).write_text(json.dumps(recipe))
        _swap_in(tmp, root, recipe)
    except OSError as e:  # no space, a mount point that cannot be renamed, ...
        raise DToPError(f"cannot build the embedded image set {root}: {e.strerror or e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _write_views(folder: Path, src: Path, views_per_class: int, seed: int, max_side: int) -> None:
    from PIL import Image

    for cls, files in PHOTOS.items():
        photos = []
        for f in files:
            p = src / f
            if p.is_file():
                with Image.open(p) as im:
                    photos.append(im.convert("RGB"))
        if not photos:
            continue
        (folder / cls).mkdir(exist_ok=True)
        rng = random.Random(f"{seed}:{cls}")
        for v in range(views_per_class):
            view = _make_view(photos[v % len(photos)], rng, max_side)
            view.save(folder / cls / f"{v:03d}.jpg", format="JPEG", quality=rng.randint(60, 95))


def _swap_in(tmp: Path, root: Path, recipe: dict) -> None:
    """Rename the built set ``tmp`` to ``root``. The same recipe's set already there (another job built it
    meanwhile) is kept, ours dropped; another recipe's (or an older version's build interrupted halfway) is moved
    aside first."""
    if _recipe_of(root) == recipe:
        return
    old = None
    try:
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
            with contextlib.suppress(FileNotFoundError):  # another build moved it aside first
                os.replace(root, old / root.name)
        os.replace(tmp, root)
    except OSError:
        if _recipe_of(root) != recipe:  # not another job's same set, put there in between
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _foreign(entry: Path, marker: str) -> bool:
    """An entry that is not the set's: neither a class folder nor its marker (dot-files such as .DS_Store are fine)."""
    return entry.name not in {*PHOTOS, marker} and not entry.name.startswith(".")


def _recipe_of(root: Path) -> dict | None:
    try:
        return json.loads((root / "RECIPE.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _make_view(img, rng: random.Random, max_side: int):  # noqa: ANN001, ANN202 - PIL images
    from PIL import Image, ImageEnhance

    w, h = img.size
    angle = rng.uniform(-10, 10)
    img = img.rotate(angle, resample=Image.Resampling.BILINEAR, expand=False)
    # crop: area 30-100 %, aspect ratio W/H in [0.5, 2] (log-uniform), inside the rotated frame
    aspect = 2 ** rng.uniform(-1, 1)
    area = rng.uniform(0.3, 1.0) * w * h * 0.8
    cw = min(w * 0.95, (area * aspect) ** 0.5)
    ch = min(h * 0.95, cw / aspect)
    cw = min(cw, ch * aspect)
    x0 = rng.uniform(0.025 * w, w - cw - 0.025 * w) if w - cw > 0.05 * w else (w - cw) / 2
    y0 = rng.uniform(0.025 * h, h - ch - 0.025 * h) if h - ch > 0.05 * h else (h - ch) / 2
    img = img.crop((round(x0), round(y0), round(x0 + cw), round(y0 + ch)))
    side = rng.randint(max_side // 2, max_side)
    s = side / max(img.size)
    img = img.resize((max(8, round(img.size[0] * s)), max(8, round(img.size[1] * s))), Image.Resampling.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.7, 1.3))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.7, 1.3))
    return img
