"""``dtop-export serve``: the online embedding + search service (Ray Serve) until SIGTERM/Ctrl-C."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import ImageSizeOpt, ScalesOpt, app, console
from dtop_export.errors import DToPError


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="A checkpoint (.pt), .onnx, OpenVINO .xml or TensorRT .plan; FILE:openvino runs an .onnx in "
            "OpenVINO (options as in `bench`)."
        ),
    ],
    index: Annotated[
        Path | None,
        typer.Option("--index", help="An index from `dtop-export index` for POST /v1/search (its image size, scales)."),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Interface to listen on; 0.0.0.0 exposes the service to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="HTTP port.")] = 8000,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster to join (HOST:PORT, or auto: $RAY_ADDRESS, else the last `ray start` here; an "
            "explicit address with token auth needs RAY_AUTH_MODE=token); default: a local one.",
        ),
    ] = None,
    replicas: Annotated[
        str,
        typer.Option(
            "--replicas",
            help="Model replicas (one engine each), or auto: --min..--max, a replica per --max-batch-size requests "
            "in flight.",
        ),
    ] = "1",
    min_replicas: Annotated[int, typer.Option("--min", help="Fewest replicas with --replicas auto.")] = 1,
    max_replicas: Annotated[int, typer.Option("--max", help="Most replicas with --replicas auto.")] = 4,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", help="Images per forward pass, at most.")] = 8,
    batch_wait_ms: Annotated[
        float, typer.Option("--batch-wait-ms", help="How long a request waits for others to share its forward pass.")
    ] = 5.0,
    max_queue: Annotated[
        int, typer.Option("--max-queue", help="Requests waiting for a replica; past it: 503 + Retry-After.")
    ] = 64,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            help="Seconds a request may take from its arrival, its upload included: an upload not received by then "
            "gets 408, an answer not ready 504.",
        ),
    ] = 30.0,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest request body (MiB).")] = 20.0,
    max_uploads: Annotated[
        int,
        typer.Option(
            "--max-uploads",
            help="Request bodies received at once; past it: 503 + Retry-After. A request uploads before it takes "
            "a place in the model's queue, so slow clients hold these, not the queue's places.",
        ),
    ] = 64,
    decode_threads: Annotated[
        int,
        typer.Option(
            "--decode-threads",
            help="Images the ingress decodes at once (0: 4); raise it when GPU replicas wait for "
            "decoding. Each may hold one decode budget of memory (12 bytes a pixel of --max-pixels).",
        ),
    ] = 0,
    max_images: Annotated[int, typer.Option("--max-images", help="Images per multipart request.")] = 16,
    max_pixels: Annotated[
        float,
        typer.Option(
            "--max-pixels",
            help="Largest image, in megapixels (decompression bombs are refused); also sets the memory one image "
            "may take to decode (12 bytes a pixel).",
        ),
    ] = 40.0,
    max_k: Annotated[int, typer.Option("--max-k", help="Largest k a search may ask for.")] = 100,
    precision: Annotated[
        str | None,
        typer.Option("--precision", help="As `embed --precision` (auto: what `bench --recommend MODEL.pt` chose)."),
    ] = None,
    threads: Annotated[int | None, typer.Option("--threads", help="CPU threads per replica (default 1).")] = None,
    gpus_per_replica: Annotated[float, typer.Option("--gpus-per-replica", help="GPUs reserved per replica.")] = 0.0,
    image_size: ImageSizeOpt = None,
    scales: ScalesOpt = "1",
    force: Annotated[
        bool, typer.Option("--force", help="Serve --index with a model of another checkpoint than the corpus's.")
    ] = False,
) -> None:
    """Serve MODEL over HTTP: POST /v1/embed, /v1/search (with --index); GET /v1/model, /healthz, /readyz, /metrics.

    Binds 127.0.0.1 unless --host says otherwise; a local Ray cluster (loopback only, token auth) unless --address.
    """
    from dtop_export.retrieval.extract import parse_scales
    from dtop_export.serve.limits import Limits
    from dtop_export.serve.run import ServeOptions, run_service

    if replicas != "auto" and not replicas.isdigit():
        raise DToPError(f"--replicas must be a number or auto, got {replicas!r}")
    if index is not None and scales != "1":
        raise DToPError("--scales comes from the index's corpus with --index: leave it out")
    if not (math.isfinite(max_pixels) and max_pixels * 1e6 >= 1):
        raise DToPError(f"--max-pixels must be a positive, finite number of megapixels, got {max_pixels}")
    limits = Limits(
        max_upload_mb=max_upload_mb, max_images=max_images, max_pixels=int(max_pixels * 1e6), max_k=max_k,
        max_queue=max_queue, request_timeout_s=request_timeout, max_uploads=max_uploads, decode_threads=decode_threads,
    )  # fmt: skip
    opts = ServeOptions(
        model=model, index=index, host=host, port=port, address=address,
        replicas="auto" if replicas == "auto" else int(replicas), min_replicas=min_replicas,
        max_replicas=max_replicas, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, precision=precision,
        threads=threads, gpus_per_replica=gpus_per_replica, image_size=image_size, scales=parse_scales(scales),
        limits=limits, force=force,
    )  # fmt: skip
    con = console()
    run_service(opts, lambda text: con.print(text, markup=False, soft_wrap=True))
