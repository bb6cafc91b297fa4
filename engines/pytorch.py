"""The PyTorch engine: the reference every exported artifact is compared against."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export.contract import Engine

if TYPE_CHECKING:
    from dtop_export.checkpoint import Checkpoint, Whitening
    from dtop_export.model import DToP
    from dtop_export.preprocess import PreprocessConfig

# torch.compile settings as they arrive from Python or a bench spec (``model.pt:bf16,compile=true``) -> mode
COMPILE_MODES: dict[bool | str, str | None] = {
    False: None,
    "false": None,
    "none": None,
    True: "default",
    "true": "default",
    "default": "default",
    "max-autotune": "max-autotune",
    "reduce-overhead": "reduce-overhead",
}


def check_device(device: str) -> None:
    """Refuse, in one line that says what to do, a device PyTorch cannot use here (before the model moves)."""
    import os

    import torch

    from dtop_export.errors import DToPError

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DToPError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type != "cuda":
        return
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DToPError(
            f"device {device}: PyTorch sees no CUDA GPU here (torch {torch.__version__}"
            + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "")
            + "): use device=cpu, or run on a machine with an NVIDIA GPU (a Ray job reserves one per actor with "
            "--gpus-per-actor)"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DToPError(f"device {device}: PyTorch sees {count} CUDA GPU(s) here: use cuda:0 to cuda:{count - 1}")


class TorchEngine(Engine):
    """Eager PyTorch on CPU/CUDA: ``normalize(whiten(normalize(model(x))))`` like the exported graph.

    precision: ``fp32`` (reference: the model as trained), ``bf16`` or ``fp16``.

    cast: how a bf16/fp16 engine runs. ``autocast`` (the deployment path; the default for bf16, and for fp16 on
    CUDA): batchnorm and weight standardisation folded as in the export, conv/linear weights cast once to the
    dtype, channels-last, the network under ``torch.autocast`` with FP32 islands (the first convolution and the
    projections to descriptor space, LayerNorm and GroupNorm in float32 on every device, attention through fused
    ``scaled_dot_product_attention``, whose softmax accumulates in float32; the L2 norms and the whitening in
    float32 outside autocast): on CUDA the tensor cores, on CPUs
    oneDNN's AMX/AVX-512-BF16 kernels. ``half`` (fp16 only; the default for fp16 on the CPU): ``model.half()``,
    every op in FP16 with FP32 accumulation, for accuracy audits; on the CPU its convolutions and GEMMs run through
    :func:`fp16_cpu_products`, since PyTorch's own CPU FP16 convolution is a slow reference kernel.

    compile: ``torch.compile`` the network (``True``/``default``, ``max-autotune``: inductor's GEMM templates, and
    CUDA graphs on CUDA; ``reduce-overhead``: CUDA graphs only, CUDA only; frozen weights). Meant for fixed
    input sizes: the first call at a new shape compiles (about a minute for the full model on 2 cores).
    ``dynamic``: torch.compile's (None: after a second shape, one dynamic-shape graph serves all; False: one
    static graph per shape, up to ``recompile_limit`` graphs, then eager). ``fixed_batch``: pad every batch to
    this many images (the last repeated, as a ``--batch`` export), so that a compiled engine keeps one graph per
    image shape whatever batch a job's last batch has.

    On CUDA, :meth:`embed_pixels_stream` takes uint8 batches: pinned host memory, the copy of batch i+1 on a
    side stream while batch i runs, normalisation on the device, descriptors copied back asynchronously.
    ``cudnn.benchmark`` is on (it picks the fastest convolution per shape: shapes repeat in a shape-grouped job), and
    cuDNN's TF32 off (process-wide settings, as PyTorch has them): float32 convolutions are float32, the fp32
    reference's and a bf16/fp16 engine's FP32 first convolution alike, whichever engine a process opened first
    (an fp32 engine alone turned it off: a later fp16 engine's parity then differed from one opened alone).

    threads: torch's intra-op threads. PyTorch has one count per process: it is set when the engine opens and again
    before each :meth:`embed` that finds another, so two engines of one process (``bench a.pt a.pt:threads=1``) each
    run on their own.

    Eager fp32/``half`` engines opened with :meth:`from_checkpoint` (a model of their own) standardise the stem's
    weights once, not in every pass (:func:`~dtop_export.model.backbone.cache_weight_standardization`, the same
    bits); a model passed in is left as the caller set it.
    """

    name = "pytorch"

    def __init__(
        self,
        model: DToP,
        preprocess: PreprocessConfig,
        whitening: Whitening | None = None,
        source: Path | None = None,
        *,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        compile: bool | str = False,  # noqa: A002 - the torch.compile option, named as users know it
        dynamic: bool | None = None,
        cast: str | None = None,
        fixed_batch: int | None = None,
        recompile_limit: int = 64,
    ) -> None:
        import torch

        from dtop_export.errors import DToPError

        if threads:
            torch.set_num_threads(threads)
        self.threads = int(threads) if threads else None
        if precision not in ("fp32", "bf16", "fp16"):
            raise DToPError(f"pytorch engine precision must be fp32, bf16 or fp16, got {precision!r}")
        if compile not in COMPILE_MODES:
            raise DToPError(f"compile must be false, true/default, max-autotune or reduce-overhead, got {compile!r}")
        if fixed_batch is not None and not int(fixed_batch) >= 1:
            raise DToPError(f"fixed_batch must be >= 1, got {fixed_batch}")
        check_device(str(device))
        on_cuda = torch.device(device).type == "cuda"
        self.compile_mode = COMPILE_MODES[compile]
        if self.compile_mode == "reduce-overhead" and not on_cuda:
            raise DToPError("compile=reduce-overhead captures CUDA graphs: it needs device=cuda (use compile=true or "
                            "max-autotune on the CPU)")  # fmt: skip
        cast = cast or ("half" if precision == "fp16" and not on_cuda else "autocast" if precision != "fp32" else "")
        if precision == "fp32" and cast:
            raise DToPError(f"cast={cast} is for bf16/fp16 engines; fp32 runs the model as trained")
        if cast not in ("", "autocast", "half") or (cast == "half" and precision != "fp16"):
            raise DToPError(f"cast must be autocast (bf16, fp16) or half (fp16 only), got {cast!r} for {precision}")
        self.cast = cast
        self.stride = model.stride
        self.channels_last = cast == "autocast"
        if cast == "autocast":
            from dtop_export.engines.torch_deploy import LowPrecisionDeploy

            dtype = torch.bfloat16 if precision == "bf16" else torch.float16
            self.model = LowPrecisionDeploy(model.eval(), dtype, torch.device(device).type).to(device)
        else:
            self.model = model.eval().to(device)
        if cast == "half":
            self.model = self.model.half()
        if on_cuda:
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.allow_tf32 = False  # float32 convolutions in float32 (matmuls: PyTorch's default)
        if self.compile_mode is not None:
            import torch._dynamo.config as dynamo_config
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold the weights (prepacked for oneDNN / AMX)
            name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), int(recompile_limit)))
            self.model = torch.compile(self.model, mode=self.compile_mode, dynamic=dynamic)
        if whitening is not None and str(device) != "cpu":  # the whitening runs where the descriptors are
            import dataclasses

            whitening = dataclasses.replace(whitening, mean=whitening.mean.to(device), proj=whitening.proj.to(device))
        self.whitening = whitening
        self.precision = precision
        self.device = device
        self.fixed_batch = int(fixed_batch) if fixed_batch else None
        self.preprocess = preprocess
        self.descriptor_dim = whitening.out_dim if whitening is not None else model.descriptor_dim
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, whiten: bool = True, **kwargs: object) -> TorchEngine:
        from dtop_export.checkpoint import load_checkpoint
        from dtop_export.model.backbone import cache_weight_standardization

        ckpt: Checkpoint = load_checkpoint(path)
        engine = cls(
            ckpt.build_model(),
            ckpt.preprocess,
            whitening=ckpt.whitening if whiten else None,
            source=Path(path),
            **kwargs,  # type: ignore[arg-type]
        )
        if engine.cast != "autocast" and engine.compile_mode is None:  # autocast folds it; inductor freezes it
            cache_weight_standardization(engine.model)  # a model of its own, whose weights stay: standardised once
        return engine

    def embed(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(self.check_images(images)).to(self.device)
        if x.shape[0] == 0:
            return self.no_descriptors()
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)  # process-wide: another engine of this process may have set its own
        with torch.inference_mode():
            return self._descriptors(x).cpu().numpy().astype(np.float32)

    def _descriptors(self, x: Any) -> Any:
        """float32 images [B, 3, H, W] on the device -> float32 descriptors [B, N] on the device (asynchronous on
        CUDA). The L2 norm and the whitening run in float32, outside any autocast (FP32 islands)."""
        import torch
        import torch.nn.functional as F

        n = x.shape[0]
        if self.fixed_batch and n % self.fixed_batch:
            x = torch.cat([x, x[-1:].expand(self.fixed_batch - n % self.fixed_batch, *x.shape[1:])])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.compile_mode is not None and x.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()  # a new inference step: CUDA graphs may reuse outputs
        if self.cast == "half":
            with fp16_cpu_products() if x.device.type == "cpu" else contextlib.nullcontext():
                u = self.model(x.half())
        else:
            u = self.model(x)
        d = F.normalize(u[:n].float(), dim=-1)
        return self.whitening.apply(d) if self.whitening is not None else d

    def embed_pixels_stream(self, batches: Iterable[Any]) -> Iterator[np.ndarray]:
        """On CUDA: uint8 batches [B, H, W, 3] (numpy, or torch tensors already on the device, e.g. GPU-decoded)
        through pinned memory and a copy stream, normalised on the device with the arithmetic of
        :func:`~dtop_export.preprocess.normalize_pixels` (true divisions, so the input is bit-identical to the
        CPU's); batch i+1 is copied and queued while batch i runs, its descriptors fetched once it is done. On
        the CPU: the default (normalisation in numpy, then :meth:`embed`)."""
        import torch

        if torch.device(self.device).type != "cuda":
            yield from super().embed_pixels_stream(batches)
            return
        dev = torch.device(self.device)
        compute, copier = torch.cuda.current_stream(dev), torch.cuda.Stream(dev)
        norm = pixel_normalizer(self.preprocess.mean, self.preprocess.std, dev)
        in_flight: deque[tuple[Any, Any, int]] = deque()
        for pixels in batches:
            x = self._upload(pixels, dev, copier, compute)
            if x.shape[0] == 0:
                in_flight.append((None, None, 0))
            else:
                with torch.inference_mode():  # entered per batch: never held across a yield
                    d = self._descriptors(norm(x))
                    host = torch.empty(d.shape, dtype=torch.float32, pin_memory=True)
                    host.copy_(d, non_blocking=True)
                done = torch.cuda.Event()
                done.record(compute)
                in_flight.append((host, done, x.shape[0]))
            if len(in_flight) > 1:  # batch i+1 is queued on the GPU: now wait for batch i
                yield self._fetch(*in_flight.popleft())
        while in_flight:
            yield self._fetch(*in_flight.popleft())

    def _upload(self, pixels: Any, dev: Any, copier: Any, compute: Any) -> Any:
        """uint8 [B, H, W, 3] -> the same on ``dev``: pinned staging, a non-blocking copy on ``copier``, which
        ``compute`` waits for (tensors already on the device pass through)."""
        import torch

        from dtop_export.errors import ShapeError

        if isinstance(pixels, torch.Tensor) and same_device(pixels.device, dev):  # decoded there, another stream
            x = pixels
            x.record_stream(compute)
        else:
            if isinstance(pixels, np.ndarray):
                src = torch.from_numpy(np.require(pixels, requirements=["C", "W"]))  # contiguous, writable
            else:
                src = pixels.cpu()
            staged = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            staged.copy_(src)
            with torch.cuda.stream(copier):
                x = staged.to(dev, non_blocking=True)
            compute.wait_stream(copier)
            x.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ShapeError(f"{self.name}: expected uint8 pixels [B, H, W, 3], got {x.dtype} {list(x.shape)}")
        if x.shape[1] % self.stride or x.shape[2] % self.stride:
            raise ShapeError(f"{self.name}: image size {x.shape[1]}x{x.shape[2]} is not a multiple of the stride "
                             f"{self.stride}")  # fmt: skip
        return x

    def _fetch(self, host: Any, done: Any, n: int) -> np.ndarray:
        if host is None:
            return self.no_descriptors()
        done.synchronize()
        return host.numpy().copy()

    def describe(self) -> dict[str, object]:
        extra = {"fp32_layers": self.model.fp32_layers} if self.cast == "autocast" else {}  # compiled: passed on
        return {**super().describe(), "compile": self.compile_mode, "cast": self.cast or None, **extra}


def same_device(a: Any, b: Any) -> bool:
    """Whether the torch devices ``a`` and ``b`` are one device, a CUDA device without an index (``cuda``) being the
    current one: ``torch.device("cuda") != torch.device("cuda:0")``, and a tensor's ``.device`` always has its
    index, so ``==`` sent every device-resident batch of an engine on ``cuda`` through the host and back."""
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    if a.type != "cuda":
        return False
    import torch

    current = torch.cuda.current_device()
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def pixel_normalizer(mean: Any, std: Any, device: Any) -> Callable[[Any], Any]:
    """uint8 pixels [B, H, W, 3] on ``device`` -> float32 images [B, 3, H, W] (a channels-last view, no copy of
    the layout): ``(x / 255 - mean) / std`` elementwise in float32, the arithmetic of
    :func:`~dtop_export.preprocess.normalize_pixels`. Every divisor is a tensor on the device: CUDA's division by a
    CPU scalar multiplies by its reciprocal, which can differ in the last bit."""
    import torch

    m, s = (torch.tensor([float(v) for v in t], dtype=torch.float32, device=device).view(3, 1, 1) for t in (mean, std))
    scale = torch.tensor(255.0, dtype=torch.float32, device=device)

    def normalize(x: Any) -> Any:
        return (x.permute(0, 3, 1, 2).float() / scale - m) / s

    return normalize


def fp16_cpu_products():  # noqa: ANN201 - torch is imported lazily
    """A ``TorchFunctionMode`` in which convolutions, linear layers and matrix products of float16 CPU tensors
    compute in float32 on the same float16 values and round the result to float16: FP16 operands, FP32
    accumulation, one rounding of ``conv + bias`` -- the arithmetic of PyTorch's CPU FP16 kernels (and of GPU
    FP16 GEMMs), without their cost: on CPUs without AVX512-FP16/AMX-FP16, oneDNN has no FP16 convolution
    (PyTorch falls back to ``slow_conv2d``, 35x slower than FP32 on the small preset) and FP16 GEMMs are
    reference loops. One path on every CPU, so FP16 audits give the same numbers everywhere."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    # F.conv2d is torch.conv2d; `a @ b` in model code is Tensor.__matmul__ (and __rmatmul__ for `b.__rmatmul__(a)`)
    funcs = {F.conv2d, F.linear, torch.matmul, torch.bmm, torch.mm, torch.addmm, torch.baddbmm}
    funcs |= {torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.matmul}

    def up(a: object) -> object:
        return a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a

    class Fp16CpuProducts(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            x = args[0] if args else kwargs.get("input")
            if func in funcs and isinstance(x, torch.Tensor) and x.dtype == torch.float16 and not x.is_cuda:
                return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()}).half()
            return func(*args, **kwargs)

    return Fp16CpuProducts()
