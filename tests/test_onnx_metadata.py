"""``read_metadata``: an ONNX file's metadata without the ``onnx`` package and without parsing its graph."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dtop_export.contract import read_metadata
from dtop_export.errors import DToPError


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_same_metadata_as_onnx_in_any_field_order_and_with_external_data(small_onnx: Path, tmp_path: Path) -> None:
    import onnx

    expected = _onnx_metadata(small_onnx)
    assert "dtop.descriptor_dim" in expected and read_metadata(small_onnx) == expected

    model = onnx.load(str(small_onnx))
    external = tmp_path / "external.onnx"
    onnx.save(model, str(external), save_as_external_data=True, location="external.data", size_threshold=0)
    assert read_metadata(external) == expected

    first = onnx.ModelProto()  # the metadata before the graph: protobuf allows fields in any order
    first.metadata_props.extend(model.metadata_props)
    del model.metadata_props[:]
    reordered = tmp_path / "reordered.onnx"
    reordered.write_bytes(first.SerializeToString() + model.SerializeToString())
    assert _onnx_metadata(reordered) == expected and read_metadata(reordered) == expected

    bare = tmp_path / "bare.onnx"  # not written by dtop-export: no metadata
    bare.write_bytes(model.SerializeToString())
    assert read_metadata(bare) == {}


def test_the_graph_is_skipped_not_parsed(small_onnx: Path, tmp_path: Path) -> None:
    """A graph field of 4 MiB that is not a GraphProto at all: seeked past, the metadata after it read."""

    def varint(n: int) -> bytes:
        out = b""
        while True:
            out += bytes([(n & 0x7F) | (0x80 if n > 0x7F else 0)])
            n >>= 7
            if not n:
                return out

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    entry = field(1, b"dtop.descriptor_dim") + field(2, b"256")
    data = varint(1 << 3) + varint(8) + field(7, b"\xff" * (4 << 20)) + field(14, entry)
    path = tmp_path / "junk-graph.onnx"
    path.write_bytes(data)
    assert read_metadata(path) == {"dtop.descriptor_dim": "256"}


def test_reading_metadata_does_not_import_onnx(small_onnx: Path) -> None:
    """``import onnx`` costs ~1 s here (its ml_dtypes): every ``embed``, corpus job and service replica paid it."""
    code = (
        "import sys; from dtop_export.contract import read_metadata; "
        f"m = read_metadata({str(small_onnx)!r}); print(len(m), 'onnx' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    n, imported = r.stdout.split()
    assert int(n) > 5 and imported == "False"


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"hello, this is not a model\n" * 20, "is not a readable ONNX file (wire type"),
        (b"", "is not a readable ONNX file (empty file)"),  # as `info` says (contract.load_onnx); "no graph" before
        (b"\x08\x08", "is not a readable ONNX file (no graph)"),
        ("truncated", "is not a readable ONNX file (field 7 runs past the end of the file)"),
        (b"\x08\x88\x88", "is not a readable ONNX file (file ends inside a varint)"),
        (b"\x08\x08\x3a\x00\x72\x80\x80\x80\x80\x80\x20", "(field 14 runs past the end of the file)"),
        (b"\x08\x08\x3a\x00\x72\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "(field 14 runs past the end of the file)"),
        (b"\x08\x08\x3a\x00\x72\x0a\x0a\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "(metadata entry cut short)"),
    ],
    ids=["text", "empty", "no-graph", "truncated", "cut-varint", "2^40-metadata", "2^63-metadata", "2^63-entry"],
)
def test_a_file_that_is_not_onnx_is_one_line(content: bytes | str, says: str, small_onnx: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(small_onnx.read_bytes()[:50_000] if content == "truncated" else content)
    with pytest.raises(DToPError, match="^" + str(path).replace(".", r"\.") + " ") as e:
        read_metadata(path)
    assert says in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DToPError, match="not found"):
        read_metadata(tmp_path / "missing.onnx")
