"""The ExecuTorch engine: a ``.pte`` program from ``dtop-export executorch`` through ``executorch.runtime``.

The program is compiled for one input (``[1, 3, S, S]``: the position embedding resampled once for that grid, the
whitening and L2 norms folded in) and carries its deployment contract as a constant method, ``dtop_metadata``
(a JSON object of the same ``dtop.*`` strings an ONNX file keeps in ``metadata_props``; its ``dtop.resize_policy``
is ``square``: the whole image resized to S×S). Batches run one image at a time, like a ``--batch 1`` export.

What this module shares with the artefact maker (:mod:`dtop_export.edge`) and ``info``: :func:`require_executorch`
(the torch/executorch pairing check), :func:`load_program` (one-line errors for a missing, truncated or foreign
file, ExecuTorch's own log lines kept off the terminal) and :func:`pte_metadata`.

Imports torch and executorch inside the functions (``--help`` and a CPU install without the ``[edge]`` extra work).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.contract import Engine, preprocess_from_metadata
from dtop_export.errors import DToPError

METADATA_METHOD = "dtop_metadata"
PTE_FORMAT = "dtop-export/executorch"
# The torch release each ExecuTorch release's Python runtime is built against (its extension links libtorch, and a
# different torch fails to load it with a linker error). The [edge] extra installs a matching pair.
TORCH_FOR_EXECUTORCH = {"1.5": "2.14"}
EDGE_INSTALL = "pip install 'dtop-export[edge]'"


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def require_executorch() -> str:
    """The installed ExecuTorch version, once its runtime loads with the installed torch; otherwise one
    :class:`DToPError` line saying which pair to install."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        et_version = version("executorch")
    except PackageNotFoundError:
        raise DToPError(
            f"ExecuTorch is not installed: {EDGE_INSTALL} (executorch with the torch it was built for)"
        ) from None
    torch_version = version("torch")
    wanted = TORCH_FOR_EXECUTORCH.get(_minor(et_version))
    if wanted is not None and _minor(torch_version) != wanted:
        raise DToPError(
            f"executorch {et_version} runs with torch {wanted}.x, but torch {torch_version} is installed: "
            f"{EDGE_INSTALL} installs a matching pair"
        )
    try:
        _import_runtime()
    except (ImportError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DToPError(
            f"executorch {et_version} cannot load with torch {torch_version} ({reason[:160]}): {EDGE_INSTALL} "
            "installs a matching pair"
        ) from e
    return et_version


def _import_runtime() -> Any:
    """``executorch.runtime`` (importing it loads the extension that links libtorch), its import-time notes muted."""
    with _quiet_logger("torch.utils._pytree"):
        import executorch.runtime

    return executorch.runtime


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def native_log() -> Iterator[list[str]]:
    """Keep what ExecuTorch's C++ side writes to stderr (``[file.cpp:N] ...`` lines) off the terminal; the lines
    are in the yielded list afterwards, for error messages."""
    lines: list[str] = []
    try:
        fd = os.dup(2)
    except OSError:  # pragma: no cover - no stderr at all
        yield lines
        return
    # the runtime's extension writes through Python's sys.stderr when it is not the process's fd 2 (pytest's
    # capture, a notebook), through fd 2 otherwise: catch both
    python_side = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink, contextlib.redirect_stderr(python_side):
        sys.stderr.flush()
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(fd, 2)
            os.close(fd)
            sink.seek(0)
            text = sink.read().decode(errors="replace") + python_side.getvalue()
            lines += [ln.strip() for ln in text.splitlines() if ln.strip()]


def _native_reason(lines: list[str], fallback: str) -> str:
    """The last log line that says something (``[file.cpp:N] text`` -> ``text``)."""
    for line in reversed(lines):
        text = line.split("] ", 1)[-1].strip()
        if text and "cpuinfo" not in line and "threadpool" not in line:
            return text
    return fallback


def load_program(path: str | Path) -> Any:
    """An ``executorch.runtime.Program`` for ``path``, or one :class:`DToPError` line (missing, truncated, not a
    ``.pte``, made by an ExecuTorch this runtime cannot read)."""
    path = Path(path)
    if not path.is_file():
        raise DToPError(f"ExecuTorch program {path} not found")
    require_executorch()
    runtime = _import_runtime()
    with native_log() as log:
        try:
            program = runtime.Runtime.get().load_program(path)
        except Exception as e:  # noqa: BLE001 - the runtime raises RuntimeError with a hex code
            error: Exception | None = e
        else:
            error = None
    if error is not None:
        reason = _native_reason(log, str(error).splitlines()[0] if str(error) else type(error).__name__)
        raise DToPError(
            f"{path} is not a readable ExecuTorch program ({reason}): export it again with `dtop-export executorch`"
        ) from error
    return program


def load_program_bytes(data: bytes, what: str) -> Any:
    """An ``executorch.runtime.Program`` of in-memory ``.pte`` bytes (``what`` names it in errors); the caller keeps
    the returned program alive while it runs its methods."""
    require_executorch()
    runtime = _import_runtime()
    with native_log() as log:
        try:
            return runtime.Runtime.get().load_program(data)
        except Exception as e:  # noqa: BLE001
            reason = _native_reason(log, str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise DToPError(f"ExecuTorch cannot load {what} ({reason})") from e


def program_metadata(program: Any, path: Path) -> dict[str, str]:
    """The ``dtop.*`` strings of a loaded program (its :data:`METADATA_METHOD`); a program without them is a
    :class:`DToPError` saying how to make one that has them."""
    if METADATA_METHOD not in program.method_names:
        raise DToPError(
            f"{path} carries no dtop-export contract (no {METADATA_METHOD} method): export it with "
            "`dtop-export executorch CKPT.pt`"
        )
    with native_log():
        out = program.load_method(METADATA_METHOD).execute([])
    try:
        meta = json.loads(out[0])
    except (IndexError, TypeError, ValueError) as e:
        raise DToPError(f"{path}: its {METADATA_METHOD} is not a JSON object: export it again") from e
    if not isinstance(meta, dict) or "dtop.format" not in meta:
        raise DToPError(f"{path}: its {METADATA_METHOD} lacks dtop.format: export it again with dtop-export")
    return {str(k): str(v) for k, v in meta.items()}


def pte_metadata(path: str | Path) -> dict[str, str]:
    """The deployment contract of the ``.pte`` at ``path`` (loads the program, not the model's method)."""
    return program_metadata(load_program(path), Path(path))


def describe_pte(path: str | Path) -> dict[str, Any]:
    """What ``dtop-export info model.pte`` prints: size, methods, input and the ``dtop.*`` contract (without loading
    the model's forward method)."""
    from dtop_export.contract import metadata_report

    path = Path(path)
    program = load_program(path)
    meta = program_metadata(program, path)
    hw = json.loads(meta.get("dtop.static_hw") or "null") or ["?", "?"]
    batch = json.loads(meta.get("dtop.fixed_batch") or "null") or 1
    return {
        "file": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "methods": sorted(program.method_names),
        "inputs": {meta.get("dtop.input_name", "images"): f"float32 [{batch}, 3, {hw[0]}, {hw[1]}]"},
        "outputs": {
            meta.get("dtop.output_name", "descriptors"): f"float32 [{batch}, {meta.get('dtop.descriptor_dim')}]"
        },
    } | metadata_report(meta)


_POOL_DEFAULT: list[int] = []  # the pool's own size, read once, before any engine resized it
# the engines whose loaded method runs on the pool as it is: XNNPACK keeps a pointer to the pool it was loaded with,
# so resizing the pool (a new pool) under them crashed the process on their next run
_OPEN: weakref.WeakSet[ExecuTorchEngine] = weakref.WeakSet()


def set_threads(threads: int | None, program: str = "a program") -> int:
    """Size ExecuTorch's thread pool (one per process, shared by every program: XNNPACK runs on it) for ``program`` and
    return the size. None: the pool's own size (a thread per core of the machine, as read before the first engine of
    the process resized it, not what an earlier engine left) capped at the CPUs this process may run on (``taskset``,
    a cgroup cpuset, a Ray worker's), which ExecuTorch does not look at: twice the threads of the CPUs made every pass
    wait. While engines loaded at another size are open, one line instead: every program of a process runs at one
    size (``bench a.pte:threads=1 b.pte`` timed b on one thread, and resizing the pool under a loaded program
    crashes it)."""
    import executorch.extension.pybindings.portable_lib as lib

    from dtop_export.host import usable_cpus

    if not _POOL_DEFAULT:
        with native_log():  # the pool's first use probes the CPU, at Info level on stderr
            _POOL_DEFAULT.append(lib._threadpool_get_thread_count())
    size = threads or min(_POOL_DEFAULT[0], usable_cpus())  # 0 as None: a pool of no threads cannot run
    current = lib._threadpool_get_thread_count()
    if current != size:
        open_ = sorted({e.source.name if e.source else "a program" for e in _OPEN})
        if open_:
            raise DToPError(
                f"ExecuTorch runs every program of a process on one thread pool, at {current} thread(s) for the "
                f"open {', '.join(open_)}: open {program} with threads={current} too (or give every .pte the same "
                f"threads=), or close the others first"
            )
        with native_log():
            lib._unsafe_reset_threadpool(size)
    return size


def _zeros(shape: tuple[int, ...]) -> Any:
    import torch

    return torch.zeros(shape)


class ExecuTorchEngine(Engine):
    """Runs a dtop-export ``.pte`` (XNNPACK-delegated, fp32 or INT8) with ExecuTorch's Python runtime.

    precision: the program's own (from its metadata); another value is an error, since a program runs at the
    precision it was compiled with. threads: ExecuTorch's thread pool size (process-wide; default: its own, one per
    core, capped at the CPUs the process may run on; the programs open at once share one size, :func:`set_threads`).
    Inputs must be the program's size (``static_hw``); batches run in chunks of its fixed batch.
    """

    name = "executorch"
    resize_hint = "compile a program of that size (dtop-export executorch CKPT.pt --size {h})"

    def __init__(self, model: str | Path, *, precision: str | None = None, threads: int | None = None) -> None:
        path = Path(model)
        if path.suffix.lower() != ".pte":
            raise DToPError(f"{path} is not an ExecuTorch program (.pte)")
        if threads is not None and threads < 1:
            raise DToPError(f"threads must be >= 1, got {threads}")
        self.program = load_program(path)
        meta = program_metadata(self.program, path)
        file_precision = meta.get("dtop.precision", "fp32")
        if precision is not None and precision != file_precision:
            hint = (
                "make one with `dtop-export executorch CKPT.pt --int8`"
                if precision == "int8"
                else f"drop :{precision} (a .pte runs at the precision it was compiled with)"
            )
            raise DToPError(f"{path} is a {file_precision} program, not {precision}: {hint}")
        self.threads = threads
        self.pool_threads = set_threads(threads, str(path.name))
        with native_log() as log:
            try:
                self.method = self.program.load_method("forward")
                self.method.execute([_zeros(self._input_shape(meta))])  # XNNPACK's first run (and CPU probe), muted
            except Exception as e:  # noqa: BLE001
                error: Exception | None = e
            else:
                error = None
        if error is not None:
            reason = _native_reason(log, str(error).splitlines()[0])
            raise DToPError(f"ExecuTorch cannot load {path}'s forward method ({reason})") from error
        self.source = path
        self.metadata = meta
        self.precision = file_precision
        self.device = "cpu"
        self.preprocess = preprocess_from_metadata(meta)
        self.stride = self.preprocess.stride
        self.descriptor_dim = int(meta["dtop.descriptor_dim"])
        hw = json.loads(meta.get("dtop.static_hw") or "null")
        self.static_hw = tuple(int(v) for v in hw) if hw else None
        self.fixed_batch = json.loads(meta.get("dtop.fixed_batch") or "null")
        _OPEN.add(self)

    @staticmethod
    def _input_shape(meta: dict[str, str]) -> tuple[int, ...]:
        hw = json.loads(meta.get("dtop.static_hw") or "null")
        if not isinstance(hw, list) or len(hw) != 2:
            raise DToPError("the program's contract has no dtop.static_hw: export it again with dtop-export executorch")
        batch = json.loads(meta.get("dtop.fixed_batch") or "null") or 1
        return (int(batch), 3, int(hw[0]), int(hw[1]))

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_exported(images, self._run, self.static_hw, self.fixed_batch)

    def _run(self, x: np.ndarray) -> np.ndarray:
        import torch

        if self.method is None:
            raise DToPError(f"{self.source} was closed: open it again to embed with it")
        out = self.method.execute([torch.from_numpy(x)])[0]
        return np.array(out.numpy(), dtype=np.float32, copy=True)

    def close(self) -> None:
        """The program's method released: the thread pool may be resized for other programs."""
        _OPEN.discard(self)
        self.method = None

    def describe(self) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            **super().describe(),
            "runtime": f"executorch {version('executorch')}",
            "backend": self.metadata.get("dtop.backend", "xnnpack"),
            "threads": self.threads,
        }
