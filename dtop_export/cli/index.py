"""``dtop-export index``: a faiss index over the Parquet shards of ``embed -o FOLDER``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dtop_export.cli.common import (
    ProgressOpt,
    app,
    at_least,
    console,
    output_option,
    progress_bar,
    refuse_existing,
)
from dtop_export.errors import DToPError


@app.command()
def index(
    shards: Annotated[Path, typer.Argument(help="A folder written by `dtop-export embed MODEL SOURCE -o FOLDER`.")],
    output: Annotated[Path, output_option("-o", "--output", help="Index file to write (e.g. corpus.faiss).")],
    kind: Annotated[
        str, typer.Option("--type", help="flat (exact inner product) or ivfpq (compressed, for millions).")
    ] = "flat",
    nlist: Annotated[
        int | None, typer.Option("--nlist", callback=at_least(1), help="IVF cells (default ~4*sqrt(n)).")
    ] = None,
    m: Annotated[
        int | None,
        typer.Option("--m", callback=at_least(1), help="PQ sub-quantisers; must divide N (default N/8, <= 64)."),
    ] = None,
    nbits: Annotated[
        int | None,
        typer.Option("--nbits", callback=at_least(1), help="Bits per PQ code, 1..16 (default 8; fewer below ~10k)."),
    ] = None,
    nprobe: Annotated[
        int | None,
        typer.Option(
            "--nprobe",
            callback=at_least(1),
            help="IVF cells searched per query (default 16; stored, `search` may override).",
        ),
    ] = None,
    train_size: Annotated[
        int | None,
        typer.Option(
            "--train-size",
            callback=at_least(1),
            help="IVF-PQ training sample (default 64 per cell, <= 200k unless --nlist needs more).",
        ),
    ] = None,
    refine: Annotated[
        int | None,
        typer.Option(
            "--refine",
            callback=at_least(0),
            help="IVF-PQ: re-rank REFINE*k candidates with 8-bit vectors (+N bytes/image); 0: off.",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the training sample and k-means.")] = 0,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Overwrite the index and its sidecars; index a folder that fails a check (unfinished, shards missing "
            "or of other settings, not unit norm) as it is, with a note.",
        ),
    ] = False,
    progress: ProgressOpt = True,
) -> None:
    """Index the descriptors of a shard folder (added shard by shard; faiss ids = the shards' keys)."""
    from dtop_export.corpus.index import build_corpus_index, check_index_options, sidecar_paths
    from dtop_export.corpus.integrity import verify_folder

    if output.is_dir():
        raise DToPError(f"{output} is a folder: give -o a file name such as corpus.faiss")
    meta, ids = sidecar_paths(output)
    refuse_existing(output, meta, ids, force=force)
    check_index_options(kind, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, train_size=train_size, refine=refine)
    verified = verify_folder(shards, force)  # refusals come before the progress bar is drawn
    total = verified.n_rows
    if kind == "ivfpq" and total:  # the corpus, then --train-size, before anything is read or trained
        from dtop_export.corpus.index import ivfpq_training

        ivfpq_training(total, verified.settings.descriptor_dim, nlist, m, nbits, train_size)
    con = console()

    def note(text: str) -> None:
        con.print(text, markup=False, soft_wrap=True, highlight=False)

    with progress_bar(con, enabled=progress) as bar:
        # IVF-PQ samples and trains first (1M x 256: ~2.5 min here): a bar of its own, pulsing with its elapsed time
        training = bar.add_task("training (sample, k-means)", total=None) if kind == "ivfpq" else None
        task = bar.add_task(f"indexing ({kind})", total=total)

        def trained() -> None:
            if training is not None:
                bar.update(training, total=1, completed=1)

        info = build_corpus_index(
            shards, output, kind, nlist=nlist, m=m, nbits=nbits, nprobe=nprobe, train_size=train_size, refine=refine,
            seed=seed, force=force, advance=lambda n: bar.advance(task, n), note=note, trained=trained,
        )  # fmt: skip
    params = ", ".join(f"{k}={v}" for k, v in info["params"].items())
    note(
        f"wrote {output} ({info['type']}, {info['ntotal']} x {info['dim']}{', ' + params if params else ''}), "
        f"{meta.name} and {ids.name}"
    )
