"""Build the C++ client (``cpp/``: the ``dtop::Embedder`` library, ``dtop-embed`` and the minimal example) with the
OpenVINO C++ SDK that the ``openvino`` wheel ships, so that users need not know where the SDK lives; and, when the
``executorch`` wheel is installed (the ``[edge]`` extra), its ExecuTorch backend for ``.pte`` programs (CMake >= 3.28:
the ``cmake`` on PATH, or pip's when that one is older).

:func:`build` configures with CMake (``-DOpenVINO_DIR=<site-packages>/openvino/cmake``), builds, optionally
installs, and returns where the binaries are. Missing pieces (CMake, a C++ compiler, the ``openvino`` wheel,
libjpeg/zlib/OpenSSL development files) are one :class:`DToPError` line naming what to install. The C++ sources
travel in the wheel as ``dtop_export.cpp_sources`` (the repository's ``cpp/`` folder).

Imports the standard library only; ``openvino``, ``executorch`` and ``cmake`` are located, not imported.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dtop_export.errors import DToPError

EMBED_TOOL = "dtop-embed"
EXAMPLE = "dtop-example"
LOG_NAME = "dtop-build.log"
# What a CMake failure means, by the line it prints.
_CMAKE_HINTS = (
    ("Could NOT find JPEG", "libjpeg development files not found: install them (Debian: apt install libjpeg-dev)"),
    ("Could NOT find ZLIB", "zlib development files not found: install them (Debian: apt install zlib1g-dev)"),
    ("Could NOT find OpenSSL", "OpenSSL development files not found: install them (Debian: apt install libssl-dev)"),
    ("No CMAKE_CXX_COMPILER could be found", "no C++ compiler found: install g++ (apt install g++) or set CXX"),
    ('provided by "OpenVINO"', "CMake cannot use the openvino wheel's SDK: pip install --force-reinstall openvino"),
    ('provided by "executorch"', "CMake cannot use the executorch wheel's SDK: pip install 'dtop-export[edge]' again"),
)
# The CMake the executorch wheel's imported targets need (its executorch-config.cmake skips them before 3.28).
EXECUTORCH_CMAKE = (3, 28)


@dataclass
class BuildResult:
    """Where a build left things, and how long each step took (seconds)."""

    build_dir: Path
    embed_tool: Path
    example: Path | None
    library: Path
    include_dir: Path
    openvino_version: str
    openvino_cmake_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    installed_to: Path | None = None
    executorch: str = "off"  # "executorch 1.5.1" when the ExecuTorch backend was built, else "off: why"

    def to_dict(self) -> dict[str, object]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def source_dir() -> Path:
    """The C++ sources: the installed ``dtop_export.cpp_sources`` data package, or ``cpp/`` of a checkout."""
    spec = importlib.util.find_spec("dtop_export.cpp_sources")
    candidates = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    here = Path(__file__).resolve().parent
    candidates += [here / "cpp_sources", here.parent / "cpp"]
    for c in candidates:
        if (c / "CMakeLists.txt").is_file():
            return c
    raise DToPError("the C++ sources (cpp/CMakeLists.txt) are missing from this install: reinstall dtop-export")


def default_build_dir() -> Path:
    """``$XDG_CACHE_HOME/dtop-export/cpp`` (``~/.cache/dtop-export/cpp``)."""
    from dtop_export.host import cache_dir

    return cache_dir("cpp")


def openvino_sdk() -> tuple[Path, str]:
    """(CMake config folder, version) of the installed ``openvino`` wheel, without importing it."""
    spec = importlib.util.find_spec("openvino")
    if spec is None or not spec.submodule_search_locations:
        raise DToPError("the openvino wheel is not installed: pip install openvino (it ships the C++ SDK)")
    root = Path(next(iter(spec.submodule_search_locations)))
    cmake_dir = root / "cmake"
    if not (cmake_dir / "OpenVINOConfig.cmake").is_file():
        raise DToPError(f"{root} has no C++ SDK (cmake/OpenVINOConfig.cmake): pip install --force-reinstall openvino")
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("openvino")
    except PackageNotFoundError:
        ver = "unknown"
    return cmake_dir, ver


def executorch_sdk() -> tuple[Path, str]:
    """(CMake config folder, version) of the installed ``executorch`` wheel, without importing it; a
    :class:`DToPError` saying why not."""
    from importlib.metadata import PackageNotFoundError, version

    spec = importlib.util.find_spec("executorch")
    if spec is None or not spec.submodule_search_locations:
        raise DToPError("the executorch wheel is not installed (pip install 'dtop-export[edge]')")
    cmake_dir = Path(next(iter(spec.submodule_search_locations))) / "share" / "cmake"
    if not (cmake_dir / "executorch-config.cmake").is_file():
        raise DToPError(f"the executorch wheel has no C++ SDK ({cmake_dir}/executorch-config.cmake)")
    try:
        return cmake_dir, version("executorch")
    except PackageNotFoundError:  # pragma: no cover - a package without metadata
        return cmake_dir, "unknown"


def pip_cmake() -> str | None:
    """The ``cmake`` binary of the ``cmake`` wheel (pip install cmake), if installed; found without importing it."""
    spec = importlib.util.find_spec("cmake")
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        exe = Path(folder) / "data" / "bin" / "cmake"
        if exe.is_file() and os.access(exe, os.X_OK):
            return str(exe)
    return None


def cmake_version(cmake: str) -> tuple[int, ...]:
    """``cmake --version`` as numbers, (0,) when it cannot be read."""
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return (0,)
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(g) for g in m.groups() if g is not None) if m else (0,)


def executorch_plan(cmake: str) -> tuple[str, list[str], str]:
    """(the CMake to build with, extra configure flags, what to report) for the ExecuTorch backend: on with the
    installed executorch wheel and a CMake >= 3.28 (``cmake``, else pip's), off with the reason otherwise."""
    try:
        et_cmake, et_version = executorch_sdk()
    except DToPError as e:
        return cmake, ["-DDTOP_WITH_EXECUTORCH=OFF"], f"off: {e}"
    for candidate in (cmake, pip_cmake()):
        if candidate and cmake_version(candidate) >= EXECUTORCH_CMAKE:
            flags = ["-DDTOP_WITH_EXECUTORCH=ON", f"-Dexecutorch_DIR={et_cmake}"]
            return candidate, flags, f"executorch {et_version}"
    have = ".".join(map(str, cmake_version(cmake)))
    return (
        cmake,
        ["-DDTOP_WITH_EXECUTORCH=OFF"],
        f"off: executorch {et_version} needs CMake >= 3.28 and this is {have} (pip install 'cmake>=3.28')",
    )


def find_toolchain() -> tuple[str, str]:
    """(cmake, C++ compiler) executables, or a :class:`DToPError` naming what to install."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise DToPError("CMake not found: install CMake >= 3.16 (apt install cmake, or pip install cmake)")
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if cxx is None or shutil.which(cxx) is None:
        raise DToPError("no C++ compiler found: install g++ >= 9 (apt install g++) or point CXX at one")
    return cmake, shutil.which(cxx) or cxx


def _run(cmd: list[str], log: Path, step: str) -> None:
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        r = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, text=True)
    if r.returncode == 0:
        return
    text = log.read_text(errors="replace")
    for needle, hint in _CMAKE_HINTS:
        if needle in text:
            raise DToPError(f"C++ {step} failed: {hint} (full log: {log})")
    errors = [ln.strip() for ln in text.splitlines() if re.search(r"\berror\b", ln, re.IGNORECASE)]
    first = errors[0] if errors else text.strip().splitlines()[-1] if text.strip() else "no output"
    raise DToPError(f"C++ {step} failed: {first[:300]} (full log: {log})")


def check_build_options(build_dir: Path | None, jobs: int | None, install_prefix: Path | None) -> None:
    """Refuse, before CMake runs, what would make the build fail after minutes of it (or at its very end)."""
    if jobs is not None and jobs < 1:
        raise DToPError(f"--jobs must be >= 1, got {jobs}")
    for option, folder in (("--build-dir", build_dir), ("--prefix", install_prefix)):
        if folder is None:
            continue
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise DToPError(f"{option} {folder} is a file: give a folder")
        existing = next((p for p in (folder.absolute(), *folder.absolute().parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise DToPError(f"{option} {folder}: {existing} is not writable: choose a folder you can write to")


def build(
    build_dir: Path | None = None,
    jobs: int | None = None,
    build_type: str = "Release",
    install_prefix: Path | None = None,
    status: Callable[[str], None] | None = None,
    werror: bool = False,
) -> BuildResult:
    """Configure and build ``cpp/`` into ``build_dir`` (default :func:`default_build_dir`); incremental when run
    again. ``install_prefix``: also ``cmake --install`` there (bin/dtop-embed, lib/libdtop.a, include/dtop,
    lib/cmake/dtop for ``find_package(dtop)``). ``status`` receives a line per step. ``werror``: compiler warnings
    are errors (``-DDTOP_WERROR=ON``, what the project's tests build with); off, a later configure turns it off."""
    say = status or (lambda _text: None)
    check_build_options(build_dir, jobs, install_prefix)
    src = source_dir()
    cmake, cxx = find_toolchain()
    ov_cmake, ov_version = openvino_sdk()
    cmake, et_flags, et_note = executorch_plan(cmake)
    build_dir = Path(build_dir or default_build_dir()).resolve()
    build_dir.mkdir(parents=True, exist_ok=True)
    log = build_dir / LOG_NAME
    log.write_text("")
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    say(f"configuring {src} -> {build_dir}")
    _run(
        [
            cmake, "-S", str(src), "-B", str(build_dir), f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_CXX_COMPILER={cxx}", f"-DOpenVINO_DIR={ov_cmake}",
            f"-DDTOP_WERROR={'ON' if werror else 'OFF'}", *et_flags,
        ],
        log, "configure",
    )  # fmt: skip
    timings["configure_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    from dtop_export.host import usable_cpus

    n = jobs or usable_cpus()
    say(f"compiling with {n} job(s)")
    _run([cmake, "--build", str(build_dir), "--parallel", str(n)], log, "build")
    timings["build_s"] = round(time.perf_counter() - t0, 2)

    tool = build_dir / EMBED_TOOL
    if not tool.is_file():
        raise DToPError(f"the build finished without {tool}: see {log}")
    example = build_dir / EXAMPLE
    result = BuildResult(
        build_dir=build_dir,
        embed_tool=tool,
        example=example if example.is_file() else None,
        library=build_dir / "libdtop.a",
        include_dir=src / "include",
        openvino_version=ov_version,
        openvino_cmake_dir=ov_cmake,
        timings=timings,
        executorch=et_note,
    )
    if install_prefix is not None:
        t0 = time.perf_counter()
        prefix = Path(install_prefix).resolve()
        say(f"installing into {prefix}")
        _run([cmake, "--install", str(build_dir), "--prefix", str(prefix)], log, "install")
        timings["install_s"] = round(time.perf_counter() - t0, 2)
        result.installed_to = prefix
    return result
