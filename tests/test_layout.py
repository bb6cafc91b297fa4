"""The house rules of DESIGN.md § Layout, checked on the source: the import graph (no cycles, layers kept),
private names, module sizes, package docstrings, and one import root in what users install."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# Modules allowed past MAX_LINES: one cohesive job each, said here so that growth elsewhere fails.
LONG_MODULES: dict[str, str] = {}
RUNTIMES = {"onnx", "onnxruntime", "openvino", "nncf", "tensorrt", "tensorrt_rtx", "executorch", "torchao"}
# What an engine must never import: the layers that run engines (audits, reports, orchestration, the CLI).
ENGINE_FORBIDDEN = ("dtop_export.fp16.audit", "dtop_export.parity", "dtop_export.bench", "dtop_export.pipeline")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a project module, or an external package's top-level name)
    names: tuple[str, ...]  # names taken from it (``from target import ...``)
    line: int
    internal: bool


def package_dirs() -> dict[str, Path]:
    """Import name -> folder, from pyproject's ``package-dir`` (the one place that maps them)."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return {name: REPO / folder for name, folder in cfg["tool"]["setuptools"]["package-dir"].items()}


def project_modules() -> dict[str, Path]:
    """Every module of the installed packages, by import name."""
    roots = package_dirs()
    out: dict[str, Path] = {}
    for prefix, folder in roots.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, top-level or inside functions, except those under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> list[Import]:
    mods = project_modules()
    out: list[Import] = []
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    internal = a.name in mods
                    out.append(Import(name, a.name if internal else a.name.split(".")[0], (), node.lineno, internal))
                continue
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rsplit(".", 1)[0]
                pkg = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1])
                base = f"{pkg}.{base}" if base else pkg
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in mods:  # ``from package import module``
                    out.append(Import(name, sub, (), node.lineno, True))
                elif base in mods:
                    out.append(Import(name, base, (a.name,), node.lineno, True))
                else:
                    out.append(Import(name, base.split(".")[0], (a.name,), node.lineno, False))
    return out


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return import_graph()


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_every_package(graph: list[Import]) -> None:
    mods = project_modules()
    assert {"dtop_export.contract", "dtop_export.engines.ort", "dtop_export.training.loop"} <= set(mods)
    assert mods["dtop_export.engines"] == REPO / "engines" / "__init__.py"
    edges = {(i.source, i.target) for i in graph if i.internal}
    # a function-level import is an edge too
    assert ("dtop_export.engines", "dtop_export.engines.ort") in edges
    assert ("dtop_export.fp16.audit", "dtop_export.engines.ort") in edges


def test_no_import_cycles(graph: list[Import]) -> None:
    """Tarjan's strongly connected components over the project's own imports."""
    adj: dict[str, set[str]] = {m: set() for m in project_modules()}
    for i in graph:
        if i.internal and i.target != i.source:
            adj[i.source].add(i.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adj[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in adj:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_model_imports_only_torch_and_timm(graph: list[Import]) -> None:
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in graph
        if _under(i.source, "dtop_export.model")
        and (
            (i.internal and not (_under(i.target, "dtop_export.model") or i.target == "dtop_export.errors"))
            or (not i.internal and i.target in RUNTIMES)
        )
    ]
    assert bad == []


def test_training_and_engines_never_import_each_other(graph: list[Import]) -> None:
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in graph
        if i.internal
        and (
            (_under(i.source, "dtop_export.training") and _under(i.target, "dtop_export.engines"))
            or (_under(i.source, "dtop_export.engines") and _under(i.target, "dtop_export.training"))
        )
    ]
    assert bad == []


def test_engines_import_no_audit_report_or_orchestration_module(graph: list[Import]) -> None:
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in graph
        if i.internal and _under(i.source, "dtop_export.engines") and any(_under(i.target, f) for f in ENGINE_FORBIDDEN)
    ]
    assert bad == []


def test_only_the_cli_imports_the_cli(graph: list[Import]) -> None:
    entry_points = {"dtop_export.__main__"}
    bad = [
        f"{i.source}:{i.line} imports {i.target}"
        for i in graph
        if i.internal
        and _under(i.target, "dtop_export.cli")
        and not _under(i.source, "dtop_export.cli")
        and i.source not in entry_points
    ]
    assert bad == []


def test_no_private_name_crosses_a_module(graph: list[Import]) -> None:
    def private(part: str) -> bool:
        return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))

    bad = [
        f"{i.source}:{i.line} imports {i.target} {list(i.names)}"
        for i in graph
        if i.internal and (any(private(n) for n in i.names) or any(private(p) for p in i.target.split(".")))
    ]
    assert bad == []


def test_runtimes_are_imported_inside_functions() -> None:
    """``dtop-export --help`` and a CPU-only install: no module imports a runtime (or torch, outside the model,
    training and fold code) at its top level, except where the module is that runtime's engine."""
    heavy = RUNTIMES | {"faiss", "ray"}
    bad = []
    for name, path in project_modules().items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                tops = [(node.module or "").split(".")[0]]
            else:
                continue
            bad += [f"{name}:{node.lineno} imports {t}" for t in tops if t in heavy]
    assert bad == []


def test_module_sizes() -> None:
    long = {}
    for name, path in project_modules().items():
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            long[name] = n
    assert set(long) <= set(LONG_MODULES), f"over {MAX_LINES} lines without a reason in LONG_MODULES: {long}"


def test_every_package_says_what_lives_there_and_what_it_imports() -> None:
    docs = {
        n: ast.get_docstring(ast.parse(p.read_text())) for n, p in project_modules().items() if p.name == "__init__.py"
    }
    assert [n for n, d in docs.items() if not d or "import" not in d.lower()] == []


# one import root -------------------------------------------------------------------------------------------


def test_pyproject_lists_every_package() -> None:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {n for n, p in project_modules().items() if p.name == "__init__.py"}
    # Data packages: mapped folders without Python (cpp/ ships as dtop_export.cpp_sources for `cpp build`).
    data = {n for n, folder in package_dirs().items() if not (folder / "__init__.py").exists()}
    assert data == {"dtop_export.cpp_sources"}
    assert set(cfg["packages"]) == packages | data
    assert all(p == "dtop_export" or p.startswith("dtop_export.") for p in cfg["packages"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("dtop_export-*.whl")
    return whl


def test_wheel_has_one_import_root(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    roots = {n.split("/")[0] for n in names}
    assert {r for r in roots if not r.endswith(".dist-info")} == {"dtop_export"}
    assert "dtop_export/training/loop.py" in names and "dtop_export/engines/tensorrt/runner.py" in names
    assert "dtop_export/training/configs/sample-small.yaml" in names
    assert {"dtop_export/cpp_sources/CMakeLists.txt", "dtop_export/cpp_sources/src/image.cpp"} <= set(names)
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["dtop_export"]


def test_fresh_venv_with_only_the_wheel(wheel: Path, tmp_path: Path) -> None:
    """Installed alone (no dependencies), the wheel offers dtop_export.training and dtop_export.engines and no
    top-level ``training`` or ``engines``."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    code = (
        "import importlib.util as u\n"
        "for name in ('training', 'engines'):\n"
        "    assert u.find_spec(name) is None, name\n"
        "for name in ('dtop_export.training', 'dtop_export.engines', 'dtop_export.engines.tensorrt'):\n"
        "    assert u.find_spec(name) is not None, name\n"
        "from dtop_export.cpp import source_dir\n"
        "assert source_dir().name == 'cpp_sources' and (source_dir() / 'CMakeLists.txt').is_file()\n"
        "print('ok')\n"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    r = subprocess.run([str(py), "-c", "import training"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 1 and "No module named 'training'" in r.stderr


def test_this_install_has_one_import_root(tmp_path: Path) -> None:
    """The development install (editable) behaves the same outside the repository."""
    code = (
        "import importlib.util as u, dtop_export.training, dtop_export.engines\n"
        "assert u.find_spec('training') is None and u.find_spec('engines') is None\n"
        "print(dtop_export.training.__file__)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()) == REPO / "training" / "__init__.py"
