"""``dtop-export search``: the nearest corpus images of query images, from an index built by ``index``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from dtop_export.cli.common import (
    BatchOpt,
    JsonOpt,
    app,
    at_least,
    check_report_files,
    console,
    output_option,
    refuse_existing,
    write_json,
    written_together,
)
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    from PIL import Image

    from dtop_export.corpus.index import Hit


@app.command()
def search(
    index_file: Annotated[Path, typer.Argument(help="An index written by `dtop-export index` (e.g. corpus.faiss).")],
    model: Annotated[str, typer.Argument(help="The model the corpus was embedded with (any of its exported files).")],
    queries: Annotated[list[Path], typer.Argument(help="Query image files or folders.")],
    k: Annotated[int, typer.Option("-k", callback=at_least(1), help="Results per query.")] = 10,
    nprobe: Annotated[
        int | None, typer.Option("--nprobe", callback=at_least(1), help="IVF cells searched (default: the index's).")
    ] = None,
    refine: Annotated[
        int | None,
        typer.Option("--refine", callback=at_least(1), help="Re-rank REFINE*k candidates (index built with --refine)."),
    ] = None,
    batch_size: BatchOpt = 1,
    threads: Annotated[
        int | None, typer.Option("--threads", callback=at_least(1), help="CPU threads for embedding the queries.")
    ] = None,
    json_out: JsonOpt = None,
    picture: Annotated[
        Path | None, output_option("--picture", help="Write a PNG: each query and its top results (at most 8).")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Overwrite --json/--picture; search with a model of another checkpoint than the corpus's.",
        ),
    ] = False,
) -> None:
    """Embed QUERIES with MODEL (the corpus's image size and scales) and print their top-k corpus images."""
    from rich.table import Table

    from dtop_export.corpus.index import CorpusIndex
    from dtop_export.corpus.runtime import open_model
    from dtop_export.identity import check_model_for_corpus
    from dtop_export.preprocess import IMAGE_SUFFIXES, expand_images
    from dtop_export.retrieval.extract import extract

    check_report_files(json_out, picture)
    refuse_existing(json_out, picture, force=force)
    idx = CorpusIndex(index_file)
    if nprobe is not None and idx.info["type"] == "flat":  # as `index` says of IVF-PQ options for a flat index
        typer.echo(f"note: {idx.path} is a flat index (exact): --nprobe (IVF-PQ indexes) ignored", err=True)
    paths = expand_images(queries)
    if not paths:
        raise DToPError(f"no query images in {', '.join(map(str, queries))} (folders are searched for "
                        f"{', '.join(IMAGE_SUFFIXES)})")  # fmt: skip
    corpus = idx.info["corpus"]
    con = console()
    warning = check_model_for_corpus(model, corpus, f"index {idx.path}", force)
    if warning:  # on stderr, as evaluate's and the --nprobe note: stdout holds the results
        typer.echo(warning, err=True)
    with open_model(model, threads) as engine:
        if engine.descriptor_dim != idx.dim:
            raise DToPError(f"{model} gives {engine.descriptor_dim}-d descriptors; the index holds {idx.dim}-d ones")
        desc = extract(
            engine, paths, None, tuple(corpus["scales"]), None, False, image_size=int(corpus["image_size"]),
            batch_size=batch_size,
        )  # fmt: skip
    results = idx.search(desc, k, nprobe, refine)
    for path, hits in zip(paths, results):
        table = Table(title=f"{path}: top {len(hits)}")
        for col in ("rank", "score", "id", "path"):
            table.add_column(col, justify="right" if col in ("rank", "score") else "left")
        for h in hits:
            table.add_row(str(h.rank), f"{h.score:.4f}", h.id, h.path)
        con.print(table)
    with written_together(json_out, picture) as tmp:  # the picture first: an error leaves neither behind
        if picture is not None:
            _draw(paths, results, tmp[picture])
        if json_out is not None:
            write_json(
                tmp[json_out],
                {
                    "index": str(index_file),
                    "model": model,
                    "k": k,
                    "queries": [
                        {"query": str(p), "results": [h.__dict__ for h in hits]} for p, hits in zip(paths, results)
                    ],
                },
            )
    for path in tmp:
        con.print(f"wrote {path}", markup=False)


def _draw(paths: list[Path], results: list[list[Hit]], output: Path) -> None:
    """The --picture: each query and its top results (at most 8); a result image that cannot be read now (moved,
    deleted, unreachable since it was embedded) is a grey tile, with a warning line naming it."""
    from dtop_export.corpus.source import load_item
    from dtop_export.preprocess import load_image
    from dtop_export.retrieval.visualize import placeholder, retrieval_grid

    def tile(path: str) -> Image.Image:
        try:
            return load_item(path)
        except DToPError as e:
            typer.echo(f"warning: --picture: {e}: drawn as a grey tile", err=True)
            return placeholder("cannot read\nthis image")

    top = [hits[:8] for hits in results]
    retrieval_grid(
        [load_image(p) for p in paths],
        [[tile(h.path) for h in hits] for hits in top],
        [["result"] * len(hits) for hits in top],
        output,
        captions=[p.name for p in paths],
        result_captions=[[f"#{h.rank} {h.score:.3f}" for h in hits] for hits in top],
        legend="blue: query   grey: results, best first (score = cosine similarity)",
    )
