"""``dtop-export check``: CPU-side checks of an ONNX file (TensorRT parser lint, FP16 audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import (
    ForceOpt,
    KeepFp32Opt,
    ProgressOpt,
    app,
    at_least,
    console,
    output_option,
    parse_keep_fp32,
    refuse_existing,
)
from dtop_export.errors import DToPError


def _share(param: typer.CallbackParam, value: float) -> float:
    """``--underflow``: a share of values, 0 <= share < 1 (1 or more would flag nothing, a negative one everything)."""
    at_least(0)(param, value)
    if not value < 1:
        raise DToPError(f"--underflow must be < 1 (a share of the values), got {value:g}")
    return value


@app.command()
def check(
    model: Annotated[Path, typer.Argument(help="An ONNX file, or an ExecuTorch program (.pte).")],
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
        int | None,
        typer.Option("--limit", callback=at_least(1), help="Audit at most this many images (plain folders)."),
    ] = None,
    underflow: Annotated[
        float,
        typer.Option(
            "--underflow",
            callback=_share,
            help="Flag tensors with more than this share (0 <= share < 1) of non-zero values flushed to 0.",
        ),
    ] = 0.01,
    keep_fp32: KeepFp32Opt = None,
    no_crop: Annotated[bool, typer.Option("--no-crop", help="Whole query images, not their boxes.")] = False,
    json_out: Annotated[Path | None, output_option("--json", help="Also write the report as JSON.")] = None,
    progress: ProgressOpt = True,
    force: ForceOpt = False,
) -> None:
    """Check an ONNX file on the CPU: `--target tensorrt` parses it with TensorRT's real ONNX parser where one can
    run (TensorRT-RTX needs no GPU) and lints it with dtop-export's rules (exit 1 when something would fail to
    parse); `--fp16-audit` emulates FP16 (exit 1 when the FP16 contract fails). A .pte: its contract, what runs
    outside XNNPACK, and one forward pass (exit 1 when it breaks the contract)."""
    refuse_existing(json_out, force=force)
    if model.suffix.lower() == ".pte":
        if target is not None or fp16_audit:
            raise DToPError("--target and --fp16-audit check ONNX files: `check model.pte` takes no options")
        _check_pte(model, json_out)
        return
    if target is None and not fp16_audit:
        target = "tensorrt"
    if target is not None and target != "tensorrt":
        raise DToPError(f"unknown --target {target!r}: only tensorrt")
    if not model.is_file():
        raise DToPError(f"ONNX file {model} not found")
    if fp16_audit and image_size is not None:
        from dtop_export.memory import check_image_size

        check_image_size(image_size)
    con = console()
    report: dict[str, object] = {"model": str(model)}
    failed = False
    if target == "tensorrt":
        from dtop_export.engines.tensorrt.lint import lint_tensorrt, real_parser_issues

        run = real_parser_issues(model)  # the real parser where a flavour can run here
        ours = lint_tensorrt(model)  # the project's rules: the fallback, and a second opinion
        issues = [*run.issues, *ours]
        report["tensorrt"] = [i.__dict__ for i in issues]
        report["tensorrt_parser"] = {"parser": run.parser or None, "skipped": run.skipped}
        errors = [i for i in issues if i.severity == "error"]
        for i in run.issues:  # the real parser's findings, one line each
            con.print(f"{i.source}: {i.line()}", style="red", soft_wrap=True, markup=False, highlight=False)
        if ours:
            from rich.table import Table

            table = Table(title=f"TensorRT ONNX parser lint (dtop-export's rules): {model.name}", show_lines=False)
            for col in ("severity", "node", "op", "problem", "fix"):
                table.add_column(col, overflow="fold")
            for i in ours:
                table.add_row(i.severity, i.node, i.op, i.problem, i.fix, style="red" if i.severity == "error" else "")
            con.print(table)
        if run.parser:
            verdict = f"{run.parser}: {len(run.issues)} error(s)" if run.issues else f"{run.parser}: parsed"
        else:
            verdict = "no TensorRT parser could run here (" + "; ".join(run.skipped) + "): the lint alone"
        con.print(verdict, soft_wrap=True, markup=False, highlight=False)
        if errors:
            nodes = {i.node or i.problem for i in errors}
            by = f"parser {sum(i.source != 'lint' for i in errors)}, lint {sum(i.source == 'lint' for i in errors)}"
            con.print(f"{len(nodes)} node(s) would make TensorRT's ONNX parser fail ({by})", style="bold red")
            failed = True
        else:
            warn = sum(1 for i in issues if i.severity == "warning")
            con.print(f"ok: {model.name} should parse on TensorRT 10.x and 11.x ({warn} warning(s))")
    if fp16_audit:
        from dtop_export.fp16.audit import fp16_audit as run_audit

        result = run_audit(
            model,
            images,
            image_size=image_size,
            keep_fp32_nodes=parse_keep_fp32(keep_fp32),
            underflow_threshold=underflow,
            crop_queries=not no_crop,
            limit=limit,
            progress=progress,
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
        map_term = ", |ΔmAP| <= 0.2" if result.map_evaluated else ""  # plain images: no queries, no mAP
        if result.passed:
            ties = result.final.near_ties()
            con.print(
                f"FP16 contract met (cosine >= 0.999{map_term}"
                + (f" or every flip a near-tie): near-ties: {'; '.join(ties)}" if ties else ")")
            )
        else:
            con.print(f"FP16 contract NOT met (cosine >= 0.999, finite{map_term})", style="bold red")
            failed = True
    if json_out is not None:
        from dtop_export.atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(report, indent=2, default=str, allow_nan=False) + "\n")
    if failed:
        raise typer.Exit(code=1)


def _check_pte(model: Path, json_out: Path | None) -> None:
    from dtop_export.edge.pte import check_program

    report = check_program(model)
    con = console()
    meta = report["metadata"]
    delegation = report["delegation"] or {}
    outside = delegation.get("outside") or {}
    et = report["executorch"]
    con.print(
        f"{model.name}: {report['precision']} ExecuTorch program, input {report['input']} (resize "
        f"{meta.get('resize_policy', {}).get('policy')} {meta.get('resize_policy', {}).get('size')}), descriptor "
        f"{meta.get('descriptor_dim')}-d, {report['size_mb']} MiB",
        highlight=False,
        soft_wrap=True,
    )
    con.print(
        f"XNNPACK: {delegation.get('partitions', '?')} partition(s); outside the delegate: "
        + (", ".join(f"{k} x{v}" for k, v in outside.items()) or "nothing"),
        highlight=False,
        soft_wrap=True,
    )
    if not et["same"]:
        con.print(f"made with executorch {et['made_with']}, running on {et['running']}", style="yellow")
    fwd = report["forward"]
    con.print(f"forward pass: loaded in {fwd['load_s']:.2f} s, ran in {fwd['run_s']:.3f} s, norm {fwd['norm']:.6f}")
    if json_out is not None:
        from dtop_export.atomic import atomic_write_text

        atomic_write_text(json_out, json.dumps(report, indent=2, default=str) + "\n")
    if not report["passed"]:
        con.print("FAIL: " + "; ".join(report["problems"]), style="bold red")
        raise typer.Exit(code=1)
    con.print("ok: the program keeps its contract")
