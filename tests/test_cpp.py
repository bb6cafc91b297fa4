"""The C++ client (cpp/): built once per run with `dtop-export cpp build` (conftest's `client`), then held to the
Python side.

Parity: `dtop-embed` vs `dtop-export embed` (ONNX Runtime) on every decoding case the Python side accepts
(:func:`dtop_export.cpp_parity.write_format_zoo`): the model inputs must be identical (0 levels: the client
reproduces Pillow's integer arithmetic) and the descriptors within cosine 0.9999; both sides skip the same
files. Bad input: one `error:` line, exit code 2, nothing written.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from cli_helpers import cli

from dtop_export.cpp_parity import BAD_FILES, MIN_COSINE, CppParityReport, ImageParity, compare, write_format_zoo
from dtop_export.errors import DToPError

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dtop_export"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_format_zoo(tmp_path_factory.mktemp("zoo"))


def _run(binary: Path, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


def _with_metadata(src: Path, dest: Path, **changes: str | None) -> Path:
    """A copy of ``src`` with metadata keys changed (None: removed)."""
    m = onnx.load(str(src))
    meta = {p.key: p.value for p in m.metadata_props}
    for k, v in changes.items():
        key = "dtop." + k
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    del m.metadata_props[:]
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, str(dest))
    return dest


# build ---------------------------------------------------------------------------------------------------


def test_binary_runs_without_environment_variables(client: Path) -> None:
    r = _run(client, "--help", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0 and "dtop-embed MODEL IMAGE..." in r.stdout
    runpath = subprocess.run(["readelf", "-d", str(client)], capture_output=True, text=True).stdout
    assert re.search(r"(RUNPATH|RPATH).*openvino/libs", runpath), runpath


def test_build_names_what_is_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util
    import shutil

    from dtop_export import cpp

    real_which, real_find = shutil.which, importlib.util.find_spec
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "cmake" else real_which(name))
    with pytest.raises(DToPError, match="CMake not found: install"):
        cpp.build(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None if name in ("c++", "g++", "clang++") else real_which(name))
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(DToPError, match="no C\\+\\+ compiler found"):
        cpp.build(tmp_path)
    monkeypatch.setattr(shutil, "which", real_which)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "openvino" else real_find(name))
    with pytest.raises(DToPError, match="openvino wheel is not installed: pip install openvino"):
        cpp.build(tmp_path)
    assert not (tmp_path / "dtop-embed").exists()


def test_cmake_failure_is_one_line_with_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken source tree: the error names the compiler's first error line and the log file."""
    import shutil

    from dtop_export import cpp

    src = tmp_path / "src"
    shutil.copytree(cpp.source_dir(), src)
    (src / "src" / "json.cpp").write_text("this is not C++;\n")
    monkeypatch.setattr(cpp, "source_dir", lambda: src)
    with pytest.raises(DToPError, match=r"C\+\+ build failed: .*error.*\(full log: .*dtop-build.log\)"):
        cpp.build(tmp_path / "build", jobs=2)


# parity with the Python side -----------------------------------------------------------------------------


def test_parity_on_every_format(client: Path, small_onnx: Path, zoo: dict[str, Path]) -> None:
    paths = sorted(zoo.values())
    report = compare(client, small_onnx, paths, image_size=256)
    assert report.passed, report.failures()
    assert report.skipped_cpp == report.skipped_python == [str(zoo[name]) for name in BAD_FILES]
    assert len(report.images) == len(zoo) - len(BAD_FILES)
    assert report.cosine_min >= MIN_COSINE and report.levels_max == 0.0


def test_parity_multiscale_batched_and_bicubic(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """`ms` scales with batches of 3, and a model whose contract says bicubic: the C++ resize follows the
    metadata (another filter and support), still identical to Pillow's."""
    bicubic = _with_metadata(
        small_onnx,
        tmp_path / "bicubic.onnx",
        resize_policy=json.dumps({"policy": "longest_side", "size": 320, "interpolation": "bicubic"}),
    )
    paths = [zoo[k] for k in ("portrait_odd.jpg", "landscape.jpg", "rgba16.png", "exif_orientation_7.jpg", "grey.png")]
    for model, scales in ((small_onnx, (1.0, 2**-0.5, 2**0.5)), (bicubic, (1.0,))):
        report = compare(client, model, paths, image_size=200, scales=scales, batch_size=3)
        assert report.passed, report.failures()


def test_report_fails_on_a_pixel_difference_or_a_different_skip() -> None:
    ok = ImageParity("a.jpg", 0.99999, 0.0, 0.0, True)
    assert CppParityReport("m", "b", 384, [1.0], [ok]).passed
    off = ImageParity("b.jpg", 0.99999, 0.0157, 1.0, True)
    assert "differs by 1 levels" in CppParityReport("m", "b", 384, [1.0], [ok, off]).failures()[0]
    far = ImageParity("c.jpg", 0.9998, 0.0, 0.0, True)
    assert "cosine" in CppParityReport("m", "b", 384, [1.0], [far]).failures()[0]
    skip = CppParityReport("m", "b", 384, [1.0], [ok], skipped_cpp=["x.bmp"], skipped_python=[])
    assert "skipped files differ" in skip.failures()[0]


def test_embed_output_matches_python_embed(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """Same .npy rows and .json sidecar fields as `dtop-export embed` for a folder, with the bad files."""
    folder = zoo["landscape.jpg"].parent
    r = _run(client, small_onnx, folder, "-o", tmp_path / "cpp.npy", "--image-size", 224, "--no-progress")
    assert r.returncode == 0, r.stderr
    bad = len(BAD_FILES)
    assert r.stderr.count("skipped: cannot read image") == bad and f"skipped {bad} unreadable image(s)" in r.stdout
    py_args = ["embed", str(small_onnx), str(folder), "-o", str(tmp_path / "py.npy"), "--image-size", "224"]
    assert cli(*py_args, "--no-progress", "--threads", "1") == 0
    assert cli(*py_args, "--threads", "0") == 2  # refused before anything runs
    cpp, py = np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "py.npy")
    jc, jp = json.loads((tmp_path / "cpp.json").read_text()), json.loads((tmp_path / "py.json").read_text())
    assert cpp.dtype == np.float32 and cpp.shape == py.shape == (len(zoo) - bad, jp["descriptor_dim"])
    assert np.all((cpp * py).sum(1) >= MIN_COSINE)
    for key in ("model", "checkpoint_sha256", "descriptor_dim", "image_size", "scales", "images"):
        assert jc[key] == jp[key], key
    assert len(jc["checkpoint_sha256"]) == 64  # evaluate --distractors and search check the file against it
    assert [s["path"] for s in jc["skipped"]] == [s["path"] for s in jp["skipped"]]
    assert jc["engine"]["name"] == "openvino-cpp" and jc["engine"]["precision"] == "fp32"


def test_file_names_that_are_not_utf8_are_named_as_python_names_them(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """A file name in another encoding (b"caf\xe9.jpg", Latin-1) went into the sidecar as its raw bytes: invalid
    JSON, and `cpp parity` died in a UnicodeDecodeError traceback reading it. The client writes such a byte as the
    escape Python's json.dumps writes for it (\udce9, os.fsdecode's surrogate), so both sidecars name the file alike;
    valid UTF-8 (é) and a broken sequence in one name too. Parity passes on such files, and a sidecar that is not UTF-8
    (an older client's) is one line."""
    import os

    names = [os.fsdecode(b"caf\xe9.jpg"), os.fsdecode(b"ok\xc3\xa9\xe2\x82x.png")]
    links = []
    for name, target in zip(names, ("landscape.jpg", "grey.png")):
        links.append(tmp_path / name)
        links[-1].symlink_to(zoo[target])
    r = _run(client, small_onnx, *links, "-o", tmp_path / "cpp.npy", "--image-size", 128, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert cli("embed", str(small_onnx), *map(str, links), "-o", str(tmp_path / "py.npy"), "--image-size", "128",
               "--no-progress") == 0  # fmt: skip
    cpp_side = json.loads((tmp_path / "cpp.json").read_bytes().decode("utf-8"))
    py_side = json.loads((tmp_path / "py.json").read_text())
    assert cpp_side["images"] == py_side["images"] == [str(p) for p in links]
    report = compare(client, small_onnx, links, image_size=128)
    assert report.passed, report.failures()
    assert [r.path for r in report.images] == [str(p) for p in links]

    fake = tmp_path / "old-client"  # writes what the client wrote before: the name's bytes as they are
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --help ]; then echo "usage: dtop-embed MODEL IMAGE..."; exit 0; fi\n'
        'while [ "$1" != -o ]; do shift; done\n'
        f'cp {tmp_path / "cpp.npy"} "$2"\n'
        'printf \'{"images": ["caf\\351.jpg"], "skipped": []}\' > "${2%.npy}.json"\n'
    )
    fake.chmod(0o755)
    with pytest.raises(DToPError, match="wrote a sidecar that is not UTF-8 JSON \\('utf-8' codec can't decode"):
        compare(fake, small_onnx, links, image_size=128)


def test_an_image_size_that_cannot_fit_is_one_line(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """Was "error: std::bad_alloc", exit 1, after ~20 GB were touched (48 s here); refused before decoding now, with
    the Python side's lower bound (dtop_export/memory.py)."""
    from dtop_export.memory import inference_bytes

    out = tmp_path / "big.npy"
    r = _run(client, small_onnx, zoo["landscape.jpg"], "-o", out, "--image-size", 100000, "--no-progress")
    assert r.returncode == 2, r.stderr
    need = inference_bytes(100000) / 2**30
    assert re.fullmatch(
        rf"error: --image-size 100000 needs at least {need:.1f} GiB for a batch of 1; [0-9.]+ GiB are available here: "
        "use a smaller --image-size",
        r.stderr.strip().splitlines()[-1],
    ), r.stderr
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.fixture(scope="module")
def small_ir(small_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_onnx`` as an IR from `dtop-export openvino` (small.xml + small.bin), read only."""
    ir = tmp_path_factory.mktemp("cpp-ir") / "small.xml"
    assert cli("openvino", str(small_onnx), "-o", str(ir)) == 0
    return ir


def _cpu_has(capability: str) -> bool:
    """OpenVINO's CPU plugin can run this CPU at ``capability`` (``FP16``: AVX512-FP16; ``BF16``): it drops a hint
    the CPU lacks and runs f32."""
    from dtop_export.engines.openvino import core

    return capability in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_f16_keeps_the_irs_fp32_islands_and_warns_without_them(
    client: Path, small_onnx: Path, small_ir: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """Under `--precision f16` the client counts the layers an IR from `dtop-export openvino` keeps FP32 (the
    sidecar's runtime names them); an .onnx carries none, and the client says so on stderr."""
    if not _cpu_has("FP16"):
        pytest.skip("this CPU has no f16 inference (AVX512-FP16): OpenVINO runs f32")
    ir = small_ir
    from dtop_export.engines.openvino import count_fp32_islands, read_model

    islands = count_fp32_islands(read_model(ir))
    image = zoo["landscape.jpg"]
    r = _run(client, ir, image, "-o", tmp_path / "ir.npy", "--precision", "f16", "--no-progress")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    runtime = json.loads((tmp_path / "ir.json").read_text())["engine"]["runtime"]
    assert islands > 0 and runtime.endswith(f"f16, {islands} FP32 islands"), runtime
    r = _run(client, small_onnx, image, "-o", tmp_path / "onnx.npy", "--precision", "f16", "--no-progress")
    assert r.returncode == 0 and "marks no FP32 islands" in r.stderr and "dtop-export openvino" in r.stderr
    r = _run(client, ir, image, "-o", tmp_path / "f32.npy", "--no-progress")  # f32: nothing to keep, nothing said
    assert r.returncode == 0 and "warning" not in r.stderr
    assert "FP32 islands" not in json.loads((tmp_path / "f32.json").read_text())["engine"]["runtime"]
    r = _run(client, ir, image, "-o", tmp_path / "bf16.npy", "--precision", "bf16", "--no-progress")
    assert r.returncode == 0 and "warning" not in r.stderr  # bf16: OpenVINO's CPU plugin ignores the marks
    assert "FP32 islands" not in json.loads((tmp_path / "bf16.json").read_text())["engine"]["runtime"]


def test_an_ir_runs_at_the_hint_it_records_unless_told_otherwise(
    client: Path, small_onnx: Path, small_ir: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """`openvino MODEL.pt --precision auto` records the hint `bench --recommend` measured (dtop.inference_precision);
    dtop-embed ran such an IR at f32 unless given --precision. It now runs at the recorded hint (the sidecar says
    which), --precision overrides it, and an IR without one stays f32."""
    from dtop_export.openvino_ir import write_ir

    hinted = tmp_path / "hinted.xml"
    write_ir(small_onnx, hinted, inference_precision="fp16")
    image = zoo["landscape.jpg"]

    def engine(model: Path, name: str, *args: str) -> dict:
        r = _run(client, model, image, "-o", tmp_path / f"{name}.npy", "--no-progress", *args)
        assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
        return json.loads((tmp_path / f"{name}.json").read_text())["engine"]

    recorded = engine(hinted, "recorded")
    if _cpu_has("FP16"):
        assert recorded["precision"] == "fp16" and "CPU f16, " in recorded["runtime"], recorded
    else:  # the sidecar says what ran, not the hint (it said fp16)
        assert recorded["precision"] == "fp32" and "CPU f32 (f16 asked: this CPU lacks it)" in recorded["runtime"]
    told = engine(hinted, "told", "--precision", "f32")
    assert told["precision"] == "fp32" and told["runtime"].endswith("CPU f32"), told
    plain = engine(small_ir, "plain")
    assert plain["precision"] == "fp32" and plain["runtime"].endswith("CPU f32"), plain


def test_an_ir_refuses_a_bin_it_was_not_written_with(
    client: Path, small_ir: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """dtop-embed ran an IR's .xml with whatever .bin lay beside it (OpenVINO reads the weights by offset: a .bin
    left from another export of the same architecture ran silently with the wrong weights), where every Python reader
    refuses it. The client checks the .bin against the sha256 the .xml records (dtop.weights_sha256), with the Python
    readers' line; the pair as written runs (the client's sha256 is hashlib's), an IR without the entry is read as
    before."""
    import shutil

    from dtop_export.engines.openvino import check_weights

    xml, img = tmp_path / "deploy.xml", zoo["landscape.jpg"]
    shutil.copy(small_ir, xml)
    shutil.copy(small_ir.with_suffix(".bin"), xml.with_suffix(".bin"))
    r = _run(client, xml, img, "-o", tmp_path / "ok.npy", "--no-progress")
    assert r.returncode == 0, r.stderr
    stale = bytearray(small_ir.with_suffix(".bin").read_bytes())
    stale[len(stale) // 2 : len(stale) // 2 + 64] = bytes(64)  # other weights, same size and layout
    xml.with_suffix(".bin").write_bytes(bytes(stale))
    r = _run(client, xml, img, "-o", tmp_path / "out.npy")
    _fails(r, r"deploy.bin is not the .bin deploy.xml was written with \(sha256 differs.*copy the .xml and its .bin "
           r"together, or write both again with `dtop-export openvino`$")  # fmt: skip
    with pytest.raises(DToPError) as python:
        check_weights(xml)
    assert r.stderr.strip() == f"error: {python.value}"  # the same line as the Python readers
    bare = tmp_path / "bare.xml"  # no entry (another tool, an older dtop-export): not checked, runs as before
    text = xml.read_text()
    bare.write_text(re.sub(r"<dtop\.weights_sha256 [^>]*/>", "", text))
    assert "dtop.weights_sha256" in text and "dtop.weights_sha256" not in bare.read_text()
    shutil.copy(xml.with_suffix(".bin"), bare.with_suffix(".bin"))
    r = _run(client, bare, img, "-o", tmp_path / "bare.npy", "--no-progress")
    assert r.returncode == 0, r.stderr
    xml.with_suffix(".bin").unlink()
    r = _run(client, xml, img, "-o", tmp_path / "out.npy")
    _fails(r, r"deploy.xml's weights deploy.bin not found: copy the .xml and its .bin together$")
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_minimal_example_compiles_runs_and_is_the_readme_one(
    client: Path, small_onnx: Path, zoo: dict[str, Path]
) -> None:
    example = client.with_name("dtop-example")
    r = _run(example, small_onnx, zoo["portrait_odd.jpg"])
    assert r.returncode == 0, r.stderr
    got = np.array([float(v) for v in r.stdout.split()], np.float32)
    from dtop_export.engines.ort import OnnxRuntimeEngine
    from dtop_export.retrieval.extract import extract

    want = extract(OnnxRuntimeEngine(small_onnx), [zoo["portrait_odd.jpg"]], progress=False)[0]
    assert got.shape == want.shape and float(got @ want) >= MIN_COSINE
    source = (REPO / "cpp" / "examples" / "minimal.cpp").read_text()
    assert source.strip() in (REPO / "README.md").read_text(), "README's C++ example must be cpp/examples/minimal.cpp"
    r = _run(example, small_onnx, zoo["text.jpg"])
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read image")


# bad input -----------------------------------------------------------------------------------------------


def _fails(r: subprocess.CompletedProcess[str], pattern: str) -> None:
    """Exit 2 and one ``error:`` line last (after the ``skipped:`` lines of unreadable images, if any)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    *before, last = r.stderr.strip().splitlines()
    assert last.startswith("error: ") and re.search(pattern, last), r.stderr
    assert all(line.startswith("skipped: cannot read image") for line in before), r.stderr


def test_bad_models(client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path) -> None:
    img = zoo["landscape.jpg"]
    out = tmp_path / "out.npy"
    bare = _with_metadata(small_onnx, tmp_path / "bare.onnx", format=None)
    _fails(_run(client, bare, img, "-o", out), r"no dtop-export metadata .*dtop-export onnx")
    old = _with_metadata(small_onnx, tmp_path / "old.onnx", stride=None)
    _fails(_run(client, old, img, "-o", out), r"lacks metadata dtop.stride")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07garbage" * 10)
    _fails(_run(client, junk, img, "-o", out), r"OpenVINO cannot read .*junk.onnx: \w+")
    _fails(_run(client, small_ckpt_copy(tmp_path), img, "-o", out), r"not an .onnx file or an OpenVINO IR")
    _fails(_run(client, tmp_path / "missing.onnx", img, "-o", out), r"model .*missing.onnx not found")
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_metadata_out_of_range_is_one_line(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """The contract's numbers were taken as they came: dtop.descriptor_dim 0 embedded into a zero-sized buffer
    (undefined behaviour; UBSan: reference binding to null pointer), dtop.fixed_batch 0 ran batches of 0 and a
    nested JSON value ('[' * 200000) overflowed the parser's stack (a crash). Each is one line now, nothing written."""
    img, out = zoo["landscape.jpg"], tmp_path / "out.npy"
    for key, value, pattern in (
        ("descriptor_dim", "0", r"metadata dtop.descriptor_dim should be a whole number from 1"),
        ("fixed_batch", "0", r"metadata dtop.fixed_batch should be a whole number from 1"),
        ("static_hw", "[384, -1]", r"metadata dtop.static_hw should be a whole number from 1"),
        ("mean", "[" * 200000, r"metadata dtop.mean is unreadable \(invalid JSON .*nested deeper than 64\)"),
        # an output name none of the outputs has: OpenVINO's output 0 was read as the descriptor, silently
        ("output_name", "logits", r"metadata dtop.output_name 'logits' names none of its outputs \(descriptors"),
        # and an input name: the images went to input 0 whatever its name (the model's input is another tensor)
        ("input_name", "pixels", r"metadata dtop.input_name 'pixels' names none of its inputs \(images"),
    ):
        model = _with_metadata(small_onnx, tmp_path / f"{key}.onnx", **{key: value})
        _fails(_run(client, model, img, "-o", out, "--no-progress"), rf"{key}.onnx: {pattern}")
    assert not out.exists() and not out.with_suffix(".json").exists()
    # --dump-inputs onto a file: a std::filesystem_error (exit 1) before, one line now
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    _fails(
        _run(client, small_onnx, img, "-o", out, "--dump-inputs", a_file, "--no-progress"),
        r"cannot make --dump-inputs folder .*a-file",
    )
    assert not out.exists()


def small_ckpt_copy(tmp_path: Path) -> Path:
    p = tmp_path / "model.pt"
    p.write_bytes(b"not a model")
    return p


def test_bad_images_and_arguments(client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    out.write_bytes(b"previous")  # a failed run must leave an existing output untouched
    _fails(
        _run(client, small_onnx, zoo["truncated.jpg"], zoo["text.jpg"], "-o", out, "--force"),
        r"none of the 2 images could be read",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(_run(client, small_onnx, empty, "-o", out), r"no images given")
    _fails(_run(client, small_onnx, zoo["grey.png"]), r"no output given: add -o")
    _fails(_run(client, small_onnx, zoo["grey.png"], "-o", tmp_path / "x.txt"), r"should end in .npy")
    _fails(_run(client, small_onnx, zoo["grey.png"], "-o", out, "--scales", "1,abc"), r"cannot read scales")
    _fails(_run(client, small_onnx, zoo["grey.png"], "-o", out, "--bogus"), r"unknown option --bogus")
    _fails(_run(client, small_onnx, zoo["grey.png"], "-o", out, "--threads", "two"), r"--threads expects an integer")
    # more threads than the CPUs: refused as `dtop-export embed` refuses them (accepted before; a README audit)
    _fails(
        _run(client, small_onnx, zoo["grey.png"], "-o", out, "--threads", str(os.cpu_count() * 4 + 1)),
        r"threads asked for \(--threads\), and this process can run on \d+ CPU\(s\)",
    )
    _fails(
        _run(client, small_onnx, zoo["grey.png"], "-o", tmp_path / "nope" / "o.npy"), r"folder .*nope does not exist"
    )
    _fails(_run(client, small_onnx, zoo["grey.png"], "-o", "/proc/dtop-test.npy"), r"cannot write /proc/dtop-test.npy")
    long = tmp_path / ("a" * 300) / "o.npy"  # was std::filesystem_error's own line, exit 1
    _fails(_run(client, small_onnx, zoo["grey.png"], "-o", long), r"cannot write .*/a+/o.npy: File name too long$")
    assert out.read_bytes() == b"previous" and not out.with_suffix(".json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out.npy"]  # no temp files left behind


def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """Only -o's folder was checked, with access(), which says yes to root in /proc: `-o /proc/x.npy` as root, or a
    --json in a missing folder, failed after every image was embedded (and --dump-inputs written). Both outputs'
    folders are checked now, and the temp file the writer makes is made there first."""
    out, dump, image = tmp_path / "out.npy", tmp_path / "dump", zoo["grey.png"]
    _fails(_run(client, small_onnx, image, "-o", out, "--json", tmp_path / "nope" / "x.json", "--dump-inputs", dump),
           r"cannot write .*nope/x.json: folder .*nope does not exist")  # fmt: skip
    _fails(_run(client, small_onnx, image, "-o", "/proc/dtop-test.npy", "--dump-inputs", dump),
           r"cannot write /proc/dtop-test.npy")  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # no dump, no output, no temp file


def test_an_existing_output_is_kept_unless_force(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """As `dtop-export embed`: OUT.npy or OUT.json already there is refused before the model opens (it was replaced
    silently), `--force` replaces both; a folder is never replaced."""
    out, image = tmp_path / "out.npy", zoo["grey.png"]
    for existing in (out, out.with_suffix(".json")):
        existing.write_bytes(b"previous")
        _fails(_run(client, small_onnx, image, "-o", out), rf"{existing.name} exists: pass --force to overwrite it")
        assert existing.read_bytes() == b"previous"
        existing.unlink()
        existing.symlink_to(tmp_path / "nowhere")  # a dangling link is an output too (Python's refuse_existing)
        _fails(_run(client, small_onnx, image, "-o", out), rf"{existing.name} exists: pass --force")
        existing.unlink()
    out.write_bytes(b"previous")
    out.with_suffix(".json").write_bytes(b"previous")
    _fails(_run(client, small_onnx, image, "-o", out), r"out.npy, .*out.json exist: pass --force to overwrite them")
    out.unlink()
    out.with_suffix(".json").unlink()
    (tmp_path / "side").mkdir()
    _fails(_run(client, small_onnx, image, "-o", out, "--json", tmp_path / "side", "-f"), r"side is a folder: give")
    assert _run(client, small_onnx, image, "-o", out, "--no-progress").returncode == 0
    first = out.read_bytes()
    _fails(_run(client, small_onnx, image, "-o", out), r"out.npy, .*out.json exist: pass --force")
    out.write_bytes(b"previous")
    r = _run(client, small_onnx, image, "-o", out, "--force", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == first and json.loads(out.with_suffix(".json").read_text())["images"] == [str(image)]


def test_a_sidecar_named_as_the_output_is_refused(
    client: Path, small_onnx: Path, zoo: dict[str, Path], tmp_path: Path
) -> None:
    """`-o X.npy --json X.npy` wrote the matrix and then the JSON over it, exit 0: the descriptors were gone. Refused
    in one line now, however the two are spelled (another path to the file, a link to it), nothing written."""
    out, image = tmp_path / "out.npy", zoo["grey.png"]
    (tmp_path / "sub").mkdir()
    for sidecar in (out, tmp_path / "sub" / ".." / "out.npy"):
        _fails(
            _run(client, small_onnx, image, "-o", out, "--json", sidecar), r"--json .*out.npy is the output .*out.npy"
        )
    out.write_bytes(b"previous")
    (tmp_path / "link.json").symlink_to(out)
    _fails(_run(client, small_onnx, image, "-o", out, "--json", tmp_path / "link.json", "--force"), r"is the output")
    assert out.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == [
        "link.json",
        "out.npy",
        "sub",
    ]


def test_parity_cli_passes_and_reports(
    client: Path, small_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli("cpp", "parity", str(small_onnx), "--binary", str(client), "--image-size", "160", "--json",
                str(tmp_path / "p.json"))  # fmt: skip
    assert code == 0, capsys.readouterr().out[-2000:]
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["passed"] and report["input_levels_max"] == 0.0 and report["cosine_min"] >= MIN_COSINE
    assert len(report["images"]) >= 25
    assert [Path(p).name for p in report["skipped_cpp"]] == list(BAD_FILES)
    assert cli("cpp", "parity", str(small_onnx), "--binary", str(tmp_path / "none")) == 2


@pytest.mark.slow
def test_full_model_parity(client: Path, full_export: tuple[Path, Path], zoo: dict[str, Path]) -> None:
    """The paper's r50-vitb16 through OpenVINO in C++ vs ONNX Runtime in Python, at the 384 px deployment size."""
    _, onnx_path = full_export
    paths = [zoo[k] for k in ("portrait_odd.jpg", "cmyk.jpg", "exif_orientation_6.jpg", "rgba16.png", "grey.png")]
    report = compare(client, onnx_path, paths, image_size=384, threads=2)
    assert report.passed, report.failures()
    assert report.cosine_min >= MIN_COSINE


def test_install_and_find_package_from_another_project(client: Path, tmp_path: Path) -> None:
    """`cpp build --prefix` installs what the README says; a separate CMake project finds it with
    find_package(dtop) and links the minimal example against it."""
    from dtop_export.cpp import build, openvino_sdk

    prefix = tmp_path / "prefix"
    result = build(client.parent, jobs=2, install_prefix=prefix)  # the test run's build: nothing to recompile
    assert result.installed_to == prefix and (prefix / "bin" / "dtop-embed").is_file()
    assert (prefix / "include" / "dtop" / "embedder.hpp").is_file() and (prefix / "lib" / "libdtop.a").is_file()
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.cpp").write_text((REPO / "cpp" / "examples" / "minimal.cpp").read_text())
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(app CXX)\nset(CMAKE_CXX_STANDARD 17)\n"
        "find_package(dtop REQUIRED)\nadd_executable(app main.cpp)\ntarget_link_libraries(app PRIVATE dtop::dtop)\n"
    )
    ov_cmake, _ = openvino_sdk()
    cfg = [
        "cmake",
        "-S",
        str(app),
        "-B",
        str(app / "b"),
        f"-Ddtop_DIR={prefix}/lib/cmake/dtop",
        f"-DOpenVINO_DIR={ov_cmake}",
    ]
    r = subprocess.run(cfg, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run(["cmake", "--build", str(app / "b")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = _run(app / "b" / "app", env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "usage:" in r.stderr  # linked, loads OpenVINO without LD_LIBRARY_PATH
    installed = _run(prefix / "bin" / "dtop-embed", "--help", env={"PATH": "/usr/bin:/bin"})
    assert installed.returncode == 0


def test_build_lines_print_brackets_as_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Rich read "pip install 'dtop-export[edge]'" as a style tag and printed "'dtop-export'": the advice lost its
    extra. Paths with brackets kept too."""
    import dtop_export.cpp as cpp

    odd = tmp_path / "b[1]"
    result = cpp.BuildResult(
        odd, odd / "dtop-embed", odd / "dtop-example", odd / "libdtop.a", odd / "include", "2026.4.1", odd,
        {"configure_s": 0.1, "build_s": 0.2}, None,
        "off: the executorch wheel is not installed (pip install 'dtop-export[edge]')",
    )  # fmt: skip
    monkeypatch.setattr(cpp, "build", lambda *a, **k: result)
    assert cli("cpp", "build", "--build-dir", str(odd)) == 0
    out = capsys.readouterr().out
    assert "pip install 'dtop-export[edge]'" in out
    assert f"library   {odd / 'libdtop.a'}" in out and f"example   {odd / 'dtop-example'}" in out
