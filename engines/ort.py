"""The ONNX Runtime engine: CPU by default, CUDA / TensorRT execution providers when asked for."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.contract import INPUT_NAME, OUTPUT_NAME, Engine, metadata_of, preprocess_from_metadata
from dtop_export.errors import DToPError

if TYPE_CHECKING:
    import onnx

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GRAPH_OPTIMIZATION = ("all", "extended", "basic", "disabled")


class OnnxRuntimeEngine(Engine):
    """Runs a dtop-export ONNX model (``images`` -> ``descriptors``) in an ONNX Runtime session.

    model: a file, or an in-memory ``onnx.ModelProto`` (the FP16 audit's emulated and instrumented graphs).
    provider: ``cpu`` (default), ``cuda`` or ``tensorrt``; a provider that is not installed is an error, never
    a silent fall-back to CPU. threads: intra-op threads (default: ORT's choice). graph_optimization: ``all``
    (default), ``extended``, ``basic`` (constant folding only: what an emulated graph needs, so that no fusion
    skips its casts) or ``disabled``. spin: whether idle intra-op threads spin (ORT's default) or sleep
    (``spin=false``: cores left to work beside the engine, e.g. a corpus job's decoding, stay theirs). on_run:
    called after every run with the input batch and *every* graph output by name (an instrumented model's extra
    outputs included).
    Preprocessing, stride, precision and descriptor size come from the model's metadata
    (:func:`dtop_export.contract.preprocess_from_metadata`).
    """

    name = "onnxruntime"

    def __init__(
        self,
        model: str | Path | onnx.ModelProto,
        on_run: Callable[[np.ndarray, dict[str, np.ndarray]], None] | None = None,
        *,
        provider: str = "cpu",
        threads: int | None = None,
        graph_optimization: str = "all",
        spin: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        if provider not in PROVIDERS:
            raise DToPError(f"unknown ONNX Runtime provider {provider!r}: choose {', '.join(PROVIDERS)}")
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise DToPError(f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATION)}")
        wanted = PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            from dtop_export.engines.tensorrt.install import onnxruntime_conflict

            # onnxruntime-gpu beside onnxruntime: each overwrites the other's module, so the GPU build replaces it
            fix = onnxruntime_conflict() or (
                "ONNX Runtime's GPU build replaces the CPU one: pip uninstall -y onnxruntime && pip install "
                "onnxruntime-gpu"
            )
            raise DToPError(
                f"ONNX Runtime has no {wanted} here (available: {', '.join(ort.get_available_providers())}); {fix}"
            )
        in_memory = not isinstance(model, (str, Path))
        opts = ort.SessionOptions()
        if in_memory:
            opts.log_severity_level = 3  # generated graphs (audits): ORT's notes about them are noise
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if spin is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        opts.graph_optimization_level = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[graph_optimization]
        what = "the in-memory model" if in_memory else str(model)
        self.source = None if in_memory else Path(model)
        try:
            blob = model.SerializeToString() if in_memory else str(model)
            self.session = ort.InferenceSession(blob, sess_options=opts, providers=[wanted])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise DToPError(f"ONNX Runtime cannot load {what}: {str(e).splitlines()[0]}") from e
        meta = metadata_of(model) if in_memory else dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise DToPError(
                f"{what} is not a dtop-export model: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}'"
            )
        fixed_batch = inputs[0].shape[0]
        self.fixed_batch = fixed_batch if isinstance(fixed_batch, int) else None
        hw = inputs[0].shape[2:]
        self.static_hw = tuple(hw) if all(isinstance(v, int) for v in hw) else None
        self.device = "cpu" if provider == "cpu" else "cuda:0"
        self.provider = provider
        self.precision = meta.get("dtop.precision", "fp32")
        self.preprocess = preprocess_from_metadata(meta)
        self.stride = self.preprocess.stride
        out_shape = next(o.shape for o in outputs if o.name == OUTPUT_NAME)
        if "dtop.descriptor_dim" not in meta and not (out_shape and isinstance(out_shape[-1], int)):
            raise DToPError(
                f"{what} is not a dtop-export model: its output '{OUTPUT_NAME}' {out_shape} has no fixed descriptor "
                "size and no dtop.descriptor_dim metadata: export it with `dtop-export onnx CKPT.pt`"
            )
        self.descriptor_dim = int(meta.get("dtop.descriptor_dim", out_shape[-1]))
        self.on_run = on_run
        self._fetch = [o.name for o in outputs] if on_run is not None else [OUTPUT_NAME]

    def _run(self, x: np.ndarray) -> np.ndarray:
        res = dict(zip(self._fetch, self.session.run(self._fetch, {INPUT_NAME: x})))
        if self.on_run is not None:
            self.on_run(x, res)
        return np.asarray(res[OUTPUT_NAME], dtype=np.float32)

    def embed(self, images: np.ndarray) -> np.ndarray:
        return self.embed_exported(images, self._run, self.static_hw, self.fixed_batch)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "provider": self.provider}
