"""Run a ``.plan`` built by :func:`~dtop_export.engines.tensorrt.builder.build_engine` behind the engine interface.

The runner reads the sidecar first (backend, version and GPU checks: a plan runs only with the TensorRT flavour
and version that built it, on its compute capability), makes its GPU current before TensorRT loads anything,
sets input shapes per call, splits batches larger than the profile allows, pads smaller ones, rejects sizes
outside every profile, and runs ``execute_async_v3`` on its own CUDA stream with device buffers from torch. One
execution context serves every profile; its activation memory is sized for the profile in use
(``ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE``), not for the largest one.

TensorRT-RTX compiles kernels for the GPU at the first run of each shape: the context is made from a runtime
config holding a *runtime cache* loaded from a file (``runtime_cache=``, default under
``~/.cache/dtop-export/tensorrt-rtx/``) and saved back on :meth:`TensorRTEngine.close`, so a second process
starts without recompiling. A cache from another GPU, driver or TensorRT-RTX is ignored with a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from dtop_export.atomic import atomic_write_bytes
from dtop_export.contract import Engine, preprocess_from_metadata
from dtop_export.engines.tensorrt import install
from dtop_export.engines.tensorrt.install import create_runtime, process_logger, require_tensorrt_and_gpu, use_device
from dtop_export.engines.tensorrt.profiles import Profile, format_shape, select_profile, split_batches
from dtop_export.engines.tensorrt.sidecar import compatibility, read_sidecar
from dtop_export.engines.tensorrt.targets import describe
from dtop_export.errors import DToPError, ShapeError

log = logging.getLogger("dtop_export.engines.tensorrt")


class TensorRTEngine(Engine):
    """Runs a ``.plan`` built by :func:`build_engine` (its JSON sidecar next to it) on a CUDA GPU.

    Input shapes are set per call; a batch larger than the profile's maximum is split, one smaller than
    its minimum padded; a size outside every profile is a :class:`ShapeError`.
    """

    name = "tensorrt"

    def __init__(
        self,
        path: str | Path,
        *,
        sidecar: str | Path | None = None,
        device: int = 0,
        runtime_cache: str | Path | None = None,
    ) -> None:
        self.source = Path(path)
        if not self.source.is_file():
            raise DToPError(f"engine file {self.source} not found")
        self.info = read_sidecar(self.source, sidecar)
        self.flavour = self.info.flavour
        if runtime_cache is not None and self.flavour.timing_cache:
            raise DToPError(f"{self.source}: runtime_cache= is for TensorRT-RTX plans; this one was built by TensorRT")
        try:
            trt, gpu = require_tensorrt_and_gpu(device, self.flavour)
        except DToPError as e:
            why = str(e)
            no_gpu = install.cuda_gpu(device) is None and install.cuda_device_count() == 0  # none (not: no such index)
            if no_gpu and self.flavour in install.installed_flavours():
                cc = str(self.info.gpu.get("compute_capability", "?"))  # not the builder's --target hint: it is built
                why = f"no CUDA GPU is visible (device {device}); run it on a GPU of {describe(cc)}"
            raise DToPError(f"{self.source} was built with {self.info.built_with()}: {why}") from e
        problem, warning = compatibility(self.info, trt.__version__, gpu, self.flavour, self.source)
        if problem:
            raise DToPError(f"{self.source}: {problem}")
        if warning:
            log.warning("%s: %s", self.source, warning)
        import torch

        self._trt = trt
        self._index = gpu.index
        self._cache: Any = None
        self.runtime_cache = None
        if not self.flavour.timing_cache:  # TensorRT-RTX: JIT kernels kept in a runtime cache
            self.runtime_cache = (
                Path(runtime_cache) if runtime_cache else default_runtime_cache(self.source, self.info, gpu)
            )
        use_device(gpu.index)  # before the runtime: TensorRT deserializes onto the current CUDA device
        self._logger = process_logger(trt)
        self._runtime = create_runtime(trt, self._logger, self.flavour)
        self.engine = self._runtime.deserialize_cuda_engine(self.source.read_bytes())
        if self.engine is None:
            raise DToPError(
                f"TensorRT could not load {self.source} ({self._logger.last_error or 'corrupt or foreign plan'}): "
                "rebuild it with `dtop-export trt`"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._input, self._output = self.info.input_name, self.info.output_name
        if self._input not in names or self._output not in names:
            raise DToPError(f"{self.source} has tensors {names}, expected {self._input} and {self._output}")
        self.profiles = [
            Profile(*(tuple(int(v) for v in s) for s in self.engine.get_tensor_profile_shape(self._input, k)))
            for k in range(self.engine.num_optimization_profiles)
        ]
        self.device = f"cuda:{device}"
        self._torch_device = torch.device(self.device)
        self.precision = str(self.info.precision.get("mode", "fp32"))
        meta = self.info.metadata
        self.preprocess = preprocess_from_metadata(meta)
        self.stride = self.preprocess.stride
        self.descriptor_dim = int(meta.get("dtop.descriptor_dim", 0)) or int(
            self.engine.get_tensor_shape(self._output)[-1]
        )
        self._stream = torch.cuda.Stream(device=self._torch_device)  # not the default stream
        self._ctx: Any = None
        self._profile = -1

    def _context(self, k: int) -> Any:
        """The one execution context, switched to profile ``k`` (memory re-sized on a switch)."""
        if self._ctx is None:
            self._logger.reset()
            strategy = getattr(self._trt, "ExecutionContextAllocationStrategy", None)
            if self.runtime_cache is not None:
                self._ctx = self.engine.create_execution_context(self._runtime_config(strategy.ON_PROFILE_CHANGE))
            elif strategy is not None:
                self._ctx = self.engine.create_execution_context(strategy.ON_PROFILE_CHANGE)
            else:  # pragma: no cover - TensorRT < 10
                self._ctx = self.engine.create_execution_context()
            if self._ctx is None:
                raise DToPError(f"TensorRT could not create an execution context: {self._logger.last_error}")
            self._profile = 0
        if k != self._profile:
            if not self._ctx.set_optimization_profile_async(k, self._stream.cuda_stream):
                raise DToPError(f"TensorRT could not switch to optimization profile {k}: {self._logger.last_error}")
            self._profile = k
        return self._ctx

    def _runtime_config(self, strategy: Any) -> Any:
        """TensorRT-RTX: a runtime config with the allocation ``strategy`` and the runtime cache, loaded from
        :attr:`runtime_cache` when it holds one this GPU, driver and TensorRT-RTX can use."""
        config = self.engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        self._cache = config.create_runtime_cache()
        path = self.runtime_cache
        blob = path.read_bytes() if path is not None and path.is_file() else b""
        if blob and not self._cache.deserialize(blob):
            log.warning(
                "runtime cache %s ignored (made for another GPU, driver or TensorRT-RTX, or corrupt): kernels are "
                "compiled again and the cache is rewritten on close()",
                path,
            )
        if not config.set_runtime_cache(self._cache):
            raise DToPError(f"TensorRT-RTX could not attach the runtime cache: {self._logger.last_error}")
        return config

    def save_runtime_cache(self) -> Path | None:
        """Write the kernels compiled so far to :attr:`runtime_cache` (atomic); None when there is nothing to keep."""
        if self._cache is None or self.runtime_cache is None:
            return None
        blob = bytes(memoryview(self._cache.serialize()))
        if not blob:
            return None
        self.runtime_cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.runtime_cache, blob)
        return self.runtime_cache

    def _torch_dtype(self, name: str) -> Any:
        import torch

        dt = self.engine.get_tensor_dtype(name)
        table = {self._trt.float32: torch.float32, self._trt.float16: torch.float16}
        if dt not in table:
            raise DToPError(f"{self.source}: tensor {name} has type {dt}, expected float32 or float16")
        return table[dt]

    def _run(self, k: int, chunk: np.ndarray) -> np.ndarray:
        import torch

        ctx = self._context(k)
        self._logger.reset()
        with torch.cuda.device(self._index), torch.cuda.stream(self._stream):
            x = torch.from_numpy(chunk).to(self._torch_device, dtype=self._torch_dtype(self._input))
            if not ctx.set_input_shape(self._input, tuple(chunk.shape)):
                raise ShapeError(f"{self.source}: TensorRT refused input shape {format_shape(chunk.shape)}")
            out = torch.empty(
                tuple(ctx.get_tensor_shape(self._output)),
                dtype=self._torch_dtype(self._output),
                device=self._torch_device,
            )
            ctx.set_tensor_address(self._input, x.data_ptr())
            ctx.set_tensor_address(self._output, out.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise DToPError(f"TensorRT execution failed: {self._logger.last_error or 'see the TensorRT log'}")
            result = out.float().cpu()
        self._stream.synchronize()
        return result.numpy()

    def embed(self, images: np.ndarray) -> np.ndarray:
        x = self.check_images(images)
        if x.shape[0] == 0:
            return self.no_descriptors()
        k = select_profile(self.profiles, x.shape[1:])
        prof = self.profiles[k]
        outs = []
        for start, stop, pad in split_batches(x.shape[0], prof.min[0], prof.max[0]):
            chunk = x[start:stop]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self._run(k, np.ascontiguousarray(chunk))[: stop - start])
        return np.concatenate(outs).astype(np.float32)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "backend": self.flavour.label,
            "tensorrt_version": self.info.tensorrt_version,
            "gpu": self.info.gpu.get("name") or self.info.gpu.get("target"),
            "typing": self.info.precision.get("typing"),
            "tf32": self.info.precision.get("tf32"),  # float32 layers may run in TF32 (bench reads them against it)
            "profiles": [p.describe() for p in self.profiles],
        }

    def close(self) -> None:
        if self._cache is not None:
            try:
                self.save_runtime_cache()
            except (OSError, DToPError) as e:  # a read-only cache folder must not fail the job that ran
                log.warning("runtime cache not saved to %s: %s", self.runtime_cache, e)
            self._cache = None
        self._ctx = None
        self._profile = -1


def default_runtime_cache(plan: Path, info: Any, gpu: Any) -> Path:
    """``$XDG_CACHE_HOME/dtop-export/tensorrt-rtx/<plan name>-<sidecar hash>-sm<cc>.rtxcache``: one cache per
    build (the sidecar records when and from what) and GPU architecture, outside the model's folder (which a
    service may not be allowed to write)."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(info.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    from dtop_export.host import cache_dir

    return cache_dir("tensorrt-rtx") / f"{plan.stem}-{digest}-sm{gpu.compute_capability.replace('.', '')}.rtxcache"
