"""Benchmark command: ``bench`` (every engine side by side, interleaved, one report)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dtop_export.bench.recommend import LOSSY_MARGIN
from dtop_export.cli.common import (
    ForceOpt,
    ProgressOpt,
    app,
    at_least,
    console,
    output_option,
    progress_bar,
    refuse_existing,
    spinner,
)
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from dtop_export.bench.spec import EngineSpec


@app.command()
def bench(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Models to compare: checkpoint (.pt, PyTorch; :bf16 for the bf16 deployment path, "
            ":bf16,compile=max-autotune to torch.compile it), .onnx (ONNX Runtime; :openvino for OpenVINO), .xml "
            "(OpenVINO IR), .plan (TensorRT). Options after a colon: model.pt:bf16, model.onnx:label=ort,threads=1."
        ),
    ],
    sizes: Annotated[str, typer.Option("--sizes", help="Square image sizes, comma-separated.")] = "224,384,512",
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1",
    threads: Annotated[
        int | None,
        typer.Option("--threads", callback=at_least(1), help="Threads for every engine (default: all cores)."),
    ] = None,
    runs: Annotated[
        int, typer.Option("--runs", callback=at_least(1), help="Timed runs per engine and shape (median reported).")
    ] = 5,
    warmup: Annotated[
        int, typer.Option("--warmup", callback=at_least(0), help="Untimed interleaved rounds before timing.")
    ] = 1,
    derive: Annotated[
        str | None,
        typer.Option(
            "--derive",
            help="Also build and time these from the first checkpoint: bf16 (PyTorch bf16 deployment path), "
            "bf16-compiled (the same, torch.compile max-autotune), onnx (export), optimized (ORT CPU rewrites), "
            "int8 (static quantisation). E.g. --derive bf16,bf16-compiled,onnx,optimized,int8.",
        ),
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option("--calib", help="Calibration images for --derive int8 (default: the embedded calibration set)."),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(
            "--workdir",
            help="Where --derive writes its files (default: a temp folder); --recommend: default next to the "
            "stored choice in the cache, where --precision auto finds them.",
        ),
    ] = None,
    json_out: Annotated[Path | None, output_option("--json", help="Write the full report (raw times) as JSON.")] = None,
    plot: Annotated[Path | None, output_option("--plot", help="Write a PNG: latency vs image size per engine.")] = None,
    markdown: Annotated[Path | None, output_option("--markdown", help="Also write the Markdown tables here.")] = None,
    no_flops: Annotated[bool, typer.Option("--no-flops", help="Skip counting FLOPs (GFLOP/s column).")] = False,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="auto: also time, next to each checkpoint, the path `bench --recommend` chose for it on this CPU "
            "(as MODEL.pt:auto does).",
        ),
    ] = None,
    recommend: Annotated[
        bool,
        typer.Option(
            "--recommend",
            help="From one checkpoint: build, time (largest --sizes, batch 1) and check every CPU path this CPU can "
            f"make pay, pick the fastest within its contract (bf16/fp16/int8 only when at least {LOSSY_MARGIN:g}x as "
            "fast as eager fp32 and as the fastest fp32 path), store it for `--precision auto`. Uses --sizes, "
            "--threads, --runs, --workdir and --json; refuses the other report and timing options.",
        ),
    ] = False,
    progress: ProgressOpt = True,
    force: ForceOpt = False,
) -> None:
    """Benchmark engines side by side: latency p50/p90, images/s, speed-up vs PyTorch eager fp32, GFLOP/s,
    first-call time, peak memory, file size and build time. Interleaved runs, same thread count (--threads) unless a
    spec sets its own (model.onnx:threads=1; its % of peak is then read against a ceiling at those threads)."""
    import tempfile

    from dtop_export.atomic import atomic_write_text
    from dtop_export.bench.harness import bench_steps, run_bench
    from dtop_export.bench.spec import parse_int_list, parse_spec
    from dtop_export.logs import quiet_ort_logs
    from dtop_export.memory import check_image_size
    from dtop_export.pipeline.artefacts import derive_specs

    batch_list = parse_int_list(batch, "--batch")
    if recommend:  # --batch as read: "1,1" and " 1" are the batch 1 it times
        _refuse_unused_by_recommend(batch=set(batch_list) != {1}, warmup=warmup != 1, derive=derive is not None,
                                    plot=plot is not None, markdown=markdown is not None, no_flops=no_flops,
                                    precision=precision is not None)  # fmt: skip
    size_list = parse_int_list(sizes, "--sizes")
    check_image_size(max(size_list), batch=max(batch_list), option="--sizes", batch_option="--batch")
    refuse_existing(json_out, plot, markdown, force=force)
    if recommend:
        _recommend(models, max(size_list), threads, runs, workdir, json_out, progress)
        return
    if precision not in (None, "auto"):
        raise DToPError(f"bench --precision takes only 'auto' (got {precision!r}); other precisions go after a colon, "
                        "e.g. model.pt:bf16")  # fmt: skip
    specs = auto_specs([parse_spec(m) for m in models], add=precision == "auto")
    con = console()
    with quiet_ort_logs():
        if derive:
            ckpt = next((s.path for s in specs if s.kind == "checkpoint"), None)
            if ckpt is None:
                raise DToPError("--derive needs a checkpoint (.pt) among the models")
            calib_paths, source = None, ""
            if calib is not None:
                from dtop_export.preprocess import list_images

                calib_paths, source = list_images(calib), str(calib)
            wd = workdir or Path(tempfile.mkdtemp(prefix="dtop-bench-"))
            kinds = [k.strip() for k in derive.split(",") if k.strip()]
            with spinner(con, "building", progress) as status:
                specs += derive_specs(
                    ckpt,
                    kinds,
                    wd,
                    calib_paths=calib_paths,
                    calib_source=source,
                    on_stage=lambda s: status.update(s),
                )
            con.print(f"built {', '.join(s.path.name for s in specs[len(models) :])} in {wd}", style="dim")
        total = bench_steps(len(specs), len(size_list) * len(batch_list), runs, warmup)
        with progress_bar(con, transient=True, enabled=progress) as prog:
            task = prog.add_task("benchmarking", total=total)
            report = run_bench(
                specs,
                size_list,
                batch_list,
                runs=runs,
                warmup=warmup,
                threads=threads,
                count_flops=not no_flops,
                progress=lambda d, n: prog.update(task, description=d, advance=n),
            )
    text = report.to_markdown()
    typer.echo(text)
    if max(report.load_before[0], report.load_after[0]) > report.machine.get("cores", 1):
        con.print(
            f"warning: load average above the core count ({report.load_before[0]:.2f} before, "
            f"{report.load_after[0]:.2f} after): these timings are contended",
            style="yellow",
        )
    for r in report.engines:
        if r.name == "pytorch" and r.precision == "fp16" and "cuda" not in str(r.options.get("device", "cpu")):
            con.print(
                f"note: {r.label} is an accuracy audit on the CPU (float32 arithmetic on float16 values), "
                "not a deployment path: time fp16 on a GPU (device=cuda, or a TensorRT plan)",
                style="yellow",
                soft_wrap=True,
            )
    if markdown:
        atomic_write_text(markdown, text)
    if json_out:
        report.write_json(json_out)
    if plot:
        report.write_plot(plot)
    written = [str(p) for p in (markdown, json_out, plot) if p]
    if written:
        con.print(f"wrote {', '.join(written)} ({report.seconds:.0f} s)", style="dim")


def auto_specs(specs: list[EngineSpec], add: bool) -> list[EngineSpec]:
    """``MODEL.pt:auto`` becomes the file and options ``bench --recommend`` chose for it on this CPU; with ``add``
    (``--precision auto``) that engine is also put after every plain checkpoint."""
    from dtop_export.bench.recommend import recommended
    from dtop_export.bench.spec import EngineSpec

    out = []
    for s in specs:
        wants = s.options.get("precision") == "auto"
        if not wants:
            out.append(s)
        if s.kind == "checkpoint" and (wants or (add and not s.options)):
            c = recommended(s.path)
            extra = {k: v for k, v in s.options.items() if k != "precision"}
            out.append(EngineSpec(Path(c["path"]), {**c["options"], **extra}, label=s.label or f"auto: {c['label']}"))
        elif wants:
            raise DToPError(f"{s.path.name}:auto: auto starts from the checkpoint (.pt) `bench --recommend` measured")
    return out


def _refuse_unused_by_recommend(**given: bool) -> None:
    """--recommend times batch 1 at the largest --sizes after one warm-up and writes --json only: an option it would
    ignore is refused in one line, before any work (`--recommend --markdown r.md` wrote nothing, exit 0)."""
    unused = [f"--{name.replace('_', '-')}" for name, yes in given.items() if yes]
    if unused:
        them = "it" if len(unused) == 1 else "them"
        raise DToPError(f"--recommend does not use {', '.join(unused)}: leave {them} out (it times batch 1 at the "
                        "largest --sizes after one warm-up, and writes its report with --json)")  # fmt: skip


def _recommend(
    models: list[str],
    size: int,
    threads: int | None,
    runs: int,
    workdir: Path | None,
    json_out: Path | None,
    progress: bool,
) -> None:
    from rich.table import Table

    from dtop_export.bench import recommend as rec_mod
    from dtop_export.bench.spec import parse_spec
    from dtop_export.logs import quiet_ort_logs

    specs = [parse_spec(m) for m in models]
    if len(specs) != 1 or specs[0].kind != "checkpoint" or specs[0].options:
        raise DToPError("--recommend takes one checkpoint (.pt) without options: bench --recommend model.pt")
    ckpt = specs[0].path
    if not ckpt.is_file():
        raise DToPError(f"checkpoint {ckpt} not found")
    con = console()
    with quiet_ort_logs(), spinner(con, "building", progress) as status:
        rec, stored = rec_mod.recommend(ckpt, size, threads, runs, workdir, on_stage=lambda s: status.update(s))
    table = Table(title=f"{ckpt.name} on {rec.cpu} ({', '.join(rec.features) or 'features unknown'}), "
                  f"{rec.threads} threads, {size}², batch 1")  # fmt: skip
    for col in ("candidate", "speed-up vs eager fp32", "cos min", "|ΔmAP| max", "contract", ""):
        table.add_column(col, justify="left" if col in ("candidate", "") else "right")
    for r in rec.rows:
        table.add_row(
            r.label, f"{r.speedup:.2f}×", "—" if r.reference else f"{r.cosine_min:.5f}",
            "—" if r.reference else f"{r.map_delta_max:.2f}", "reference" if r.reference else
            ("PASS" if r.passed else "FAIL"), "<- chosen" if r is rec.choice else "",
        )  # fmt: skip
    con.print(table)
    for label, why in rec.skipped:
        con.print(f"not measured: {label}: {why}", markup=False, soft_wrap=True)
    c = rec.choice
    assert c is not None
    con.print(
        f"recommended: {c.label} ({Path(c.path).name}), {c.speedup:.2f}× eager fp32"
        + ("" if c.reference else f", cos min {c.cosine_min:.5f}, |ΔmAP| <= {c.map_delta_max:.2f}")
        + f"; `--precision auto` runs it on this CPU (stored in {stored}; files in {Path(c.path).parent})",
        markup=False,
        soft_wrap=True,
    )
    if json_out:
        from dtop_export.cli.common import write_json

        write_json(json_out, rec.to_dict())
