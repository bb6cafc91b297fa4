"""The command line: fast start-up, one-line errors with exit code 2, init/info round trip."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EXE = [sys.executable, "-m", "dtop_export"]


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=300, env=env)


def test_help_does_not_import_torch() -> None:
    code = "import sys; import dtop_export.cli as c; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = run("--help")
    assert r.returncode == 0 and "init" in r.stdout and "info" in r.stdout


def test_a_checkpoints_contract_is_read_without_the_model_code(small_ckpt: Path) -> None:
    """A corpus job's driver (and ``info``) reads a checkpoint's preprocessing and descriptor size: torch.load, but
    not the model's modules with timm and torchvision (~1.2 s of a Ray job's start-up on 2 cores)."""
    code = (
        "import sys; from dtop_export.corpus.runtime import model_contract; "
        f"c = model_contract({str(small_ckpt)!r}); "
        "assert not {'timm', 'torchvision', 'dtop_export.model.dtop'} & set(sys.modules), 'model code imported'; "
        "import dtop_export.model as m; assert m.DToP.__name__ == 'DToP' and 'dtop_export.model.dtop' in sys.modules; "
        "print(c.descriptor_dim)"
    )
    from dtop_export.checkpoint import load_checkpoint

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(load_checkpoint(small_ckpt).config.descriptor_dim)


def test_version() -> None:
    from dtop_export import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"dtop-export {__version__}"


def test_init_and_info(tmp_path: Path) -> None:
    ckpt = tmp_path / "s.pt"
    r = run("init", "--preset", "small", "-o", str(ckpt))
    assert r.returncode == 0, r.stderr
    assert ckpt.exists() and "5.1M parameters" in r.stdout
    r = run("info", str(ckpt), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["config"]["backbone"] == "dtop_tiny_r_s16"
    p = report["parameters"]
    # every row but the ELM's (a part of local_branch, named as such: it read as a component of its own) adds up
    parts = [k for k in p if k != "total" and not k.startswith("local_branch.")]
    assert parts == ["stem", "transformer", "pos_embed", "global_branch", "local_branch", "head"], list(p)
    assert p["total"] == sum(p[k] for k in parts) and 0 < p["local_branch.elm"] < p["local_branch"]
    assert report["provenance"]["backbone_init"] == "random-init"
    r = run("info", str(ckpt))
    assert r.returncode == 0 and "local_branch" in r.stdout and "provenance" in r.stdout
    r = run("init", "--preset", "small", "-o", str(ckpt))  # exists
    assert r.returncode == 2 and "--force" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "missing.pt"], "not found"),
        (["init", "--preset", "nope", "-o", "x.pt"], "unknown preset 'nope'"),
        (["info", "garbage.pt"], "not a dtop-export checkpoint"),
        (["init", "--preset", "small", "-o", "no/such/dir/x.pt"], "does not exist"),
        (["embed", "garbage.pt", "no/photos/", "-o", "x.npy"], "no/photos not found: give image files or folders"),
        (["onnx", "model.onnx"], "model.onnx is an exported model, not a checkpoint: give the .pt"),  # not "exists"
        (["onnx", "garbage.pt", "-o", "x.txt"], "--output x.txt should end in .onnx"),  # while parsing
    ],
)
def test_user_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    (tmp_path / "model.onnx").write_text("an ONNX file, as far as this test goes")
    r = subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    ("args", "existing"),
    [
        (["parity", "ref.pt", "m.onnx", "-d", "no-such-set", "--json", "out.json"], "out.json"),
        (["check", "m.onnx", "--fp16-audit", "--json", "out.json"], "out.json"),
        (["check", "m.onnx", "--json", "out.json"], "out.json"),
        (["trt", "m.onnx", "--fp16", "--print-trtexec"], "m.fp16.onnx"),
        (["trt", "m.onnx", "--fp16"], "m.fp16.onnx"),
        (["trt", "m.onnx", "--fp16", "--fp16-onnx", "half.onnx"], "half.onnx"),
    ],
)
def test_an_existing_output_is_refused_before_the_work_unless_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], existing: str
) -> None:
    """Like `onnx --fp16`, `evaluate` and `bench`: a file the command would write is not replaced without --force
    (`trt --fp16` writes the FP16 ONNX it builds from next to the plan, --print-trtexec too)."""
    from cli_helpers import cli

    monkeypatch.chdir(tmp_path)
    for name in ("ref.pt", "m.onnx"):
        (tmp_path / name).write_text("not a model, as far as this test goes")
    (tmp_path / existing).write_text("keep me")
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err == f"error: {existing} exists: pass --force to overwrite it\n"
    assert (tmp_path / existing).read_text() == "keep me"
    assert cli(*args, "--force") == 2  # past the check: the inputs are not real
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "exists" not in err and "No such option" not in err, err


@pytest.mark.parametrize(
    "args",
    [
        ["init", "--preset", "small", "-o", "no/x.pt"],
        ["onnx", "missing.pt", "-o", "no/x.onnx"],
        ["whiten", "missing.pt", "--images", "photos", "-o", "no/w.pt"],
        ["openvino", "missing.onnx", "-o", "no/m.xml"],
        ["optimize", "missing.onnx", "-o", "no/m.onnx"],
        ["quantize", "missing.onnx", "-o", "no/m.onnx"],
        ["trt", "missing.onnx", "-o", "no/m.plan"],
        ["trt", "missing.onnx", "--timing-cache", "no/t.cache"],
        ["embed", "missing.onnx", "photos", "-o", "no/d.npy"],
        ["embed", "missing.onnx", "photos", "-o", "d.npy", "--json", "no/d.json"],
        ["evaluate", "missing.onnx", "--picture", "no/p.png"],
        ["parity", "missing.pt", "missing.onnx", "--json", "no/p.json"],
        ["check", "missing.onnx", "--json", "no/c.json"],
        ["bench", "missing.onnx", "--plot", "no/b.png"],
        ["bench", "missing.onnx", "--markdown", "no/b.md"],
        ["index", "shards", "-o", "no/i.faiss"],
        ["search", "missing.faiss", "missing.onnx", "q.jpg", "--picture", "no/h.png"],
        ["cpp", "parity", "missing.onnx", "--json", "no/c.json"],
    ],
)
def test_an_output_in_a_missing_folder_fails_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """Every file a command writes is checked while the command line is parsed: the error names the output,
    not the (also missing) input, so it comes before any work: no export, embedding or benchmark is lost to a
    mistyped folder at the end."""
    from cli_helpers import cli

    monkeypatch.chdir(tmp_path)
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "output folder no does not exist: create it or choose another path" in err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["onnx", "missing.pt", "-o", "out.onnx", "--force"],
        ["init", "--preset", "small", "-o", "out.pt", "--force"],
        ["embed", "missing.onnx", "photos", "-o", "out.npy", "--force"],
        ["optimize", "missing.onnx", "-o", "out.onnx", "--force"],
        ["index", "shards", "-o", "out.faiss", "--force"],
        ["evaluate", "missing.onnx", "--picture", "out.png", "--force"],
        ["bench", "missing.onnx", "--json", "out.json"],
    ],
)
def test_an_output_that_is_a_folder_fails_before_the_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """An output path naming an existing folder is refused while the command line is parsed, --force or not: the
    job would run to its end and then fail to replace the folder ([Errno 21] Is a directory)."""
    from cli_helpers import cli

    monkeypatch.chdir(tmp_path)
    name = next(a for a in args if a.startswith("out."))
    (tmp_path / name).mkdir()
    assert cli(*args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"{name} is a folder: give the name of a file to write" in err, err
    assert (tmp_path / name).is_dir() and not any((tmp_path / name).iterdir())


def test_a_default_output_that_is_a_folder_is_refused(
    small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`onnx m.pt --force` where m.onnx is a folder: refused before the export (it failed after it)."""
    from cli_helpers import cli

    ckpt = tmp_path / "m.pt"
    ckpt.symlink_to(small_ckpt)
    (tmp_path / "m.onnx").mkdir()
    assert cli("onnx", str(ckpt), "--force") == 2
    assert "m.onnx is a folder: give the name of a file to write" in capsys.readouterr().err
    assert not any((tmp_path / "m.onnx").iterdir())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["small.pt", "-o", "z.onnx"], "small.pt is a PyTorch checkpoint, not ONNX: export it first with `dtop-export"),
        (["small.pt"], "small.pt is a PyTorch checkpoint"),  # before "small.opt.onnx exists"
        (["notes.txt"], "notes.txt is not a readable ONNX file"),
        (["fake.onnx"], "fake.onnx is not a readable ONNX file"),
        (["small.xml"], "small.xml is an OpenVINO IR, not ONNX: give the .onnx file it was converted from"),
    ],
)
def test_optimize_refuses_what_is_not_onnx_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    """A checkpoint, an IR or any other file given to ``optimize`` is refused in one line before the output is
    looked at (protobuf's DecodeError traceback before), and nothing is written."""
    from cli_helpers import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.pt").write_bytes(b"PK\x03\x04 a checkpoint, as far as this test goes")
    (tmp_path / "notes.txt").write_text("some notes\n")
    (tmp_path / "fake.onnx").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "small.xml").write_text('<?xml version="1.0"?><net name="m"></net>\n')
    (tmp_path / "small.opt.onnx").write_text("an earlier result")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli("optimize", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_optimize_onnx_refuses_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    from dtop_export.errors import DToPError
    from dtop_export.optimize import optimize_onnx

    bad = tmp_path / "m.onnx"
    bad.write_text("not a model")
    with pytest.raises(DToPError, match="not a readable ONNX file"):
        optimize_onnx(bad, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_optimize_refuses_a_low_precision_export_from_its_metadata(
    small_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An fp16 or INT8 file is refused from its metadata, before its output is looked at and before the model is
    loaded (it was refused after the load: ~2 s for the full model)."""
    import onnx
    from cli_helpers import cli

    import dtop_export.optimize as optimize_module

    m = onnx.load(str(small_onnx))
    for prop in m.metadata_props:
        prop.value = "fp16" if prop.key == "dtop.precision" else prop.value
    half = tmp_path / "small.fp16.onnx"
    onnx.save(m, str(half))
    (tmp_path / "small.fp16.opt.onnx").write_text("an earlier result")
    monkeypatch.setattr(optimize_module, "load_onnx", lambda path: pytest.fail(f"{path} loaded"))
    assert cli("optimize", str(half)) == 2
    err = capsys.readouterr().err
    assert err == f"error: {half} is fp16: optimise the fp32 export, then quantise\n"


def test_debug_shows_traceback(tmp_path: Path) -> None:
    r = subprocess.run([*EXE, "--debug", "info", "missing.pt"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "CheckpointError" in r.stderr


@pytest.mark.parametrize(
    "command",
    [
        "train", "whiten", "embed", "index", "evaluate", "parity", "quantize", "bench", "check", "demo",
        # spinners: executorch, onnx, trt, openvino, optimize and cpp's refused --no-progress (a README walkthrough)
        "executorch", "onnx", "trt", "openvino", "optimize", "cpp build", "cpp parity",
    ],
)  # fmt: skip
def test_commands_with_progress_bars_take_no_progress(command: str) -> None:
    """Every command that draws a progress bar or a spinner can be told not to (`--no-progress`), for logs and
    scripts, and takes `--progress` too (train and whiten took only --no-progress)."""
    import typer

    from dtop_export.cli import app

    cmd = typer.main.get_command(app)
    for name in command.split():
        cmd = cmd.commands[name]  # type: ignore[attr-defined]
    flags = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    assert {"--progress", "--no-progress"} <= flags, f"{command} has no --progress/--no-progress"


@pytest.mark.parametrize(
    ("args", "shown"),
    [([], "false"), (["--progress"], "true"), (["--no-progress"], "false")],
)
def test_train_progress_option_overrides_the_config_only_when_given(args: list[str], shown: str, capsys) -> None:  # noqa: ANN001
    """train's --progress (new) turns the bar on over a config's progress: false; left out, the config decides."""
    from cli_helpers import cli

    assert cli("train", "--print-config", "-s", "progress=false", *args) == 0
    assert f"\nprogress: {shown}\n" in capsys.readouterr().out


def test_commands_draw_spinners_only_through_the_progress_option() -> None:
    """A spinner drawn with rich's console.status directly cannot be turned off: the commands use common.spinner,
    which --no-progress silences."""
    import dtop_export.cli as cli_package

    folder = Path(cli_package.__file__).parent
    direct = [p.name for p in sorted(folder.glob("*.py")) if p.name != "common.py" and ".status(" in p.read_text()]
    assert direct == []


def test_no_progress_draws_no_spinner(small_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`onnx --no-progress` draws no spinner (the export itself stubbed: the wiring is tested); `spinner` and the
    demo's reporter draw nothing on a terminal when told not to."""
    import io
    from types import SimpleNamespace

    from cli_helpers import cli
    from rich.console import Console

    import dtop_export.export as export_module
    from dtop_export.cli.common import rich_reporter, spinner

    def fake_export(checkpoint: Path, output: Path, on_stage: object = None, **kwargs: object) -> SimpleNamespace:
        output.write_bytes(b"onnx")
        meta = {"dtop.whitening": '{"applied": false}', "dtop.descriptor_dim": "256"}
        return SimpleNamespace(opset=18, nodes=1, metadata=meta, seconds=0.0, stage_seconds={})

    drawn: list[str] = []
    real_status = Console.status
    monkeypatch.setattr(export_module, "export_onnx", fake_export)
    monkeypatch.setattr(Console, "status", lambda self, text, **kw: drawn.append(text) or real_status(self, text))
    assert cli("onnx", str(small_ckpt), "-o", str(tmp_path / "a.onnx"), "--no-progress") == 0
    assert drawn == []
    assert cli("onnx", str(small_ckpt), "-o", str(tmp_path / "b.onnx"), "--progress") == 0
    assert drawn == ["exporting"]  # the patch sees a spinner that is drawn
    monkeypatch.setattr(Console, "status", real_status)

    for enabled in (False, True):
        out = io.StringIO()
        con = Console(file=out, force_terminal=True)
        with spinner(con, "working", enabled) as status:
            status.update("still working")
        with rich_reporter(con, enabled).status("working") as update:
            update("still working")
        assert bool(out.getvalue()) is enabled


def test_bench_engine_error_leaves_stdout_empty(tmp_path: Path) -> None:
    """A transient bar on a stdout that is not a terminal is not drawn: rich left an empty line there, in
    front of the one-line error (and of a script's parse of the table)."""
    bad = tmp_path / "bad.onnx"
    bad.write_text("not an onnx file")
    r = run("bench", str(bad), "--runs", "1", "--warmup", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert r.stdout == ""


def test_help_keeps_the_extras_it_names() -> None:
    """An extra named in a command's docstring (`[edge]`, `[cuda12]`) reaches its --help: rich reads an unescaped
    `[edge]` as a markup tag and drops it ("Needs the  extra (pip install 'dtop-export')")."""
    import re

    import typer
    from typer.testing import CliRunner

    from dtop_export.cli import app

    def commands(group: typer.Typer, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
        out = []
        for c in group.registered_commands:
            name = c.name or c.callback.__name__.replace("_", "-")
            out.append(((*path, name), c.callback.__doc__ or ""))
        for g in group.registered_groups:
            out += commands(g.typer_instance, (*path, g.name))
        return out

    found = commands(app, ())
    checked = 0
    for argv, doc in found:
        extras = set(re.findall(r"\[([a-z][a-z0-9-]*)\]", doc))
        if not extras:
            continue
        r = CliRunner().invoke(app, [*argv, "--help"], prog_name="dtop-export", env={"COLUMNS": "200"})
        text = " ".join(r.output.replace("│", " ").split())
        checked += 1
        assert r.exit_code == 0 and all(f"[{e}]" in text for e in extras), (argv, extras, text[:400])
    assert checked >= 2, found  # executorch, cpp build and trt name theirs


def test_ctrl_c_while_a_c_extension_loads_is_an_interrupt(monkeypatch: pytest.MonkeyPatch, capsys) -> None:  # noqa: ANN001
    """Ctrl-C during the import of a C extension (onnxruntime's, in the first second of a job) surfaces as
    ``ImportError("initialization failed")`` raised from the KeyboardInterrupt (pybind11): exit 130 with the
    interrupt's line, no traceback; an ImportError of its own still propagates."""
    import dtop_export.cli as cli_module

    def interrupted_import(args: list[str], prog_name: str) -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(cli_module, "app", interrupted_import)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["embed"])
    assert exit_info.value.code == 130
    assert "interrupted: files are written whole or not at all" in capsys.readouterr().err

    def terminated_import(args: list[str], prog_name: str) -> None:  # SIGTERM there: 143, not 130 (a review)
        from dtop_export.errors import raise_interrupted

        try:
            raise_interrupted(15, None)
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e

    monkeypatch.setattr(cli_module, "app", terminated_import)
    with pytest.raises(SystemExit) as exit_info:
        cli_module.main(["embed"])
    assert exit_info.value.code == 143
    assert "interrupted: SIGTERM: files are written whole or not at all" in capsys.readouterr().err

    def broken_import(args: list[str], prog_name: str) -> None:
        raise ImportError("no module named nothing")

    monkeypatch.setattr(cli_module, "app", broken_import)
    with pytest.raises(ImportError, match="nothing"):
        cli_module.main(["embed"])


@pytest.mark.parametrize("command", ["executorch", "quantize", "embed"])
def test_sigterm_leaves_no_temporary_file(command: str, small_ckpt: Path, small_onnx: Path, tmp_path: Path) -> None:
    """SIGTERM (`timeout`, `docker stop`, a CI job cancelled) ended a command where it stood, unlike Ctrl-C:
    `executorch` left its staged `.s.pte.XXXX.tmp` next to the output, `quantize` its `dtop-quant-*` folder in
    $TMPDIR (20 MB; 0.5 GB for r50-vitb16). Now it stops as Ctrl-C does: exit 143, one line, nothing staged left.
    A local `embed` job says how many shards are complete, with 143 too (it exited 130, a review)."""
    import os
    import re
    import signal
    import time

    import numpy as np
    from PIL import Image

    if command == "executorch":
        pytest.importorskip("executorch.runtime", reason="the [edge] extra")
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    out.mkdir()
    if command == "executorch":
        argv, staged = ["executorch", str(small_ckpt), "--size", "128", "-o", str(out / "s.pte")], out
    elif command == "quantize":
        argv = ["quantize", str(small_onnx), "-o", str(out / "q.onnx"), "--calib-count", "8", "--calib-sizes", "128"]
        staged = tmp
    else:  # the job has started once its manifest is written: SIGTERM in the middle of it
        images, rng = tmp_path / "images", np.random.default_rng(0)
        images.mkdir()
        for i in range(24):
            Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(images / f"p{i}.png")
        argv, staged = ["embed", str(small_onnx), str(images), "-o", str(out / "c"), "--shard-size", "4"], out / "c"
    pattern = {"executorch": ".*.tmp", "quantize": "dtop-*", "embed": "manifest.json"}[command]
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([*EXE, *argv, "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        for _ in range(6000):  # a hang detector, not a timing: until the command has staged its work
            if list(staged.glob(pattern)) or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    if command == "embed":
        assert re.fullmatch(
            rf"interrupted: \d+ of 6 shard\(s\) are complete in {re.escape(str(out / 'c'))} \(each shard is written "
            r"whole\); run the same command again to embed the rest",
            err.strip().splitlines()[-1],
        ), err[-3000:]
        return
    assert err.strip().splitlines()[-1] == "interrupted: SIGTERM: files are written whole or not at all", err[-3000:]
    assert list(out.iterdir()) == [] and not list(tmp.glob("dtop-*"))
