"""TensorRT commands: ``trt`` (ONNX -> engine) and ``check`` (parser lint, FP16 audit: CPU only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli._app import app, console
from dtop_export.errors import DToPError

_SHAPE_HELP = "Profile {} shape BxCxHxW (default {}); repeat --min/--opt/--max for several profiles."
MinOpt = Annotated[list[str] | None, typer.Option("--min", help=_SHAPE_HELP.format("min", "1x3x224x224"))]
OptOpt = Annotated[list[str] | None, typer.Option("--opt", help=_SHAPE_HELP.format("opt", "1x3x512x512"))]
MaxOpt = Annotated[list[str] | None, typer.Option("--max", help=_SHAPE_HELP.format("max", "8x3x1024x1024"))]
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


@app.command()
def trt(
    model: Annotated[Path, typer.Argument(help="A float32 (or FP16) ONNX file from `dtop-export onnx`.")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Engine file (default: MODEL.plan).")] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="FP16 with FP32 islands (LayerNorm, Softmax, L2 norms, ...).")
    ] = False,
    min_shape: MinOpt = None,
    opt_shape: OptOpt = None,
    max_shape: MaxOpt = None,
    workspace: Annotated[float, typer.Option("--workspace", help="Builder workspace limit in GiB.")] = 4.0,
    timing_cache: Annotated[
        Path | None, typer.Option("--timing-cache", help="Timing cache file: loaded if present, saved after.")
    ] = None,
    weak_typing: Annotated[
        bool,
        typer.Option("--weak-typing", help="TensorRT 10.0-10.11: FP16 flag + FP32-pinned layers instead of casts."),
    ] = False,
    no_tf32: Annotated[bool, typer.Option("--no-tf32", help="Disable TF32 (strict FP32 parity).")] = False,
    keep_fp32: KeepFp32Opt = None,
    fp16_onnx: Annotated[
        Path | None, typer.Option("--fp16-onnx", help="Where the FP16 ONNX goes (default: OUTPUT.fp16.onnx).")
    ] = None,
    print_trtexec: Annotated[
        bool, typer.Option("--print-trtexec", help="Print the equivalent trtexec command and stop (no GPU needed).")
    ] = False,
    device: Annotated[int, typer.Option("--device", help="CUDA device index.")] = 0,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing engine.")] = False,
) -> None:
    r"""Build a TensorRT engine (.plan + .plan.json sidecar) with dynamic-shape profiles. Needs an NVIDIA GPU and
    `pip install 'dtop-export\[gpu]'`; --print-trtexec works anywhere."""
    from engines.tensorrt import build_engine, make_profiles, prepare_fp16_onnx, trtexec_command

    if not model.is_file():
        raise DToPError(f"ONNX file {model} not found")
    output = output or model.with_suffix(".plan")
    if output.exists() and not force and not print_trtexec:
        raise DToPError(f"{output} exists: pass --force to overwrite it")
    if weak_typing and not fp16:
        raise DToPError("--weak-typing only applies to --fp16 builds")
    keep = parse_keep_fp32(keep_fp32)
    if keep and not fp16:
        raise DToPError("--keep-fp32 only applies to --fp16 builds")
    stride = _stride_of(model)
    profiles = make_profiles(min_shape or (), opt_shape or (), max_shape or (), stride=stride)
    fp16_path = fp16_onnx or output.with_suffix(".fp16.onnx")
    con = console()

    if print_trtexec:
        src, layers, typing = model, [], "strong"
        if fp16 and not weak_typing:
            src, _ = prepare_fp16_onnx(model, fp16_path, keep)
            if src != model:
                typer.echo(f"# wrote the FP16 ONNX (FP32 islands as casts) to {src}", err=True)
        elif fp16:
            import onnx

            from dtop_export.fp16 import plan_fp32_islands

            layers, typing = sorted(plan_fp32_islands(onnx.load(str(model)), keep_fp32_nodes=keep).islands), "weak"
        typer.echo(
            trtexec_command(
                src,
                output,
                profiles,
                typing=typing,
                workspace_gb=workspace,
                timing_cache=timing_cache,
                fp32_layers=layers,
                tf32=not no_tf32,
            )
        )
        return

    with con.status("building the TensorRT engine (minutes)"):
        r = build_engine(
            model,
            output,
            fp16=fp16,
            profiles=profiles,
            workspace_gb=workspace,
            timing_cache=timing_cache,
            weak_typing=weak_typing,
            tf32=not no_tf32,
            keep_fp32_nodes=keep,
            fp16_onnx_path=fp16_path,
            device=device,
        )
    p = r.info.precision
    con.print(
        f"wrote {r.plan} ({r.size_bytes / 2**20:.1f} MiB) + {r.sidecar.name} in {r.seconds:.0f} s: "
        f"TensorRT {r.info.tensorrt_version} on {r.info.gpu['name']} (sm {r.info.gpu['compute_capability']}), "
        f"{p['mode']} {p['typing']}ly typed, {len(p['fp32_nodes'])} FP32 nodes, profiles "
        + "; ".join(q.describe() for q in profiles),
        soft_wrap=True,
    )


def _stride_of(model: Path) -> int:
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise DToPError(f"{model} is not a readable ONNX file ({e.__class__.__name__})") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    return int(meta.get("dtop.stride", 16))


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="An ONNX file.")],
    target: Annotated[
        str | None, typer.Option("--target", help="Runtime whose ONNX parser to lint against: tensorrt.")
    ] = None,
    fp16_audit: Annotated[
        bool, typer.Option("--fp16-audit", help="Emulate FP16 on the CPU: cosine, mAP delta, out-of-range layers.")
    ] = False,
    images: Annotated[
        str,
        typer.Option("--images", help="Audit images: a folder, a revisitop folder (gnd_*.pkl: adds mAP), or sample."),
    ] = "sample",
    image_size: Annotated[int | None, typer.Option("--image-size", help="Longer image side (default: set's).")] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="Audit at most this many images (plain folders).")
    ] = None,
    underflow: Annotated[
        float, typer.Option("--underflow", help="Flag tensors with more than this share of values flushed to 0.")
    ] = 0.01,
    keep_fp32: KeepFp32Opt = None,
    no_crop: Annotated[bool, typer.Option("--no-crop", help="Whole query images, not their boxes.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> None:
    """Check an ONNX file on the CPU: `--target tensorrt` lints it against TensorRT's ONNX parser (exit 1 when
    something would fail to parse); `--fp16-audit` emulates FP16 (exit 1 when the FP16 contract fails)."""
    if target is None and not fp16_audit:
        target = "tensorrt"
    if target is not None and target != "tensorrt":
        raise DToPError(f"unknown --target {target!r}: only tensorrt")
    if not model.is_file():
        raise DToPError(f"ONNX file {model} not found")
    con = console()
    report: dict[str, object] = {"model": str(model)}
    failed = False
    if target == "tensorrt":
        from dtop_export.checks import lint_tensorrt

        issues = lint_tensorrt(model)
        report["tensorrt"] = [i.__dict__ for i in issues]
        errors = [i for i in issues if i.severity == "error"]
        if issues:
            from rich.table import Table

            table = Table(title=f"TensorRT ONNX parser check: {model.name}", show_lines=False)
            for col in ("severity", "node", "op", "problem", "fix"):
                table.add_column(col, overflow="fold")
            for i in issues:
                table.add_row(i.severity, i.node, i.op, i.problem, i.fix, style="red" if i.severity == "error" else "")
            con.print(table)
        if errors:
            con.print(f"{len(errors)} problem(s) would make TensorRT's ONNX parser fail", style="bold red")
            failed = True
        else:
            warn = sum(1 for i in issues if i.severity == "warning")
            con.print(f"ok: {model.name} should parse on TensorRT 10.x ({warn} warning(s))")
    if fp16_audit:
        from dtop_export.checks import fp16_audit as run_audit

        with con.status("FP16 audit (CPU emulation)"):
            result = run_audit(
                model,
                images,
                image_size=image_size,
                keep_fp32_nodes=parse_keep_fp32(keep_fp32),
                underflow_threshold=underflow,
                crop_queries=not no_crop,
                limit=limit,
            )
        report["fp16_audit"] = result.to_dict()
        con.print(result.table(), soft_wrap=True)
        con.print(
            f"{result.images} images ({result.queries} queries) at longer side {result.image_size}, "
            f"{result.watched_tensors} tensors watched, {result.seconds:.0f} s",
            style="dim",
        )
        if result.keep_fp32_nodes:
            con.print(f"keep in FP32 (pass to `trt --fp16 --keep-fp32`): {','.join(result.keep_fp32_nodes)}")
        else:
            con.print("no tensor leaves FP16 range: the default FP32 islands suffice")
        if result.passed:
            con.print("FP16 contract met (cosine >= 0.999, |ΔmAP| <= 0.2)")
        else:
            con.print("FP16 contract NOT met (cosine >= 0.999, finite, |ΔmAP| <= 0.2)", style="bold red")
            failed = True
    if json_out is not None:
        from dtop_export._io import atomic_write_text

        atomic_write_text(json_out, json.dumps(report, indent=2, default=str) + "\n")
    if failed:
        raise typer.Exit(code=1)
