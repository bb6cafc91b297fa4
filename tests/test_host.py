"""``dtop_export.host``: the cache folder follows the XDG base directory specification."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtop_export.host import cache_dir, usable_cpus


@pytest.mark.parametrize("value", [None, "", "relative/cache"])
def test_cache_dir_falls_back_to_home_cache(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    """Unset, empty (two modules took "" as the current folder) or relative: ~/.cache, as the specification says."""
    if value is None:
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", value)
    assert cache_dir("cpp") == Path.home() / ".cache" / "dtop-export" / "cpp"


def test_every_cache_user_takes_the_same_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dtop_export.cpp import default_build_dir
    from dtop_export.retrieval.datasets import default_data_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("DTOP_EXPORT_DATA", raising=False)
    assert default_build_dir() == tmp_path / "dtop-export" / "cpp" == cache_dir("cpp")
    assert default_data_root() == tmp_path / "dtop-export" / "data"
    assert usable_cpus() >= 1


def test_an_actor_or_replica_fits_its_threads_to_its_node() -> None:
    """The driver derives actor threads from Ray's logical CPUs (--num-cpus, a quota), which a node's affinity can
    undercut: on the node they are capped, not refused (the option check refuses what a user asks locally)."""
    from dtop_export.corpus.runtime import node_threads

    assert node_threads(None) is None and node_threads(1) == 1
    assert node_threads(usable_cpus() + 7) == usable_cpus()
