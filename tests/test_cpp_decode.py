"""The C++ client's decoder on hostile files (dtop_export.hostile): no crash, no hang, peak RSS within the decode
budget, and the same files refused and the same model inputs as the Python side (Pillow), case by case.

The suite runs the representative subset (every seed and rule case, one in sixteen mutations: ~250 files, one
`dtop-embed` process each on a one-layer model, ~1 min here); `python benchmarks/decode_hostile.py` runs the
whole set (~1500 files, ~8 min here: too long for CI, whose `slow` tests run too).
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop_export.errors import DToPError
from dtop_export.hostile import HostileReport, hostile_cases, many_scans_jpeg, run_hostile, tiny_model
from dtop_export.preprocess import DecodeBudget, load_image

BUDGET = DecodeBudget(max_decode_mb=64)


@pytest.fixture(scope="module")
def tiny(small_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small export's contract on a one-layer graph: a process per file costs the decoder, not the model."""
    return tiny_model(small_onnx, tmp_path_factory.mktemp("tiny") / "tiny.onnx")


def _check(report: HostileReport) -> None:
    assert report.failures() == [], "\n".join(report.failures())
    by = {r.name: r for r in report.results}
    s = report.summary()
    assert s["accepted_by_both"] > 50 and s["refused_by_both"] > 50  # both sides of the rules are exercised
    # decompression bombs of a few bytes: refused from the header, by the budget, on both sides (Pillow's own
    # DecompressionBombError says "pixels" where it comes first)
    for name, limit in (("png.bomb_16bit_rgba_1row", "--max-decode-mb"), ("png.bomb_adam7", "--max-decode-mb"),
                        ("png.bomb_wide_16bit", "--max-decode-mb"), ("png.bomb_rgb_1gb", "pixels")):  # fmt: skip
        assert limit in by[name].cpp_error and limit in by[name].python_error, by[name]
        assert by[name].peak_rss_mb < report.baseline_rss_mb + 8
    assert "--max-scans" in by["scans.3000"].cpp_error and "--max-scans" in by["scans.3000"].python_error
    assert by["scans.100"].cpp_ok and not by["scans.101"].cpp_ok  # the limit is where it says
    # an image just inside the budget decodes, and its RSS shows the decoded image (14 MB of RGB, 2400 x 2000)
    big = by["large.png_rgba_2400x2000"]
    assert big.cpp_ok and big.python_ok and big.peak_rss_mb > report.baseline_rss_mb + 10


def test_hostile_set_ci_subset(client: Path, tiny: Path) -> None:
    cases = [c for c in hostile_cases() if c.ci]
    assert 150 < len(cases) < 400
    _check(run_hostile(client, tiny, cases, BUDGET))


# the budget's options -----------------------------------------------------------------------------------------


def _embed(client: Path, model: Path, image: Path, tmp: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [str(client), str(model), str(image), "-o", str(tmp / "o.npy"), "--image-size", "64", "--no-progress", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("flag", "refused", "read", "make"),
    [
        ("--max-pixels", 59999, 60000, lambda: _photo(300, 200, "PNG")),  # 60000 pixels
        ("--max-decode-mb", 2, 3, lambda: _photo(600, 400, "PNG")),  # 0.7 MB file + 6 x 240000 + 32 x 600 bytes
        ("--max-scans", 9, 10, lambda: _photo(300, 200, "JPEG", progressive=True)),  # libjpeg's script: 10 scans
        ("--max-scans", 99, 100, lambda: many_scans_jpeg(100, 64)),
    ],
)
def test_a_limit_refuses_in_one_line_naming_its_option_and_python_agrees(
    client: Path, tiny: Path, tmp_path: Path, flag: str, refused: int, read: int, make: object
) -> None:
    image = tmp_path / ("x.jpg" if flag == "--max-scans" else "x.png")
    image.write_bytes(make())  # type: ignore[operator]
    r = _embed(client, tiny, image, tmp_path, flag, str(refused))
    assert r.returncode == 2, r.stderr
    skipped = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped: ")]
    assert len(skipped) == 1 and flag in skipped[0] and f" of {refused}" in skipped[0], r.stderr
    field = flag[2:].replace("-", "_")
    with pytest.raises(DToPError, match=f"cannot read image .*x\\.(png|jpg): .* of {refused}.*{re.escape(flag)}"):
        load_image(image, budget=DecodeBudget(**{field: refused}))
    assert _embed(client, tiny, image, tmp_path, flag, str(read)).returncode == 0
    assert load_image(image, budget=DecodeBudget(**{field: read})).size[0] > 0


def test_limit_flags_are_checked(client: Path, tiny: Path, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(_photo(30, 20, "PNG"))
    for flag, value in (("--max-scans", "0"), ("--max-decode-mb", "-5"), ("--max-pixels", "many")):
        r = _embed(client, tiny, image, tmp_path, flag, value)
        assert r.returncode == 2 and r.stderr.strip() == f"error: {flag} expects a whole number >= 1, got '{value}'"


def _photo(w: int, h: int, fmt: str, **kw: object) -> bytes:
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()
