"""Which checkpoint a model file comes from, and whether it may query descriptors embedded by another file.

A file's hash cannot decide it (every re-export, FP16 or INT8 variant, OpenVINO IR or TensorRT plan of the same
checkpoint is another file with comparable descriptors, within its precision's contract), but the checkpoint's
sha256 that every export writes into the model's metadata (``dtop.checkpoint_sha256``; a checkpoint is its own
identity) can: a model of another checkpoint gives descriptors in another space, and its scores against the corpus
(~0.04 for random weights) look like results but mean nothing. :func:`check_model_for_corpus` is the one check
``search``, ``evaluate --distractors`` and ``serve --index`` make; :func:`check_exported_from` the one ``parity``
makes, with :func:`reference_whitening` (an export made with ``--no-whiten`` is compared with its checkpoint run
without whitening). Imports onnx/openvino inside the functions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dtop_export.errors import DToPError

KEY = "dtop.checkpoint_sha256"


def _path(model: str | Path) -> Path | None:
    """The file of MODEL (``FILE[:options]``), or None when it does not exist."""
    from dtop_export.bench.spec import parse_spec

    try:
        path = parse_spec(str(model)).path
    except DToPError:
        return None
    return path if path.is_file() else None


def checkpoint_of(model: str | Path) -> str | None:
    """The sha256 of the checkpoint MODEL (a file or ``FILE:options``) was exported from: a checkpoint's own
    digest, else the ``dtop.checkpoint_sha256`` metadata of an ONNX file, an OpenVINO IR, an ExecuTorch program or a
    TensorRT plan's sidecar; None when the file carries none (not exported by dtop-export, or from an in-memory
    model)."""
    from dtop_export.engines import CHECKPOINT_SUFFIXES

    path = _path(model)
    if path is None:
        return None
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        from dtop_export.digest import file_sha256

        return file_sha256(path)
    return _metadata(path).get(KEY) or None


def _metadata(path: Path) -> dict[str, str]:
    """The ``dtop.*`` metadata of an exported model file (empty for a checkpoint or a file that carries none)."""
    from dtop_export.engines import IR_SUFFIXES, PLAN_SUFFIXES, PTE_SUFFIXES

    suffix = path.suffix.lower()
    meta: dict[str, str] = {}
    if suffix == ".onnx":
        from dtop_export.contract import read_metadata

        meta = read_metadata(path)
    elif suffix in IR_SUFFIXES:
        from dtop_export.engines.openvino import ir_metadata

        meta = ir_metadata(path)
    elif suffix in PTE_SUFFIXES:
        from dtop_export.engines.executorch import pte_metadata

        meta = pte_metadata(path)
    elif suffix in PLAN_SUFFIXES:
        from dtop_export.engines.tensorrt.sidecar import read_sidecar

        try:
            meta = read_sidecar(path).metadata
        except DToPError:
            return {}
    return meta


def reference_whitening(models: Sequence[str | Path], reference: str | Path) -> tuple[bool, str | None]:
    """Whether ``parity``'s reference (the checkpoint ``reference``) applies its whitening, and a note to print when
    it does not: exports made with ``--no-whiten`` (``dtop.whitening`` not applied) are compared with the checkpoint
    run without its whitening too, since against the whitened one they fail by construction (cosine ~0) and the
    failure would read as an accuracy problem. Exports of both kinds in one run are refused in one line (one
    reference cannot match both). Reads the checkpoint only when an export was made without whitening."""
    from dtop_export.engines import CHECKPOINT_SUFFIXES

    applied: dict[str, bool] = {}
    for m in models:
        path = _path(m)
        if path is None:
            continue
        if path.suffix.lower() in CHECKPOINT_SUFFIXES:
            applied[str(m)] = True  # a checkpoint MODEL runs with its whitening
            continue
        try:
            applied[str(m)] = bool(json.loads(_metadata(path).get("dtop.whitening", "")).get("applied"))
        except (json.JSONDecodeError, AttributeError):
            continue  # records nothing: not ours to judge
    unwhitened = [m for m, a in applied.items() if not a]
    if not unwhitened:
        return True, None
    from dtop_export.checkpoint import load_checkpoint

    whitening = load_checkpoint(reference).whitening
    if whitening is None:  # nothing to leave out: the same reference either way
        return True, None
    whitened = [m for m, a in applied.items() if a]
    if whitened:
        raise DToPError(
            f"{unwhitened[0]} was exported with --no-whiten, {whitened[0]} applies the checkpoint's whitening: one "
            f"reference ({reference}) cannot match both; check them in separate parity runs"
        )
    were = "was" if len(unwhitened) == 1 else "were"
    return False, (
        f"note: {', '.join(unwhitened)} {were} exported with --no-whiten: the reference runs {reference} without "
        f"its whitening ({whitening.kind}) too"
    )


def corpus_checkpoint(corpus: dict[str, Any]) -> str | None:
    """The checkpoint a corpus was embedded with (``corpus``: an index sidecar's ``corpus`` section, a shard
    manifest's ``settings`` or an ``embed X.npy`` sidecar): recorded since this check exists; for an older corpus,
    read from its model file when that file is still there, unchanged."""
    if corpus.get("checkpoint_sha256"):
        return str(corpus["checkpoint_sha256"])
    model, digest = corpus.get("model"), corpus.get("model_sha256")
    if not model or not digest:
        return None
    from dtop_export.corpus.shards import file_sha256

    path = _path(model)
    if path is not None and file_sha256(path) == digest:
        return checkpoint_of(model)
    return None


def check_model_for_corpus(model: str | Path, corpus: dict[str, Any], what: str, force: bool = False) -> str | None:
    """Refuse MODEL for descriptors embedded by a model of another checkpoint (``what`` names them, e.g. ``index
    corpus.faiss``), in one line, unless ``force``; the same file or another export of the same checkpoint passes.
    Returns a warning to print when the answer is unknown (a model or corpus that records no checkpoint) or
    ``force`` overrode a refusal; None when they match. A MODEL that names no model file is refused first (before a
    warning that it records no checkpoint)."""
    from dtop_export.bench.spec import parse_spec
    from dtop_export.corpus.shards import file_sha256
    from dtop_export.engines import check_model_file

    check_model_file(parse_spec(str(model)).path)
    path = _path(model)
    if corpus.get("model_sha256") and path is not None and file_sha256(path) == corpus["model_sha256"]:
        return None  # the very file the corpus was embedded with
    mine, theirs = checkpoint_of(model), corpus_checkpoint(corpus)
    embedded_with = corpus.get("model") or "an unknown model"
    if mine is None or theirs is None:
        which = str(model) if mine is None else f"{what}'s model ({embedded_with})"
        return (
            f"warning: cannot tell whether {model} comes from the checkpoint {what} was embedded with ({which} "
            "records no checkpoint): scores are only meaningful for the same checkpoint"
        )
    if mine == theirs:
        return None
    message = (
        f"{model} comes from checkpoint {mine[:12]}, but {what} was embedded with {embedded_with} from checkpoint "
        f"{theirs[:12]}: its scores against it would be meaningless"
    )
    if force:
        return f"warning: {message} (--force)"
    raise DToPError(
        f"{message}; use a model exported from the corpus's checkpoint, re-embed the corpus with {model}, or pass "
        "--force"
    )


def check_exported_from(model: str | Path, reference: str | Path) -> None:
    """Refuse, in one line, an exported MODEL (``FILE[:options]``) whose metadata names another checkpoint than the
    checkpoint ``reference`` (``parity``: its descriptors differ by construction, and the failure would read as an
    accuracy problem). A model that records no checkpoint, a missing file and a checkpoint MODEL (compared by its
    descriptors) pass."""
    from dtop_export.engines import CHECKPOINT_SUFFIXES

    path = _path(model)
    if path is None or path.suffix.lower() in CHECKPOINT_SUFFIXES:
        return
    mine = checkpoint_of(model)
    if mine is None:  # before hashing the reference (a full checkpoint is ~0.5 GB)
        return
    ref = Path(reference)  # hashed once per process however many MODELs parity checks (dtop_export.digest)
    theirs = checkpoint_of(ref) if ref.is_file() else None
    if theirs is None or mine == theirs:
        return
    raise DToPError(
        f"{model} was exported from another checkpoint ({mine[:12]}) than the reference {reference} "
        f"({theirs[:12]}): give the checkpoint it was exported from, or export {reference} again"
    )


def check_distractors(model: str | Path, distractors: str | Path, force: bool = False) -> str | None:
    """:func:`check_model_for_corpus` for ``evaluate --distractors``: a shard folder's manifest, or the sidecar
    ``X.json`` that ``embed -o X.npy`` writes next to the matrix (a bare ``.npy`` records nothing: a warning)."""
    import json

    from dtop_export.bench.spec import parse_spec
    from dtop_export.corpus.integrity import distractor_path
    from dtop_export.engines import check_model_file

    check_model_file(parse_spec(str(model)).path)  # both files before the provenance: no warning before their errors
    path = distractor_path(distractors)
    what = f"distractors {path}"
    if path.is_dir():
        from dtop_export.corpus.shards import read_manifest

        manifest = read_manifest(path)
        corpus = (manifest or {}).get("settings", {})
    else:
        sidecar = path.with_suffix(".json")
        try:
            corpus = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        except (OSError, json.JSONDecodeError):
            corpus = {}
        if not isinstance(corpus, dict):
            corpus = {}
    return check_model_for_corpus(model, corpus, what, force)
