"""An ONNX file's ``metadata_props`` read without the ``onnx`` package and without parsing its graph.

``onnx.load(path, load_external_data=False)`` parses the whole file, initializers inline included: for the
full model (513 MiB) 0.7 s and ~1 GB of memory, and ``import onnx`` itself costs ~1 s here (its ``ml_dtypes``
import), twice a second's start-up for every ``embed`` of one image, every corpus job, every service replica,
which need only the ``dtop.*`` keys. An ONNX file is one ``ModelProto`` message; this walks its top-level fields
in the protobuf wire format (tag, then a varint, a fixed 4 or 8 bytes, or a length and that many bytes), skips
every field but ``metadata_props`` (field 14: ``StringStringEntryProto`` key = 1, value = 2) by seeking past it,
and so reads a few hundred bytes of the file. Fields may come in any order (``onnx`` writes the graph, field 7,
before the metadata). A file that is not a well-formed ``ModelProto`` with an ``ir_version`` and a graph is
refused in one line, as :func:`dtop_export.contract.load_onnx` refuses a file protobuf cannot parse; stricter than
protobuf in two ways no ONNX writer meets: a (deprecated) group field is refused, and a length is checked against
the file's size before anything is read.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import BinaryIO

from dtop_export.errors import DToPError

IR_VERSION, GRAPH, METADATA_PROPS = 1, 7, 14
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


class _Malformed(ValueError):
    """Not the protobuf wire format (or cut short)."""


def _varint(f: BinaryIO) -> int | None:
    """The next varint of ``f``; None at a clean end of file."""
    value, shift = 0, 0
    while True:
        b = f.read(1)
        if not b:
            if shift:
                raise _Malformed("file ends inside a varint")
            return None
        value |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise _Malformed("varint longer than 10 bytes")


def _string_pair(data: bytes) -> tuple[str, str]:
    """``StringStringEntryProto`` (key = 1, value = 2) from its bytes."""
    f, fields = io.BytesIO(data), {1: "", 2: ""}
    while (tag := _varint(f)) is not None:
        number, wire = tag >> 3, tag & 7
        if wire != LENGTH:
            raise _Malformed(f"metadata entry field {number} has wire type {wire}")
        n = _varint(f)
        if n is None or n > len(data) - f.tell():
            raise _Malformed("metadata entry cut short")
        value = f.read(n)
        if number in fields:
            fields[number] = value.decode("utf-8")
    return fields[1], fields[2]


def _walk(f: BinaryIO, size: int) -> dict[str, str]:
    meta: dict[str, str] = {}
    seen: set[int] = set()
    while (tag := _varint(f)) is not None:
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Malformed("field number 0")
        seen.add(number)
        if wire == VARINT:
            if _varint(f) is None:
                raise _Malformed("file ends after a tag")
            continue
        if wire in (FIXED64, FIXED32):
            skip = 8 if wire == FIXED64 else 4
        elif wire == LENGTH:
            n = _varint(f)
            if n is None:
                raise _Malformed("file ends after a tag")
            if f.tell() + n > size:
                raise _Malformed(f"field {number} runs past the end of the file")
            if number == METADATA_PROPS:
                data = f.read(n)
                key, value = _string_pair(data)
                meta[key] = value
                continue
            skip = n
        else:
            raise _Malformed(f"wire type {wire}")
        if f.tell() + skip > size:
            raise _Malformed(f"field {number} runs past the end of the file")
        f.seek(skip, os.SEEK_CUR)
    if GRAPH not in seen or IR_VERSION not in seen:
        raise _Malformed("empty file" if not size else "no graph" if GRAPH not in seen else "no ir_version")
    return meta


def other_format(path: Path) -> str | None:
    """What a file given as ONNX is instead, with what to do, when it is a model of another kind the toolkit knows
    (by suffix, or a PyTorch checkpoint's zip signature): the start of a one-line error; None otherwise."""
    from dtop_export.suffixes import CHECKPOINT_SUFFIXES, IR_SUFFIXES, PLAN_SUFFIXES, PTE_SUFFIXES

    suffix = path.suffix.lower()
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if suffix in CHECKPOINT_SUFFIXES or head == b"PK\x03\x04":
        return f"{path} is a PyTorch checkpoint, not ONNX: export it first with `dtop-export onnx {path}`"
    if suffix in IR_SUFFIXES:
        return f"{path} is an OpenVINO IR, not ONNX: give the .onnx file it was converted from"
    if suffix in PLAN_SUFFIXES:
        return f"{path} is a TensorRT plan, not ONNX: give the .onnx file it was built from"
    if suffix in PTE_SUFFIXES:
        return f"{path} is an ExecuTorch program, not ONNX: give the .onnx file (or the checkpoint) it came from"
    return None


def read_onnx_metadata_props(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of the ONNX file ``path`` as a dict (empty when it has none); one
    :class:`DToPError` line when the file is missing or not ONNX."""
    path = Path(path)
    if not path.is_file():
        raise DToPError(f"ONNX file {path} not found")
    try:
        with path.open("rb") as f:
            return _walk(f, path.stat().st_size)
    except (_Malformed, UnicodeDecodeError) as e:
        raise DToPError(other_format(path) or f"{path} is not a readable ONNX file ({e})") from e
