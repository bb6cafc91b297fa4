"""The ONNX Runtime engine: CPU by default, CUDA / TensorRT execution providers when asked for."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.errors import DToPError
from engines.base import Engine

_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class OnnxRuntimeEngine(Engine):
    """Runs a dtop-export ONNX file (``images`` -> ``descriptors``) in an ONNX Runtime session.

    provider: ``cpu`` (default), ``cuda`` or ``tensorrt``; a provider that is not installed is an
    error, never a silent fall-back to CPU. threads: intra-op threads (default: ORT's choice).
    graph_optimization: ``all`` (default), ``extended``, ``basic`` or ``disabled``.
    """

    name = "onnxruntime"

    def __init__(
        self,
        path: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        graph_optimization: str = "all",
    ) -> None:
        import onnxruntime as ort

        from dtop_export.export import INPUT_NAME, OUTPUT_NAME
        from dtop_export.preprocess import PreprocessConfig

        self.source = Path(path)
        if provider not in _PROVIDERS:
            raise DToPError(f"unknown ONNX Runtime provider {provider!r}: choose {', '.join(_PROVIDERS)}")
        wanted = _PROVIDERS[provider]
        if wanted not in ort.get_available_providers():
            raise DToPError(
                f"ONNX Runtime has no {wanted} here (available: {', '.join(ort.get_available_providers())}); "
                "install onnxruntime-gpu for cuda/tensorrt"
            )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        opts.graph_optimization_level = levels[graph_optimization]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=[wanted])
        except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
            raise DToPError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0]}") from e
        meta: dict[str, Any] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.metadata = meta
        inputs = self.session.get_inputs()
        outputs = self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in outputs]:
            raise DToPError(
                f"{path} is not a dtop-export model: expected input '{INPUT_NAME}' and output '{OUTPUT_NAME}'"
            )
        self._input = inputs[0]
        fixed_batch = self._input.shape[0]
        self.fixed_batch = fixed_batch if isinstance(fixed_batch, int) else None
        hw = self._input.shape[2:]
        self.static_hw = tuple(hw) if all(isinstance(v, int) for v in hw) else None
        self.device = "cpu" if provider == "cpu" else "cuda:0"
        self.provider = provider
        self.precision = meta.get("dtop.precision", "fp32")
        self.stride = int(meta.get("dtop.stride", 16))
        self.descriptor_dim = int(meta.get("dtop.descriptor_dim", outputs[0].shape[-1]))
        self.preprocess = PreprocessConfig(
            mean=tuple(json.loads(meta.get("dtop.mean", "[0.5, 0.5, 0.5]"))),
            std=tuple(json.loads(meta.get("dtop.std", "[0.5, 0.5, 0.5]"))),
            color_order=meta.get("dtop.color_order", "RGB"),
            stride=self.stride,
            **_resize_fields(meta.get("dtop.resize_policy")),
        )

    def embed(self, images: np.ndarray) -> np.ndarray:
        from dtop_export.export import INPUT_NAME, OUTPUT_NAME

        x = self._check_images(images)
        if self.static_hw is not None and tuple(x.shape[2:]) != self.static_hw:
            from dtop_export.errors import ShapeError

            raise ShapeError(
                f"{self.source} was exported for {self.static_hw[0]}x{self.static_hw[1]} inputs only, got "
                f"{x.shape[2]}x{x.shape[3]}: resize, or re-export without --static"
            )
        if self.fixed_batch is None or x.shape[0] == self.fixed_batch:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0].astype(np.float32)
        # A fixed-batch export: run in chunks of that batch, padding the last one.
        out = []
        b = self.fixed_batch
        for i in range(0, x.shape[0], b):
            chunk = x[i : i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            out.append(self.session.run([OUTPUT_NAME], {INPUT_NAME: chunk})[0][:n])
        return np.concatenate(out).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "provider": self.provider}


def _resize_fields(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    d = json.loads(text)
    return {
        "resize": d.get("policy", "longest_side"),
        "size": d.get("size", 1024),
        "interpolation": d.get("interpolation", "bilinear"),
    }
