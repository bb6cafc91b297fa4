"""``dtop-export index``: a faiss index over the Parquet shards of ``embed -o FOLDER``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import ForceOpt, ProgressOpt, app, console, output_option, progress_bar
from dtop_export.errors import DToPError


@app.command()
def index(
    shards: Annotated[Path, typer.Argument(help="A folder written by `dtop-export embed MODEL SOURCE -o FOLDER`.")],
    output: Annotated[Path, output_option("-o", "--output", help="Index file to write (e.g. corpus.faiss).")],
    kind: Annotated[
        str, typer.Option("--type", help="flat (exact inner product) or ivfpq (compressed, for millions).")
    ] = "flat",
    nlist: Annotated[int | None, typer.Option("--nlist", help="IVF cells (default ~4*sqrt(n)).")] = None,
    m: Annotated[int | None, typer.Option("--m", help="PQ sub-quantisers; must divide N (default N/8, <= 64).")] = None,
    nbits: Annotated[
        int | None, typer.Option("--nbits", help="Bits per PQ code (default 8; fewer below ~10k).")
    ] = None,
    nprobe: Annotated[
        int, typer.Option("--nprobe", help="IVF cells searched per query (stored; `search` may override).")
    ] = 16,
    train_size: Annotated[
        int | None, typer.Option("--train-size", help="IVF-PQ training sample (default 64 per cell, <= 200k).")
    ] = None,
    refine: Annotated[
        int,
        typer.Option(
            "--refine", help="IVF-PQ: re-rank REFINE*k candidates with 8-bit vectors (+N bytes/image); 0: off."
        ),
    ] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the training sample and k-means.")] = 0,
    force: ForceOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Index the descriptors of a shard folder (added shard by shard; faiss ids = the shards' keys)."""
    from dtop_export.corpus.index import build_corpus_index, sidecar_paths
    from dtop_export.corpus.shards import read_manifest, shard_files

    if output.exists() and not force:
        raise DToPError(f"{output} exists: pass --force to overwrite it")
    if output.is_dir():
        raise DToPError(f"{output} is a folder: give -o a file name such as corpus.faiss")
    shard_files(shards)  # a folder without shards is an error before the progress bar is drawn
    manifest = read_manifest(shards)
    total = int((manifest or {}).get("counts", {}).get("embedded", 0)) or None
    con = console()
    with progress_bar(con) as bar:
        task = bar.add_task(f"indexing ({kind})", total=total, visible=progress)
        info = build_corpus_index(
            shards, output, kind, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, train_size=train_size, refine=refine,
            seed=seed,
            advance=lambda n: bar.advance(task, n),
        )  # fmt: skip
    meta, ids = sidecar_paths(output)
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items())
    con.print(
        f"wrote {output} ({info['type']}, {info['ntotal']} x {info['dim']}{', ' + params if params else ''}), "
        f"{meta.name} and {ids.name}",
        markup=False,
        soft_wrap=True,
    )
