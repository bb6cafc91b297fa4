"""The OpenVINO engine: an exported ``.onnx`` or an OpenVINO IR (``.xml`` + ``.bin``) on the CPU.

The same runtime the C++ client (cpp/) uses, here behind the :class:`~dtop_export.contract.Engine` interface so
that parity, bench, evaluate and embed take it like any other engine.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.contract import OUTPUT_NAME, Engine, preprocess_from_metadata
from dtop_export.errors import DToPError

# engine precision -> OpenVINO's inference precision hint. int8: an INT8 model whose float parts run fp32.
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# dtop.inference_precision (the hint `openvino MODEL.pt --precision auto` measured) -> the engine precision it runs
# at when none is asked for
RECORDED_HINTS = {"fp32": "fp32", "f32": "fp32", "bf16": "bf16", "fp16": "fp16", "f16": "fp16"}
MODES = ("latency", "throughput")
FRAMEWORKS = {".onnx": "onnx", ".xml": "ir"}
log = logging.getLogger(__name__)
# The IR attribute that keeps a layer in its own precision under an f16 inference hint (OpenVINO's
# ``disable_fp16_compression``; ``rt_info`` key ``DisablePrecisionConversion_0`` once read). OpenVINO's Python API
# cannot put it on a node, so it travels through the IR's XML (:func:`mark_fp32_islands`).
KEEP_FP32 = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}
KEEP_FP32_KEY = "DisablePrecisionConversion_0"
WEIGHTS_KEY = "dtop.weights_sha256"  # the IR's .bin, recorded in its .xml (:func:`check_weights`)


_CORE: list[Any] = []
_CORE_LOCK = threading.Lock()


def core() -> Any:
    """The process's one ``ov.Core``, kept until exit. Each Core loads a CPU plugin of its own, which gives the thread
    that loads it an alternate signal stack of its own and unmaps it when the plugin goes: engines freed first-in
    first-out (two in a list), or on another thread, left the main thread's signal stack pointing at unmapped memory,
    and the next signal with a Python handler (SIGCHLD once a DataLoader worker ran, Ctrl-C or SIGTERM in training)
    killed the process (SIGSEGV) or wrote its frame over whatever was mapped there since (the test suite's process
    died twice of a corrupted GC list)."""
    with _CORE_LOCK:
        if not _CORE:
            import openvino as ov

            _CORE.append(ov.Core())
        return _CORE[0]


def read_model(path: Path) -> Any:
    """An ``ov.Model`` read with the frontend its suffix names (``Core.read_model`` would offer the file to every
    frontend, and TensorFlow's writes its parse errors of a broken ``.onnx`` to stderr); an IR's ``.bin`` checked
    against the ``.xml`` first (:func:`check_weights`)."""
    from openvino.frontend import FrontEndManager

    framework = FRAMEWORKS.get(path.suffix.lower())
    if framework is None:
        raise DToPError(f"{path} is not an .onnx file or an OpenVINO IR (.xml + .bin)")
    if not path.is_file():
        raise DToPError(f"model file {path} not found")
    if framework == "ir":
        check_weights(path)
    try:
        frontend = FrontEndManager().load_by_framework(framework)
        return frontend.convert(frontend.load(str(path)))
    except Exception as e:  # noqa: BLE001 - OpenVINO raises its own exception types
        raise DToPError(f"OpenVINO cannot read {path}: {first_reason(str(e))}") from e


def first_reason(text: str) -> str:
    """The line of an OpenVINO message that says what happened (not its "Check '...' failed at" header)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if not (ln.startswith(("Exception from", "Check '")) or ln.endswith(":")):
            return ln
    return lines[-1] if lines else "unknown error"


def fp32_islands(onnx_path: Path) -> tuple[set[str], set[str]]:
    """(node names, output tensor names) of the FP32 islands of a dtop-export ONNX: the nodes the FP16 ONNX keeps
    FP32 (:func:`~dtop_export.fp16.convert.plan_fp32_islands`: LayerNorm, Softmax, L2 norms, the whitening)."""
    import onnx

    from dtop_export.fp16.convert import plan_fp32_islands

    graph = onnx.load(str(onnx_path), load_external_data=False)
    islands = set(plan_fp32_islands(graph).islands)
    tensors = {t for n in graph.graph.node if n.name in islands for t in n.output if t}
    return islands, tensors


def mark_fp32_islands(xml: Path, nodes: set[str], tensors: set[str]) -> int:
    """Give the layers of the IR ``xml`` that come from the ONNX ``nodes`` (a layer named after the node, or
    ``node/part`` for the pieces OpenVINO splits it into) or produce one of ``tensors`` (a graph output takes the
    tensor's name) the :data:`KEEP_FP32` attribute; rewrites ``xml``, returns the layers marked."""
    import xml.etree.ElementTree as ET

    tree = ET.parse(xml)
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("type") in ("Const", "Parameter", "Result"):
            continue
        outputs = {n for port in layer.iterfind("output/port") for n in (port.get("names") or "").split(",") if n}
        if not from_node(layer.get("name", ""), nodes) and not outputs & tensors:
            continue
        keep_fp32(layer)
        marked += 1
    tree.write(xml, encoding="utf-8", xml_declaration=True)
    return marked


def from_node(name: str, nodes: set[str]) -> bool:
    """Whether the IR layer ``name`` comes from one of the ONNX ``nodes``: the node itself, or one of its pieces,
    ``node/part`` (an ONNX name may hold "/" itself)."""
    return name in nodes or any(name[:i] in nodes for i, c in enumerate(name) if c == "/")


def keep_fp32(layer: Any) -> bool:
    """Give the IR ``<layer>`` element the :data:`KEEP_FP32` attribute, once; whether it was added."""
    import xml.etree.ElementTree as ET

    rt_info = layer.find("rt_info")
    if rt_info is None:
        rt_info = ET.Element("rt_info")
        layer.insert(0, rt_info)
    if any(a.get("name") == KEEP_FP32["name"] for a in rt_info.iter("attribute")):
        return False
    ET.SubElement(rt_info, "attribute", KEEP_FP32)
    return True


def with_fp32_islands(model: Any, onnx_path: Path) -> tuple[Any, int]:
    """``model`` (read from the dtop-export ONNX ``onnx_path``) with its FP32 islands marked so that an f16
    inference hint leaves them FP32, as the FP16 ONNX of a TensorRT build does; and the count of marked layers.
    Round trip through a temporary IR (see :data:`KEEP_FP32`)."""
    import tempfile

    import openvino as ov

    nodes, tensors = fp32_islands(onnx_path)
    with tempfile.TemporaryDirectory(prefix="dtop-ov-") as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)
        marked = mark_fp32_islands(xml, nodes, tensors)
        return core().read_model(str(xml)), marked


def count_fp32_islands(model: Any) -> int:
    """Operations of ``model`` that carry the :data:`KEEP_FP32` attribute."""
    return sum(1 for op in model.get_ops() if KEEP_FP32_KEY in op.get_rt_info())


def ir_metadata(xml: Path) -> dict[str, str]:
    """:func:`model_metadata` of an IR read from its ``.xml`` alone (the ``<net>``'s own ``<rt_info>``; ~50 ms for
    the full model), without importing OpenVINO or reading the ``.bin``: ``read_model`` took 0.3 s, compiling for
    the contract 0.8 s. An IR that keeps no ``dtop.*`` entry there (written by another tool or OpenVINO version) is
    read by OpenVINO instead."""
    return xml_metadata(xml) or model_metadata(read_model(xml))


def recorded_precision(meta: dict[str, str]) -> tuple[str, str | None]:
    """(the hint, the engine precision) an fp32 model of metadata ``meta`` runs at when none is asked for: its
    recorded ``dtop.inference_precision`` (the hint ``openvino MODEL.pt --precision auto`` measured); ("", None)
    when it records none or is not fp32, (hint, None) for a hint the engine refuses as it opens."""
    hint = meta.get("dtop.inference_precision", "") if meta.get("dtop.precision", "fp32") == "fp32" else ""
    return hint, RECORDED_HINTS.get(hint)


def ran_at(compiled: Any, precision: str) -> str:
    """The engine precision ``compiled`` runs at, asked for ``precision``: its inference precision property (the CPU
    plugin keeps f32 where the CPU lacks the hint's arithmetic: bf16 without AVX512-BF16/AMX, f16 without AVX512-FP16),
    ``int8`` for an INT8 model (its float parts at that property)."""
    if precision == "int8":
        return precision
    try:
        name = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    except Exception:  # noqa: BLE001 - a device whose compiled model does not report it: the hint asked for
        return precision
    return RECORDED_HINTS.get(name, precision)


def xml_metadata(xml: Path) -> dict[str, str]:
    """The ``dtop.*`` entries of the ``<net>``'s own ``<rt_info>`` of the IR ``xml`` (none: an empty dict)."""
    import xml.etree.ElementTree as ET

    if not xml.is_file():
        raise DToPError(f"model file {xml} not found")
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError) as e:
        raise DToPError(f"OpenVINO cannot read {xml}: {e}") from e
    info = root.find("rt_info")
    out: dict[str, str] = {}
    for section in [] if info is None else [info, *info.findall("framework")]:
        for entry in section:
            key = entry.get("name", "") if entry.tag == "info" else entry.tag  # a key that is no XML name: <info>
            if key.startswith("dtop.") and "value" in entry.attrib:
                out[key] = entry.attrib["value"]
    return out


def check_weights(xml: Path) -> None:
    """Refuse an IR whose ``.bin`` is not the one its ``.xml`` was written with (``dtop.weights_sha256``, which
    ``dtop-export openvino`` records): OpenVINO reads weights by offset, so a ``.bin`` left from another export of
    the same architecture (a retrained checkpoint; only the ``.xml`` copied) ran silently with the old weights under
    the new ``.xml``'s metadata. An IR without the entry (another tool, an older dtop-export) is not checked."""
    from dtop_export.digest import file_sha256

    expected = xml_metadata(xml).get(WEIGHTS_KEY)
    if not expected:
        return
    weights = xml.with_suffix(".bin")
    if not weights.is_file():
        raise DToPError(f"{xml}'s weights {weights.name} not found: copy the .xml and its .bin together")
    if file_sha256(weights) != expected:
        raise DToPError(
            f"{weights} is not the .bin {xml.name} was written with (sha256 differs: left from another export?): "
            "copy the .xml and its .bin together, or write both again with `dtop-export openvino`"
        )


def model_metadata(model: Any) -> dict[str, str]:
    """The ``dtop.*`` metadata of an ``ov.Model``: ONNX ``metadata_props`` appear under ``rt_info["framework"]``;
    an IR written by ``dtop-export openvino`` keeps them there too."""
    info = model.get_rt_info()
    sections = [info, info["framework"]] if "framework" in list(info.keys()) else [info]
    out: dict[str, str] = {}
    for section in sections:
        for key in list(section.keys()):
            value = section[key]
            if str(key).startswith("dtop."):
                out[str(key)] = value.astype(str) if hasattr(value, "astype") else str(value)
    return out


class OpenVinoEngine(Engine):
    """Runs a dtop-export model with OpenVINO.

    precision: ``fp32`` (default; the CPU plugin's f32 path, pinned: OpenVINO would pick bf16 by itself on an
    AMX CPU), ``bf16`` or ``fp16`` (inference precision hints; bf16 pays only with AMX, measure first), or
    ``int8`` (an IR from ``dtop-export openvino --int8``, or a QDQ ONNX from ``dtop-export quantize``; taken from
    the file's metadata when not given). Not given, an fp32 IR runs at the hint it records as
    ``dtop.inference_precision`` (``openvino MODEL.pt --precision auto``: what ``bench --recommend`` measured).
    threads: inference threads (default: OpenVINO's). mode: ``latency``
    (one request, all cores) or ``throughput`` (OpenVINO's streams; for many concurrent requests). device:
    ``CPU`` (OpenVINO's name). A fixed-batch export runs in chunks of its batch, like the ONNX Runtime engine.
    ``precision`` afterwards is what the CPU runs (:func:`ran_at`: fp32, with a warning, for a hint it lacks).
    """

    name = "openvino"

    def __init__(
        self,
        model: str | Path,
        *,
        precision: str | None = None,
        threads: int | None = None,
        mode: str = "latency",
        device: str = "CPU",
    ) -> None:
        import openvino.properties as props
        import openvino.properties.hint as hints

        path = Path(model)
        ov_model = read_model(path)
        meta = model_metadata(ov_model)
        if "dtop.format" not in meta:
            raise DToPError(f"{path} has no dtop-export metadata: export it with `dtop-export onnx CKPT.pt`")
        file_precision = meta.get("dtop.precision", "fp32")
        hint, recorded = recorded_precision(meta)
        if hint and recorded is None and not precision:  # as the C++ client refuses it
            raise DToPError(
                f"{path} records dtop.inference_precision {hint!r}, not one of f32, bf16, f16: give a precision "
                f"({path.name}:fp32)"
            )
        precision = precision or recorded or file_precision
        if precision not in INFERENCE_PRECISION:
            raise DToPError(f"unknown OpenVINO precision {precision!r}: choose {', '.join(INFERENCE_PRECISION)}")
        if file_precision == "int8" and precision != "int8":
            raise DToPError(
                f"{path} is an int8 model, not {precision}: drop :{precision} (an INT8 model runs its float parts "
                "in f32)"
            )
        if precision == "int8" and file_precision != "int8":
            raise DToPError(
                f"{path} is not an INT8 model ({file_precision}): make one with `dtop-export openvino MODEL.onnx "
                "--int8`"
            )
        if mode not in MODES:
            raise DToPError(f"unknown OpenVINO mode {mode!r}: choose latency or throughput")
        if threads is not None and threads < 1:
            raise DToPError(f"threads must be >= 1, got {threads}")
        self.fp32_islands = 0
        if precision == "fp16":
            # what the FP16 ONNX of a TensorRT build keeps FP32 stays FP32 here too (the whitening, L2 norms,
            # LayerNorm, Softmax); an IR from `dtop-export openvino` carries the marks already
            if path.suffix.lower() == ".onnx":
                ov_model, self.fp32_islands = with_fp32_islands(ov_model, path)
            else:
                self.fp32_islands = count_fp32_islands(ov_model)
                if not self.fp32_islands:
                    log.warning(
                        "%s marks no FP32 islands: under fp16 its whitening and L2 norms run in FP16 too; "
                        "write it again with `dtop-export openvino MODEL.onnx`",
                        path,
                    )
        config: dict[str, Any] = {
            hints.inference_precision: INFERENCE_PRECISION[precision],
            hints.performance_mode: hints.PerformanceMode.LATENCY
            if mode == "latency"
            else hints.PerformanceMode.THROUGHPUT,
        }
        if threads:
            config[props.inference_num_threads] = threads
        try:
            self.compiled = core().compile_model(ov_model, device, config)
        except Exception as e:  # noqa: BLE001
            raise DToPError(f"OpenVINO cannot compile {path} for {device}: {first_reason(str(e))}") from e
        asked, precision = precision, ran_at(self.compiled, precision)
        if precision != asked:
            log.warning(
                "%s: %s has no %s inference (OpenVINO ignores the hint): it runs %s",
                path,
                "this CPU" if device.upper() == "CPU" else device,
                asked,
                precision,
            )
        names = [set(o.get_names()) for o in self.compiled.outputs]
        self._output = next((i for i, n in enumerate(names) if meta.get("dtop.output_name", OUTPUT_NAME) in n), 0)
        self.request = self.compiled.create_infer_request()
        self.source = path
        self.metadata = meta
        self.precision = precision
        self.device = "cpu" if device.upper() == "CPU" else device.lower()
        self.mode, self.threads = mode, threads
        self.preprocess = preprocess_from_metadata(meta)
        self.stride = self.preprocess.stride
        self.descriptor_dim = int(meta.get("dtop.descriptor_dim", 0)) or int(
            self.compiled.outputs[self._output].get_partial_shape()[-1].get_length()
        )
        hw = json.loads(meta.get("dtop.static_hw") or "null")
        self.static_hw = tuple(int(v) for v in hw) if hw else None
        self.fixed_batch = json.loads(meta.get("dtop.fixed_batch") or "null")

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_exported(images, self._run, self.static_hw, self.fixed_batch)

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self.request.infer({0: x})
        return np.array(out[self.compiled.outputs[self._output]], dtype=np.float32, copy=True)

    def describe(self) -> dict[str, Any]:
        import openvino as ov

        return {
            **super().describe(),
            "runtime": f"openvino {ov.get_version()}",
            "mode": self.mode,
            "threads": self.threads,
            **({"fp32_islands": self.fp32_islands} if self.precision == "fp16" else {}),
        }
