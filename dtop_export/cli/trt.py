"""``dtop-export trt``: ONNX -> TensorRT engine (.plan + .plan.json sidecar); ``--print-trtexec`` anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import KeepFp32Opt, ProgressOpt, app, console, output_option, refuse_existing
from dtop_export.errors import DToPError

_SHAPE_HELP = "Profile {} shape BxCxHxW (default {}); repeat --min/--opt/--max for several profiles."
MinOpt = Annotated[list[str] | None, typer.Option("--min", help=_SHAPE_HELP.format("min", "1x3x224x224"))]
OptOpt = Annotated[list[str] | None, typer.Option("--opt", help=_SHAPE_HELP.format("opt", "1x3x512x512"))]
MaxOpt = Annotated[list[str] | None, typer.Option("--max", help=_SHAPE_HELP.format("max", "8x3x1024x1024"))]


@app.command()
def trt(
    model: Annotated[Path | None, typer.Argument(help="A float32 (or FP16) ONNX file from `dtop-export onnx`.")] = None,
    output: Annotated[Path | None, output_option("-o", "--output", help="Engine file (default: MODEL.plan).")] = None,
    fp16: Annotated[
        bool, typer.Option("--fp16", help="FP16 with FP32 islands (LayerNorm, Softmax, L2 norms, ...).")
    ] = False,
    min_shape: MinOpt = None,
    opt_shape: OptOpt = None,
    max_shape: MaxOpt = None,
    workspace: Annotated[float, typer.Option("--workspace", help="Builder workspace limit in GiB.")] = 4.0,
    timing_cache: Annotated[
        Path | None, output_option("--timing-cache", help="Timing cache file: loaded if present, saved after.")
    ] = None,
    weak_typing: Annotated[
        bool,
        typer.Option("--weak-typing", help="TensorRT 10.0-10.11: FP16 flag + FP32-pinned layers instead of casts."),
    ] = False,
    no_tf32: Annotated[bool, typer.Option("--no-tf32", help="Disable TF32 (strict FP32 parity).")] = False,
    keep_fp32: KeepFp32Opt = None,
    fp16_onnx: Annotated[
        Path | None,
        output_option("--fp16-onnx", help="Where the FP16 ONNX goes (default: OUTPUT.fp16.onnx).", suffix=".onnx"),
    ] = None,
    print_trtexec: Annotated[
        bool, typer.Option("--print-trtexec", help="Print the equivalent trtexec command and stop (no GPU needed).")
    ] = False,
    trt_version: Annotated[
        int | None,
        typer.Option(
            "--trt-version",
            help="TensorRT major version the trtexec line is for: 10 or 11 (default: the installed TensorRT, else 11).",
        ),
    ] = None,
    self_test: Annotated[
        bool,
        typer.Option("--self-test", help="GPU acceptance: build, inspect and check the small model (no MODEL)."),
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="--self-test: also r50-vitb16 at the default profile + latency vs ORT.")
    ] = False,
    report: Annotated[Path | None, output_option("--json", help="--self-test: write the JSON report here.")] = None,
    device: Annotated[int, typer.Option("--device", help="CUDA device index.")] = 0,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="auto (the installed one; TensorRT when both are, TensorRT-RTX with --target), tensorrt or rtx.",
        ),
    ] = "auto",
    target: Annotated[
        str | None,
        typer.Option(
            "--target",
            help="TensorRT-RTX: build without a GPU for these compute capabilities, one plan each: "
            "sm75, sm80, sm86, sm89, sm120, sm121 (comma-separated; MODEL.sm86.plan ... for several).",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", "-f", help="Overwrite an existing engine (and the FP16 ONNX that --fp16 writes).")
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    r"""Build a TensorRT engine (.plan + .plan.json sidecar) with dynamic-shape profiles: with TensorRT on this GPU
    (`pip install 'dtop-export\[cuda12]'`, or \[cuda13]), or with TensorRT-RTX (\[rtx-cuda12]) on this GPU or,
    with --target, for named GPU architectures without one. --print-trtexec works anywhere; --self-test checks a
    machine end to end (exit 0 pass, 1 fail, 2 nothing to test with, 3 built but not run: needs a GPU)."""
    from dtop_export.cli.common import parse_keep_fp32, spinner
    from dtop_export.contract import read_metadata
    from dtop_export.engines.tensorrt.builder import build_engines
    from dtop_export.engines.tensorrt.install import BACKENDS
    from dtop_export.engines.tensorrt.profiles import make_profiles
    from dtop_export.engines.tensorrt.targets import parse_targets, plan_paths
    from dtop_export.engines.tensorrt.trtexec import default_trt_major, trtexec_command
    from dtop_export.fp16.convert import prepare_fp16_onnx
    from dtop_export.suffixes import PLAN_SUFFIXES

    if backend not in BACKENDS:
        raise DToPError(f"unknown --backend {backend!r}: choose {', '.join(BACKENDS)}")
    targets = parse_targets(target) if target is not None else None
    if self_test:
        if model is not None or print_trtexec or targets:
            raise DToPError("--self-test takes no MODEL, --target or --print-trtexec: it exports its own test models")
        from dtop_export.pipeline.trt_selftest import run_self_test

        raise typer.Exit(
            run_self_test(full=full, device=device, report_path=report, console=console(), backend=backend)
        )
    if full or report is not None:
        raise DToPError("--full and --json belong to --self-test")
    if model is None:
        raise DToPError("give the ONNX file to build (e.g. `dtop-export trt model.onnx --fp16`), or --self-test")
    if trt_version is not None and not print_trtexec:
        raise DToPError("--trt-version only applies to --print-trtexec (a build uses the installed TensorRT)")
    if not model.is_file():
        raise DToPError(f"ONNX file {model} not found")
    output = output or model.with_suffix(".plan")
    if output.suffix.lower() not in PLAN_SUFFIXES:  # `embed`, `bench`, `info` tell a plan by its suffix
        raise DToPError(f"--output {output}: a TensorRT engine file ends in .plan (or .engine, .trt)")
    outputs = plan_paths(output, targets) if targets else [output]
    if not print_trtexec:
        refuse_existing(*outputs, force=force)
    if print_trtexec and (targets or backend == "rtx"):
        raise DToPError("--print-trtexec prints TensorRT's trtexec line; TensorRT-RTX builds (--target, --backend rtx) "
                        "run here directly")  # fmt: skip
    if weak_typing and not fp16:
        raise DToPError("--weak-typing only applies to --fp16 builds")
    keep = parse_keep_fp32(keep_fp32)
    if keep and not fp16:
        raise DToPError("--keep-fp32 only applies to --fp16 builds")
    fp16_path = fp16_onnx or output.with_suffix(".fp16.onnx")
    if fp16 and not weak_typing and fp16_path.resolve() != model.resolve():  # the FP16 ONNX written next to the plan
        refuse_existing(fp16_path, force=force)
    stride = int(read_metadata(model).get("dtop.stride", 16))
    profiles = make_profiles(min_shape or (), opt_shape or (), max_shape or (), stride=stride)
    con = console()

    if print_trtexec:
        major = trt_version if trt_version is not None else default_trt_major()
        if weak_typing and major != 10:
            raise DToPError(f"--weak-typing exists on TensorRT 10 only: drop it for the TensorRT {major} line")
        src, layers, typing = model, [], "strong"
        if fp16 and not weak_typing:
            src, _ = prepare_fp16_onnx(model, fp16_path, keep)
            if src != model:
                typer.echo(f"# wrote the FP16 ONNX (FP32 islands as casts) to {src}", err=True)
        elif fp16:
            from dtop_export.engines.tensorrt.builder import weak_typing_layer_names

            try:
                layers, unmatched = weak_typing_layer_names(model, keep, device)
            except DToPError as e:
                raise DToPError(
                    f"--print-trtexec --weak-typing names the exact TensorRT layers to pin, which needs TensorRT 10 "
                    f"and a GPU here ({e}); the strongly typed line (drop --weak-typing) needs neither"
                ) from e
            if unmatched:
                typer.echo(f"# {len(unmatched)} FP32 node(s) match no TensorRT layer: {', '.join(unmatched)}", err=True)
            typing = "weak"
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
                trt_major=major,
            )
        )
        return

    common = {
        "fp16": fp16,
        "profiles": profiles,
        "workspace_gb": workspace,
        "timing_cache": timing_cache,
        "weak_typing": weak_typing,
        "tf32": not no_tf32,
        "keep_fp32_nodes": keep,
        "fp16_onnx_path": fp16_path,
        "device": device,
        "backend": backend,
    }
    # the spinner names each optimizer phase as it starts
    with spinner(con, "building the TensorRT engine (minutes)", progress) as status:
        results = build_engines(model, outputs, targets=targets, on_build=status.update, **common)
    for r in results:
        p = r.info.precision
        net = p.get("network") or {}
        layers = f", network {net['fp16_layers']} FP16 / {net['fp32_layers']} FP32 layers" if net else ""
        con.print(
            f"wrote {r.plan} ({r.size_bytes / 2**20:.1f} MiB) + {r.sidecar.name} in {r.seconds:.1f} s: "
            f"{r.info.built_with()}, {p['mode']} {p['typing']}ly typed, {len(p['fp32_nodes'])} FP32 island nodes"
            f"{layers}; profiles " + "; ".join(q.describe() for q in profiles),
            soft_wrap=True,
        )
    if targets:
        con.print(
            f"built, not run here: each plan runs with {results[0].info.flavour.label} "
            f"{results[0].info.tensorrt_version} on a GPU of its compute capability "
            "(`dtop-export parity`/`embed` there check it)",
            soft_wrap=True,
        )
