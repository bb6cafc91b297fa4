"""The dtop-export checkpoint: one file with config, weights, whitening, preprocessing and provenance.

The file is a ``torch.save`` archive holding only tensors and plain Python values (dict, list, str,
int, float, bool, None), so it is always loaded with ``torch.load(weights_only=True)``: a pickle that
would construct arbitrary objects (and so could run code) is refused. Writes are atomic.

Layout (format version 1)::

    {
      "format": "dtop-export/checkpoint", "format_version": 1,
      "config": DToPConfig.to_dict(),
      "state_dict": {name: tensor},
      "whitening": None | {"mean": [N] tensor, "proj": [d, N] tensor, "kind": "lw"|"pca", ...},
      "preprocess": PreprocessConfig.to_dict(),
      "provenance": {"created": iso-8601, "code_version": str, "source": str, "training_set": str|None,
                     "epoch": int|None, "step": int|None, "metrics": dict, ...},
    }
"""

from __future__ import annotations

import datetime as _dt
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtop_export import __version__
from dtop_export.atomic import atomic_path
from dtop_export.digest import file_sha256
from dtop_export.errors import CheckpointError
from dtop_export.model.config import DToPConfig
from dtop_export.preprocess import PreprocessConfig

if TYPE_CHECKING:
    import torch

    from dtop_export.model import DToP

FORMAT = "dtop-export/checkpoint"
FORMAT_VERSION = 1


@dataclass
class Whitening:
    """Learned whitening, cirtorch semantics: ``normalize(proj @ (x - mean))`` on L2-normalised x.

    mean: [N]; proj: [d, N] with d <= N (the output descriptor dimension).
    """

    mean: torch.Tensor
    proj: torch.Tensor
    kind: str = "lw"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dim(self) -> int:
        return int(self.proj.shape[0])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Whiten L2-normalised descriptors [B, N] -> L2-normalised [B, d]."""
        import torch.nn.functional as F

        return F.normalize((x - self.mean) @ self.proj.T, dim=-1)

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "proj": self.proj, "kind": self.kind, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Whitening:
        return cls(mean=d["mean"], proj=d["proj"], kind=d.get("kind", "lw"), info=d.get("info", {}))


@dataclass
class Checkpoint:
    """Everything the toolkit needs to rebuild, run and deploy a DToP model."""

    config: DToPConfig
    state_dict: dict[str, torch.Tensor]
    preprocess: PreprocessConfig
    whitening: Whitening | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    sha256: str | None = None

    def build_model(self) -> DToP:
        """Instantiate the model and load the weights (strict; mismatches named).

        The modules are built on the meta device and take copies of the checkpoint's tensors, so the random
        initialisation the weights would replace is never computed (1.1 s of 1.7 s for r50-vitb16).
        """
        import torch

        from dtop_export.model import build_model

        with torch.device("meta"):
            model = build_model(self.config)
        load_state_dict_checked(model, self.state_dict, self.path, assign=True)
        return model.eval()


def new_provenance(source: str, **extra: Any) -> dict[str, Any]:
    """Provenance record for a checkpoint created now by this toolkit version."""
    prov: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": __version__,
        "source": source,
        "training_set": None,
        "epoch": None,
        "step": None,
        "metrics": {},
    }
    prov.update(extra)
    return prov


def save_checkpoint(
    path: str | Path,
    model: DToP,
    preprocess: PreprocessConfig,
    whitening: Whitening | None = None,
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically (temp file + rename) and return its path."""
    import torch

    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "whitening": None if whitening is None else whitening.to_dict(),
        "preprocess": preprocess.to_dict(),
        "provenance": provenance or new_provenance("unknown"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


# what `onnx`, `openvino` and `trt` write (dtop_export.engines' IR_/PLAN_SUFFIXES; the core does not import engines)
EXPORTED_SUFFIXES = (".onnx", ".xml", ".plan", ".engine", ".trt")


def check_checkpoint_file(path: str | Path) -> Path:
    """The cheap checks of :func:`load_checkpoint` (exists, a file, a readable torch.save archive), for commands
    that validate their input before anything else; one-line :class:`CheckpointError` on failure."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found: create one with `dtop-export init -o {path}`")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != b"PK\x03\x04":
        if path.suffix.lower() in EXPORTED_SUFFIXES:
            raise CheckpointError(f"{path} is an exported model, not a checkpoint: give the .pt it was exported from")
        raise CheckpointError(f"{path} is not a dtop-export checkpoint (not a torch.save archive)")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e}); re-copy or re-create it") from e
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a checkpoint; every failure is a one-line :class:`CheckpointError`."""
    import torch

    path = check_checkpoint_file(path)
    try:
        # memory-mapped: the tensors are read from the page cache when used, not copied twice on load
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled Python objects that could run code; "
            "only dtop-export checkpoints (tensors and plain values) are accepted"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({e.__class__.__name__}); re-create it") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a torch file but not a dtop-export checkpoint (no '{FORMAT}' tag)")
    version = payload.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version}, newer than this dtop-export "
            f"({__version__}) reads (<= {FORMAT_VERSION}): upgrade with `pip install -U dtop-export`"
        )
    for key in ("config", "state_dict", "preprocess"):
        if not isinstance(payload.get(key), dict):
            raise CheckpointError(f"{path} is missing its '{key}' section")
    config = _section(DToPConfig, payload, "config", path)
    preprocess = _section(PreprocessConfig, payload, "preprocess", path)
    whitening = _whitening(payload.get("whitening"), config.descriptor_dim, path)
    return Checkpoint(
        config=config,
        state_dict=payload["state_dict"],
        preprocess=preprocess,
        whitening=whitening,
        provenance=payload.get("provenance") or {},
        path=path,
        sha256=file_sha256(path),
    )


def _section(cls: type, payload: dict[str, Any], key: str, path: Path) -> Any:
    """The ``config`` or ``preprocess`` section as its dataclass: values of the wrong type or out of range (a file
    edited by hand or written by another tool) are a one-line error naming the field, not a failure far from it."""
    from dtop_export.errors import DToPError
    from dtop_export.fields import check_field_types

    try:
        check_field_types(cls, payload[key])
        section = cls.from_dict(payload[key])
        if isinstance(section, PreprocessConfig):
            section.validate()
    except DToPError as e:  # a newer file's unknown fields already say to upgrade
        fix = "" if "upgrade" in str(e) else " (fix the file or re-create the checkpoint)"
        raise CheckpointError(f"{path}: its {key}: {e}{fix}") from e
    return section


def _whitening(d: Any, n: int, path: Path) -> Whitening | None:
    """The ``whitening`` section: a float ``mean`` [N] and ``proj`` [d, N] (1 <= d <= N, N the model's descriptor
    size), or nothing."""
    import torch

    if not d:
        return None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: its whitening is a {type(d).__name__}, not a mapping of mean and proj")
    mean, proj = d.get("mean"), d.get("proj")
    for name, t in (("mean", mean), ("proj", proj)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise CheckpointError(f"{path}: its whitening has no floating-point tensor '{name}'")
    if tuple(mean.shape) != (n,) or proj.ndim != 2 or proj.shape[1] != n or not 1 <= proj.shape[0] <= n:
        raise CheckpointError(
            f"{path}: its whitening does not fit the model's {n}-d descriptors (mean {tuple(mean.shape)}, proj "
            f"{tuple(proj.shape)}; want mean ({n},) and proj (d, {n}) with d <= {n}): learn it again for this model"
        )
    if not isinstance(d.get("kind", "lw"), str) or not isinstance(d.get("info", {}), dict):
        raise CheckpointError(f"{path}: its whitening's kind must be a string and its info a mapping")
    return Whitening.from_dict(d)


def load_state_dict_checked(
    model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path | None, *, assign: bool = False
) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the first mismatching keys.

    ``assign=True`` (for a model built on the meta device) gives the model its own copies of ``state``'s
    tensors, in the model's dtypes; anything left on the meta device afterwards is an error.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        where = f"{path}: " if path else ""
        bits = []
        if missing:
            bits.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            bits.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
        if shapes:
            bits.append(f"shape mismatch in {len(shapes)} key(s) e.g. {'; '.join(shapes[:2])}")
        raise CheckpointError(f"{where}weights do not match the stored config ({'; '.join(bits)})")
    if not assign:
        model.load_state_dict(state, strict=True)
        return
    model.load_state_dict({k: state[k].to(own[k].dtype, copy=True) for k in own}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{path or 'model'}: no weights for {len(left)} tensor(s), e.g. {', '.join(left[:3])}")


def load_model(path: str | Path) -> tuple[DToP, Checkpoint]:
    """Load a checkpoint and return the eval-mode model with it."""
    ckpt = load_checkpoint(path)
    return ckpt.build_model(), ckpt


def random_checkpoint(preset: str, out: str | Path, seed: int = 0, source: str = "random_checkpoint") -> Path:
    """Random-init ``preset`` with perturbed biases/norms/BN statistics and a random whitening, saved to
    ``out``: a model where nothing folds away that a trained one would keep (benchmarks, the TensorRT
    self-test; no weights are downloaded)."""
    import torch

    from dtop_export.model import build_model, get_preset
    from dtop_export.preprocess import default_preprocess

    torch.manual_seed(seed)
    model = build_model(get_preset(preset)).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # norm scales
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.add_(0.05 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.mul_(1 + 0.2 * torch.rand(b.shape, generator=g))
    n = model.descriptor_dim
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    whitening = Whitening(
        mean=0.01 * torch.randn(n, generator=g),
        proj=q * (1 + torch.rand(n, generator=g))[:, None],
        info={"note": "random, for benchmarks and self-tests"},
    )
    save_checkpoint(
        out,
        model,
        default_preprocess(model.cfg.backbone, model.stride),
        whitening=whitening,
        provenance=new_provenance(source, seed=seed),
    )
    return Path(out)
