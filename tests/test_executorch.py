"""The ExecuTorch artefact (``dtop-export executorch``): the XNNPACK form, the ``.pte`` and its contract, the engine
behind parity/check/embed/bench, the C++ backend, and bad input. One fp32 and one INT8 program of the small preset
per run (module fixtures, 128² inputs); the full model is ``slow``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli

from dtop_export.errors import DToPError

pytest.importorskip("executorch.runtime", reason="the [edge] extra (pip install 'dtop-export[edge]')")

SIZE = 128


@pytest.fixture(scope="module")
def small_pte(small_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pte") / "small.pte"
    assert cli("executorch", str(small_ckpt), "--size", str(SIZE), "-o", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def small_int8_pte(small_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("pte-int8")
    out, report = d / "small.int8.pte", d / "int8.json"
    code = cli("executorch", str(small_ckpt), "--size", str(SIZE), "--int8", "--calib-count", "4", "-o", str(out),
               "--json", str(report))  # fmt: skip
    assert code == 0
    return out, json.loads(report.read_text())["programs"][0]


def _images(n: int, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size), dtype=np.float32)


# the XNNPACK form and the program -----------------------------------------------------------------------------


def test_xnnpack_form_is_the_folded_model(small_ckpt: Path) -> None:
    """Every rewrite (fixed position embedding, LayerNorm/GroupNorm/attention/L2 norms) computes what the folded
    model computes, in PyTorch, up to float rounding."""
    from dtop_export.checkpoint import load_checkpoint
    from dtop_export.edge.xnnpack_form import xnnpack_form
    from dtop_export.fold import fold_for_deployment

    ckpt = load_checkpoint(small_ckpt)
    form, stats = xnnpack_form(ckpt, SIZE)
    assert stats["rewritten_layer_norm"] > 0 and stats["rewritten_group_norm"] > 0 and stats["rewritten_attention"] == 6
    deploy, _ = fold_for_deployment(ckpt.build_model(), ckpt.whitening)
    x = torch.from_numpy(_images(2))
    with torch.no_grad():
        a, b = form(x), deploy(x)
    assert float((a - b).abs().max()) <= 2e-6
    with pytest.raises(DToPError, match="not a multiple of the model stride 16: try 240 or 256"):
        xnnpack_form(ckpt, 250)


def test_group_norm_stays_exact_in_xnnpack() -> None:
    """GroupNorm over a 128×128 map (the stem at 256²) whose variance is small next to its mean, through XNNPACK: the
    channel means are pooled in levels, 1.8e-6 (relative) from float64 here; XNNPACK's one-level global mean, 2.2e-5
    (4.3e-5 on a trained checkpoint's real stem)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from dtop_export.edge.xnnpack_form import LinearGroupNorm
    from dtop_export.engines.executorch import load_program_bytes, native_log

    torch.manual_seed(0)
    gn = torch.nn.GroupNorm(8, 32)
    torch.nn.init.normal_(gn.weight)
    module = LinearGroupNorm(gn).eval()
    x = torch.randn(1, 32, 128, 128) * 0.3 + 20  # the mean's rounding error is what the variance inherits

    class Flat(torch.nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return module(t).flatten(1)

    ep = torch.export.export(Flat(), (x,))
    data = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    program = load_program_bytes(data, "the test program")
    with native_log(), torch.no_grad():
        got = program.load_method("forward").execute([x])[0]
        want = torch.nn.functional.group_norm(x.double(), 8, gn.weight.double(), gn.bias.double(), gn.eps).flatten(1)
    assert float((got.double() - want).abs().max() / want.abs().max()) <= 5e-6


def test_program_contract_and_delegation(small_pte: Path) -> None:
    """The contract is inside the .pte (dtop_metadata), with the square resize of its fixed input; XNNPACK runs the
    whole graph: one partition, nothing left to ExecuTorch's portable kernels."""
    from dtop_export.engines.executorch import pte_metadata

    meta = pte_metadata(small_pte)
    assert meta["dtop.format"] == "dtop-export/executorch" and meta["dtop.precision"] == "fp32"
    assert json.loads(meta["dtop.resize_policy"])["policy"] == "square"
    assert json.loads(meta["dtop.resize_policy"])["size"] == SIZE
    assert json.loads(meta["dtop.static_hw"]) == [SIZE, SIZE] and json.loads(meta["dtop.fixed_batch"]) == 1
    assert json.loads(meta["dtop.delegation"]) == {"backend": "XnnpackBackend", "partitions": 1, "outside": {}}


def test_a_program_names_its_checkpoint(small_pte: Path, small_ckpt: Path) -> None:
    """identity.checkpoint_of read no .pte, so `search`, `serve --index` and `evaluate --distractors` said of every
    program "records no checkpoint" (it does: dtop.checkpoint_sha256 in dtop_metadata) and took one of another
    checkpoint with that warning, and `parity` never refused one."""
    from dtop_export.digest import file_sha256
    from dtop_export.identity import check_model_for_corpus, checkpoint_of

    mine = file_sha256(small_ckpt)
    assert checkpoint_of(small_pte) == mine
    assert check_model_for_corpus(small_pte, {"checkpoint_sha256": mine, "model": "m.onnx"}, "index i.faiss") is None
    with pytest.raises(DToPError, match="comes from checkpoint"):
        check_model_for_corpus(small_pte, {"checkpoint_sha256": "0" * 64, "model": "m.onnx"}, "index i.faiss")


def test_fp32_program_meets_the_onnx_contract(small_pte: Path, small_ckpt: Path) -> None:
    """Descriptors through executorch.runtime vs PyTorch eager on the same inputs: the fp32 (ONNX) contract, and the
    tighter bound this program keeps (max-abs 1e-5 on random weights; 1.4e-6 on a trained checkpoint, see
    benchmarks/README.md)."""
    from dtop_export.engines import load_engine

    x = _images(3, seed=1)
    with load_engine(small_pte, threads=2) as pte, load_engine(small_ckpt) as torch_engine:
        got, want = pte.embed(x), torch_engine.embed(x)
        assert pte.name == "executorch" and pte.static_hw == (SIZE, SIZE) and pte.descriptor_dim == got.shape[1]
        assert pte.embed(x[:0]).shape == (0, got.shape[1])
    assert got.shape == want.shape == (3, 256)
    assert float(np.min(np.sum(got * want, axis=1))) >= 0.99999
    assert float(np.abs(got - want).max()) <= 1e-5


def test_default_threads_fit_the_cpus_the_process_may_run_on(small_pte: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ExecuTorch sizes its thread pool by the machine's cores, not the process's affinity (taskset -c 0 on 2 cores:
    2 threads on 1 CPU, as in a cpuset container or a pinned Ray worker): without --threads the engine now caps the
    pool at the CPUs the process may run on (the INT8 check of `executorch --int8` too)."""
    import executorch.extension.pybindings.portable_lib as lib

    from dtop_export import host
    from dtop_export.engines import load_engine

    before = lib._threadpool_get_thread_count()
    lib._unsafe_reset_threadpool(2)  # what a 2-core machine's default pool holds
    monkeypatch.setattr(host, "usable_cpus", lambda: 1)
    try:
        with load_engine(small_pte):
            assert lib._threadpool_get_thread_count() == 1
    finally:
        lib._unsafe_reset_threadpool(before)


def test_int8_program(small_int8_pte: tuple[Path, dict], small_pte: Path) -> None:
    """Dynamic INT8 on the transformer blocks (fc2 float by default): smaller, XNNPACK's QD8 kernels, within the INT8
    contract of the fp32 program; the written program was checked against fp32 on the calibration images."""
    from dtop_export.engines import load_engine
    from dtop_export.engines.executorch import pte_metadata

    path, report = small_int8_pte
    meta = pte_metadata(path)
    q = json.loads(meta["dtop.quantization"])
    assert meta["dtop.precision"] == "int8" and q["recipe"] == "dynamic" and q["float_roles"] == ["fc2"]
    assert "linear layers (qkv, proj, fc1)" in q["weights"]
    assert report["quantization"]["check"]["inputs"] == 4 and report["quantization"]["check"]["cosine_min"] >= 0.99
    assert json.loads(meta["dtop.delegation"])["outside"] == {}
    assert path.stat().st_size < 0.8 * small_pte.stat().st_size  # qkv, proj, fc1 int8: 16.4 of 21.7 MB here
    x = _images(4, seed=2)
    with load_engine(path) as int8, load_engine(small_pte) as fp32:
        assert int8.precision == "int8"
        a, b = int8.embed(x), fp32.embed(x)
    cos = np.sum(a * b, axis=1)
    assert float(cos.min()) >= 0.99 and float(np.abs(a - b).max()) > 1e-5  # quantised, not a copy of fp32


# the engine in the commands ----------------------------------------------------------------------------------


def test_parity_check_embed_and_bench_take_a_pte(
    small_pte: Path, small_int8_pte: tuple[Path, dict], small_ckpt: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """parity on the embedded set (both programs, their square inputs fed to the reference too), check, embed, bench."""
    int8, _ = small_int8_pte
    report = tmp_path / "parity.json"
    assert cli("parity", str(small_ckpt), str(small_pte), str(int8), "--no-progress", "--json", str(report)) == 0
    r = json.loads(report.read_text())
    fp32_row, int8_row = r["engines"]
    assert r["image_size"] == SIZE and fp32_row["passed"] and int8_row["passed"]
    assert fp32_row["cosine_min"] >= 0.99999 and fp32_row["max_abs"] <= 1e-5
    assert int8_row["contract"]["precision"] == "int8" and int8_row["cosine_min"] >= 0.99
    capsys.readouterr()
    assert cli("check", str(small_pte), "--json", str(tmp_path / "check.json")) == 0
    out = capsys.readouterr().out
    assert "XNNPACK: 1 partition(s); outside the delegate: nothing" in out and "ok: the program keeps" in out
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["passed"] and check["metadata"]["static_hw"] == [SIZE, SIZE]
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray((np.arange(90 * 60 * 3) % 251).astype(np.uint8).reshape(60, 90, 3)).save(images / "a.png")
    assert cli("embed", str(small_pte), str(images), "-o", str(tmp_path / "e.npy"), "--threads", "1") == 0
    side = json.loads((tmp_path / "e.json").read_text())
    assert side["image_size"] == SIZE and side["engine"]["name"] == "executorch" and np.load(tmp_path / "e.npy").shape
    assert cli("embed", f"{int8}:int8", str(images), "-o", str(tmp_path / "i.npy"), "--no-progress") == 0
    bench = tmp_path / "bench.json"
    code = cli("bench", str(small_pte), f"{small_ckpt}", "--sizes", str(SIZE), "--runs", "1", "--warmup", "0",
               "--threads", "1", "--no-progress", "--json", str(bench))  # fmt: skip
    assert code == 0
    rows = {e["name"]: e for e in json.loads(bench.read_text())["engines"]}
    assert rows["executorch"]["timings"][0]["cosine_min"] >= 0.99999
    # another size: refused as the program loads, naming the option (it failed in the first pass, after the engines
    # before it had run, with the engine's own message)
    err = _error(capsys, "bench", str(small_ckpt), str(small_pte), "--sizes", f"{SIZE},64", "--no-progress")
    assert f"{small_pte} runs {SIZE}x{SIZE} inputs only, not 64x64: bench it with --sizes {SIZE}" in err


def test_square_preprocessing_feeds_the_whole_image() -> None:
    """The program's policy: any image to S×S (no crop, aspect not kept); --image-size and scales snap to the stride;
    a data set's own size does not override a fixed-size model's."""
    from dtop_export.preprocess import PreprocessConfig, input_size, model_size

    square = PreprocessConfig(resize="square", size=384)
    assert model_size(1000, 300, square) == (384, 384) and model_size(10, 4000, square) == (384, 384)
    assert model_size(640, 480, square, scale=2**-0.5) == (272, 272)
    assert input_size(square, None, 1024) == 384 and input_size(square, 256, 1024) == 256
    assert input_size(PreprocessConfig(size=512), None, 1024) == 1024


def test_parity_refuses_programs_of_two_sizes(small_pte: Path, small_ckpt: Path) -> None:
    from types import SimpleNamespace

    from dtop_export.engines import load_engine
    from dtop_export.parity import shared_preprocess
    from dtop_export.preprocess import PreprocessConfig

    with load_engine(small_pte) as pte, load_engine(small_ckpt) as ref:
        cfg = shared_preprocess(ref, [pte])
        assert (cfg.resize, cfg.size, cfg.mean) == ("square", SIZE, ref.preprocess.mean)
        other = SimpleNamespace(preprocess=PreprocessConfig(resize="square", size=256))
        with pytest.raises(DToPError, match=r"different fixed inputs \(square 128, square 256\)"):
            shared_preprocess(ref, [pte, other])


# bad input -----------------------------------------------------------------------------------------------------


def _error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert cli(*argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_input_is_one_line(
    small_ckpt: Path, small_pte: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A size off the stride, INT8-only options without --int8 (and an fp32 .pte asked for INT8), an exported model
    as the source, a truncated .pte, a .pte without the contract: one line each, exit 2, nothing written."""
    out = tmp_path / "x.pte"
    assert "not a multiple of the model stride 16: try 240 or 256" in _error(
        capsys, "executorch", str(small_ckpt), "--size", "250", "-o", str(out)
    )
    assert "--calib applies to --int8 only" in _error(
        capsys, "executorch", str(small_ckpt), "--calib", str(tmp_path), "-o", str(out)
    )
    assert "--calib-count applies to --int8 only" in _error(
        capsys, "executorch", str(small_ckpt), "--calib-count", "4", "-o", str(out)
    )
    assert "compiles the checkpoint (.pt) it came from" in _error(capsys, "executorch", str(small_pte), "--int8")
    images = tmp_path / "img"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (1, 2, 3)).save(images / "a.png")
    assert "is a fp32 program, not int8: make one with `dtop-export executorch CKPT.pt --int8`" in _error(
        capsys, "embed", str(small_pte), str(images), "-o", str(tmp_path / "e.npy"), "--precision", "int8"
    )
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(small_pte.read_bytes()[: small_pte.stat().st_size // 3])
    assert "truncated.pte is not a readable ExecuTorch program" in _error(capsys, "check", str(truncated))
    bare = tmp_path / "bare.pte"
    bare.write_bytes(_program_without_contract())
    assert "carries no dtop-export contract (no dtop_metadata method)" in _error(capsys, "info", str(bare))
    assert "carries no dtop-export contract" in _error(capsys, "check", str(bare))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bare.pte", "img", "truncated.pte"]


def test_sizes_and_roles_are_checked_before_the_work(
    small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--size` was the one size option without the memory check (`--size 4096 --int8`: a traceback or the OOM
    killer), and `--int8 --keep-float bogus` was refused by the build, after the checkpoint was read and the check
    images prepared: both are one line now, before the work, nothing written."""
    from dtop_export import checkpoint

    out = tmp_path / "x.pte"
    line = _error(capsys, "executorch", str(small_ckpt), "--size", "100000", "-o", str(out))
    assert line.startswith("error: --size 100000 needs at least") and "--size " in line.split("use ", 1)[-1]
    monkeypatch.setattr(checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("the checkpoint was read"))
    line = _error(capsys, "executorch", str(small_ckpt), "--int8", "--keep-float", "bogus", "-o", str(out))
    assert line == "error: unknown INT8 role(s) bogus: choose from qkv, proj, fc1, fc2"
    line = _error(capsys, "executorch", str(small_ckpt), "--int8", "--keep-float", "qkv,proj,fc1,fc2", "-o", str(out))
    assert "leaves no layer to quantise" in line
    assert list(tmp_path.iterdir()) == []


def test_programs_open_together_share_one_pool_size_and_a_later_one_gets_the_default(
    small_pte: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`bench a.pte:threads=1 b.pte` timed b on one thread: the pool is the process's, and an engine without threads
    took min(the pool as the engine before left it, the CPUs). It cannot simply be resized for b: XNNPACK keeps the
    pool a method was loaded with, and running a after the pool was replaced crashes the process. So: while a is open
    b is refused in one line naming the size to give; once a is closed, b gets the pool's own size (read before any
    engine resized it) capped at the CPUs."""
    import os

    import executorch.extension.pybindings.portable_lib as lib

    from dtop_export import host
    from dtop_export.engines import load_engine

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: the pool's own size is one thread")
    before = lib._threadpool_get_thread_count()
    monkeypatch.setattr(host, "usable_cpus", lambda: 2)
    x = _images(1)
    try:
        with load_engine(small_pte, threads=1) as one:
            with pytest.raises(DToPError) as e:
                load_engine(small_pte)
            assert str(e.value) == (
                "ExecuTorch runs every program of a process on one thread pool, at 1 thread(s) for the open small.pte:"
                " open small.pte with threads=1 too (or give every .pte the same threads=), or close the others first"
            )
            with load_engine(small_pte, threads=1) as same:  # the same size: both run
                assert np.allclose(one.embed(x), same.embed(x), atol=1e-6)
        with load_engine(small_pte) as default:
            default.embed(x)
            assert lib._threadpool_get_thread_count() == 2 and default.pool_threads == 2
        with pytest.raises(DToPError, match=r"small\.pte was closed: open it again"):  # was an AttributeError
            default.embed(x)
    finally:
        lib._unsafe_reset_threadpool(before)


def test_an_existing_json_report_is_refused_before_the_work(
    small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`executorch --json R` replaced an existing R without --force, after the minutes of lowering (every other
    command with --json refuses it first): now one line before any work, the program not written."""
    report = tmp_path / "r.json"
    report.write_text("{}")
    line = _error(capsys, "executorch", str(small_ckpt), "--size", str(SIZE), "-o", str(tmp_path / "m.pte"), "--json",
                  str(report))  # fmt: skip
    assert f"{report} exists: pass --force" in line
    assert report.read_text() == "{}" and not (tmp_path / "m.pte").exists()


def test_int8_programs_of_several_sizes_are_named_int8_with_o(
    small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`executorch --int8 -o d.pte --size 64,128` named its INT8 programs d.64.pte and d.128.pte (fp32 names; without
    -o they are CKPT.S.int8.pte): now d.64.int8.pte and d.128.int8.pte, a stem's own .int8 moved behind the size."""
    from dtop_export.cli.executorch import pte_outputs

    ckpt, d = Path("m.pt"), tmp_path / "d.pte"
    assert pte_outputs(ckpt, d, [64, 128], int8=True) == [tmp_path / "d.64.int8.pte", tmp_path / "d.128.int8.pte"]
    assert pte_outputs(ckpt, tmp_path / "d.int8.pte", [64, 128], int8=True) == pte_outputs(ckpt, d, [64, 128], True)
    assert pte_outputs(ckpt, d, [64, 128], int8=False) == [tmp_path / "d.64.pte", tmp_path / "d.128.pte"]
    assert pte_outputs(ckpt, None, [64, 128], int8=True) == [Path("m.64.int8.pte"), Path("m.128.int8.pte")]
    assert pte_outputs(ckpt, d, [64], int8=True) == [d]  # one size: -o as given
    (tmp_path / "d.128.int8.pte").write_bytes(b"mine")  # the command refuses the name it would write, before work
    line = _error(capsys, "executorch", str(small_ckpt), "--size", "64,128", "--int8", "-o", str(d))
    assert f"{tmp_path / 'd.128.int8.pte'} exists: pass --force" in line


def test_too_few_check_images_are_not_called_calibration(
    small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ExecuTorch's dynamic INT8 needs no calibration (the --calib images only check the program), but too few of
    them were refused with quantize's "INT8 ranges from fewer than 8 images are unreliable"."""
    from PIL import Image

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(2):
        Image.new("RGB", (40 + i, 30), (10 * i, 20, 30)).save(calib / f"{i}.png")
    line = _error(capsys, "executorch", str(small_ckpt), "--size", str(SIZE), "--int8", "--calib", str(calib),
                  "-o", str(tmp_path / "q.pte"))  # fmt: skip
    assert "2 check image(s) for the 16 asked: an INT8 check on fewer than 8 images says little" in line, line
    assert "needs no calibration" in line and "ranges" not in line and "--calib-count" in line
    assert not (tmp_path / "q.pte").exists()


def _stub_the_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cosine_min: float) -> Path:
    """write_pte with its fold, export, quantisation, lowering and check stubbed (the check gives ``cosine_min``);
    returns a --calib folder of 4 images."""
    from PIL import Image

    from dtop_export.edge import pte, xnnpack_form
    from dtop_export.edge.pte import Delegation

    form = torch.nn.Identity()
    form.descriptor_dim = 8
    monkeypatch.setattr(xnnpack_form, "xnnpack_form", lambda ckpt, size, whiten: (form, {}))
    monkeypatch.setattr(pte, "_export", lambda module, example: None)
    monkeypatch.setattr(pte, "quantize_dynamic", lambda module, example, keep_float=(): None)
    monkeypatch.setattr(pte, "lower_to_xnnpack", lambda exported: (None, Delegation(1)))
    monkeypatch.setattr(pte, "emit_program", lambda edge, meta, keep=False: b"program")
    monkeypatch.setattr(pte, "check_int8", lambda fp32, program, tensors: {
        "inputs": len(tensors), "cosine_min": cosine_min, "cosine_mean": 0.97})  # fmt: skip
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        Image.new("RGB", (40 + i, 30), (10 * i, 20, 30)).save(calib / f"{i}.png")
    return calib


def test_an_int8_programs_check_is_recorded_held_out_as_the_other_int8_checks(
    small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """quantize's and openvino --int8's checks record held_out (and images) and print what they ran on; executorch
    --int8's recorded neither (its line said "on 4 images"). Its dynamic recipe calibrates nothing, so its check
    images are held out of calibration: held_out true, printed as the others print it. (Build stubbed.)"""
    from dtop_export.int8_check import describe_check

    calib = _stub_the_build(monkeypatch, tmp_path, cosine_min=0.995)
    report = tmp_path / "r.json"
    assert cli("executorch", str(small_ckpt), "--size", str(SIZE), "--int8", "--calib", str(calib), "--calib-count",
               "4", "-o", str(tmp_path / "q.pte"), "--json", str(report)) == 0  # fmt: skip
    check = json.loads(report.read_text())["programs"][0]["quantization"]["check"]
    assert check == {"inputs": 4, "cosine_min": 0.995, "cosine_mean": 0.97, "held_out": True, "images": 4,
                     "source": str(calib)}  # fmt: skip
    out = " ".join(capsys.readouterr().out.split())
    assert f"INT8 vs the fp32 program on {describe_check(check)} from {calib}: cosine min 0.99500" in out, out
    assert describe_check(check) == "4 held-out inputs (4 images not used for calibration)"


def test_int8_below_the_contract_is_not_written(
    small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An INT8 program whose check on the --calib images fell below the INT8 contract (cosine 0.99) was written
    anyway, exit 0, with "BELOW" in a status line: now it is refused, one line saying what to try, nothing written.
    (The fold, export, quantisation and lowering are stubbed: only the check's verdict matters here.)"""
    from dtop_export.edge import pte

    calib = _stub_the_build(monkeypatch, tmp_path, cosine_min=0.93)
    out = tmp_path / "out" / "q.pte"
    out.parent.mkdir()
    line = _error(capsys, "executorch", str(small_ckpt), "--size", str(SIZE), "--int8", "--calib", str(calib),
                  "--calib-count", "4", "-o", str(out))  # fmt: skip
    assert "breaks the INT8 contract on its 4 check images" in line and "cosine min 0.93000 < 0.99" in line
    assert "--keep-float fc1,fc2" in line and "nothing was written" in line
    assert list(out.parent.iterdir()) == []
    # Several sizes, the second below the contract: the first size's program was on disk (exit 2, and a rerun
    # needed --force); now every size is built and checked before any is put in place, and under --force an
    # existing program of a size that passed stays as it was.
    monkeypatch.setattr(pte, "check_int8", lambda fp32, program, tensors: {
        "inputs": len(tensors), "cosine_min": 0.93 if tensors[0].shape[-1] == SIZE else 0.999, "cosine_mean": 0.99,
    })  # fmt: skip
    first = out.parent / "q.64.int8.pte"
    for force in ((), ("--force",)):
        line = _error(capsys, "executorch", str(small_ckpt), "--size", f"64,{SIZE}", "--int8", "--calib", str(calib),
                      "--calib-count", "4", "-o", str(out), *force)  # fmt: skip
        assert f"on its 4 check images ({calib}): cosine min 0.93000" in line
        assert list(out.parent.iterdir()) == ([first] if force else [])  # no temporary file either
        first.write_bytes(b"mine")
    assert first.read_bytes() == b"mine"


def test_another_size_names_the_programs_own_option(small_pte: Path) -> None:
    """A program fed another size than its own said "re-export without --static" (`onnx`'s option; `executorch`
    has --size), e.g. `search corpus.faiss model.128.pte q.jpg` on a 1024-px corpus."""
    from dtop_export.engines import load_engine

    with load_engine(small_pte) as engine, pytest.raises(DToPError) as e:
        engine.embed(np.zeros((1, 3, SIZE // 2, SIZE // 2), np.float32))
    assert f"dtop-export executorch CKPT.pt --size {SIZE // 2}" in str(e.value) and "--static" not in str(e.value)


def _program_without_contract(contract: dict[str, str] | None = None) -> bytes:
    """A program of x * 2: without a dtop_metadata method, or with ``contract`` (JSON) as its dtop_metadata."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from dtop_export.engines.executorch import METADATA_METHOD

    class Double(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    ep = torch.export.export(Double(), (torch.ones(1, 3, 16, 16),))
    methods = None if contract is None else {METADATA_METHOD: json.dumps(contract)}
    return (
        to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()], constant_methods=methods)
        .to_executorch()
        .buffer
    )


def test_mismatched_torch_and_executorch_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch another than the one ExecuTorch's runtime was built against, or a runtime that fails to load: one line
    naming the pair to install (instead of the loader's undefined-symbol error)."""
    import importlib.metadata as md

    from dtop_export.engines import executorch as et

    real = md.version
    monkeypatch.setattr(md, "version", lambda name: "2.13.0" if name == "torch" else real(name))
    with pytest.raises(
        DToPError, match=r"executorch 1\.5\.1\S* runs with torch 2\.14\.x, but torch 2\.13\.0 .*\[edge\]"
    ):
        et.require_executorch()
    monkeypatch.setattr(md, "version", real)

    def broken() -> None:
        raise ImportError("libtorch_cpu.so: undefined symbol: _ZN3c10")

    monkeypatch.setattr(et, "_import_runtime", broken)
    with pytest.raises(DToPError, match=r"cannot load with torch .*undefined symbol.*matching pair"):
        et.require_executorch()
    monkeypatch.setattr(md, "version", lambda name: (_ for _ in ()).throw(md.PackageNotFoundError(name)))
    with pytest.raises(DToPError, match=r"ExecuTorch is not installed: pip install 'dtop-export\[edge\]'"):
        et.require_executorch()


# the C++ client --------------------------------------------------------------------------------------------------


def test_cpp_runs_the_program_like_python(
    client: Path, small_pte: Path, small_int8_pte: tuple[Path, dict], tmp_path: Path
) -> None:
    """dtop-embed on a .pte (ExecuTorch's Module API): model inputs identical to Python's on every decoding case of
    the format zoo (tall images squashed to the square included), descriptors within the C++ client's contract."""
    from dtop_export.cpp_parity import BAD_FILES, MIN_COSINE, compare, write_format_zoo

    zoo = write_format_zoo(tmp_path / "zoo")
    report = compare(client, small_pte, sorted(zoo.values()), image_size=SIZE, threads=2)
    assert report.passed, report.failures()
    assert report.levels_max == 0.0 and report.cosine_min >= MIN_COSINE
    assert [Path(p).name for p in report.skipped_cpp] == list(BAD_FILES)
    int8, _ = small_int8_pte
    paths = [zoo[k] for k in ("portrait_odd.jpg", "landscape.jpg", "grey.png")]
    report = compare(client, int8, paths, image_size=SIZE, batch_size=2)
    assert report.passed, report.failures()
    r = subprocess.run([str(client), str(int8), str(zoo["grey.png"]), "-o", str(tmp_path / "o.npy")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr  # ExecuTorch's own log lines stay off the terminal
    engine = json.loads((tmp_path / "o.json").read_text())["engine"]
    assert engine["name"] == "executorch-cpp" and engine["precision"] == "int8"


def test_cpp_bad_programs(client: Path, small_pte: Path, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (40, 30), (10, 20, 30)).save(image)

    def fails(model: Path, pattern: str, *extra: str) -> None:
        r = subprocess.run([str(client), str(model), str(image), "-o", str(tmp_path / "o.npy"), *extra],
                           capture_output=True, text=True)  # fmt: skip
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
        import re

        assert re.search(pattern, lines[0]), lines[0]

    truncated = tmp_path / "t.pte"
    truncated.write_bytes(small_pte.read_bytes()[:4096])
    fails(truncated, r"t\.pte is not a readable ExecuTorch program \(\w+")
    bare = tmp_path / "bare.pte"
    bare.write_bytes(_program_without_contract())
    fails(bare, r"carries no dtop-export contract \(no dtop_metadata method\)")
    # a contract without a key names the program's maker, not `dtop-export onnx` (old code, for a .pte as for an .onnx)
    partial = tmp_path / "partial.pte"
    partial.write_bytes(_program_without_contract({"dtop.format": "dtop-export/executorch"}))
    fails(partial, r"partial\.pte lacks metadata dtop\.input_name: re-export it with this version of dtop-export "
          r"executorch$")  # fmt: skip
    formatless = tmp_path / "formatless.pte"
    formatless.write_bytes(_program_without_contract({}))
    fails(formatless, r"no dtop-export metadata \(dtop\.format\): export the model with `dtop-export executorch "
          r"CKPT\.pt`$")  # fmt: skip
    fails(small_pte, r"runs at the precision it was compiled with", "--precision", "bf16")
    # another size than the program's names `executorch --size`, not `onnx --static` (the Python engine's hint)
    fails(small_pte, rf"for {SIZE}x{SIZE} inputs only, got 256x256: resize, or compile a program of that size "
          r"\(dtop-export executorch CKPT\.pt --size 256\)$", "--image-size", "256")  # fmt: skip
    fails(tmp_path / "missing.pte", r"model .*missing\.pte not found")
    assert not (tmp_path / "o.npy").exists()


def test_cpp_default_threads_fit_the_cpus_the_process_may_run_on(client: Path, small_pte: Path, tmp_path: Path) -> None:
    """dtop-embed on a .pte without --threads left ExecuTorch's pool at a thread per core of the machine under
    taskset/a cpuset (2 threads on 1 CPU here), as the Python engine did; the sidecar said "default threads". Now the
    pool is capped at the process's affinity and the sidecar names its size."""
    import os

    from PIL import Image

    Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / "a.png")
    one_cpu = min(os.sched_getaffinity(0))
    r = subprocess.run([str(client), str(small_pte), str(tmp_path / "a.png"), "-o", str(tmp_path / "o.npy"),
                        "--no-progress"], capture_output=True, text=True,
                       preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o.json").read_text())["engine"]["runtime"].endswith("XNNPACK 1 threads")


def test_cpp_build_says_why_without_executorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cpp build` builds the backend when it can, and says why not: no executorch wheel, or no CMake >= 3.28."""
    import importlib.util

    from dtop_export import cpp

    cmake, flags, note = cpp.executorch_plan("cmake")
    assert note.startswith("executorch ") and "-DDTOP_WITH_EXECUTORCH=ON" in flags
    assert cpp.cmake_version(cmake) >= (3, 28)
    monkeypatch.setattr(cpp, "pip_cmake", lambda: None)
    monkeypatch.setattr(cpp, "cmake_version", lambda exe: (3, 25, 1))
    _, flags, note = cpp.executorch_plan("cmake")
    assert flags == ["-DDTOP_WITH_EXECUTORCH=OFF"] and "needs CMake >= 3.28 and this is 3.25.1" in note
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "executorch" else real(name))
    _, flags, note = cpp.executorch_plan("cmake")
    assert flags == ["-DDTOP_WITH_EXECUTORCH=OFF"] and note == (
        "off: the executorch wheel is not installed (pip install 'dtop-export[edge]')"
    )


def test_find_package_dtop_with_the_executorch_component(client: Path, small_pte: Path, tmp_path: Path) -> None:
    """`cpp build --prefix` installs dtop::executorch; another CMake project links it with
    find_package(dtop COMPONENTS executorch) and runs a .pte through dtop::Embedder.

    ExecuTorch's thread pool is the process's and XNNPACK keeps the one it loaded with: a second program opened with
    other threads rebuilt the pool under the first (its passes then ran on freed memory). Now refused while a program
    is open; threads 0 takes the pool as it is; with none open a new count sizes it again, and 0 sizes it to
    ExecuTorch's own size capped at the CPUs (it kept what the last program left: 1 thread after a threads-1 one)."""
    from dtop_export.cpp import build, executorch_plan, openvino_sdk

    prefix = tmp_path / "prefix"
    build(client.parent, jobs=2, install_prefix=prefix)
    assert (prefix / "lib" / "cmake" / "dtop" / "dtopExecutorchTargets.cmake").is_file()
    app = tmp_path / "app"
    app.mkdir()
    (app / "main.cpp").write_text(APP)
    (app / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.28)\nproject(app CXX)\nset(CMAKE_CXX_STANDARD 17)\n"
        "find_package(dtop REQUIRED COMPONENTS executorch)\nadd_executable(app main.cpp)\n"
        "target_link_libraries(app PRIVATE dtop::executorch)\n"
    )
    cmake, flags, _ = executorch_plan("cmake")
    ov, _ = openvino_sdk()
    cfg = [cmake, "-S", str(app), "-B", str(app / "b"), f"-Ddtop_DIR={prefix}/lib/cmake/dtop", f"-DOpenVINO_DIR={ov}"]
    r = subprocess.run([*cfg, *[f for f in flags if f.startswith("-Dexecutorch_DIR")]], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([cmake, "--build", str(app / "b"), "-j", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    from PIL import Image

    Image.new("RGB", (50, 70), (200, 100, 0)).save(tmp_path / "a.png")
    # the pool's own size, in a process of its own (this one's pool was resized by other tests)
    probe = "import executorch.extension.pybindings.portable_lib as lib; print(lib._threadpool_get_thread_count())"
    pool_default = int(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.split()[-1])
    r = subprocess.run([str(app / "b" / "app"), str(small_pte), str(tmp_path / "a.png")], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "256",
        f"refused: {small_pte}: ExecuTorch's thread pool is the process's, and the 1 ExecuTorch program(s) open in it "
        "run on 2 threads: open this one with threads 2 (or 0), or close them first",
        "default: 2 threads, same descriptor: 1",
        "alone: 1 threads",
        f"default again: {min(pool_default, len(os.sched_getaffinity(0)))} threads",
    ], r.stdout


APP = r"""#include <cstdio>
#include <string>

#include <dtop/embedder.hpp>
#include <dtop/executorch.hpp>

std::string threads(const dtop::Embedder& e) { return e.describe().substr(e.describe().rfind("XNNPACK ") + 8); }

int main(int argc, char** argv) {
  if (argc != 3) return 2;
  dtop::RuntimeOptions two, one;
  two.threads = 2;
  one.threads = 1;
  {
    dtop::Embedder e(dtop::open_executorch(argv[1], two), argv[1]);
    const auto d = e.embed(dtop::load_image(argv[2]));
    std::printf("%zu\n", d.size());
    try {
      dtop::Embedder other(dtop::open_executorch(argv[1], one), argv[1]);
      std::printf("opened: %s\n", threads(other).c_str());
    } catch (const dtop::Error& x) {
      std::printf("refused: %s\n", x.what());
    }
    dtop::Embedder same(dtop::open_executorch(argv[1]), argv[1]);
    std::printf("default: %s, same descriptor: %d\n", threads(same).c_str(), e.embed(dtop::load_image(argv[2])) == d);
  }
  {
    dtop::Embedder alone(dtop::open_executorch(argv[1], one), argv[1]);
    std::printf("alone: %s\n", threads(alone).c_str());
  }
  dtop::Embedder fresh(dtop::open_executorch(argv[1]), argv[1]);
  std::printf("default again: %s\n", threads(fresh).c_str());
}
"""


# the full model --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_model_program(full_export: tuple[Path, Path], tmp_path: Path) -> None:
    """r50-vitb16 at 384²: one XNNPACK partition, fp32 within the ONNX contract of PyTorch eager."""
    from dtop_export.edge.pte import write_pte
    from dtop_export.engines import load_engine

    ckpt, _ = full_export
    r = write_pte(ckpt, tmp_path / "full.pte", 384)
    assert r.delegation.partitions == 1 and r.delegation.outside == {}
    x = _images(2, 384, seed=3)
    with load_engine(r.path, threads=2) as pte, load_engine(ckpt) as eager:
        got, want = pte.embed(x), eager.embed(x)
    assert float(np.min(np.sum(got * want, axis=1))) >= 0.99999 and float(np.abs(got - want).max()) <= 1e-4
