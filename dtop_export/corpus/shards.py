"""The shard format of an embedded corpus: ``OUT_DIR/shard-00000.parquet ...`` plus ``OUT_DIR/manifest.json``.

Shard ``k`` holds the items with keys ``[k*S, (k+1)*S)`` (``S`` = shard size) that could be read, one row each:
``key`` (int64, the item's row in the source listing and its faiss id), ``id``, ``path``, ``descriptor``
(fixed-size list of float32, N), ``model_sha256`` and ``scales``. The items that could not be read are listed
with their reasons in the file's Parquet metadata (``dtop.shard``, JSON, with the job's fingerprint), so a
shard accounts for every key of its range exactly once. Shards are written to a temporary file and renamed:
a shard file exists complete or not at all. ``manifest.json`` records the model, the preprocessing contract,
the counts and every skipped image.

A re-run checks every shard against the job's :class:`CorpusSettings` fingerprint and redoes only missing or
invalid ones; a fingerprint that differs (another model, preprocessing, scales, shard size or listing) is
refused unless the caller clears the folder (``--force``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.atomic import read_tagged_json
from dtop_export.errors import DToPError

FORMAT = "dtop-export/shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_GLOB = "shard-*.parquet"
META_KEY = b"dtop.shard"
# The temporary files atomic_path makes for a shard or the manifest (mkstemp: "." + name + "." + 8 random + ".tmp"):
# a killed run leaves them; any other hidden .tmp file in the folder is someone else's.
TEMP_FILE = re.compile(r"\.(shard-\d{5,}\.parquet|manifest\.json)\.[a-z0-9_]+\.tmp")


def shard_name(index: int) -> str:
    """``shard-00042.parquet``."""
    return f"shard-{index:05d}.parquet"


def file_sha256(path: str | Path) -> str:
    """sha256 of a model: the file, plus the ``.bin`` weights of an OpenVINO ``.xml``."""
    from dtop_export.digest import file_sha256 as sha256_of

    path = Path(path)
    files = [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]
    return sha256_of(*(p for p in files if p.is_file()))


@dataclass
class CorpusSettings:
    """What a corpus job's output depends on; shards written under other settings never mix with these."""

    model: str
    model_sha256: str
    descriptor_dim: int
    preprocess: dict[str, Any]
    image_size: int
    scales: list[float]
    shard_size: int
    source: str
    n_items: int
    listing_sha256: str
    engine: str = ""  # the file and options that ran (--precision, --precision auto), threads left out
    checkpoint_sha256: str = ""  # the checkpoint the model was exported from (dtop_export.identity); "" unknown
    gpu_decode: bool = False  # --gpu-decode: JPEGs decoded on the GPU (another decoder, its own parity contract)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def fingerprint(self) -> dict[str, Any]:
        """The fields that must match for shards to be reused (the model's path and the source's name may move)."""
        d = asdict(self)
        d.pop("model")
        d.pop("source")
        d.pop("checkpoint_sha256")  # follows from the model file (model_sha256); absent from older shards
        if not d["gpu_decode"]:
            del d["gpu_decode"]  # recorded only when on: older shards and manifests (the CPU decoder) lack it
        return d

    def n_shards(self) -> int:
        return -(-self.n_items // self.shard_size)

    def shard_keys(self, index: int) -> range:
        """The keys shard ``index`` accounts for."""
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.n_items))

    def scales_text(self) -> str:
        return ",".join(f"{s:g}" for s in self.scales)


# what a changed CorpusSettings field means to a user
_FIELD_NAMES = {
    "model_sha256": "model file",
    "descriptor_dim": "descriptor size",
    "preprocess": "preprocessing",
    "image_size": "image size",
    "scales": "scales",
    "shard_size": "shard size",
    "n_items": "number of images",
    "listing_sha256": "source listing",
    "engine": "engine/precision",
    "gpu_decode": "decoder (--gpu-decode)",
    "format": "format",
    "format_version": "format version",
}


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return ",".join(f"{v:g}" for v in value)
    return json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, with the old and the new value: ``image size (was 1024, now 512)``;
    in a nested dict (the preprocessing) the keys that differ."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if a == b:
            continue
        name = _FIELD_NAMES.get(k, k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{name} {j} (was {_show(a.get(j))}, now {_show(b.get(j))})" for j in sorted(set(a) | set(b))
                    if a.get(j) != b.get(j)]  # fmt: skip
        else:
            out.append(f"{name} (was {_show(a)}, now {_show(b)})")
    return out


@dataclass
class Shard:
    """One shard's rows before writing: parallel lists of readable items and their descriptors, and the
    skipped ones as ``{"key", "id", "path", "error"}``."""

    index: int
    keys: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    descriptors: list[np.ndarray] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def write_shard(folder: Path, shard: Shard, settings: CorpusSettings) -> Path:
    """Write ``shard`` as ``folder/shard-NNNNN.parquet`` atomically (rows sorted by key)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dtop_export.atomic import atomic_path

    order = np.argsort(np.asarray(shard.keys, dtype=np.int64), kind="stable")
    n, dim = len(order), settings.descriptor_dim
    desc = (
        np.stack([np.asarray(shard.descriptors[i], np.float32) for i in order]) if n else np.zeros((0, dim), np.float32)
    )
    if desc.shape != (n, dim):
        raise DToPError(f"shard {shard.index}: descriptors are {list(desc.shape)}, expected [{n}, {dim}]")
    table = pa.table(
        {
            "key": pa.array([shard.keys[i] for i in order], pa.int64()),
            "id": pa.array([shard.ids[i] for i in order], pa.string()),
            "path": pa.array([shard.paths[i] for i in order], pa.string()),
            "descriptor": pa.FixedSizeListArray.from_arrays(pa.array(desc.reshape(-1), pa.float32()), dim),
            "model_sha256": pa.array([settings.model_sha256] * n, pa.string()),
            "scales": pa.array([settings.scales_text()] * n, pa.string()),
        }
    )
    info = {
        "shard": shard.index,
        "keys": [shard.index * settings.shard_size, shard.index * settings.shard_size + n + len(shard.skipped)],
        "rows": n,
        "skipped": sorted(shard.skipped, key=lambda s: s["key"]),
        "fingerprint": settings.fingerprint(),
    }
    table = table.replace_schema_metadata({META_KEY: json.dumps(info).encode()})
    dest = folder / shard_name(shard.index)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp)
    return dest


def shard_info(path: Path) -> dict[str, Any] | None:
    """The ``dtop.shard`` metadata of a shard file with its row count, or None for a missing/unreadable/foreign file."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_metadata(path)
        raw = (meta.metadata or {}).get(META_KEY)
        info = json.loads(raw) if raw else None
    except Exception:  # noqa: BLE001 - a damaged shard is simply not complete
        return None
    if not isinstance(info, dict):
        return None
    info["num_rows"] = meta.num_rows
    return info


def shard_is_complete(folder: Path, index: int, settings: CorpusSettings) -> bool:
    """True when ``shard-index`` exists, was written under ``settings`` and accounts for every key of its range."""
    info = shard_info(folder / shard_name(index))
    if info is None or info.get("fingerprint") != settings.fingerprint() or info.get("shard") != index:
        return False
    return int(info["num_rows"]) + len(info.get("skipped", [])) == len(settings.shard_keys(index))


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` as a dict (None when missing)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return read_tagged_json(
        path, FORMAT, "a dtop-export shard manifest", "choose another output folder, or pass --force to replace it"
    )


def prepare_folder(folder: Path, settings: CorpusSettings, force: bool) -> list[int]:
    """Make ``folder`` ready for a job under ``settings``; returns the shard indices still to write.

    Removes temporary files left by a killed run. With ``force`` every earlier shard and the manifest go;
    otherwise earlier shards under other settings are refused with what changed (a manifest alone, from a run
    that wrote none, is replaced).
    """
    if folder.exists() and not folder.is_dir():
        raise DToPError(f"{folder} exists and is not a folder: choose another -o")
    folder.mkdir(parents=True, exist_ok=True)
    for tmp in folder.glob(".*.tmp"):  # left by a killed run (the caller holds the folder's lock)
        if TEMP_FILE.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)
    if force:
        for p in folder.glob(SHARD_GLOB):
            p.unlink()
        (folder / MANIFEST).unlink(missing_ok=True)
    manifest = read_manifest(folder)
    if manifest is not None and not any(folder.glob(SHARD_GLOB)):
        manifest = None  # a run that wrote no shard (it failed to start, say) leaves nothing to protect
    if manifest is not None:
        old = {
            k: v for k, v in manifest.get("settings", {}).items() if k not in ("model", "source", "checkpoint_sha256")
        }
        if not old.get("gpu_decode", True):
            del old["gpu_decode"]  # as fingerprint(): recorded only when on
        changed = _differences(old, settings.fingerprint())
        if changed:
            raise DToPError(
                f"{folder} holds shards written with another {', '.join(changed)}: use another output folder, "
                "or pass --force to replace them"
            )
    elif any(folder.glob(SHARD_GLOB)):
        foreign = [
            p.name
            for p in folder.glob(SHARD_GLOB)
            if (shard_info(p) or {}).get("fingerprint") != settings.fingerprint()
        ]
        if foreign:
            raise DToPError(
                f"{folder} holds shards of another job ({foreign[0]}, ...): use another output folder, or pass --force"
            )
    return [k for k in range(settings.n_shards()) if not shard_is_complete(folder, k, settings)]


def write_manifest(folder: Path, settings: CorpusSettings, status: str, extra: dict[str, Any] | None = None) -> None:
    """``folder/manifest.json`` (atomic): the settings, the status (``running``/``complete``) and ``extra``."""
    from dtop_export import __version__
    from dtop_export.atomic import atomic_write_text

    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "toolkit_version": __version__, "status": status}
    payload["settings"] = asdict(settings)
    payload.update(extra or {})
    atomic_write_text(folder / MANIFEST, json.dumps(payload, indent=2, default=str) + "\n")


def require_shard_folder(folder: str | Path) -> Path:
    """``folder`` as a Path, or one :class:`DToPError` line when it is missing or a file (an index, an .npy)."""
    folder = Path(folder)
    if folder.is_file():
        raise DToPError(
            f"{folder} is a file, not a shard folder: give the folder `dtop-export embed MODEL SOURCE -o FOLDER` wrote"
        )
    if not folder.is_dir():
        raise DToPError(f"shard folder {folder} not found")
    return folder


def shard_files(folder: str | Path) -> list[Path]:
    """The shard files of an output folder, in key order; a folder without any is a :class:`DToPError`."""
    folder = require_shard_folder(folder)
    files = sorted(folder.glob(SHARD_GLOB))
    if not files:
        raise DToPError(f"{folder} holds no {SHARD_GLOB} files: run `dtop-export embed MODEL SOURCE -o {folder}` first")
    return files


def shards_with_skipped(folder: Path, settings: CorpusSettings, indices: Sequence[int]) -> dict[int, Shard]:
    """The complete shards among ``indices`` that recorded skipped images (``--retry-skipped``), each as a
    :class:`Shard` holding the rows it has and, as ``skipped``, the images to embed again."""
    out: dict[int, Shard] = {}
    for k in indices:
        info = shard_info(folder / shard_name(k))
        if not info or not info.get("skipped") or not shard_is_complete(folder, k, settings):
            continue
        rows = read_shard(folder / shard_name(k))
        keys = [int(x) for x in rows["key"]]
        out[k] = Shard(k, keys, rows["id"], rows["path"], list(rows["descriptor"]), list(info["skipped"]))
    return out


# the decode budget's advice in a skipped image's error ("... (raise it with --max-pixels or DecodeBudget.max_pixels)")
_RAISE_LIMIT = re.compile(r"\(raise it with (--max-[a-z-]+) or DecodeBudget\.\w+\)")


def corpus_error(error: str) -> str:
    """A skipped image's reason as a corpus job records it: over the decode budget, the advice says to re-run with
    ``--retry-skipped`` too (a shard that skipped an image is reused as it is otherwise)."""
    return _RAISE_LIMIT.sub(r"(raise \1 and re-run with --retry-skipped)", error)


def skip_reason(error: str) -> str:
    """What kind of skip ``error`` records: ``over --max-pixels`` (or another decode limit), ``not found``,
    ``read error`` (the file system's: worth a retry) or ``unreadable`` (not an image, truncated...)."""
    limit = re.search(r"\(raise (?:it with )?(--max-[a-z-]+) ", error)
    if limit:
        return f"over {limit.group(1)}"
    if error.startswith("image ") and error.endswith(" not found"):
        return "not found"
    return "read error" if "[Errno " in error else "unreadable"


def collect_skipped(folder: Path, indices: Sequence[int]) -> list[dict[str, Any]]:
    """The skipped images recorded in the given shards, in key order."""
    out: list[dict[str, Any]] = []
    for k in indices:
        out += (shard_info(folder / shard_name(k)) or {}).get("skipped", [])
    return sorted(out, key=lambda s: s["key"])


def read_shard(path: Path, columns: Sequence[str] = ("key", "id", "path", "descriptor")) -> dict[str, Any]:
    """One shard's columns: ``descriptor`` as float32 [rows, N], ``key`` as int64, the rest as lists."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=list(columns))
    except Exception as e:  # noqa: BLE001
        raise DToPError(f"cannot read shard {path} ({str(e).splitlines()[0] if str(e) else e}): re-run the embed "
                        "job that wrote it") from e  # fmt: skip
    out: dict[str, Any] = {}
    for name in columns:
        col = table.column(name).combine_chunks()
        if name == "descriptor":
            dim = col.type.list_size
            out[name] = col.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
        elif name == "key":
            out[name] = col.to_numpy().astype(np.int64)
        else:
            out[name] = col.to_pylist()
    return out


def iter_shards(
    folder: str | Path, columns: Sequence[str] = ("key", "id", "path", "descriptor")
) -> Iterator[dict[str, Any]]:
    """:func:`read_shard` of every shard file of ``folder``, in order (one shard in memory at a time)."""
    for path in shard_files(folder):
        yield read_shard(path, columns)


class ShardedDescriptors:
    """The descriptors of a shard folder as a read-only [M, N] matrix that reads shards on demand.

    Supports ``len``, ``shape``, ``ndim``, ``dtype`` and row slices ``m[a:b]`` (what the +R1M ranking uses), so
    a million distractors are scored shard by shard without loading all of them. The last shard read is kept: slices
    in order (the ranking's chunks) read each shard once, however the chunks and the shards are cut.
    """

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, folder: str | Path, files: Sequence[Path] | None = None) -> None:
        import pyarrow.parquet as pq

        self.files = list(files) if files is not None else shard_files(folder)
        self.rows = []
        for p in self.files:
            try:
                self.rows.append(pq.read_metadata(p).num_rows)
            except Exception as e:  # noqa: BLE001 - any reader failure is a damaged shard
                raise DToPError(f"cannot read shard {p} ({str(e).splitlines()[0]}): re-run the embed job") from e
        self.starts = np.concatenate([[0], np.cumsum(self.rows)]).astype(np.int64)
        first = next((p for p, r in zip(self.files, self.rows) if r), None)
        dim = read_shard(first, ("descriptor",))["descriptor"].shape[1] if first is not None else 0
        self.shape = (int(self.starts[-1]), dim)
        self._last: tuple[int, np.ndarray] | None = None  # (shard index, its descriptors)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice):
            raise TypeError("ShardedDescriptors supports row slices only")
        start, stop, step = item.indices(len(self))
        if step != 1:
            raise TypeError("ShardedDescriptors supports contiguous row slices only")
        parts = []
        for i, path in enumerate(self.files):
            a, b = int(self.starts[i]), int(self.starts[i + 1])
            if b <= start or a >= stop or a == b:
                continue
            if self._last is None or self._last[0] != i:
                self._last = (i, read_shard(path, ("descriptor",))["descriptor"])
            d = self._last[1]
            parts.append(d[max(start - a, 0) : min(stop, b) - a])
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), np.float32)
