"""Checks for the list files of the training sets, as real downloads come: text with a BOM, Windows line endings
or a non-UTF-8 byte; cirtorch pickles of another structure (revisitop's ``gnd``: ``dtop_export.retrieval.datasets``).
Each problem is one :class:`DToPError` line naming the file (and the line or entry)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError


def as_list(v: Any) -> list:
    """A pickled sequence (list, tuple or numpy array) as a plain list."""
    return v.tolist() if hasattr(v, "tolist") else list(v)


def read_text(path: str | Path) -> str:
    """A list file's text: UTF-8 with or without a BOM (Excel writes one), or a one-line error naming the line."""
    path = Path(path)
    data = path.read_bytes()
    data = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DToPError(
            f"{path}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}): save the list as UTF-8"
        ) from None


def csv_rows(path: Path, columns: tuple[str, ...], header: str) -> csv.DictReader:
    """The rows of a CSV list that must have ``columns`` in its header (``header``: the one to name if not)."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    if not reader.fieldnames or not set(columns) <= set(reader.fieldnames):
        raise DToPError(f"{path}: expected a header {header}")
    return reader


def path_label_lines(path: Path, root: Path) -> tuple[list[tuple[str, str]], int]:
    """(image path, label) per line of an NC-clean style list, and the number of lines without a label.

    ``.csv``: CSV rows (quoted fields may hold commas), the first two columns; else a tab between path and label, or
    whitespace or a comma (:func:`_split_path_label`: a path may hold spaces or commas when it names a file).
    Empty lines and ``#`` comments are skipped."""
    text = read_text(path)
    lines = list(csv.reader(io.StringIO(text, newline=""))) if path.suffix.lower() == ".csv" else text.splitlines()
    pairs: list[tuple[str, str]] = []
    unlabelled = 0
    for line in lines:
        if isinstance(line, list):
            parts = [c.strip() for c in line]
        elif "\t" in line:
            parts = [c.strip() for c in line.strip().split("\t")]
        else:
            parts = _split_path_label(line.strip(), root)
        parts = [c for c in parts if c]
        if not parts or parts[0].startswith("#"):
            continue
        if len(parts) < 2:
            unlabelled += 1
            continue
        pairs.append((parts[0], parts[1]))
    return pairs, unlabelled


def _split_path_label(line: str, root: Path) -> list[str]:
    """``path label [more]``; a line of more fields or with a comma is first tried as ``path with spaces label`` and
    ``path,label`` (the path a file under ``root``), else split at every space and comma (cirtorch's lists)."""
    parts = line.split()
    if len(parts) <= 2 and "," not in line:
        return parts
    if len(parts) == 1 and line.count(",") == 1:  # path,label: no file to look for (a stat per line on NFS)
        return line.split(",")
    comma = line.rsplit(",", 1)[0]
    # each path once; without a space the whole line is no 'path label'
    for cand in dict.fromkeys((parts[0], line.rsplit(None, 1)[0], comma) if len(parts) > 1 else (comma,)):
        if (root / cand).is_file():
            return [cand, *line[len(cand) :].replace(",", " ").split()[:1]]
    return line.replace(",", " ").split()


def sfm120k_lists(db: Any, pkl: Path, split: str) -> tuple[list, list, list, list]:
    """cirtorch's ``db[split]`` lists (cids, cluster, qidxs, pidxs), checked: equal lengths, integer clusters and
    pair indices into ``cids``."""
    part = db[split]
    if not isinstance(part, dict):
        raise DToPError(f"{pkl}: '{split}' is a {type(part).__name__}, not cirtorch's {{'cids', 'cluster', ...}}")
    missing = [k for k in ("cids", "cluster", "qidxs", "pidxs") if k not in part]
    if missing:
        raise DToPError(f"{pkl}: '{split}' has no '{missing[0]}' list")
    cids, clusters = _lists(part, ("cids", "cluster"), f"{pkl}: '{split}'")
    if len(clusters) != len(cids):
        raise DToPError(f"{pkl}: '{split}' has {len(cids)} cids but {len(clusters)} cluster labels")
    _integers(clusters, None, f"{pkl}: '{split}' cluster")
    qidxs, pidxs = pair_indices(part, len(cids), pkl, f"'{split}' ")
    return cids, clusters, qidxs, pidxs


def pair_indices(part: dict, n: int, pkl: Path, where: str = "") -> tuple[list[int], list[int]]:
    """cirtorch's ``qidxs``/``pidxs``, checked: equal lengths, indices into the ``n`` cids."""
    qidxs, pidxs = _lists(part, ("qidxs", "pidxs"), f"{pkl}: {where}")
    if len(qidxs) != len(pidxs):
        raise DToPError(f"{pkl}: {where}has {len(qidxs)} qidxs but {len(pidxs)} pidxs")
    return _integers(qidxs, n, f"{pkl}: {where}qidxs"), _integers(pidxs, n, f"{pkl}: {where}pidxs")


def _lists(part: dict, keys: tuple[str, ...], where: str) -> list[list]:
    try:
        return [as_list(part[k]) for k in keys]
    except TypeError as e:
        raise DToPError(f"{where} {'/'.join(keys)} are not sequences ({e})") from None


def _integers(values: list, bound: int | None, what: str) -> list[int]:
    for i, v in enumerate(values):
        try:
            ok = int(v) == v and (bound is None or 0 <= int(v) < bound)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            rule = "an integer" if bound is None else f"an index in 0..{bound - 1}"
            raise DToPError(f"{what}[{i}] is {v!r}, not {rule}")
    return [int(v) for v in values]
