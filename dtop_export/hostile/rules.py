"""The hostile cases that follow one Pillow rule each: PLTE / tRNS variants, PNG chunk rules (CRC, lengths, text,
APNG, zlib streams that end early), JPEG marker rules, and large images that just fit a 64 MB decode budget (the
EXIF / XMP / eXIf variants are :mod:`dtop_export.hostile.exif`'s)."""

from __future__ import annotations

import struct
import zlib

from dtop_export.hostile.build import (
    ADAM7,
    PNG_SIGNATURE,
    Case,
    app_segment,
    encode,
    ihdr,
    jpeg_insert,
    jpeg_segments,
    lossless_jpeg,
    patch_sof,
    png_build,
    png_chunk,
    png_chunks,
    png_image,
)


def palette_cases() -> list[Case]:
    """PLTE / tRNS where Pillow has rules: before PLTE, longer than it, a single index, too long, none."""
    import numpy as np

    rows = [list(range(i * 16, i * 16 + 16)) for i in range(16)]
    pal2 = bytes([10, 20, 30, 200, 100, 50])
    full = bytes(np.random.default_rng(3).integers(0, 256, 768, dtype=np.uint8))
    v: dict[str, list[tuple[bytes, bytes]]] = {
        "pal2": [(b"PLTE", pal2)],
        "pal_none": [],
        "pal_odd7": [(b"PLTE", pal2 + b"\x99")],
        "pal_770": [(b"PLTE", full + b"\x01\x02")],
        "pal_771": [(b"PLTE", full + b"\x01\x02\x03")],
        "pal_empty": [(b"PLTE", b"")],
        "trns_longer": [(b"PLTE", pal2), (b"tRNS", bytes([0, 128, 7, 9, 200]))],
        "trns_before_plte": [(b"tRNS", bytes([0, 128])), (b"PLTE", pal2)],
        "trns_256": [(b"PLTE", full), (b"tRNS", bytes(range(256)))],
        "trns_257": [(b"PLTE", full), (b"tRNS", bytes(257))],
        "trns_simple3": [(b"PLTE", full), (b"tRNS", b"\xff\xff\xff\x00")],
        "trns_simple_newline": [(b"PLTE", full), (b"tRNS", b"\xff\x00\n")],
        "trns_simple256": [(b"PLTE", full), (b"tRNS", b"\xff" * 256 + b"\x00")],
        "trns_empty": [(b"PLTE", full), (b"tRNS", b"")],
        "trns_no_plte": [(b"tRNS", bytes([0, 100, 200]))],
        "two_plte": [(b"PLTE", full), (b"PLTE", pal2)],
    }
    out = [Case(f"palette.{k}", "palette", png_image(rows, 16, 8, 3, extra=x)) for k, x in v.items()]
    out.append(
        Case(
            "palette.trns_after_idat",
            "palette",
            png_image(rows, 16, 8, 3, extra=[(b"PLTE", full)], after=[(b"tRNS", bytes(range(0, 256, 3)))]),
        )
    )
    out.append(
        Case(
            "palette.text_transparency",
            "palette",
            png_image(rows, 16, 8, 3, extra=[(b"PLTE", full), (b"tEXt", b"transparency\0x")]),
        )
    )
    g = [[(x * 16 + y) % 256 for x in range(16)] for y in range(16)]
    grey = {
        "grey_trns_short": [(b"tRNS", b"\x01")],
        "grey_trns": [(b"tRNS", b"\x12\x34")],
        "grey_text_transparency": [(b"tEXt", b"transparency\0x")],
        "grey_plte": [(b"PLTE", pal2)],
    }
    out += [Case(f"palette.{k}", "palette", png_image(g, 16, 8, 0, extra=x)) for k, x in grey.items()]
    rgb = [[(x * 7 + y * 3 + c) % 256 for x in range(16) for c in range(3)] for y in range(16)]
    out += [
        Case("palette.rgb_trns_short", "palette", png_image(rgb, 16, 8, 2, extra=[(b"tRNS", b"\0\1\0\2")])),
        Case("palette.rgb_trns", "palette", png_image(rgb, 16, 8, 2, extra=[(b"tRNS", b"\0\1\0\2\0\3")])),
        Case("palette.rgb_plte", "palette", png_image(rgb, 16, 8, 2, extra=[(b"PLTE", pal2)])),
    ]
    # an IHDR for P, its PLTE, then an IHDR of another mode (Pillow keeps the palette: L becomes P)
    for name, (depth, color, row) in {"to_grey": (8, 0, g), "to_rgb": (8, 2, rgb), "to_bilevel": (1, 0, None)}.items():
        data = png_image(row or [[(x + y) % 2 for x in range(16)] for y in range(16)], 16, depth, color)
        ch = png_chunks(data)
        out.append(Case(f"palette.ihdr_p_then_{name}", "palette",
                        png_build([(b"IHDR", ihdr(16, 16, 8, 3)), (b"PLTE", pal2), *ch])))  # fmt: skip
    return out


def png_rules(png: dict[str, bytes]) -> list[Case]:
    """Pillow's own reading rules, one file each (the issue's list and what reading PngImagePlugin adds)."""
    import numpy as np

    w, h = 16, 8
    rgb = [[(x * 13 + y * 7 + c * 50) % 256 for x in range(w) for c in range(3)] for y in range(h)]
    raw = b"".join(b"\0" + bytes(r) for r in rgb)
    hdr = (b"IHDR", ihdr(w, h, 8, 2))
    ok = png_build([hdr, (b"IDAT", zlib.compress(raw)), (b"IEND", b"")])
    sig_ihdr = PNG_SIGNATURE + png_chunk(*hdr)
    big = zlib.compress(b"a" * (2 << 20))
    megabytes_of_text = [(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"a" * (1 << 20))) for i in range(65)]
    cases = {
        "ok": ok,
        "idat_crc": sig_ihdr + png_chunk(b"IDAT", zlib.compress(raw), crc=1) + png_chunk(b"IEND", b""),
        "text_crc_before": sig_ihdr
        + png_chunk(b"tEXt", b"a\0b", crc=1)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b""),
        "text_crc_after": sig_ihdr
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"tEXt", b"a\0b", crc=1)
        + png_chunk(b"IEND", b""),
        "ihdr_crc": PNG_SIGNATURE + png_chunk(*hdr, crc=1) + png_chunk(b"IDAT", zlib.compress(raw)),
        "crc_missing": sig_ihdr[:-4],
        "ztxt_method1": png_build([hdr, (b"zTXt", b"k\0\1xyz"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "ztxt_big": png_build([hdr, (b"zTXt", b"k\0\0" + big), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "ztxt_big_after": png_build([hdr, (b"IDAT", zlib.compress(raw)), (b"zTXt", b"k\0\0" + big), (b"IEND", b"")]),
        "ztxt_exact_1mib": png_build(
            [hdr, (b"zTXt", b"k\0\0" + zlib.compress(b"a" * (1 << 20))), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "ztxt_broken": png_build([hdr, (b"zTXt", b"k\0\0xyz"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "itxt_big": png_build([hdr, (b"iTXt", b"k\0\1\0\0\0" + big), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "iccp_method1": png_build(
            [hdr, (b"iCCP", b"icc\0\1" + zlib.compress(b"x")), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "iccp_big": png_build([hdr, (b"iCCP", b"icc\0\0" + big), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "iccp_no_nul": png_build([hdr, (b"iCCP", b"\0"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "gama_short": png_build([hdr, (b"gAMA", b"\0\1"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "phys_short": png_build([hdr, (b"pHYs", b"\0" * 8), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "srgb_empty": png_build([hdr, (b"sRGB", b""), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "chrm_short_after": png_build([hdr, (b"IDAT", zlib.compress(raw)), (b"cHRM", b"\0" * 31), (b"IEND", b"")]),
        "cut_after_rows": ok[: len(sig_ihdr) + 8 + len(zlib.compress(raw)) - 4],
        "zlib_short_boundary": png_build([hdr, (b"IDAT", zlib.compress(raw[: 3 * (1 + 3 * w)])), (b"IEND", b"")]),
        "zlib_short_midrow": png_build([hdr, (b"IDAT", zlib.compress(raw[: 3 * (1 + 3 * w) + 5])), (b"IEND", b"")]),
        "zlib_adler_bad": png_build([hdr, (b"IDAT", zlib.compress(raw)[:-4] + b"\0\0\0\0"), (b"IEND", b"")]),
        "zlib_extra": png_build([hdr, (b"IDAT", zlib.compress(raw + b"\0" * 100)), (b"IEND", b"")]),
        "zlib_trailing_idat": png_build([hdr, (b"IDAT", zlib.compress(raw)), (b"IDAT", b"junk"), (b"IEND", b"")]),
        "zlib_trailing_idat_lie": ok[:-12] + struct.pack(">I", 5000) + b"IDATxx",
        "zlib_raw_deflate": png_build([hdr, (b"IDAT", zlib.compress(raw)[2:]), (b"IEND", b"")]),
        "filter_5": png_build([hdr, (b"IDAT", zlib.compress(b"\5" + raw[1:])), (b"IEND", b"")]),
        "ihdr_compression1": png_build(
            [(b"IHDR", ihdr(w, h, 8, 2, compression=1)), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "ihdr_filter1": png_build(
            [(b"IHDR", ihdr(w, h, 8, 2)[:11] + b"\1\0"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "ihdr_interlace2": png_build(
            [(b"IHDR", ihdr(w, h, 8, 2, interlace=2)), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "ihdr_short": png_build([(b"IHDR", ihdr(w, h, 8, 2)[:12]), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "ihdr_bad_combo": png_build([(b"IHDR", ihdr(w, h, 8, 1)), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "ihdr_twice": png_build([hdr, hdr, (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "ihdr_twice_bad_second": png_build(
            [hdr, (b"IHDR", ihdr(w, h, 8, 1)), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "ihdr_twice_smaller": png_build(
            [hdr, (b"IHDR", ihdr(w, h // 2, 8, 2)), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "no_ihdr": png_build([(b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "unknown_critical": png_build([hdr, (b"ABCD", b"xyz"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "unknown_critical_after": png_build([hdr, (b"IDAT", zlib.compress(raw)), (b"ABCD", b"xyz"), (b"IEND", b"")]),
        "bad_chunk_name": png_build([hdr, (b"a-b!", b"xyz"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "bad_chunk_name_after": png_build([hdr, (b"IDAT", zlib.compress(raw)), (b"a-b!", b"xyz"), (b"IEND", b"")]),
        "no_idat": png_build([hdr, (b"IEND", b"")]),
        "iend_before_idat": png_build([hdr, (b"IEND", b""), (b"IDAT", zlib.compress(raw))]),
        "no_iend": ok[:-12],
        "idat_len_huge": sig_ihdr + struct.pack(">I", 0x7FFFFFFF) + b"IDAT" + zlib.compress(raw),
        "idat_split_text_between": png_build(
            [
                hdr,
                (b"IDAT", zlib.compress(raw)[:20]),
                (b"tEXt", b"a\0b"),
                (b"IDAT", zlib.compress(raw)[20:]),
                (b"IEND", b""),
            ]
        ),  # fmt: skip
        "idat_empty_chunks": png_build(
            [hdr, (b"IDAT", b""), (b"IDAT", zlib.compress(raw)), (b"IDAT", b""), (b"IEND", b"")]
        ),  # fmt: skip
        "ddat_continues": png_build(
            [hdr, (b"IDAT", zlib.compress(raw)[:20]), (b"DDAT", zlib.compress(raw)[20:]), (b"IEND", b"")]
        ),  # fmt: skip
        "text_key_interlace": png_build(
            [hdr, (b"tEXt", b"interlace\0yes"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
        ),  # fmt: skip
        "text_key_interlace_empty": png_build(
            [
                (b"IHDR", ihdr(w, h, 8, 2, interlace=1)),
                (b"tEXt", b"interlace\0"),
                (b"IDAT", zlib.compress(raw)),
                (b"IEND", b""),
            ]
        ),  # fmt: skip
        "text_key_bbox": png_build([hdr, (b"tEXt", b"bbox\0x"), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "text_len_lie": png_build([hdr, (b"IDAT", zlib.compress(raw))])[:-0]
        + struct.pack(">I", 0x7FFFFFFF)
        + b"tEXt"
        + b"k\0"
        + b"v" * 6000,
        "text_len_lie_before": sig_ihdr + struct.pack(">I", 0x7FFFFFFF) + b"tEXt" + b"k\0" + b"v" * 6000,
        "text_memory": png_build([hdr, *megabytes_of_text, (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]),
        "bomb_16bit_rgba_1row": png_build(
            [(b"IHDR", ihdr(178956970, 1, 16, 6)), (b"IDAT", zlib.compress(b"\0" * 8000)), (b"IEND", b"")]
        ),  # fmt: skip
        "bomb_rgb_1gb": png_build(
            [(b"IHDR", ihdr(20000, 20000, 8, 2)), (b"IDAT", zlib.compress(b"\0" * 8000)), (b"IEND", b"")]
        ),  # fmt: skip
        "bomb_wide_16bit": png_build(
            [(b"IHDR", ihdr(40000000, 1, 16, 6)), (b"IDAT", zlib.compress(b"\0" * 800)), (b"IEND", b"")]
        ),  # fmt: skip
        "bomb_adam7": png_build(
            [(b"IHDR", ihdr(8000, 8000, 8, 6, interlace=1)), (b"IDAT", zlib.compress(b"\0" * 800)), (b"IEND", b"")]
        ),  # fmt: skip
    }
    # APNG: fcTL before IDAT (its box decides the tile), sequence errors, boxes outside the image, fdAT first
    fctl = lambda seq, fw, fh, x, y: struct.pack(">IIIIIHHBB", seq, fw, fh, x, y, 1, 10, 0, 0)  # noqa: E731
    actl = (b"acTL", struct.pack(">II", 1, 0))
    comp = zlib.compress(raw)
    small = zlib.compress(b"".join(b"\0" + bytes(r[: 3 * 8]) for r in rgb[:4]))
    cases |= {
        "apng_full": png_build([hdr, actl, (b"fcTL", fctl(0, w, h, 0, 0)), (b"IDAT", comp), (b"IEND", b"")]),
        "apng_box": png_build([hdr, actl, (b"fcTL", fctl(0, 8, 4, 3, 2)), (b"IDAT", small), (b"IEND", b"")]),
        "apng_box_outside": png_build([hdr, actl, (b"fcTL", fctl(0, 8, 4, 12, 2)), (b"IDAT", small), (b"IEND", b"")]),
        "apng_box_empty": png_build([hdr, actl, (b"fcTL", fctl(0, 0, 4, 0, 2)), (b"IDAT", small), (b"IEND", b"")]),
        "apng_seq_bad": png_build([hdr, actl, (b"fcTL", fctl(3, w, h, 0, 0)), (b"IDAT", comp), (b"IEND", b"")]),
        "apng_fctl_short": png_build(
            [hdr, actl, (b"fcTL", fctl(0, w, h, 0, 0)[:20]), (b"IDAT", comp), (b"IEND", b"")]
        ),  # fmt: skip
        "apng_actl_short": png_build([hdr, (b"acTL", b"\0\0\0\1"), (b"IDAT", comp), (b"IEND", b"")]),
        "apng_actl_zero": png_build([hdr, (b"acTL", b"\0" * 8), (b"IDAT", comp), (b"IEND", b"")]),
        "apng_fdat_first": png_build(
            [hdr, actl, (b"fcTL", fctl(0, w, h, 0, 0)), (b"fdAT", b"\0\0\0\1" + comp), (b"IEND", b"")]
        ),  # fmt: skip
        "apng_fdat_bad_seq_after": png_build([hdr, (b"IDAT", comp), (b"fdAT", b"\0\0\0\7" + comp), (b"IEND", b"")]),
        "apng_fctl_after_bad": png_build([hdr, (b"IDAT", comp), (b"fcTL", fctl(5, w, h, 0, 0)), (b"IEND", b"")]),
    }
    out = [Case(f"png.{k}", "png-rule", v) for k, v in cases.items()]
    rng = np.random.default_rng(11)
    noise = rng.integers(0, 256, (40, 40 * 3), dtype=np.uint8)
    out.append(Case("png.adam7_noise_cut", "png-rule",
                    png_image([list(map(int, r)) for r in noise], 40, 8, 2, interlace=True)[:-200]))  # fmt: skip
    return out


def jpeg_rules(jpeg: dict[str, bytes]) -> list[Case]:
    base = jpeg["j_base"]
    segs = jpeg_segments(base)
    sos = next(s for m, s, e in segs if m == 0xDA)
    cases = {
        "no_eoi": base[:-2],
        "no_sos": base[:sos] + b"\xff\xd9",
        "no_sof": b"\xff\xd8" + b"".join(base[s:e] for m, s, e in segs if m not in (0xC0, 0xC2)) + base[sos:],
        "tem_marker": base[:2] + b"\xff\x01" + base[2:],
        "reserved_marker": base[:2] + b"\xff\x02\x00\x04ab" + base[2:],
        "garbage_before_marker": base[:2] + b"junk" + base[2:],
        "fill_ff": base[:2] + b"\xff\xff\xff" + base[2:],
        "jfif_short": jpeg_insert(base, app_segment(0xE0, b"JFIF\0")),
        "adobe_short": jpeg_insert(base, app_segment(0xEE, b"Adobe")),
        "photoshop_name_cut": jpeg_insert(base, app_segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04")),
        "photoshop_ok": jpeg_insert(base, app_segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04\0\0\0\0\0\x04abcd")),
        "icc_fragment_short": jpeg_insert(base, app_segment(0xE2, b"ICC_PROFILE\0\1")),
        "icc_fragment_ok": jpeg_insert(base, app_segment(0xE2, b"ICC_PROFILE\0\1\1abc")),
        "dqt_short": base[:2] + app_segment(0xDB, b"\0" + b"\1" * 10) + base[2:],
        "dqt_16bit": base[:2] + app_segment(0xDB, b"\x10" + b"\0\1" * 64) + base[2:],
        "sof_12bit": patch_sof(base, lambda s: s[:4] + b"\x0c" + s[5:]),
        "sof_2_layers": patch_sof(base, lambda s: s[:9] + b"\x02" + s[10:]),
        "sof_partial_component": patch_sof(base, lambda s: s[:2] + struct.pack(">H", len(s) - 2 - 1) + s[4:-1]),
        "sof_sampling0": patch_sof(base, lambda s: s[:11] + b"\x00" + s[12:]),
        "two_sof": base[:sos] + next(base[s:e] for m, s, e in segs if m in (0xC0, 0xC2)) + base[sos:],
        "sos_truncated": base[: sos + 6],
        "data_after_eoi": base + b"\xff\xd8garbage" * 10,
        "mpf_app2": jpeg_insert(
            base,
            app_segment(
                0xE2,
                b"MPF\0II*\x00\x08\x00\x00\x00\x01\x00\x01\xb0\x04\x00\x01\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00",
            ),
        ),  # fmt: skip
        "com_marker": jpeg_insert(base, app_segment(0xFE, b"a comment")),
        "app_len_1": base[:2] + b"\xff\xe5\x00\x01" + base[2:],
    }
    return [Case(f"jpeg.{k}", "jpeg-rule", v) for k, v in cases.items()]


def large_cases() -> list[Case]:
    """Images that decode within a 64 MB budget but not by much: the budget's arithmetic against the RSS."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:2000, 0:2400]
    rgba = np.stack([x % 256, y % 256, (x + y) % 256, (x * 3) % 256], -1).astype(np.uint8)
    smooth = Image.fromarray(rgba[..., :3]).resize((2048, 2048))
    exif = Image.Exif()
    exif[0x0112] = 6
    big = np.zeros((3200, 3200, 3), np.uint8)
    big[::7] = 200
    adam = rgba[:1800, :1800, :3]
    raw = b"".join(b"\0" + row.tobytes() for x0, y0, dx, dy in ADAM7 for row in adam[y0::dy, x0::dx])
    return [
        Case("large.png_rgba_2400x2000", "large", encode(Image.fromarray(rgba), "PNG", compress_level=1)),
        Case("large.png_rgb_3200x3200", "large", encode(Image.fromarray(big), "PNG")),
        Case(
            "large.png_palette_3000x2000",
            "large",
            encode(
                Image.fromarray((np.arange(3000)[None] % 200).repeat(2000, 0).astype(np.uint8), "L").convert("P"),
                "PNG",
                transparency=bytes(range(0, 256, 2)),
            ),
        ),  # fmt: skip
        Case(
            "large.png_adam7_rgb_1800x1800",
            "large",
            png_build([(b"IHDR", ihdr(1800, 1800, 8, 2, 1)), (b"IDAT", zlib.compress(raw, 1)), (b"IEND", b"")]),
        ),
        Case("large.jpeg_prog_2048x2048", "large", encode(smooth, "JPEG", quality=80, progressive=True)),
        Case(
            "large.jpeg_cmyk444_prog_1400x1400",
            "large",
            encode(smooth.resize((1400, 1400)).convert("CMYK"), "JPEG", progressive=True, subsampling=0),
        ),
        Case("large.jpeg_exif6_2400x2000", "large", encode(Image.fromarray(rgba[..., :3]), "JPEG", exif=exif)),
        Case(
            "jpeg.lossless", "jpeg-rule", lossless_jpeg([[(7 * x + 3 * y) % 256 for x in range(40)] for y in range(24)])
        ),
    ]
