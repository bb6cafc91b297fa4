"""What to benchmark: a model file plus engine options, as written on the command line (``PATH[:opt,k=v]``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtop_export.engines import CHECKPOINT_SUFFIXES, RUNTIMES
from dtop_export.errors import DToPError

PRECISIONS = ("fp32", "bf16", "fp16", "int8")


@dataclass
class EngineSpec:
    """One engine to benchmark: a file plus engine options (``PATH[:opt,key=value,...]`` on the CLI)."""

    path: Path
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    build_seconds: float | None = None
    derived_from: str | None = None

    @property
    def kind(self) -> str:
        s = self.path.suffix.lower()
        return "checkpoint" if s in CHECKPOINT_SUFFIXES else s.lstrip(".")


def parse_spec(text: str) -> EngineSpec:
    """``model.pt``, ``model.pt:bf16``, ``model.onnx:threads=1,label=ort``, ``model.onnx:openvino``,
    ``model.pt:fp16,device=cuda:1`` -> :class:`EngineSpec`.

    A bare option is a precision (fp32, bf16, fp16, int8) or a runtime (``openvino`` runs an ``.onnx`` in
    OpenVINO); ``key=value`` options go to the engine's constructor (ints and floats are converted), except
    ``label``, which names the row.
    """
    path_text, opts_text = text, ""
    colon = text.find(":", max(text.rfind("/"), text.rfind("\\")) + 1)  # the first ':' in the file name
    if colon > 0:  # so that a value may hold one: device=cuda:1
        path_text, opts_text = text[:colon], text[colon + 1 :]
    options: dict[str, Any] = {}
    label = None
    for item in filter(None, (o.strip() for o in opts_text.split(","))):
        if "=" in item:
            k, v = (p.strip() for p in item.split("=", 1))
            if k == "label":
                label = v
                continue
            options[k] = _coerce(v)
        elif item in PRECISIONS:
            options["precision"] = item
        elif item == "auto":  # resolved by the bench command: what `bench --recommend` chose on this CPU
            options["precision"] = "auto"
        elif item in RUNTIMES:
            options["runtime"] = item
        else:
            raise DToPError(f"cannot read engine option {item!r} in {text!r}: use a precision, a runtime or key=value")
    path = Path(path_text)
    if not path.exists():
        raise DToPError(f"model file {path} not found")
    return EngineSpec(path=path, options=options, label=label)


def _coerce(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def parse_int_list(text: str, what: str) -> list[int]:
    """``"224,384,512"`` -> [224, 384, 512]; a one-line DToPError otherwise."""
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise DToPError(f"cannot read {what} {text!r}: write comma-separated positive integers, e.g. 384,512")
    return values
