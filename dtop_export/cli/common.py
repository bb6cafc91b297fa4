"""The Typer application object, the root options, and what several commands share (options, printing).

Top-level imports: typer and the standard library only, so that ``dtop-export --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dtop_export import __version__
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from rich.console import Console

    from dtop_export.contract import Engine
    from dtop_export.pipeline.stages import Reporter

app = typer.Typer(
    name="dtop-export",
    help="Train DToP image-retrieval models and ship them as ONNX / TensorRT descriptors with proven parity.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dtop-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks instead of one-line errors.")] = False,
) -> None:
    """dtop-export: DToP checkpoints -> ONNX / TensorRT descriptors, with parity and mAP checks."""
    if debug:
        os.environ["DTOP_EXPORT_DEBUG"] = "1"


def console() -> Console:
    """A rich console on stdout."""
    from rich.console import Console

    return Console()


def progress_bar(con: Console | None = None, transient: bool = False, enabled: bool = True) -> Any:
    """A rich progress bar: description, bar, done/total, elapsed time (drawn only if ``enabled``). A
    ``transient`` bar is not drawn on a console that is not a terminal: rich would leave an empty line there
    (in front of a table or an error on stdout) where a terminal erases the bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if transient and enabled:
        enabled = (con or console()).is_terminal
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=con,
        transient=transient,
        disable=not enabled,
    )


class _NoSpinner:
    """What :func:`spinner` yields under ``--no-progress``: its text updates go nowhere."""

    def update(self, *args: Any, **kwargs: Any) -> None:
        pass


@contextlib.contextmanager
def spinner(con: Console, text: str, enabled: bool = True) -> Iterator[Any]:
    """``con.status(text)``: a spinner for a step without a progress bar, whose ``update`` changes its text; nothing
    is drawn unless ``enabled`` (``--no-progress``)."""
    if not enabled:
        yield _NoSpinner()
        return
    with con.status(text) as status:
        yield status


def write_json(path: Path, payload: dict[str, Any], strict: bool = False) -> None:
    """``payload`` as indented JSON, written atomically; ``strict``: refuse NaN/inf (not JSON) instead of writing it."""
    from dtop_export.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(payload, indent=2, default=str, allow_nan=not strict) + "\n")


def onnx_input(src: Path) -> dict[str, str]:
    """The metadata of the ONNX file a command reads (``optimize``, ``quantize``, ``openvino``), or one line saying
    what to give instead: a checkpoint, an OpenVINO IR or any other file that is not ONNX (read in milliseconds,
    before the command's other checks and its work)."""
    from dtop_export.contract import read_metadata
    from dtop_export.onnx_metadata import other_format

    if src.is_file() and (what := other_format(src)):  # a checkpoint, IR, plan or .pte: what to give instead
        raise DToPError(what)
    try:
        return read_metadata(src)
    except DToPError as e:
        if not src.is_file():
            raise
        raise DToPError(f"{e}: give an .onnx written by `dtop-export onnx`") from None


def new_output(src: Path, output: Path | None, suffix: str, force: bool) -> Path:
    """The file a command derived from ``src`` writes (default ``src`` with ``suffix``), refusing to
    overwrite one without ``--force``; ``src`` must exist (an ONNX input is read first: :func:`onnx_input`)."""
    if not src.is_file():
        raise DToPError(f"{src} not found")
    output = output or output_path(src.with_name(src.stem + suffix))
    refuse_existing(output, force=force)
    return output


def output_path(path: Path, option: str | None = None) -> Path:
    """``path`` as a file a command may write (``option``: the option that named it, for the message): its folder
    exists (outputs never create folders) and it is not itself a folder (``--force`` replaces files, not folders:
    the write would fail after the work)."""
    from dtop_export.atomic import output_folder

    named = f"{option} {path}" if option else str(path)
    try:
        output_folder(path)
    except DToPError as e:
        raise DToPError(f"{named}: {e}" if option else str(e)) from None
    if path.is_dir():
        raise DToPError(f"{named} is a folder: give the name of a file to write")
    return path


def output_file(param: typer.CallbackParam, value: Path | None, suffix: str | None = None) -> Path | None:
    """Option callback for a file a command writes (:func:`output_path`), ending in ``suffix`` when one is given. It
    runs while the command line is parsed, so a mistyped path fails before the work, not after it (the writers
    check again when they write)."""
    if value is not None:
        output_path(value, param.opts[-1])
        if suffix is not None and value.suffix.lower() != suffix:
            raise DToPError(f"{param.opts[-1]} {value} should end in {suffix}")
    return value


def output_option(*names: str, help: str, suffix: str | None = None) -> Any:  # noqa: A002 - typer's keyword
    """``typer.Option`` for a file the command writes (:func:`output_file` checks it while parsing); ``suffix``: the
    one suffix it may have (``.onnx``)."""

    def callback(param: typer.CallbackParam, value: Path | None) -> Path | None:  # typer reads the annotations
        return output_file(param, value, suffix)

    return typer.Option(*names, callback=callback, help=help)


def option_name(param: typer.CallbackParam) -> str:
    """The long name of an option (``--batch-size`` rather than ``-b``), as the help shows it."""
    return next((o for o in param.opts if o.startswith("--")), param.opts[0])


def at_least(low: float) -> Callable[[typer.CallbackParam, Any], Any]:
    """Option callback refusing a number below ``low`` while the command line is read (before any work); None
    (an option left out) passes."""

    def check(param: typer.CallbackParam, value: Any) -> Any:
        if value is not None and not value >= low:  # NaN included
            raise DToPError(f"{option_name(param)} must be >= {low:g}, got {value:g}")
        return value

    return check


def above(low: float) -> Callable[[typer.CallbackParam, Any], Any]:
    """Option callback refusing a number that is not greater than ``low`` (see :func:`at_least`)."""

    def check(param: typer.CallbackParam, value: Any) -> Any:
        if value is not None and not value > low:
            raise DToPError(f"{option_name(param)} must be > {low:g}, got {value:g}")
        return value

    return check


def refuse_existing(*paths: Path | None, force: bool) -> None:
    """Refuse, before any work, to overwrite files a command would write (sidecars included) unless ``force``."""
    existing = [str(p) for p in paths if p is not None and (p.exists() or p.is_symlink())]
    if existing and not force:
        one = len(existing) == 1
        raise DToPError(
            f"{', '.join(existing)} exist{'s' if one else ''}: pass --force to overwrite {'it' if one else 'them'}"
        )


def check_report_files(json_out: Path | None, picture: Path | None) -> None:
    """``--json`` and ``--picture`` of a command that writes both (``evaluate``, ``search``): the picture a .png,
    and two files, before any work."""
    if picture is not None and picture.suffix.lower() != ".png":
        raise DToPError(f"--picture {picture} should end in .png")
    if json_out is not None and picture is not None and json_out.resolve() == picture.resolve():
        raise DToPError(f"--json and --picture both name {picture}: give two files")


@contextlib.contextmanager
def written_together(*paths: Path | None) -> Iterator[dict[Path, Path]]:
    """The outputs given (None: not asked for) written as one set: yields each one's temporary file to write, all
    renamed into place when the body returns, none when it raises (:func:`~dtop_export.atomic.atomic_paths`)."""
    from dtop_export.atomic import atomic_paths

    outputs = [p for p in paths if p is not None]
    with atomic_paths(outputs) as temps:
        yield dict(zip(outputs, temps))


def parse_int_list(text: str, what: str) -> list[int]:
    """``"224,384,512"`` -> [224, 384, 512] (the library's parser, imported lazily)."""
    from dtop_export.bench.spec import parse_int_list as parse

    return parse(text, what)


def open_engine(model: Path | str, precision: str | None = None, **options: Any) -> Engine:
    """The engine of a MODEL argument: a file, or ``FILE:options`` as ``bench`` takes them (``m.onnx:openvino``,
    ``m.xml:threads=2``, ``m.pt:bf16``); ``precision`` as ``embed --precision`` (``auto`` included); ``options`` add
    to the written ones."""
    from dtop_export.corpus.runtime import engine_options
    from dtop_export.engines import load_engine

    path, written = engine_options(str(model), precision=precision)
    return load_engine(path, **{**written, **options})


def rich_reporter(con: Console, progress: bool = True) -> Reporter:
    """A :class:`~dtop_export.pipeline.stages.Reporter` that draws a rule per stage and spinners (``progress``)."""
    from dtop_export.pipeline.stages import Reporter

    class RichReporter(Reporter):
        def stage(self, number: int, title: str) -> None:
            con.rule(f"[bold][{number}] {title}")

        def note(self, text: str) -> None:
            con.print(text, markup=False, soft_wrap=True)

        @contextlib.contextmanager
        def status(self, text: str) -> Iterator[Callable[[str], None]]:
            with spinner(con, text, progress) as status:
                yield lambda update: status.update(update)

    return RichReporter()


# options several commands share ---------------------------------------------------------------------------

ScalesOpt = Annotated[
    str,
    typer.Option("--scales", help="Comma-separated scales (cirtorch multi-scale: 1,0.707,1.414 or `ms`)."),
]
ImageSizeOpt = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        callback=at_least(1),
        help="Longer image side before scaling (default: the data set's, else 1024).",
    ),
]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", "-b", callback=at_least(1), help="Images per forward pass (same-shape images).")
]
DatasetOpt = Annotated[
    str, typer.Option("--dataset", "-d", help="roxford5k, rparis6k, sample, or a folder with gnd_<name>.pkl + jpg/.")
]
DataRootOpt = Annotated[
    Path | None,
    typer.Option("--data-root", help="Folder holding the data sets (default: $DTOP_EXPORT_DATA or ~/.cache)."),
]
NoCropOpt = Annotated[bool, typer.Option("--no-crop", help="Use whole query images, not their bounding boxes.")]
JsonOpt = Annotated[Path | None, output_option("--json", help="Also write the results as JSON to this file.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
CalibOpt = Annotated[
    Path | None, typer.Option("--calib", help="Folder of calibration images (default: the embedded calibration set).")
]
CalibCountOpt = Annotated[
    int | None, typer.Option("--calib-count", callback=at_least(1), help="Calibration images to use [default: 16].")
]
CalibSizesOpt = Annotated[
    str | None, typer.Option("--calib-sizes", help="Longer-side sizes each image is calibrated at [default: 320,512].")
]
KeepFloatOpt = Annotated[
    str | None,
    typer.Option(
        "--keep-float",
        help="Conv/MatMul roles left in float: first_conv, stem, elm, qkv, proj, fc1, fc2, attention, dpe "
        "[default: first_conv,stem,attention,dpe].",
    ),
]
ForceOpt = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing file.")]
KeepFp32Opt = Annotated[
    list[str] | None,
    typer.Option(
        "--keep-fp32",
        help="Node names kept FP32 besides the default islands (comma-separated, repeatable, or @audit.json "
        "from `check --fp16-audit --json`).",
    ),
]


def parse_keep_fp32(values: list[str] | None) -> list[str]:
    """Node names from ``--keep-fp32`` values: names, comma lists, or ``@file.json`` (an audit report's
    ``keep_fp32_nodes`` or a JSON list)."""
    out: list[str] = []
    for v in values or []:
        if v.startswith("@"):
            path = Path(v[1:])
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise DToPError(f"cannot read --keep-fp32 file {path}: {e}") from e
            names = data.get("keep_fp32_nodes") if isinstance(data, dict) else data
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DToPError(f"{path} holds no list of node names (expected keep_fp32_nodes)")
            out += names
        else:
            out += [n.strip() for n in v.split(",") if n.strip()]
    return list(dict.fromkeys(out))
