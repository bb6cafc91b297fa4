"""Shared fixtures: a random-init small DToP model and its checkpoint (no network, no downloads)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtop_export.model import DToP, build_model, get_preset

# Tests send Ctrl-C (SIGINT) to the jobs they start, as a user's terminal does. A test run started in the background
# by a shell without job control (`nohup pytest &`, some CI runners) inherits SIGINT ignored, and so would every job it
# starts: Python installs its KeyboardInterrupt handler only where SIGINT is not ignored. A handler here is reset to
# the default in each child at exec, so the jobs under test get Python's usual one.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# A test marked `isolated` runs in a pytest process of its own: it sends signals to (or interrupts) the process it
# runs in, and the suite's process holds a Ray driver (grpc threads) and ~40 native threads; twice this stop the suite's
# process died of a segmentation fault (Python's GC list corrupted) in a test after such in-process interrupts.
ISOLATED_ENV = "DTOP_TEST_ISOLATED"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get(ISOLATED_ENV):
        return
    for item in items:
        if item.get_closest_marker("isolated") is not None and isinstance(item, pytest.Function):
            item.runtest = _isolated_runner(item)  # type: ignore[method-assign]


def _isolated_runner(item: pytest.Function):  # noqa: ANN202
    def run() -> None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="isolated-") as base:
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", base, item.nodeid]
            env = {**os.environ, ISOLATED_ENV: "1"}
            r = subprocess.run(cmd, cwd=item.config.rootpath, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.fail(f"{item.nodeid} failed in its own process (exit {r.returncode}):\n{r.stdout[-6000:]}"
                        f"{r.stderr[-3000:]}", pytrace=False)  # fmt: skip

    return run


def restore_faulthandler(config: pytest.Config | None = None) -> None:
    """Installs faulthandler again (on pytest's file) where it was enabled. A Ray driver that shuts down leaves SIGSEGV,
    SIGABRT, SIGFPE and SIGILL at their default action (its failure handler resets them instead of restoring what was
    there: ray-project/ray#65749), and faulthandler, still "enabled", prints nothing: the two crashes of the suite's
    process after the Ray tests left no Python stack."""
    import faulthandler

    if not faulthandler.is_enabled():
        return
    fd = sys.__stderr__.fileno()
    if config is not None:
        try:
            from _pytest.faulthandler import fault_handler_stderr_fd_key  # the file pytest's faulthandler writes to

            fd = config.stash[fault_handler_stderr_fd_key]
        except (ImportError, KeyError):
            pass
    faulthandler.disable()  # enable() does nothing while it is enabled
    faulthandler.enable(file=fd, all_threads=True)


def signal_stack_mapped() -> bool:
    """Whether this thread's alternate signal stack, if it has one, is mapped memory (Linux). Python's signal handlers
    run on it (SA_ONSTACK): on an unmapped one the next handled signal kills the process (SIGSEGV), and on one that was
    mapped again since, the kernel writes the signal's frame over whatever lives there (Python's GC list corrupted)."""
    import ctypes

    class Stack(ctypes.Structure):
        _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

    st = Stack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(st)) == 0
    spans = [
        [int(x, 16) for x in line.split()[0].split("-")]
        for line in Path("/proc/self/maps").read_text().split("\n")
        if line
    ]
    return not st.sp or any(a <= st.sp < b for a, b in spans)


@pytest.fixture(scope="session")
def small_model() -> DToP:
    torch.manual_seed(0)
    return build_model(get_preset("small")).eval()


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory, small_model: DToP) -> Path:
    from dtop_export.checkpoint import new_provenance, save_checkpoint
    from dtop_export.preprocess import default_preprocess

    path = tmp_path_factory.mktemp("ckpt") / "small.pt"
    save_checkpoint(path, small_model, default_preprocess("dtop_tiny_r_s16", 16), provenance=new_provenance("test"))
    return path


@pytest.fixture(scope="session")
def small_onnx(small_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_ckpt`` exported to ONNX (dynamic batch/height/width): shared by the tests that only read it."""
    from dtop_export.export import export_onnx

    out = tmp_path_factory.mktemp("small-onnx") / "small.onnx"
    export_onnx(small_ckpt, out)
    return out


@pytest.fixture(scope="session")
def full_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The paper's r50-vitb16 model (random init, perturbed biases/BN statistics, a random whitening) and its
    ONNX export: the one full-size export of a test run (~1 min here), shared by every ``slow`` test."""
    from dtop_export.checkpoint import random_checkpoint
    from dtop_export.export import export_onnx

    d = tmp_path_factory.mktemp("full")
    ckpt = random_checkpoint("r50-vitb16", d / "full.pt", seed=0, source="test")
    export_onnx(ckpt, d / "full.onnx")
    return ckpt, d / "full.onnx"


# Real photos scikit-image ships: a small corpus whose every image is its own nearest neighbour.
CORPUS_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "camera.png")
CORPUS_SIZE = 128  # px, longer side: fast on 2 cores, enough for the small model


@pytest.fixture(scope="session")
def small_index(small_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``small_onnx``'s shards of :data:`CORPUS_PHOTOS` at :data:`CORPUS_SIZE` px and their flat faiss index
    (``index.faiss``; the photos are in ``photos/`` next to it)."""
    import shutil

    from dtop_export.corpus.embed import CorpusJob, embed_corpus
    from dtop_export.corpus.index import build_corpus_index
    from dtop_export.retrieval.sample_data import skimage_data_dir

    root = tmp_path_factory.mktemp("small-index")
    photos = root / "photos"
    photos.mkdir()
    for name in CORPUS_PHOTOS:
        shutil.copy(skimage_data_dir() / name, photos / name)
    job = CorpusJob(str(small_onnx), str(photos), root / "shards", image_size=CORPUS_SIZE, progress=False)
    embed_corpus(job)
    build_corpus_index(root / "shards", root / "index.faiss")
    return root / "index.faiss"


@pytest.fixture(scope="session")
def client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dtop-export cpp build` into a fresh folder: the one C++ build of a test run (with the ExecuTorch backend when
    the [edge] extra is installed), shared by every test of the C++ client (tests/test_cpp*.py, test_executorch.py).
    Warnings are errors here (``--werror``), as they are not in a user's build."""
    build_dir = tmp_path_factory.mktemp("cpp-build")
    cmd = [sys.executable, "-m", "dtop_export", "cpp", "build", "--build-dir", str(build_dir), "--werror"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    binary = Path(r.stdout.strip().splitlines()[-1])  # the last line is the binary, alone
    assert binary == build_dir / "dtop-embed" and os.access(binary, os.X_OK)
    return binary
