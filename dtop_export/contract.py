"""The deployment contract, in one place: the engine interface and the metadata an exported model carries.

* :class:`Engine`: what every runtime implements (PyTorch, ONNX Runtime, TensorRT, the trainer's in-memory
  model): ``embed(images float32 [B, 3, H, W]) -> float32 [B, N]`` L2-normalised descriptors, plus ``name``,
  ``precision``, ``device``, ``descriptor_dim``, ``stride`` and ``preprocess``. One optional entry point,
  ``embed_pixels_stream`` (uint8 batches, normalised by the engine; a default built on ``embed``), lets an engine
  on a GPU take a quarter of the bytes and overlap copies with compute. Parity, evaluation and the benchmarks
  take engines, never a runtime directly (Polygraphy's runners).
* The model's metadata (ONNX ``metadata_props``, copied into TensorRT sidecars and OpenVINO ``rt_info``):
  :func:`onnx_metadata` writes it, :func:`metadata_of` / :func:`read_metadata` read it back as a dict of
  strings, :func:`preprocess_from_metadata` turns it into the :class:`~dtop_export.preprocess.PreprocessConfig`
  every engine feeds its images through, and :func:`read_onnx_metadata` is the report ``dtop-export info``
  prints.

Imports numpy and the errors only; onnx (metadata) and the preprocessing (the pixel default) inside functions.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtop_export import __version__
from dtop_export.errors import DToPError, ShapeError

if TYPE_CHECKING:
    import onnx

    from dtop_export.checkpoint import Checkpoint
    from dtop_export.preprocess import PreprocessConfig

INPUT_NAME = "images"
OUTPUT_NAME = "descriptors"
MODEL_FORMAT = "dtop-export/onnx"


# the engine interface ---------------------------------------------------------------------------------


class Engine(ABC):
    """One runtime holding one model.

    Attributes: ``name`` (e.g. ``onnxruntime``), ``precision`` (``fp32``, ``fp16``, ``bf16``, ``int8``),
    ``device`` (``cpu``, ``cuda:0``), ``descriptor_dim`` (N), ``stride`` (H and W must be multiples of it),
    ``preprocess`` (the image contract the model was trained with), ``source`` (the file it was loaded from).
    """

    name: str = "engine"
    precision: str = "fp32"
    device: str = "cpu"
    descriptor_dim: int
    stride: int
    preprocess: PreprocessConfig
    source: Path | None = None
    # how to get a file for another input size than a fixed-size one's ({h}, {w}: the size asked for)
    resize_hint: str = "re-export without --static"

    @abstractmethod
    def embed(self, images: np.ndarray) -> np.ndarray:
        """float32 images [B, 3, H, W] -> float32 L2-normalised descriptors [B, N]."""

    def embed_pixels_stream(self, batches: Iterable[Any]) -> Iterator[np.ndarray]:
        """uint8 RGB batches [B, H, W, 3] (each one shape) -> their descriptors [B, N], one array per batch, in order.

        The optional entry point of engines that take pixels before normalisation (what
        :func:`~dtop_export.preprocess.prepare_pixels` gives): a quarter of the float32 bytes to move, and room to
        overlap. This default normalises each batch on the CPU with the one arithmetic
        (:func:`~dtop_export.preprocess.normalize_pixels`), so the model input is bit-identical to
        :func:`~dtop_export.preprocess.prepare`'s, and calls :meth:`embed`. An engine on a GPU overrides it to
        normalise on the device and to copy the next batch while the current one runs (it may pull batch i+1 from
        ``batches`` before it yields the descriptors of batch i)."""
        from dtop_export.preprocess import normalize_pixels

        for pixels in batches:
            pixels = np.asarray(pixels)
            if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[-1] != 3:
                raise ShapeError(f"{self.name}: expected uint8 pixels [B, H, W, 3], got {pixels.dtype} "
                                 f"{list(pixels.shape)}")  # fmt: skip
            yield self.embed(normalize_pixels(pixels, self.preprocess.mean, self.preprocess.std))

    def embed_pixels(self, pixels: Any) -> np.ndarray:
        """One uint8 batch [B, H, W, 3] through :meth:`embed_pixels_stream`."""
        return next(iter(self.embed_pixels_stream([pixels])))

    def describe(self) -> dict[str, Any]:
        """A short JSON-able description for reports."""
        return {
            "name": self.name,
            "precision": self.precision,
            "device": self.device,
            "descriptor_dim": self.descriptor_dim,
            "source": str(self.source) if self.source else None,
        }

    @property
    def label(self) -> str:
        """Display label, e.g. ``onnxruntime fp32 cpu``."""
        return f"{self.name} {self.precision} {self.device}"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release runtime resources."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def no_descriptors(self) -> np.ndarray:
        """What ``embed`` of zero images returns: float32 [0, N] (every engine answers an empty batch the
        same way instead of failing in a reshape)."""
        return np.zeros((0, self.descriptor_dim), np.float32)

    def check_images(self, images: np.ndarray) -> np.ndarray:
        """``images`` as a contiguous float32 [B, 3, H, W] array with H and W multiples of the stride, or a
        :class:`ShapeError` saying what is wrong."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ShapeError(f"{self.name}: expected images [B, 3, H, W], got {list(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.stride or w % self.stride:
            raise ShapeError(f"{self.name}: image size {h}x{w} is not a multiple of the stride {self.stride}")
        return np.ascontiguousarray(images, dtype=np.float32)

    def embed_exported(
        self,
        images: np.ndarray,
        run: Callable[[np.ndarray], np.ndarray],
        static_hw: tuple[int, ...] | None = None,
        fixed_batch: int | None = None,
    ) -> np.ndarray:
        """``embed`` for a runtime holding an exported file: checks the images (:meth:`check_images`), answers
        an empty batch, refuses another size than a ``--static`` export's ``static_hw``, and runs a ``--batch``
        export (``fixed_batch``) in chunks of its batch, the last one padded by repeating its final image.
        ``run`` maps float32 [B, 3, H, W] to [B, N]."""
        x = self.check_images(images)
        if x.shape[0] == 0:
            return self.no_descriptors()
        if static_hw is not None and tuple(x.shape[2:]) != tuple(static_hw):
            h, w = static_hw[0], static_hw[1]
            fix = f"resize, or {self.resize_hint.format(h=x.shape[2], w=x.shape[3])}"
            if h != w:  # no resize policy makes every photo HxW
                fix = (
                    "a photo resized by its longer side rarely has that shape: embed with the dynamic export "
                    f"(re-export without --static) or a square one (--static {max(h, w)}x{max(h, w)}: the whole "
                    "image resized to it)"
                )
            got = f"{x.shape[2]}x{x.shape[3]}"
            what = self.source or f"the {self.label} model"  # an in-memory model has no file
            raise ShapeError(f"{what} was exported for {h}x{w} inputs only, got {got}: {fix}")
        b = fixed_batch
        if not b or x.shape[0] == b:
            return np.asarray(run(x), dtype=np.float32)
        out = []
        for i in range(0, x.shape[0], b):
            chunk = x[i : i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
            out.append(run(chunk)[:n])
        return np.concatenate(out).astype(np.float32)


# metadata: write ------------------------------------------------------------------------------------------


def onnx_metadata(
    ckpt: Checkpoint,
    descriptor_dim: int,
    whiten: bool,
    opset: int,
    static_hw: tuple[int, int] | None,
    batch: int | None,
    precision: str = "fp32",
) -> dict[str, str]:
    """``metadata_props`` of an exported file: everything a deployer needs, as strings. A square ``static_hw``
    (``--static SxS``) takes the ``square`` resize policy at S, as an ExecuTorch program of that size does: a photo
    resized by its longer side would rarely be SxS."""
    pp = ckpt.preprocess
    if static_hw is not None and static_hw[0] == static_hw[1]:
        pp = replace(pp, resize="square", size=int(static_hw[0]))
    wh = ckpt.whitening if whiten else None
    return {
        "dtop.format": MODEL_FORMAT,
        "dtop.toolkit_version": __version__,
        "dtop.config": json.dumps(ckpt.config.to_dict(), sort_keys=True),
        "dtop.descriptor_dim": str(descriptor_dim),
        "dtop.l2_normalized": "true",
        "dtop.whitening": json.dumps(
            {
                "applied": wh is not None,
                "kind": wh.kind if wh else None,
                "in_dim": int(wh.proj.shape[1]) if wh else None,
                "out_dim": wh.out_dim if wh else None,
            }
        ),
        "dtop.precision": precision,
        "dtop.input_name": INPUT_NAME,
        "dtop.output_name": OUTPUT_NAME,
        "dtop.input_layout": pp.layout,
        "dtop.input_dtype": "float32",
        "dtop.color_order": pp.color_order,
        "dtop.mean": json.dumps(list(pp.mean)),
        "dtop.std": json.dumps(list(pp.std)),
        "dtop.pixel_range": "[0, 1] before mean/std",
        "dtop.resize_policy": json.dumps({"policy": pp.resize, "size": pp.size, "interpolation": pp.interpolation}),
        "dtop.stride": str(pp.stride),
        "dtop.dynamic_axes": json.dumps(
            {"batch": batch is None, "height": static_hw is None, "width": static_hw is None}
        ),
        "dtop.static_hw": json.dumps(list(static_hw) if static_hw else None),
        "dtop.fixed_batch": json.dumps(batch),
        "dtop.checkpoint_sha256": ckpt.sha256 or "",
        "dtop.provenance": json.dumps(ckpt.provenance, default=str, sort_keys=True),
        "dtop.opset": str(opset),
    }


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace ``model``'s ``metadata_props`` by ``metadata`` (in place)."""
    del model.metadata_props[:]
    for k, v in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v


# metadata: read -------------------------------------------------------------------------------------------


def metadata_of(model: onnx.ModelProto) -> dict[str, str]:
    """``model``'s ``metadata_props`` as a dict."""
    return {p.key: p.value for p in model.metadata_props}


def load_onnx(path: str | Path, weights: bool = True) -> onnx.ModelProto:
    """Read an ONNX file, or one :class:`DToPError` line when it is missing or not ONNX. ``weights=False``
    leaves external weight files unread (enough for metadata and the graph's structure)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise DToPError(f"ONNX file {path} not found")
    from dtop_export.onnx_metadata import other_format

    try:
        proto = onnx.load(str(path), load_external_data=weights)
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user error
        raise DToPError(other_format(path) or f"{path} is not a readable ONNX file ({e.__class__.__name__})") from e
    if not proto.ir_version or not proto.HasField("graph"):  # protobuf parses an empty file as an empty message
        missing = "empty file" if not path.stat().st_size else "no graph" if proto.ir_version else "no ir_version"
        raise DToPError(other_format(path) or f"{path} is not a readable ONNX file ({missing})")
    return proto


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of the ONNX file ``path`` (empty for a file that dtop-export did not write), read without
    the graph (:mod:`dtop_export.onnx_metadata`: milliseconds, where ``onnx.load`` takes seconds)."""
    from dtop_export.onnx_metadata import read_onnx_metadata_props

    return read_onnx_metadata_props(path)


def preprocess_from_metadata(meta: dict[str, str]) -> PreprocessConfig:
    """The image contract a dtop-export model carries in its metadata (defaults for missing keys)."""
    from dtop_export.preprocess import PreprocessConfig

    resize = json.loads(meta.get("dtop.resize_policy", "{}") or "{}")
    return PreprocessConfig(
        mean=tuple(json.loads(meta.get("dtop.mean", "[0.5, 0.5, 0.5]"))),
        std=tuple(json.loads(meta.get("dtop.std", "[0.5, 0.5, 0.5]"))),
        color_order=meta.get("dtop.color_order", "RGB"),
        stride=int(meta.get("dtop.stride", 16)),
        resize=resize.get("policy", "longest_side"),
        size=int(resize.get("size", 1024)),
        interpolation=resize.get("interpolation", "bilinear"),
    )


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """What ``dtop-export info model.onnx`` prints: I/O signature, opset, size and the dtop metadata."""
    import onnx

    path = Path(path)
    proto = load_onnx(path, weights=False)

    def sig(values: Any) -> dict[str, str]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or str(d.dim_value) for d in t.shape.dim]
            out[v.name] = f"{onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)} [{', '.join(dims)}]"
        return out

    report: dict[str, Any] = {
        "file": str(path),
        "size_mb": round(path.stat().st_size / 2**20, 2),
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "opset": opset_of(proto) or None,
        "inputs": sig(proto.graph.input),
        "outputs": sig(proto.graph.output),
        "nodes": len(proto.graph.node),
    }
    return report | metadata_report(metadata_of(proto))


def metadata_report(meta: dict[str, str]) -> dict[str, Any]:
    """The ``dtop.*`` metadata as ``info`` prints it, whichever file carried it (ONNX, OpenVINO IR, TensorRT
    sidecar): ``metadata`` (JSON values decoded), ``config`` and ``provenance`` as sections of their own."""
    nice: dict[str, Any] = {}
    for k, v in meta.items():
        key = k.removeprefix("dtop.")
        try:
            nice[key] = json.loads(v) if key not in ("format", "toolkit_version", "checkpoint_sha256") else v
        except json.JSONDecodeError:
            nice[key] = v
    config = nice.pop("config", None)
    provenance = nice.pop("provenance", None)
    report: dict[str, Any] = {"metadata": nice}
    if config is not None:
        report["config"] = config
    if provenance is not None:
        report["provenance"] = provenance
    if not meta:
        report["note"] = "no dtop-export metadata: not exported by dtop-export"
    return report


def opset_of(model: onnx.ModelProto) -> int:
    """The default-domain opset of ``model`` (0 when it has none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
