"""Stages with reuse: run a chain of artefact-building steps, and skip the ones a previous run already made.

A :class:`StageRunner` runs stages in order inside one work folder and keeps a JSON state file there. A stage
is reused when its outputs exist, its settings (``key``) equal the recorded ones, an optional validity check
passes, and no earlier stage was rebuilt in this run; otherwise it is built. Every stage's status, time,
settings, note and facts land in the state file, so a later run (and the summary) can read them.

The runner talks to a person only through a :class:`Reporter`; the default one logs, the CLI passes a rich one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtop_export.atomic import atomic_write_text

log = logging.getLogger(__name__)

STATE_VERSION = 1


class Reporter:
    """How a pipeline shows its progress. This one logs; subclasses draw (the CLI's uses rich)."""

    def stage(self, number: int, title: str) -> None:
        """A stage starts."""
        log.info("[%d] %s", number, title)

    def note(self, text: str) -> None:
        """A line or a Markdown table for the person running the pipeline."""
        log.info("%s", text)

    @contextlib.contextmanager
    def status(self, text: str) -> Iterator[Callable[[str], None]]:
        """A long step without a progress bar; yields a function that updates its text."""
        log.info("%s", text)
        yield lambda update: log.debug("%s", update)


@dataclass
class Stage:
    """One stage: what it makes and the settings that decide whether a previous result still holds."""

    name: str
    title: str
    outputs: list[Path]
    key: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # built | reused | skipped | failed
    seconds: float = 0.0
    note: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    changed: bool = True  # False when a run wrote nothing (e.g. no TensorRT here)


class StageRunner:
    """Runs stages in order in ``workdir`` and decides, per stage, whether a previous run's artefacts can be
    reused (``force`` rebuilds everything). The state is written to ``workdir/state_file`` after every stage."""

    def __init__(self, workdir: Path, state_file: str, force: bool = False, reporter: Reporter | None = None) -> None:
        self.workdir = workdir
        self.state_path = workdir / state_file
        self.force = force
        self.reporter = reporter or Reporter()
        self.stages: list[Stage] = []
        self.summary: dict[str, Any] = {}  # run-level facts written next to the stages (machine, total time)
        self.previous: dict[str, Any] = {}
        self.upstream_rebuilt = False
        if self.state_path.is_file() and not force:
            try:
                data = json.loads(self.state_path.read_text())
                if data.get("version") == STATE_VERSION:
                    self.previous = {s["name"]: s for s in data.get("stages", [])}
            except (OSError, ValueError):
                self.previous = {}

    def stage(
        self,
        name: str,
        title: str,
        outputs: list[Path],
        build: Callable[[Stage], None],
        key: dict[str, Any] | None = None,
        valid: Callable[[], bool] | None = None,
        leaf: bool = False,
    ) -> Stage:
        """Run (or reuse) one stage; its ``build`` fills ``facts`` and may mark it skipped. Rebuilding a stage
        rebuilds every later one, except after a ``leaf`` (whose files no later stage reads)."""
        st = Stage(name, title, outputs, dict(key or {}))
        self.stages.append(st)
        prev = self.previous.get(name)
        reusable = (
            not self.force
            and not self.upstream_rebuilt
            and prev is not None
            and prev.get("status") in ("built", "reused", "skipped")
            and prev.get("key") == jsonable(st.key)
            and all(p.exists() for p in outputs)
            and (valid is None or valid())
        )
        self.reporter.stage(len(self.stages), title)
        if reusable:
            st.status, st.facts, st.note = "reused", dict(prev.get("facts", {})), prev.get("note", "")
            made = ", ".join(self.relative(p) for p in outputs)
            self.reporter.note(f"reusing {made} (--force rebuilds)")
            self.save()
            return st
        t0 = time.perf_counter()
        try:
            build(st)
        except BaseException:
            st.status, st.seconds = "failed", time.perf_counter() - t0
            self.save()
            raise
        st.seconds = time.perf_counter() - t0
        if st.status == "pending":
            st.status = "built"
        if st.changed and not leaf:
            self.upstream_rebuilt = True
        if st.note:
            self.reporter.note(st.note)
        self.save()
        return st

    def get(self, name: str) -> Stage | None:
        """The stage called ``name`` in this run, if it ran."""
        return next((s for s in self.stages if s.name == name), None)

    def relative(self, p: Path) -> str:
        """``p`` relative to the work folder when it is inside it."""
        try:
            return str(p.relative_to(self.workdir))
        except ValueError:
            return str(p)

    def save(self) -> None:
        """Write the state file (atomic)."""
        data = {
            "version": STATE_VERSION,
            **jsonable(self.summary),
            "stages": [
                {
                    "name": s.name,
                    "title": s.title,
                    "status": s.status,
                    "seconds": round(s.seconds, 2),
                    "outputs": [self.relative(p) for p in s.outputs],
                    "key": jsonable(s.key),
                    "note": s.note,
                    "facts": jsonable(s.facts),
                }
                for s in self.stages
            ],
        }
        atomic_write_text(self.state_path, json.dumps(data, indent=2) + "\n")


def jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (paths and other objects as strings)."""
    return json.loads(json.dumps(obj, default=str))
