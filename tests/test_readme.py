"""The README stays true: its measured figures come from the result files, its commands exist."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _numbers() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_numbers", REPO / "benchmarks" / "readme_numbers.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["readme_numbers"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_measured_table_is_generated_from_the_results() -> None:
    numbers = _numbers()
    block = numbers.readme_block(README)
    assert block == numbers.render(), "stale: run `python benchmarks/readme_numbers.py`"
    rows = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| what")]
    assert len(rows) >= 8
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert len(cells) == 4 and all(cells), row
        assert re.search(r"\d", cells[1]), f"a figure without a number: {row}"


def test_generator_refuses_a_malformed_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    numbers = _numbers()
    good = numbers.rows()
    monkeypatch.setattr(numbers, "rows", lambda: [*good, ("the demo", "line one\nline two", "m", "`x`")])
    with pytest.raises(ValueError, match="newline"):
        numbers.render()


def test_figures_follow_their_sources() -> None:
    """A figure in the README changes when its result file does (it is computed, not copied)."""
    numbers = _numbers()
    demo = numbers._load("demo.json")
    row = next(r for r in numbers.rows() if r[0].startswith("the demo"))
    assert f"{demo['seconds']:.0f} s wall" in row[1]
    bench = numbers._load("bench.json")
    t = numbers._timing(bench, "onnxruntime", "int8", 512)
    int8 = next(r for r in numbers.rows() if r[0] == "ONNX Runtime INT8")
    assert f"{t['p50_s']:.2f} s at 512² ({t['speedup']:.2f}×)" in int8[1]


def test_every_command_the_readme_names_exists() -> None:
    from dtop_export.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    commands |= {g.name for g in app.registered_groups}
    named = set(re.findall(r"^\s*(?:\$ )?dtop-export (\w[\w-]*)", README, re.M))
    assert named and named <= commands, named - commands


def test_every_python_module_the_readme_runs_exists() -> None:
    modules = set(re.findall(r"(?:python3?|torchrun[^\n]*?) -m ([\w.]+)", README))
    assert "dtop_export" in modules
    missing = [m for m in modules if m not in ("venv", "pip") and importlib.util.find_spec(m) is None]
    assert missing == []


def _cli_json(*args: str) -> dict:
    import json

    from typer.testing import CliRunner

    from dtop_export.cli import app

    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_presets_table_is_what_info_presets_prints() -> None:
    """The README's presets table (its heading names `dtop-export info --presets`) holds the command's figures: the
    parameter column once said 86.4M for ViT-B/16 (86.1M) and the command printed no parameters at all."""
    table = README.split("Presets (`dtop-export info --presets`):", 1)[1].split("\n\n", 2)[1]
    rows = {
        m[0]: m[1:]
        for m in re.findall(r"^\| `([\w-]+)`[^|]*\| [^|]+\| (\d+) \| (\d+) \| (\d+) \| (.+?) \|$", table, re.M)
    }
    presets = _cli_json("info", "--presets")["presets"]
    assert set(rows) == set(presets)
    for name, (size, k, n, params) in rows.items():
        p = presets[name]
        assert (int(size), int(k), int(n)) == (p["img_size"], p["k"], p["N"]), name
        millions = f"{p['parameters']['backbone'] / 1e6:.1f}M + {p['parameters']['dtop'] / 1e6:.1f}M"
        assert params == millions, name


def test_every_repository_path_the_readme_names_exists() -> None:
    """A path the README names in backticks or as a link, whose first folder is one of the repository's, exists from
    the root (`dtop_export/`, `cpp/` and `cpp/include/` may be left out, as the README's layout does):
    `results/cpu-epyc/...` (in benchmarks/) once did not."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    folders = {part for f in files for part in Path(f).parts[:-1]}
    named = set(re.findall(r"`([\w.-]+(?:/[\w.-]+)+/?)`", README)) | set(re.findall(r"\]\(([^)#:]+)\)", README))
    named |= set(re.findall(r"(?:python3?|bash) (benchmarks/[\w/.-]+)", README))
    checked = [p for p in named if Path(p).parts[0] in folders]
    missing = [
        p for p in checked if not any((REPO / base / p).exists() for base in ("", "dtop_export", "cpp", "cpp/include"))
    ]
    assert len(checked) >= 20 and missing == [], missing


def test_examples_ask_no_more_threads_than_the_machine_they_ran_on() -> None:
    """The README's examples run as written on the 2-core machine it describes: `embed ... --threads 4` was refused
    there ('this process can run on 2 CPU(s)'), a README audit's first try of the embed quickstart."""
    asked = [int(n) for n in re.findall(r"--threads[ =](\d+)", README)]
    assert asked and max(asked) <= 2, asked
