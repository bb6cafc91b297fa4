"""The PyTorch engine: the reference every exported artifact is compared against."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

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

    precision: ``fp32`` (reference: the model as trained), ``bf16`` (the deployment path: batchnorm and weight
    standardisation folded as in the export, conv/linear weights stored in bf16, channels-last, autocast;
    oneDNN's AMX/AVX-512-BF16 kernels on CPUs that have them) or ``fp16`` (``model.half()``: FP16 weights and
    activations with FP32 accumulation, for accuracy audits; on the CPU its convolutions and GEMMs run through
    :func:`fp16_cpu_products`, since PyTorch's own CPU FP16 convolution is a slow reference kernel).

    compile: ``torch.compile`` the network (``True``/``default`` or ``max-autotune``: inductor's GEMM
    templates; frozen weights). Meant for fixed input sizes, as when serving: the first call at a new shape
    compiles (about a minute for the full model on 2 cores). ``dynamic``: torch.compile's (None: after a
    second shape, one dynamic-shape graph serves all; False: one static graph per shape, up to dynamo's
    recompile limit, then eager).
    """

    name = "pytorch"

    def __init__(
        self,
        model: DToP,
        preprocess: PreprocessConfig,
        whitening: Whitening | None = None,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
        source: Path | None = None,
        compile: bool | str = False,  # noqa: A002 - the torch.compile option, named as users know it
        dynamic: bool | None = None,
    ) -> None:
        import torch

        from dtop_export.errors import DToPError

        if threads:
            torch.set_num_threads(threads)
        if precision not in ("fp32", "bf16", "fp16"):
            raise DToPError(f"pytorch engine precision must be fp32, bf16 or fp16, got {precision!r}")
        if compile not in COMPILE_MODES:
            raise DToPError(f"compile must be false, true/default or max-autotune, got {compile!r}")
        self.compile_mode = COMPILE_MODES[compile]
        check_device(str(device))
        self.stride = model.stride
        self.channels_last = False
        if precision == "bf16":
            self.model = bf16_deploy_model(model.eval()).to(device)
            self.channels_last = True
        else:
            self.model = model.eval().to(device)
        if precision == "fp16":
            self.model = self.model.half()
        if self.compile_mode is not None:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True  # constant-fold the weights (prepacked for oneDNN / AMX)
            self.model = torch.compile(self.model, mode=self.compile_mode, dynamic=dynamic)
        if whitening is not None and str(device) != "cpu":  # the whitening runs where the descriptors are
            import dataclasses

            whitening = dataclasses.replace(whitening, mean=whitening.mean.to(device), proj=whitening.proj.to(device))
        self.whitening = whitening
        self.precision = precision
        self.device = device
        self.preprocess = preprocess
        self.descriptor_dim = whitening.out_dim if whitening is not None else model.descriptor_dim
        self.source = source

    @classmethod
    def from_checkpoint(cls, path: str | Path, whiten: bool = True, **kwargs: object) -> TorchEngine:
        from dtop_export.checkpoint import load_checkpoint

        ckpt: Checkpoint = load_checkpoint(path)
        return cls(
            ckpt.build_model(),
            ckpt.preprocess,
            whitening=ckpt.whitening if whiten else None,
            source=Path(path),
            **kwargs,  # type: ignore[arg-type]
        )

    def embed(self, images: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        x = torch.from_numpy(self.check_images(images)).to(self.device)
        if x.shape[0] == 0:
            return self.no_descriptors()
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                    u = self.model(x)
            elif self.precision == "fp16":
                with fp16_cpu_products() if x.device.type == "cpu" else contextlib.nullcontext():
                    u = self.model(x.half())
            else:
                u = self.model(x)
            d = F.normalize(u.float(), dim=-1)
            if self.whitening is not None:
                d = self.whitening.apply(d)
        return d.cpu().numpy().astype(np.float32)

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "compile": self.compile_mode}


def bf16_deploy_model(model: DToP):  # noqa: ANN201 - torch is imported lazily
    """The network as exported (batchnorm and weight standardisation folded, head BN dropped) with conv and
    linear weights in bf16 and channels-last memory: no per-call weight casts under autocast, and oneDNN's
    blocked bf16 convolutions. Norms keep fp32 parameters (autocast runs them in fp32). Returns a module
    mapping images [B, 3, H, W] to L2-normalised descriptors [B, N]."""
    import torch
    from torch import nn

    from dtop_export.fold import fold_for_deployment

    deploy, _ = fold_for_deployment(model, None)
    for m in deploy.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.to(torch.bfloat16)
    return deploy.to(memory_format=torch.channels_last).eval()


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
