"""What a corpus job embeds: the SOURCE argument listed as items (key, id, path), and reading their bytes.

SOURCE is a folder (searched recursively for :data:`~dtop_export.preprocess.IMAGE_SUFFIXES`), a text file of
paths (one per line, ``#`` comments), or a Parquet/CSV table with a ``path`` column and an optional ``id``
column. Local paths and anything :mod:`pyarrow.fs` opens (``file://``, ``s3://``, ``gs://``, ``hdfs://`` URIs)
work; relative paths in a list or table are relative to the list's folder. Local paths are stored absolute, from
the source's resolved location (symbolic links and ``..`` resolved), so that they open from any working directory
and ``src`` and ``/abs/src`` list the same items. The listing order is the key order (``key`` = row number), so
re-running a job lists the same items in the same order.

The ids and paths of a table are its cells' exact text: a CSV's ``path`` and ``id`` columns are read as strings
(``0001`` stays ``0001``), a Parquet table's must be strings (an integer ``id`` column is taken as its decimal text).
A folder's files whose names are not UTF-8 cannot be stored in the shards (Parquet strings are UTF-8): they are left
out of the listing (:func:`list_source`'s ``left_out``) the same way on every run, so a resumed job lists the same
items.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from PIL import Image

    from dtop_export.preprocess import DecodeBudget

TABLE_SUFFIXES = (".parquet", ".pq", ".csv")
# Where the n-th listed item (0-based) is in its source, as the user counts: "line 3" of a CSV or text file (the
# line an editor shows), "row 2" of a Parquet table (1 = the first row).
Locate = Callable[[int], str]


@dataclass(frozen=True)
class CorpusItem:
    """One image of a corpus: ``key`` (its row number, the faiss id), ``id`` (the user's name for it) and ``path``."""

    key: int
    id: str
    path: str


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths (opened through :mod:`pyarrow.fs`)."""
    return "://" in path


def _filesystem(path: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(path)
    except (ValueError, OSError) as e:
        raise DToPError(f"cannot open {path}: {e}") from e


def read_bytes(path: str) -> bytes:
    """The bytes of a local file or a ``pyarrow.fs`` URI (missing files raise :class:`DToPError`)."""
    try:
        if not is_uri(path):
            return Path(path).read_bytes()
        fs, inner = _filesystem(path)
        with fs.open_input_stream(inner) as fh:
            return fh.read()
    except (FileNotFoundError, IsADirectoryError) as e:
        raise DToPError(f"image {path} not found") from e
    except OSError as e:
        raise DToPError(f"cannot read image {path}: {e}") from e


def load_item(path: str, budget: DecodeBudget | None = None) -> Image.Image:
    """A corpus image as RGB through the one preprocessing path (local files directly, URIs via their bytes),
    within the decode ``budget`` (default: :class:`~dtop_export.preprocess.DecodeBudget`'s)."""
    from dtop_export.preprocess import load_image

    if not is_uri(path):
        return load_image(path, budget=budget)
    return load_image(path, data=read_bytes(path), budget=budget)


def _join(base: str, rel: str) -> str:
    if is_uri(rel) or rel.startswith("/"):
        return rel
    if is_uri(base):
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{PurePosixPath(rest) / rel}"
    return str(Path(base) / rel)


def _parent(path: str) -> str:
    if is_uri(path):
        scheme, _, rest = path.partition("://")
        return f"{scheme}://{PurePosixPath(rest).parent}"
    return str(Path(path).parent)


def is_utf8(name: str) -> bool:
    """False for a file name that is not valid UTF-8 (Python holds its stray bytes as surrogate escapes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_name(name: str) -> str:
    """A file name for messages: ``repr`` of its bytes when it is not UTF-8 (``b'caf\\xe9.jpg'``), else as is."""
    return name if is_utf8(name) else repr(os.fsencode(name))


def _list_folder(source: str, left_out: list[str]) -> list[tuple[str, str]]:
    from dtop_export.preprocess import IMAGE_SUFFIXES

    if not is_uri(source):
        from dtop_export.preprocess import list_images

        root = Path(source)
        pairs = [(p.relative_to(root).as_posix(), str(p)) for p in list_images(root)]
        left_out += [path for _, path in pairs if not is_utf8(path)]
        return [(i, path) for i, path in pairs if is_utf8(path)]
    import pyarrow.fs as pafs

    fs, inner = _filesystem(source)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True))
    scheme = source.partition("://")[0]
    files, bad = [], []
    for i in infos:
        try:
            path = i.path  # pyarrow.fs decodes a name when it is read: one that is not UTF-8 raises here
        except UnicodeDecodeError as e:
            path = os.fsdecode(e.object)
        if i.type == pafs.FileType.File and PurePosixPath(path).suffix.lower() in IMAGE_SUFFIXES:
            (files if is_utf8(path) else bad).append(path)
    files.sort()
    left_out += sorted(f"{scheme}://{p}" for p in bad)
    if not files and not bad:
        raise DToPError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    root = PurePosixPath(inner)
    return [(PurePosixPath(f).relative_to(root).as_posix(), f"{scheme}://{f}") for f in files]


def _read_table(source: str) -> tuple[Any, Locate]:
    """The table and where its rows are (:data:`Locate`)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    suffix = PurePosixPath(source).suffix.lower()
    try:
        if suffix == ".csv":
            data = read_bytes(source)
            import pyarrow as pa

            text = {name: pa.string() for name in ("path", "id")}  # their exact text: `0001` is not `1`
            table = pacsv.read_csv(
                pa.BufferReader(data),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=False, column_types=text),
            )
            return table, _csv_lines(data)
        if is_uri(source):
            fs, inner = _filesystem(source)
            return pq.read_table(inner, filesystem=fs), _rows
        return pq.read_table(source), _rows
    except DToPError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is the same user error
        raise DToPError(f"cannot read the table {source}: {str(e).splitlines()[0] if str(e) else e}") from e


def _rows(n: int) -> str:
    return f"row {n + 1}"


def _csv_lines(data: bytes) -> Locate:
    """:data:`Locate` for a CSV file: the line its n-th data row starts on (the header is line 1; blank lines, which
    the reader skips, and quoted line breaks counted). Worked out only when an error names a row."""

    def locate(n: int) -> str:
        import csv
        import io

        reader = csv.reader(io.StringIO(data.decode("utf-8-sig", errors="replace"), newline=""))
        starts, line = [], 1
        for record in reader:
            if record:
                starts.append(line)
            line = reader.line_num + 1
        return f"line {starts[n + 1]}" if n + 1 < len(starts) else _rows(n)

    return locate


def _column(table: Any, name: str, source: str, locate: Locate) -> list[str]:
    """A table column as strings; a null or empty cell is refused with where it is, and so is a column of another
    type than text (an ``id`` column of integers is taken as their decimal text: ``1`` and ``001`` are one id)."""
    import pyarrow as pa

    kind = table.schema.field(name).type
    text = kind if not pa.types.is_dictionary(kind) else kind.value_type
    string_view = getattr(pa.types, "is_string_view", lambda t: False)  # pyarrow >= 16; pyproject allows 14
    if not (pa.types.is_string(text) or pa.types.is_large_string(text) or string_view(text)) and not (
        name == "id" and pa.types.is_integer(text)
    ):
        allowed = "strings or integers" if name == "id" else "strings"
        raise DToPError(f"{source}: the {name!r} column holds {kind}, not text: store its values as {allowed}")
    values = table.column(name).to_pylist()
    for n, v in enumerate(values):
        if v is None or str(v).strip() == "":
            what = "no" if v is None else "an empty"
            raise DToPError(f"{source}: {locate(n)} has {what} {name!r}: fill it in or remove the row")
    return [str(v) for v in values]


def _list_table(source: str) -> tuple[list[tuple[str, str]], Locate]:
    table, locate = _read_table(source)
    if "path" not in table.column_names:
        raise DToPError(f"{source} has no 'path' column (columns: {', '.join(table.column_names)})")
    paths = _column(table, "path", source, locate)
    ids = _column(table, "id", source, locate) if "id" in table.column_names else paths
    base = _parent(source)
    return [(i, _join(base, p)) for i, p in zip(ids, paths)], locate


def _list_text(source: str) -> tuple[list[tuple[str, str]], Locate]:
    try:
        text = read_bytes(source).decode("utf-8-sig")  # a byte-order mark is not part of the first path
    except UnicodeDecodeError as e:
        raise DToPError(f"{source} is not a UTF-8 text file of image paths") from e
    base = _parent(source)
    lines = [(k, ln.strip()) for k, ln in enumerate(text.splitlines(), 1)]
    kept = [(k, ln) for k, ln in lines if ln and not ln.startswith("#")]
    return [(ln, _join(base, ln)) for _, ln in kept], lambda n: f"line {kept[n][0]}"


def list_source(source: str | Path, left_out: list[str] | None = None) -> list[CorpusItem]:
    """The items of SOURCE (see the module docstring), keyed 0..n-1 in listing order.

    Refuses a missing source, an empty one and duplicate ids, each with one line saying what to fix. A folder's files
    whose names are not UTF-8 are left out of the items and their paths appended to ``left_out``.
    """
    left_out = left_out if left_out is not None else []
    typed = source = str(source)
    if is_uri(source):
        import pyarrow.fs as pafs

        fs, inner = _filesystem(source)
        kind = fs.get_file_info(inner).type
        if kind == pafs.FileType.NotFound:
            raise DToPError(f"source {source} not found")
        is_dir = kind == pafs.FileType.Directory
    else:
        if not Path(source).exists():
            raise DToPError(f"source {source} not found: give a folder, a text file of paths or a Parquet/CSV table")
        is_dir = Path(source).is_dir()
        source = os.path.realpath(source)  # stored paths open from anywhere; `src` and `/abs/src` are one source
        if not is_utf8(source):
            raise DToPError(f"source {shown_name(source)} has a name that is not UTF-8: rename it or a folder above")
    locate: Locate = _rows
    if is_dir:
        pairs = _list_folder(source, left_out)  # ids are relative paths: never twice
    elif PurePosixPath(typed).suffix.lower() in TABLE_SUFFIXES:
        pairs, locate = _list_table(source)
    else:
        pairs, locate = _list_text(source)
    if not pairs:
        names = f" whose names are UTF-8 ({len(left_out)} are not: rename them)" if left_out else ""
        raise DToPError(f"{typed} lists no images{names}")
    seen: dict[str, int] = {}
    for n, (i, _) in enumerate(pairs):
        if i in seen:
            raise DToPError(f"{typed}: id {i!r} appears twice ({locate(seen[i])} and {locate(n)}): ids must be unique")
        seen[i] = n
    return [CorpusItem(k, i, p) for k, (i, p) in enumerate(pairs)]


def listing_sha256(items: list[CorpusItem]) -> str:
    """A digest of the listing (ids and paths in order): a changed source changes it."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\0{it.path}\n".encode())
    return h.hexdigest()
