"""``dtop-export cpp``: the C++ client (``cpp build``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import ForceOpt, ProgressOpt, app, at_least, console, output_option, refuse_existing

cpp_app = typer.Typer(help="The C++ client: build dtop-embed and the dtop::Embedder library.", no_args_is_help=True)
app.add_typer(cpp_app, name="cpp")


@cpp_app.command("build")
def cpp_build(
    build_dir: Annotated[
        Path | None, typer.Option("--build-dir", help="CMake build folder (default: ~/.cache/dtop-export/cpp).")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", callback=at_least(1), help="Parallel compile jobs (default: all).")
    ] = None,
    debug_build: Annotated[bool, typer.Option("--debug-build", help="CMAKE_BUILD_TYPE=Debug (not Release).")] = False,
    prefix: Annotated[
        Path | None, typer.Option("--prefix", help="Also install there (bin/, lib/, include/, lib/cmake/dtop).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    werror: Annotated[
        bool, typer.Option("--werror", help="Compiler warnings are errors (the project's tests build so).")
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    r"""Configure and build the C++ client with the installed openvino wheel's SDK (and the executorch wheel's, for
    .pte programs, when the \[edge] extra is installed); prints the binary's path.

    Needs CMake >= 3.16, a C++17 compiler and the libjpeg/zlib/OpenSSL development files (apt install cmake g++
    libjpeg-dev zlib1g-dev libssl-dev). Run again after an upgrade: the build is incremental.
    """
    from dtop_export.cli.common import spinner
    from dtop_export.cpp import build

    con = console()
    if as_json:
        result = build(build_dir, jobs, "Debug" if debug_build else "Release", prefix, werror=werror)
        typer.echo(json.dumps(result.to_dict(), indent=2))
        return
    with spinner(con, "building the C++ client", progress) as status:
        result = build(
            build_dir,
            jobs,
            "Debug" if debug_build else "Release",
            prefix,
            status=lambda t: status.update(t),
            werror=werror,
        )
    t = result.timings
    con.print(
        f"built with OpenVINO {result.openvino_version} in {t['configure_s'] + t['build_s']:.1f} s "
        f"(configure {t['configure_s']:.1f} s, compile {t['build_s']:.1f} s)",
        highlight=False,
    )
    con.print(
        f"library   {result.library}\nheaders   {result.include_dir}", highlight=False, soft_wrap=True, markup=False
    )
    con.print(f"executorch backend: {result.executorch}", highlight=False, soft_wrap=True, markup=False)  # .pte
    if result.example:
        con.print(f"example   {result.example}", highlight=False, soft_wrap=True, markup=False)
    if result.installed_to:
        con.print(f"installed {result.installed_to}", highlight=False, soft_wrap=True, markup=False)
    # Last line: the binary, alone, so that scripts can take it with `| tail -1`.
    typer.echo(str(result.embed_tool))


@cpp_app.command("parity")
def cpp_parity(
    model: Annotated[Path, typer.Argument(help="An exported .onnx or ExecuTorch .pte (run by both sides).")],
    images: Annotated[
        list[Path] | None,
        typer.Argument(help="Image files or folders (default: a generated set of every format and EXIF case)."),
    ] = None,
    binary: Annotated[
        Path | None, typer.Option("--binary", help="dtop-embed to check (default: the one `cpp build` made).")
    ] = None,
    image_size: Annotated[int, typer.Option("--image-size", callback=at_least(1), help="Longer image side.")] = 384,
    scales: Annotated[str, typer.Option("--scales", help="Comma-separated scales, or `ms`.")] = "1",
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", callback=at_least(1), help="Same-shape images per pass.")
    ] = 1,
    threads: Annotated[
        int | None, typer.Option("--threads", callback=at_least(1), help="Threads for both runtimes.")
    ] = None,
    json_out: Annotated[Path | None, output_option("--json", help="Also write the report as JSON.")] = None,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """C++ client vs Python on the same model and files: descriptor cosine (>= 0.9999) and model-input
    difference (0 levels) per image, and the same skipped files. Exits 1 when the client breaks the contract."""
    import tempfile

    from rich.table import Table

    from dtop_export.cli.common import spinner, write_json
    from dtop_export.cpp import EMBED_TOOL, default_build_dir
    from dtop_export.cpp_parity import MAX_LEVELS, MIN_COSINE, check_binary, compare, write_format_zoo
    from dtop_export.errors import DToPError
    from dtop_export.memory import check_image_size
    from dtop_export.preprocess import expand_images
    from dtop_export.retrieval.extract import parse_scales

    sc = parse_scales(scales)
    check_image_size(image_size, sc, batch_size)
    refuse_existing(json_out, force=force)
    if not model.is_file():
        raise DToPError(f"model {model} not found: give the .onnx or .pte both sides run")
    exe = binary or default_build_dir() / EMBED_TOOL
    check_binary(exe)
    con = console()
    with tempfile.TemporaryDirectory(prefix="dtop-zoo-") as tmp:
        paths = expand_images(images) if images else sorted(write_format_zoo(tmp).values())
        if not paths:
            raise DToPError("no images given")
        with spinner(con, f"embedding {len(paths)} images with {exe.name} and Python", progress):
            report = compare(exe, model, paths, image_size, sc, batch_size, threads)
    table = Table(title=f"C++ client vs Python: {model.name}, {image_size}px, scales {list(sc)}")
    for col in ("image", "cosine", "input max-abs", "levels"):
        table.add_column(col, justify="left" if col == "image" else "right")
    for r in report.images:
        table.add_row(Path(r.path).name, f"{r.cosine:.7f}", f"{r.input_max_abs:.2e}", f"{r.input_levels:g}")
    con.print(table)
    con.print(f"skipped by both: {[Path(p).name for p in report.skipped_cpp]}", highlight=False, soft_wrap=True)
    if json_out:
        write_json(json_out, report.to_dict())
    if report.passed:
        con.print(
            f"[green]PASS[/] cosine min {report.cosine_min:.7f} (>= {MIN_COSINE}), model inputs equal "
            f"(max {report.levels_max:g} levels, bound {MAX_LEVELS:g})",
            soft_wrap=True,
        )
        return
    for f in report.failures():
        con.print(f"[red]FAIL[/] {f}", highlight=False)
    raise typer.Exit(1)
