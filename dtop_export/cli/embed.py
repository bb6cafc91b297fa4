"""``dtop-export embed``: descriptors of image files (``.npy`` + ``.json`` sidecar) or of a corpus (Parquet shards,
in-process or on Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dtop_export.cli.common import (
    BatchOpt,
    ImageSizeOpt,
    JsonOpt,
    ProgressOpt,
    ScalesOpt,
    above,
    app,
    at_least,
    console,
    option_name,
    output_file,
    refuse_existing,
    write_json,
)
from dtop_export.errors import DToPError
from dtop_export.preprocess import DecodeBudget

if TYPE_CHECKING:
    from dtop_export.corpus.embed import CorpusJob


# The decode budget (preprocess.DecodeBudget), the same flags as the C++ client's dtop-embed.
MaxPixelsOpt = Annotated[
    int,
    typer.Option("--max-pixels", callback=at_least(1), help="Refuse images of more pixels (Pillow's own limit)."),
]
MaxDecodeMbOpt = Annotated[
    int,
    typer.Option(
        "--max-decode-mb",
        callback=at_least(1),
        help="Refuse images whose decoding needs more MiB (the file, RGB and a rotated copy, the decoder's "
        "buffers), checked from the header.",
    ),
]
MaxScansOpt = Annotated[
    int, typer.Option("--max-scans", callback=at_least(1), help="Refuse JPEGs of more scans (progressive JPEGs).")
]
# -o X with one of these suffixes is a mistyped file name, not a shard folder (a folder may be named corpus.v2)
FILE_SUFFIXES = (".npz", ".json", ".parquet", ".csv", ".txt", ".pkl", ".h5", ".faiss", ".pt", ".onnx", ".xml", ".bin")


def _npy_output(param: typer.CallbackParam, value: Path) -> Path:
    """``-o X.npy`` is a file in an existing folder (:func:`output_file`); a shard folder is created as needed, and
    any other name is one, except names with a file suffix (:data:`FILE_SUFFIXES`), which are refused."""
    if value.suffix.lower() == ".npy":
        return output_file(param, value)
    if value.suffix.lower() in FILE_SUFFIXES and not value.is_dir():
        raise DToPError(f"output {value} should end in .npy (one matrix) or name a folder (shards)")
    if value.exists() and not value.is_dir():
        raise DToPError(f"output {value} exists and is not a folder: give -o a folder (shards) or an .npy file")
    return value


# options of one mode, refused in another (given on the command line, not their defaults): Ray's placement without
# --ray; the in-process decode pool with --ray (Ray's read tasks decode); shard and pool options with -o X.npy
RAY_ONLY = ("address", "actors", "gpus_per_actor", "cpus_per_actor")
IN_PROCESS_ONLY = ("workers", "decode_pool")
FOLDER_ONLY = ("shard_size", "workers", "decode_pool", "retry_skipped")


def _refuse_other_mode(ctx: typer.Context, npy: bool, use_ray: bool) -> None:
    """One line for the first option the user gave that the chosen mode would ignore."""
    params = {p.name: p for p in ctx.command.params}

    def given(names: tuple[str, ...]) -> list[str]:  # by name: typer's click is its own copy (typer._click)
        sources = [ctx.get_parameter_source(n) for n in names]
        return [
            option_name(params[n]) for n, s in zip(names, sources) if s and s.name in ("COMMANDLINE", "ENVIRONMENT")
        ]

    if not use_ray and (flags := given(RAY_ONLY)):
        raise DToPError(f"{flags[0]} needs --ray (it places the Ray job): add --ray, or leave {flags[0]} out")
    if npy and (flags := given(FOLDER_ONLY)):
        raise DToPError(f"{flags[0]} is for folder output (Parquet shards): give -o a folder, or leave {flags[0]} out")
    if use_ray and (flags := given(IN_PROCESS_ONLY)):
        raise DToPError(f"{flags[0]} is for the in-process run (Ray's read tasks decode): leave it out with --ray")


def _folder_file(name: str) -> bool:
    """Whether ``name`` is one of the files a folder job keeps in its folder: the manifest, the lock, a shard (any
    ``shard-*`` name)."""
    from dtop_export.corpus.lock import LOCK_NAME
    from dtop_export.corpus.shards import MANIFEST

    return name in (MANIFEST, LOCK_NAME) or name.startswith("shard-")


@app.command()
def embed(
    ctx: typer.Context,
    model: Annotated[
        str,
        typer.Argument(
            help="A checkpoint (.pt), .onnx, OpenVINO .xml or TensorRT .plan; FILE:openvino runs an .onnx "
            "in OpenVINO (options as in `bench`)."
        ),
    ],  # fmt: skip
    images: Annotated[
        list[str],
        typer.Argument(
            help="Image files or folders (searched recursively); with -o FOLDER one SOURCE: a folder, a text file "
            "of paths, or a Parquet/CSV table with a path (and id) column, local or a pyarrow.fs URI (s3://...)."
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o",
            "--output",
            callback=_npy_output,
            help="X.npy: one descriptor matrix; a folder: resumable Parquet shards + manifest.json.",
        ),
    ],
    batch_size: BatchOpt = 1,
    scales: ScalesOpt = "1",
    image_size: ImageSizeOpt = None,
    progress: ProgressOpt = True,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            callback=at_least(1),
            help="CPU threads (PyTorch, ONNX Runtime or OpenVINO), per actor with --ray.",
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision",
            help="fp32, bf16, fp16 or int8 for a .pt or OpenVINO model (= MODEL:PRECISION); auto: what "
            "`bench --recommend MODEL.pt` chose on this CPU.",
        ),
    ] = None,
    shard_size: Annotated[
        int, typer.Option("--shard-size", callback=at_least(1), help="Images per Parquet shard (folder output).")
    ] = 1000,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Overwrite X.npy, X.json and --json; folder output: delete the folder's shards and manifest and "
            "start over (without it a re-run resumes; the --json summary of a folder job is always replaced).",
        ),
    ] = False,
    use_ray: Annotated[bool, typer.Option("--ray", help="Run the folder job as a Ray Data pipeline.")] = False,
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster to join (e.g. auto, ray://host:10001); default: local.")
    ] = None,
    actors: Annotated[
        int, typer.Option("--actors", callback=at_least(1), help="Inference actors (one engine each) with --ray.")
    ] = 1,
    gpus_per_actor: Annotated[
        float, typer.Option("--gpus-per-actor", callback=at_least(0), help="GPUs reserved per actor.")
    ] = 0.0,
    cpus_per_actor: Annotated[
        float | None,
        typer.Option(
            "--cpus-per-actor",
            callback=above(0),
            help="Logical CPUs per actor (default: the cluster's, less 1 for decoding).",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            callback=at_least(1),
            help="Folder output in-process: decode workers, decoding while the engine runs (default: every core).",
        ),
    ] = None,
    decode_pool: Annotated[
        str,
        typer.Option(
            "--decode-pool",
            help="Folder output in-process: thread (Pillow releases the GIL; no pickling), process (no GIL at all) "
            "or auto (default: processes for a CUDA engine, threads on a CPU).",
        ),
    ] = "auto",
    gpu_decode: Annotated[
        bool,
        typer.Option(
            "--gpu-decode",
            help="Folder output, in-process, MODEL.pt:device=cuda: decode baseline JPEGs on the GPU (nvJPEG) and "
            "resize there; its own parity contract (cos >= 0.9999 vs the CPU decoder). Off by default.",
        ),
    ] = False,
    max_pixels: MaxPixelsOpt = DecodeBudget.max_pixels,
    max_decode_mb: MaxDecodeMbOpt = DecodeBudget.max_decode_mb,
    max_scans: MaxScansOpt = DecodeBudget.max_scans,
    json_out: JsonOpt = None,
    retry_skipped: Annotated[
        bool,
        typer.Option(
            "--retry-skipped",
            help="Folder output: embed again the images earlier runs skipped (over the decode budget, read errors); "
            "their shards are rewritten, the rest reused.",
        ),
    ] = False,
) -> None:
    """Descriptors of images: OUTPUT.npy (n x N float32) + OUTPUT.json, or a folder of Parquet shards.

    Unreadable images, and images over the decode budget (--max-pixels, --max-decode-mb, --max-scans), are
    reported and skipped. Folder output is resumable: re-running the same command writes only the shards that
    are missing; --retry-skipped also embeds again the images they skipped (after raising a limit, say).
    """
    from dtop_export.retrieval.extract import parse_scales

    sc = parse_scales(scales)
    budget = DecodeBudget(max_pixels, max_decode_mb, max_scans)
    npy = output.suffix.lower() == ".npy"
    _refuse_other_mode(ctx, npy, use_ray)
    if npy:
        if use_ray or gpu_decode:
            flag = "--ray" if use_ray else "--gpu-decode"
            raise DToPError(f"{flag} is for folder output (Parquet shards): give -o a folder (e.g. -o embeddings/)")
        sidecar = output.with_suffix(".json")
        if json_out is not None and json_out.resolve() in (output.resolve(), sidecar.resolve()):
            raise DToPError(f"--json {json_out} is the matrix or its sidecar: give the run summary another file name")
        refuse_existing(output, sidecar, json_out, force=force)
        _embed_npy(model, images, output, batch_size, sc, image_size, progress, threads, precision, budget, json_out)
        return
    # a folder job's --json is the summary of its latest run, as the manifest: replaced (atomically) without --force,
    # so that the same command line resumes an interrupted job
    if len(images) != 1:
        raise DToPError(f"folder output embeds one SOURCE (a folder, list or table), got {len(images)}")
    if json_out is not None and json_out.resolve().parent == output.resolve() and _folder_file(json_out.name):
        raise DToPError(f"--json {json_out} is one of the folder's own files: give the run summary another file name")
    from dtop_export.corpus.embed import CorpusJob

    job = CorpusJob(
        model=model, source=images[0], output=output, batch_size=batch_size, scales=sc, image_size=image_size,
        threads=threads, precision=precision, shard_size=shard_size, force=force, progress=progress,
        use_ray=use_ray, address=address, actors=actors, gpus_per_actor=gpus_per_actor, cpus_per_actor=cpus_per_actor,
        decode=budget, workers=workers, decode_pool=decode_pool, gpu_decode=gpu_decode, retry_skipped=retry_skipped,
    )  # fmt: skip
    _embed_shards(job, json_out)


def _embed_shards(job: CorpusJob, json_out: Path | None) -> None:
    from rich.table import Table

    from dtop_export.corpus.embed import embed_corpus

    con = console()
    summary = embed_corpus(job, log=lambda text: con.print(text, markup=False, soft_wrap=True))
    table = Table(title=f"embedded {job.source} -> {job.output} ({summary.mode})", show_header=False)
    table.add_column("", style="cyan")
    table.add_column("", justify="right")
    rows = {
        "images": summary.images, "embedded": summary.embedded, "skipped": summary.skipped,
        "processed in this run": summary.processed, "shards written": summary.shards_written,
        "shards reused": summary.shards_reused, "wall time s": f"{summary.wall_s:.1f}",
        "images/s": f"{summary.images_per_s:.2f}",
    }  # fmt: skip
    if summary.first_result_s is not None:
        rows["start-up s (to the first result)"] = f"{summary.first_result_s:.1f}"
    if summary.steady_images_per_s is not None:
        rows["images/s after start-up"] = f"{summary.steady_images_per_s:.2f}"
    if summary.startup:
        rows["fixed costs s"] = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f}"
                                          for k, v in summary.startup.items())  # fmt: skip
    if summary.feed:
        f = summary.feed
        rows["decode workers"] = f"{f['workers']} {f['pool']}(s), {f['batches']} batches of <= {job.batch_size}"
    for name, value in rows.items():
        table.add_row(name, str(value))
    con.print(table)
    if summary.actors:
        per = Table(title="per actor (images/s while embedding)")
        for col in ("actor", "images", "busy s", "images/s", "start-up s"):
            per.add_column(col, justify="right" if col != "actor" else "left")
        for a in summary.actors:
            per.add_row(a.name, str(a.images), f"{a.busy_s:.1f}", f"{a.images_per_s:.2f}", f"{a.startup_s:.1f}")
        con.print(per)
    if summary.skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in summary.skip_reasons.items())
        retry = any(why.startswith("over ") or why in ("read error", "not found") for why in summary.skip_reasons)
        hint = "; to embed them, raise the limit or fix the files and re-run with --retry-skipped" if retry else ""
        con.print(f"skipped {summary.skipped} image(s) ({reasons}): listed in {job.output / 'manifest.json'}{hint}",
                  markup=False, soft_wrap=True)  # fmt: skip
    if json_out:
        write_json(json_out, summary.to_dict())


def _embed_npy(
    model: str,
    images: list[str],
    output: Path,
    batch_size: int,
    sc: tuple[float, ...],
    image_size: int | None,
    progress: bool,
    threads: int | None,
    precision: str | None,
    budget: DecodeBudget,
    json_out: Path | None = None,
) -> None:
    import time

    import numpy as np

    from dtop_export.atomic import atomic_paths
    from dtop_export.bench.spec import parse_spec
    from dtop_export.corpus.runtime import open_model
    from dtop_export.corpus.shards import file_sha256
    from dtop_export.identity import checkpoint_of
    from dtop_export.memory import check_image_size
    from dtop_export.preprocess import IMAGE_SUFFIXES, expand_images, load_image
    from dtop_export.retrieval.datasets import NPY_FORMAT
    from dtop_export.retrieval.extract import extract

    t0 = time.perf_counter()
    if not any(Path(i).exists() for i in images):
        raise DToPError(f"{Path(images[0])} not found: give image files or folders of images")
    paths = expand_images([Path(i) for i in images])
    if not paths:
        raise DToPError("no images given (folders are searched for " + ", ".join(IMAGE_SUFFIXES) + ")")
    engine = open_model(model, threads, precision)
    errors: list[tuple[int, str]] = []
    with engine:
        size = image_size or engine.preprocess.size
        check_image_size(size, sc, batch_size, engine.preprocess.stride)
        desc = extract(
            engine, paths, None, sc, None, progress, image_size=size, batch_size=batch_size, errors=errors,
            description="embedding", load=lambda p: load_image(p, budget=budget),
        )  # fmt: skip
    wall = time.perf_counter() - t0
    for _, msg in errors:
        typer.echo(f"skipped: {msg}", err=True)
    skipped = {i for i, _ in errors}
    kept = [str(p) for i, p in enumerate(paths) if i not in skipped]
    if not kept:
        raise DToPError(f"none of the {len(paths)} images could be read")
    sidecar = output.with_suffix(".json")
    info = {
        "format": NPY_FORMAT,
        "model": str(model),
        "model_sha256": file_sha256(parse_spec(model).path),  # hashed before any file goes into place
        "checkpoint_sha256": checkpoint_of(model) or "",
        "engine": engine.describe(),
        "descriptor_dim": int(desc.shape[1]),
        "image_size": size,
        "scales": list(sc),
        "images": kept,
        "skipped": [{"path": str(paths[i]), "error": msg} for i, msg in errors],
    }
    # the run summary, as a folder job's (CorpusSummary.to_dict) where its fields apply
    summary = {
        "mode": "local",
        "images": len(paths),
        "processed": len(paths),
        "embedded": len(kept),
        "skipped": len(errors),
        "wall_s": wall,
        "images_per_s": round(len(paths) / wall, 3) if wall > 0 else 0.0,
    }
    files = [output, sidecar] + ([json_out] if json_out else [])
    with atomic_paths(files) as tmps:  # the matrix, its sidecar and --json: all in place, or none
        with open(tmps[0], "wb") as fh:
            np.save(fh, desc)
        for tmp, payload in zip(tmps[1:], (info, summary)):
            tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    typer.echo(
        f"wrote {output} ({desc.shape[0]} x {desc.shape[1]} float32) and {sidecar}"
        + (f" and {json_out}" if json_out else "")
        + (f"; skipped {len(errors)} unreadable image(s)" if errors else "")
    )
