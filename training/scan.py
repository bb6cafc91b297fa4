"""What a training set's folder holds on disk, before its images are read (:mod:`training.datasets` reads them).

* :func:`folder_entries`: the (image, class) pairs of a class-per-folder set with links resolved: a class folder
  that is a symbolic link to another class folder is that class, not a second one, and one image file reached
  twice (a link to it, a hard link, a class folder linked into another) is used once, under its first class.
* :func:`read_size_cache` / :func:`write_size_cache`: the run folder's ``image_sizes.tsv``, each image's size with
  the file's bytes and mtime (:func:`dtop_export.atomic.file_state`) it was read from, so a replaced image is read
  again.
* :func:`write_skipped_files`: the run folder's list of every file a set skipped, and why.
* :func:`guess_layout`: which of the downloaded layouts (GLDv2, GLDv1, SfM-120k, NC-clean, revisitop) a folder
  holds, from its list files, so that a reader pointed at another layout can say which ``data.dataset`` to set
  (:func:`layout_setting`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections import Counter
from pathlib import Path

from dtop_export.preprocess import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

# photo formats a crawl or a phone export holds that the toolkit does not decode (not in IMAGE_SUFFIXES): counted
UNSUPPORTED_SUFFIXES = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".dng", ".cr2", ".nef", ".arw")

# dataset -> (a file its download has at the root, a folder beside it, or None), in the order they are checked
LAYOUTS = {
    "gldv2": ("train_clean.csv", "train"),
    "sfm120k": ("retrieval-SfM-120k.pkl", "ims"),
    "nc-clean": ("annotations/annotation_clean_train.txt", None),
    "gldv1": ("train.csv", "train"),
}
HEX = "0123456789abcdef"


def guess_layout(root: Path, folders: bool = False) -> str | None:
    """The ``data.dataset`` whose downloaded layout ``root`` holds (its list file at its place), else None;
    ``folders``: else ``folder`` when a sub-folder holds images (lists the sub-folders: for error messages)."""
    for name, (listed, folder) in LAYOUTS.items():
        if (root / listed).is_file() and (folder is None or (root / folder).is_dir()):
            # GLDv2's full train.csv has GLDv1's name and columns; its images lie in train/<a>/<b>/<c>/
            return "gldv2" if name == "gldv1" and any((root / folder / c).is_dir() for c in HEX) else name
    try:
        with os.scandir(root) as it:
            subs = sorted(e.name for e in it if e.is_dir())
    except OSError:
        return None
    if any((root / s / f"gnd_{s}.pkl").is_file() for s in subs):  # a look-up per sub-folder, not its listing
        return "revisitop"
    with contextlib.suppress(OSError):  # an unreadable sub-folder: no guess
        if folders and any(p.suffix.lower() in IMAGE_SUFFIXES for s in subs for p in (root / s).iterdir()):
            return "folder"
    return None


def layout_setting(root: Path, name: str) -> str:
    """What to set to read ``root`` as the ``name`` set :func:`guess_layout` found: ``data.dataset=<name>``, and for a
    GLDv2 download without train_clean.csv its full train.csv as ``data.list_file``."""
    if name == "gldv2" and not (root / "train_clean.csv").is_file() and (root / "train.csv").is_file():
        return f"data.dataset=gldv2 and data.list_file={root / 'train.csv'}"
    return f"data.dataset={name}"


def folder_entries(classes: list[Path], skipped: Counter, files: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(image path, class name) of every image file under the class folders (sorted), with links resolved.

    A class folder whose real folder is another class folder's is skipped with a warning (a real folder names the
    class before a link to it); an image whose file (device, inode) was met before is counted as ``duplicate`` or,
    under another class, ``duplicate_other_label``; a link to nothing is kept, and counted as missing later; a
    photo the toolkit does not decode (HEIC, AVIF, raw: :data:`UNSUPPORTED_SUFFIXES`) is ``unsupported_format``; a
    folder that cannot be listed (permissions) is ``unreadable_folder``.
    ``skipped``/``files``: counts per reason and (reason, path) of each file skipped, added to.
    """
    resolved = {d: d.resolve() for d in classes}  # once each: a look-up per path component
    owner: dict[Path, str] = {}
    for d in sorted(classes, key=lambda d: (d.is_symlink(), d.name)):  # real folders first
        owner.setdefault(resolved[d], d.name)
    seen: dict[tuple[int, int], str] = {}
    entries: list[tuple[str, str]] = []
    # folders above a class (the root and its ancestors among them): a class folder linking to one holds other classes
    root = classes[0].parent.resolve() if classes else Path("/")
    above = {root, *root.parents, *(a for d in classes for a in resolved[d].parents)}  # a set: one look-up per class
    for d in classes:
        real = owner[resolved[d]]
        if resolved[d] in above and d.is_symlink():
            # a link to the set's root (or above, or to a folder of classes) would take every class's images
            log.warning("folder: class folder %s is a link to %s, which holds other classes: skipped", d, resolved[d])
            skipped["class_folder_links_to_classes"] += 1
            files.append(("class_folder_links_to_classes", str(d)))
            continue
        if real != d.name:
            log.warning("folder: class folder %s is a link to %s: its images are used once, as class %s", d, real, real)
            skipped["in_linked_class_folders"] += sum(1 for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            files.append(("in_linked_class_folders", str(d)))
            continue
        for p in _files_under(d, skipped, files):
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                if p.suffix.lower() in UNSUPPORTED_SUFFIXES:
                    skipped["unsupported_format"] += 1
                    files.append(("unsupported_format", str(p)))
                continue
            try:
                st = p.stat()
            except OSError:  # a link to nothing: counted as missing by the reader
                if p.is_symlink():
                    entries.append((str(p), d.name))
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            key = (st.st_dev, st.st_ino) if st.st_ino else (-1, len(seen))  # a file system without inode numbers
            if key in seen:
                reason = "duplicate" if seen[key] == d.name else "duplicate_other_label"
                skipped[reason] += 1
                files.append((reason, str(p)))
                continue
            seen[key] = d.name
            entries.append((str(p), d.name))
    return entries


def _files_under(d: Path, skipped: Counter, files: list[tuple[str, str]]) -> list[Path]:
    """Every file under ``d`` (sorted; links to folders are not followed, as ``rglob``), and an unreadable folder
    counted as ``unreadable_folder`` where ``rglob`` left out its images without a word."""

    def unreadable(e: OSError) -> None:
        skipped["unreadable_folder"] += 1
        files.append(("unreadable_folder", str(e.filename)))

    return sorted(Path(top) / n for top, _, names in os.walk(d, onerror=unreadable) for n in names)


def unreadable_reason(path: str) -> str:
    """Why an existing file gave no image size: ``empty_file``, ``over_decode_budget`` (larger than the decoder takes:
    a 30,000-px panorama; :class:`~dtop_export.decode_budget.DecodeBudget`) or ``unreadable`` (corrupt, cut short,
    not an image). Asked only of the files that failed."""
    import warnings

    from PIL import Image

    from dtop_export.decode_budget import DECODE_FORMATS, DecodeBudget

    try:
        if os.path.getsize(path) == 0:
            return "empty_file"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=DECODE_FORMATS) as im:
                w, h = im.size
    except Image.DecompressionBombError:  # over twice Pillow's own pixel limit: refused before any header check
        return "over_decode_budget"
    except Exception:  # noqa: BLE001 - the decoder's own refusal: corrupt or not an image
        return "unreadable"
    return "unreadable" if DecodeBudget().fits_header(w, h) else "over_decode_budget"


# a cached size is the size of the file as it was: (width, height, bytes, mtime_ns)
CachedSize = tuple[int, int, int, int]


def read_size_cache(path: Path | None) -> dict[str, CachedSize]:
    """``width, height, bytes, mtime_ns, path`` lines; lines of the older ``width, height, path`` form are dropped
    (their files are read again once: a size without the file's state cannot tell a replaced image)."""
    if path is None or not path.is_file():
        return {}
    out = {}
    for line in path.read_bytes().decode("utf-8", "surrogateescape").split("\n"):
        parts = line.split("\t", 4)
        if len(parts) == 5 and all(v.isdigit() for v in parts[:4]):
            w, h, n, t = map(int, parts[:4])
            out[parts[4]] = (w, h, n, t)
    return out


def write_size_cache(path: Path, sizes: dict[str, CachedSize]) -> None:
    """Write what :func:`read_size_cache` reads back (atomically)."""
    from dtop_export.atomic import atomic_write_bytes

    # file names as the file system has them (non-UTF-8 bytes kept); one with a tab or newline is read again
    text = "".join(f"{w}\t{h}\t{n}\t{t}\t{p}\n" for p, (w, h, n, t) in sizes.items() if "\t" not in p and "\n" not in p)
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_skipped_files(path: Path, files: list[tuple[str, str]]) -> None:
    """``reason<TAB>path`` per skipped file (a training set's ``skipped_files``), written atomically."""
    from dtop_export.atomic import atomic_write_bytes

    text = "".join(f"{reason}\t{p}\n" for reason, p in files if "\n" not in p)
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))
