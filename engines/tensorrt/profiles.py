"""Optimization profiles of the ``images`` input (min/opt/max [B, 3, H, W]) and how a runner uses them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dtop_export.errors import DToPError, ShapeError

DEFAULT_MIN, DEFAULT_OPT, DEFAULT_MAX = "1x3x224x224", "1x3x512x512", "8x3x1024x1024"


@dataclass(frozen=True)
class Profile:
    """One optimization profile of the ``images`` input: min/opt/max shapes [B, 3, H, W]."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_dict(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[int]]) -> Profile:
        return cls(tuple(int(v) for v in d["min"]), tuple(int(v) for v in d["opt"]), tuple(int(v) for v in d["max"]))

    def accepts(self, chw: Sequence[int]) -> bool:
        """Whether an input [*, C, H, W] fits the non-batch dims."""
        return all(lo <= v <= hi for lo, v, hi in zip(self.min[1:], chw, self.max[1:]))

    def describe(self) -> str:
        """``1x3x224x224 .. 8x3x1024x1024 (opt 1x3x512x512)``."""
        return f"{format_shape(self.min)} .. {format_shape(self.max)} (opt {format_shape(self.opt)})"


def format_shape(shape: Sequence[int]) -> str:
    """(1, 3, 224, 224) -> ``1x3x224x224``."""
    return "x".join(str(int(v)) for v in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """``1x3x224x224`` (or trtexec's ``images:1x3x224x224``) -> (1, 3, 224, 224)."""
    body = text.strip().split(":")[-1]
    try:
        dims = tuple(int(v) for v in body.lower().replace("*", "x").split("x"))
    except ValueError:
        dims = ()
    if len(dims) != 4 or min(dims) < 1:
        raise DToPError(f"cannot read shape {text!r}: write BxCxHxW with positive sizes, e.g. 1x3x512x512")
    return dims


def make_profiles(
    mins: Sequence[str] = (),
    opts: Sequence[str] = (),
    maxs: Sequence[str] = (),
    stride: int = 16,
) -> list[Profile]:
    """Profiles from repeated ``--min/--opt/--max`` options (the i-th of each form profile i).

    Nothing given: one profile ``1x3x224x224 .. 8x3x1024x1024 (opt 1x3x512x512)``. With one profile, a
    missing option takes that default. Every shape must be [B, 3, H, W] with min <= opt <= max and H, W
    multiples of ``stride``.
    """
    n = max(len(mins), len(opts), len(maxs), 1)
    if n > 1 and not (len(mins) == len(opts) == len(maxs)):
        raise DToPError(
            f"for {n} profiles give --min, --opt and --max {n} times each (got {len(mins)}, {len(opts)}, {len(maxs)})"
        )
    mins = list(mins) or [DEFAULT_MIN]
    opts = list(opts) or [DEFAULT_OPT]
    maxs = list(maxs) or [DEFAULT_MAX]
    profiles = []
    for lo_t, op_t, hi_t in zip(mins, opts, maxs):
        p = Profile(parse_shape(lo_t), parse_shape(op_t), parse_shape(hi_t))
        for label, shape in (("min", p.min), ("opt", p.opt), ("max", p.max)):
            if shape[1] != 3:
                raise DToPError(f"--{label} {format_shape(shape)}: the model takes 3 channels (Bx3xHxW)")
            if shape[2] % stride or shape[3] % stride:
                raise DToPError(
                    f"--{label} {format_shape(shape)}: height and width must be multiples of the model stride {stride}"
                )
        if not all(a <= b <= c for a, b, c in zip(p.min, p.opt, p.max)):
            raise DToPError(f"profile {p.describe()}: need min <= opt <= max in every dimension")
        profiles.append(p)
    return profiles


def select_profile(profiles: Sequence[Profile], chw: Sequence[int]) -> int:
    """Index of the profile that takes an input [*, C, H, W]: among those whose range holds it, the one
    whose opt size is closest. Raises :class:`ShapeError` naming the ranges when none does."""
    c, h, w = (int(v) for v in chw)
    fits = [i for i, p in enumerate(profiles) if p.accepts((c, h, w))]
    if not fits:
        ranges = "; ".join(f"H {p.min[2]}..{p.max[2]}, W {p.min[3]}..{p.max[3]}" for p in profiles)
        raise ShapeError(
            f"input {h}x{w} is outside the engine's optimization profile(s) ({ranges}): resize the image, "
            "or rebuild with --min/--max covering it"
        )
    return min(fits, key=lambda i: abs(profiles[i].opt[2] * profiles[i].opt[3] - h * w))


def split_batches(n: int, min_batch: int, max_batch: int) -> list[tuple[int, int, int]]:
    """Chunks ``(start, stop, pad)`` covering ``n`` images with at most ``max_batch`` each; a chunk smaller
    than ``min_batch`` is padded by ``pad`` copies of its last image (results of the padding are dropped)."""
    if n < 1:
        return []
    if min_batch < 1 or max_batch < min_batch:
        raise ValueError(f"bad batch range {min_batch}..{max_batch}")
    out = []
    for start in range(0, n, max_batch):
        stop = min(start + max_batch, n)
        out.append((start, stop, max(0, min_batch - (stop - start))))
    return out


def check_static_dims(net_shape: Sequence[int], profiles: Sequence[Profile]) -> None:
    """A static ONNX dimension must equal min = opt = max of every profile."""
    if len(net_shape) != 4:
        raise DToPError(f"the network input has rank {len(net_shape)}: expected images [B, 3, H, W]")
    names = ("batch", "channels", "height", "width")
    for p in profiles:
        for d, (fixed, lo, op, hi) in enumerate(zip(net_shape, p.min, p.opt, p.max)):
            if fixed >= 0 and not fixed == lo == op == hi:
                raise DToPError(
                    f"the ONNX fixes {names[d]} = {fixed} but the profile asks {lo}..{hi}: make --min/--opt/--max "
                    f"use {fixed} there, or re-export without --static/--batch"
                )
