"""The hostile set: seeds of every format the client decodes, their truncations, byte flips, enlarged headers and
lying lengths, plus the rule cases (:mod:`dtop_export.hostile.rules`, :mod:`dtop_export.hostile.exif`);
deterministic, built in seconds."""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path
from typing import Any

from dtop_export.hostile.build import (
    PNG_SIGNATURE,
    Case,
    encode,
    ihdr,
    jpeg_segments,
    many_scans_jpeg,
    png_build,
    png_chunks,
    png_image,
    split_idat,
)
from dtop_export.hostile.exif import exif_cases
from dtop_export.hostile.rules import jpeg_rules, large_cases, palette_cases, png_rules


def _photos() -> dict[str, Any]:
    import skimage
    from PIL import Image

    folder = Path(skimage.data.__file__).parent
    astronaut = Image.open(folder / "astronaut.png").convert("RGB")
    coffee = Image.open(folder / "coffee.png").convert("RGB")
    cat = Image.open(folder / "chelsea.png").convert("RGB")
    return {
        "landscape": coffee.resize((64, 43)),
        "portrait": astronaut.resize((37, 71)),
        "square": cat.resize((48, 48)),
    }


def _seeds() -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(JPEG seeds, PNG seeds): valid files of every format the client decodes."""
    import numpy as np
    from PIL import Image

    p = _photos()
    land, port, sq = p["landscape"], p["portrait"], p["square"]
    jpeg = {
        "j_base": encode(land, "JPEG", quality=90),
        "j_prog": encode(land, "JPEG", quality=85, progressive=True),
        "j_444": encode(port, "JPEG", quality=95, subsampling=0),
        "j_grey": encode(sq.convert("L"), "JPEG", quality=90),
        "j_cmyk": encode(sq.convert("CMYK"), "JPEG", quality=90),
        "j_restart": encode(port, "JPEG", quality=80, restart_marker_blocks=2),
        "j_dpi": encode(land, "JPEG", quality=80, dpi=(300, 300)),
        "j_icc": encode(sq, "JPEG", quality=80, icc_profile=b"\0" * 200),
        "j_prog_grey": encode(port.convert("L"), "JPEG", quality=75, progressive=True),
    }
    rng = np.random.default_rng(7)
    g = np.asarray(sq.convert("L"), dtype=np.int64)
    rgb = np.asarray(land, dtype=np.int64)
    h, w = g.shape

    def rows(a: Any) -> list[list[int]]:
        return [list(map(int, r.reshape(-1))) for r in a]

    pal = bytes(rng.integers(0, 256, 3 * 16, dtype=np.uint8))
    idx4 = (g // 16).astype(np.int64)
    alpha = (np.arange(w)[None, :] * 255 // max(1, w - 1)).repeat(h, 0)
    rh, rw = rgb.shape[:2]
    rgba = np.concatenate([rgb, (np.arange(rw)[None, :, None] * 255 // (rw - 1)).repeat(rh, 0)], -1)
    png = {
        "p_rgb": encode(land, "PNG"),
        "p_grey": encode(sq.convert("L"), "PNG"),
        "p_bilevel": encode(sq.convert("1"), "PNG"),
        "p_palette": encode(port.convert("P", palette=Image.Palette.ADAPTIVE, colors=64), "PNG"),
        "p_palette_trns": encode(
            land.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG", transparency=bytes(range(0, 256, 8))
        ),  # fmt: skip
        "p_palette_idx": encode(land.convert("P", palette=Image.Palette.ADAPTIVE, colors=32), "PNG", transparency=3),
        "p_rgba": png_image(rows(rgba), rw, 8, 6, filters=(0, 1, 2, 3, 4)),
        "p_la": png_image(rows(np.stack([g, alpha], -1)), w, 8, 4, filters=(4, 3)),
        "p_grey2": png_image(rows(g // 64), w, 2, 0),
        "p_grey4": png_image(rows(g // 16), w, 4, 0, filters=(1, 2)),
        "p_pal4": png_image(rows(idx4), w, 4, 3, extra=[(b"PLTE", pal)]),
        "p_pal1": png_image(rows(g // 128), w, 1, 3, extra=[(b"PLTE", pal[:6])]),
        "p_grey16": png_image(rows(g * 255 + 3), w, 16, 0, filters=(2, 4)),
        "p_rgb16": png_image(rows(rgb * 250 + 100), rw, 16, 2, filters=(3,)),
        "p_rgba16": png_image(rows(rgba * 250 + 5), rw, 16, 6),
        "p_la16": png_image(rows(np.stack([g * 257, alpha * 200], -1)), w, 16, 4),
        "p_adam7_rgb": png_image(rows(rgb), rw, 8, 2, interlace=True, filters=(4, 1)),
        "p_adam7_pal4": png_image(rows(idx4), w, 4, 3, interlace=True, extra=[(b"PLTE", pal), (b"tRNS", b"\x00\x80")]),
        "p_adam7_rgba16": png_image(rows(rgba * 257), rw, 16, 6, interlace=True),
        "p_adam7_bilevel": png_image(rows(g // 128), w, 1, 0, interlace=True),
        "p_adam7_tiny": png_image(rows(g[:3, :5]), 5, 8, 0, interlace=True),
        "p_multi_idat": split_idat(encode(land, "PNG"), 97),
        "p_text": png_image(
            rows(g),
            w,
            8,
            0,
            extra=[
                (b"tEXt", b"Comment\0hello"),
                (b"zTXt", b"Title\0\0" + zlib.compress(b"a title")),
                (b"iTXt", b"Author\0\0\0en\0\0ada"),
            ],
        ),  # fmt: skip
        "p_apng": encode(land, "PNG", save_all=True, append_images=[port.resize(land.size)], duration=100),
        "p_apng_default": encode(
            land, "PNG", save_all=True, append_images=[port.resize(land.size)], default_image=True
        ),  # fmt: skip
    }
    return jpeg, png


def _truncations(name: str, data: bytes) -> list[Case]:
    cuts = sorted({int(len(data) * f) for f in (0.05, 0.3, 0.6, 0.9)} | {len(data) - k for k in (1, 4, 12)})
    return [Case(f"{name}.cut{c}", "truncate", data[:c]) for c in cuts if 0 < c < len(data)]


def _flips(name: str, data: bytes, count: int) -> list[Case]:
    rng = random.Random(zlib.crc32(name.encode()))
    out = []
    for k in range(count):
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 2, 4, 8))):
            lo = 8 if k % 2 == 0 else 0  # half of them keep the signature
            i = rng.randrange(lo, len(b))
            b[i] ^= rng.randrange(1, 256)
        out.append(Case(f"{name}.flip{k}", "flip", bytes(b)))
    return out


def _png_length_lies(name: str, data: bytes) -> list[Case]:
    out, pos, seen = [], 8, set()
    chunks = png_chunks(data)
    for k, (cid, payload) in enumerate(chunks):
        first = cid not in seen or (cid == b"IDAT" and k + 1 < len(chunks) and chunks[k + 1][0] != b"IDAT")
        seen.add(cid)
        if not first:  # the first chunk of each type (and the last IDAT) only
            pos += 12 + len(payload)
            continue
        lies = (0x7FFFFFFF, len(payload) + 1) + ((max(0, len(payload) - 1), 0) if cid in (b"IHDR", b"IDAT") else ())
        for lie in lies:
            if lie == len(payload):
                continue
            b = bytearray(data)
            b[pos : pos + 4] = struct.pack(">I", lie)
            out.append(Case(f"{name}.len{k}{cid.decode('latin-1')}={lie:#x}", "length", bytes(b)))
        pos += 12 + len(payload)
    return out


def _jpeg_length_lies(name: str, data: bytes) -> list[Case]:
    out, seen = [], set()
    for k, (m, start, end) in enumerate(jpeg_segments(data)):
        if m in seen:  # the first segment of each marker only
            continue
        seen.add(m)
        n = end - start - 2
        for lie in (0xFFFF, n + 1) + ((0, 1, max(2, n - 1)) if k < 2 or m in (0xC0, 0xC2, 0xDA) else ()):
            if lie == n:
                continue
            b = bytearray(data)
            b[start + 2 : start + 4] = struct.pack(">H", lie)
            out.append(Case(f"{name}.len{m:02X}@{start}={lie}", "length", bytes(b)))
    return out


def _png_headers(name: str, data: bytes) -> list[Case]:
    """IHDR enlarged (the bombs: a few KB declaring gigabytes), with a valid CRC."""
    chunks = png_chunks(data)
    w, h, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    out = []
    for nw, nh in ((65535, 65535), (178956970, 1), (20000, 20000), (w * 3, h), (w, 0)):
        rest = [(c, d) for c, d in chunks[1:]]
        out.append(Case(f"{name}.ihdr{nw}x{nh}", "header", png_build([(b"IHDR", ihdr(nw, nh, depth, color))] + rest)))
    return out


def _jpeg_headers(name: str, data: bytes) -> list[Case]:
    out = []
    for m, start, _end in jpeg_segments(data):
        if m in (0xC0, 0xC1, 0xC2):
            for nw, nh in ((65535, 65535), (13377, 13377), (65535, 8), (0, 16)):
                b = bytearray(data)
                b[start + 5 : start + 9] = struct.pack(">HH", nh, nw)
                out.append(Case(f"{name}.sof{nw}x{nh}", "header", bytes(b)))
    return out


def hostile_cases() -> list[Case]:
    """Every case, deterministic (fixed photos, fixed seeds); ``Case.ci`` marks the CI subset."""
    jpeg, png = _seeds()
    cases: list[Case] = []
    for name, data in {**jpeg, **png}.items():
        cases.append(Case(f"seed.{name}", "seed", data))
        cases += _truncations(name, data)
        cases += _flips(name, data, 8)
        is_png = data.startswith(PNG_SIGNATURE)
        cases += (_png_length_lies if is_png else _jpeg_length_lies)(name, data)
        cases += (_png_headers if is_png else _jpeg_headers)(name, data)
    cases += exif_cases(jpeg, png)
    cases += palette_cases()
    cases += png_rules(png)
    cases += jpeg_rules(jpeg)
    cases += [Case(f"scans.{n}", "scans", many_scans_jpeg(n)) for n in (6, 99, 100, 101, 500, 3000)]
    cases += [Case("scans.1000_big", "scans", many_scans_jpeg(1000, 1024))]
    cases += large_cases()
    # The CI subset: every seed and rule case, one in sixteen of the rest (chosen by a hash of the name).
    for c in cases:
        c.ci = c.kind in ("seed", "png-rule", "jpeg-rule", "scans", "palette") or zlib.crc32(c.name.encode()) % 16 == 0
        c.ci = c.ci and c.kind != "large" or c.name in ("large.png_rgba_2400x2000", "large.jpeg_exif6_2400x2000")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise AssertionError("duplicate hostile case names")
    return cases


def write_hostile_set(folder: str | Path, ci_only: bool = False) -> dict[str, Path]:
    """Write the set (or its CI subset) into ``folder`` (e.g. for ``dtop-export cpp parity MODEL FOLDER``);
    returns case name -> file, named with its format's suffix so that folder expansion finds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for c in hostile_cases():
        if ci_only and not c.ci:
            continue
        suffix = ".png" if c.data.startswith(PNG_SIGNATURE[:4]) else ".jpg"
        path = folder / (c.name.replace("/", "_") + suffix)
        path.write_bytes(c.data)
        out[c.name] = path
    return out
