"""The hostile cases of EXIF, XMP and eXIf (one Pillow rule each): every way ``Image.getexif()`` reads an
orientation from a JPEG or a PNG, and every way it fails."""

from __future__ import annotations

import struct
import zlib

from dtop_export.hostile.build import (
    Case,
    app_segment,
    jpeg_insert,
    orientation_entry,
    png_build,
    png_chunks,
    tiff_block,
)


def exif_blocks() -> dict[str, bytes]:
    """EXIF blocks (TIFF bytes, no "Exif" prefix) for every rule Pillow's getexif() has."""
    o = orientation_entry
    blocks = {
        "short6": tiff_block([o(6, 3)]),
        "short6_mm": tiff_block([o(6, 3, "MM")], order="MM"),
        "long8": tiff_block([o(8, 4)]),
        "rational6": tiff_block([o((6, 1), 5)]),
        "rational12_2": tiff_block([o((12, 2), 5)]),
        "rational6_0": tiff_block([o((6, 0), 5)]),
        "srational_neg": tiff_block([o((-6, -1), 10)]),
        "float6": tiff_block([o(6.0, 11)]),
        "double3": tiff_block([o(3.0, 12)]),
        "double2_5": tiff_block([o(2.5, 12)]),
        "byte6": tiff_block([o(6, 1)]),
        "undefined6": tiff_block([o(6, 7)]),
        "ascii6": tiff_block([o(6, 2)]),
        "sbyte7": tiff_block([o(7, 6)]),
        "sshort5": tiff_block([o(5, 8)]),
        "slong_neg6": tiff_block([o(-6, 9)]),
        "long8type": tiff_block([o(6, 16)]),
        "ifdtype": tiff_block([o(6, 13)]),
        "short_count2": tiff_block([o(6, 3, n=2)]),
        "short_count0": tiff_block([(0x0112, 3, 0, b"\x06\x00")]),
        "value9": tiff_block([o(9, 3)]),
        "value0": tiff_block([o(0, 3)]),
        "count0_ifd": tiff_block([o(6, 3)], count=0),
        "count_big": tiff_block([o(6, 3)], count=500),
        "ifd_beyond": tiff_block([o(6, 3)], ifd=8)[:8].replace(b"\x08\x00\x00\x00", b"\xff\xff\x00\x00"),
        "magic_MM2a00": tiff_block([o(6, 3, "MM")], order="MM", magic=b"MM\x2a\x00"),
        "magic_II002a": tiff_block([o(6, 3)], magic=b"II\x00\x2a"),
        "magic_bigtiff": tiff_block([o(6, 3)], magic=b"II\x2b\x00"),
        "magic_MM002b": tiff_block([o(6, 3, "MM")], order="MM", magic=b"MM\x00\x2b"),
        "magic_bad": tiff_block([o(6, 3)], magic=b"IIxx"),
        "five_bytes": b"II*\x00\x08",
        "head_only": b"II*\x00",
        "empty": b"",
        "dup_tag_first_bad": tiff_block([(0x0112, 99, 1, b"\x06\x00"), o(8, 3)]),
        "dup_tag": tiff_block([o(3, 3), o(6, 3)]),
        "tag_after_truncated_data": tiff_block([(0x010F, 2, 4000, b"x" * 8), o(6, 3)]),
        "tag_after_huge_data": tiff_block([(0x010F, 2, 0xFFFFFF, b"x" * 8), o(6, 3)]),
        "ifd_offset_odd": tiff_block([o(5, 3)], ifd=11),
        # exif_transpose rewrites the remaining tags after turning the image, and raises on these two
        "exififd_negative": tiff_block([o(6, 3), (0x8769, 9, 1, struct.pack("<i", -5))]),
        "software_rational": tiff_block([o(8, 3), (0x0131, 5, 1, struct.pack("<II", 1, 0))]),
    }
    # an entry whose out-of-line data points past the end, before the orientation: the directory stops there
    b = bytearray(tiff_block([(0x010F, 2, 8, b"abcdefgh"), o(6, 3)]))
    struct.pack_into("<I", b, 8 + 2 + 8, 5000)
    blocks["data_past_end"] = bytes(b)
    return blocks


XMP_PACKETS = {
    "xmp_attr6": b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>',
    "xmp_elem8": b"<x:xmpmeta><tiff:Orientation>8</tiff:Orientation></x:xmpmeta>",
    "xmp_9": b'<x:xmpmeta tiff:Orientation="9"/>',
    "xmp_bad": b"<x:xmpmeta tiff:Orientation='6'/>",
}


def exif_cases(jpeg: dict[str, bytes], png: dict[str, bytes]) -> list[Case]:
    blocks = exif_blocks()
    base_j, dpi_j = jpeg["j_base"], jpeg["j_dpi"]
    base_p = png["p_rgb"]
    out: list[Case] = []

    def with_png(extra: list[tuple[bytes, bytes]], after: list[tuple[bytes, bytes]] = ()) -> bytes:  # type: ignore[assignment]
        ch = png_chunks(base_p)
        i = [c for c, _ in ch].index(b"IDAT")
        return png_build(ch[:1] + extra + ch[1 : i + 1] + list(after) + ch[i + 1 :])

    for key, block in blocks.items():
        app1 = app_segment(0xE1, b"Exif\0\0" + block)
        out.append(Case(f"exif.{key}.jpeg", "exif", jpeg_insert(base_j, app1)))
        out.append(Case(f"exif.{key}.jpeg_dpi", "exif", jpeg_insert(dpi_j, app1)))
        out.append(Case(f"exif.{key}.png", "exif", with_png([(b"eXIf", block)])))
        out.append(Case(f"exif.{key}.png_after", "exif", with_png([], [(b"eXIf", block)])))
    s6 = blocks["short6"]
    spaced = b" ".join(s6.hex()[i : i + 2].encode() for i in range(0, len(s6) * 2, 2))
    raw_profile = b"\nexif\n" + f"{len(s6):8}".encode() + b"\n" + s6.hex().encode()
    out += [
        Case("exif.png_prefixed", "exif", with_png([(b"eXIf", b"Exif\0\0" + s6)])),
        Case("exif.png_two_exif", "exif", with_png([(b"eXIf", blocks["long8"]), (b"eXIf", s6)])),
        Case("exif.png_text_exif", "exif", with_png([(b"tEXt", b"exif\0" + s6)])),
        Case("exif.png_ztxt_exif", "exif", with_png([(b"zTXt", b"exif\0\0" + zlib.compress(s6))])),
        Case("exif.png_raw_profile", "exif", with_png([(b"tEXt", b"Raw profile type exif\0" + raw_profile)])),
        Case(
            "exif.png_raw_profile_ztxt",
            "exif",
            with_png([(b"zTXt", b"Raw profile type exif\0\0" + zlib.compress(raw_profile))]),
        ),  # fmt: skip
        Case(
            "exif.png_raw_profile_bad_hex", "exif", with_png([(b"tEXt", b"Raw profile type exif\0\nexif\n 4\nzz00")])
        ),  # fmt: skip
        Case(
            "exif.png_raw_profile_spaces",
            "exif",
            with_png([(b"tEXt", b"Raw profile type exif\0\nexif\n 4\n" + spaced)]),
        ),
        Case(
            "exif.jpeg_two_app1",
            "exif",
            jpeg_insert(base_j, app_segment(0xE1, b"Exif\0\0" + s6[:14]) + app_segment(0xE1, b"Exif\0\0" + s6[14:])),
        ),
        Case("exif.jpeg_double_prefix", "exif", jpeg_insert(base_j, app_segment(0xE1, b"Exif\0\0Exif\0\0" + s6))),
        Case(
            "exif.jpeg_triple_prefix", "exif", jpeg_insert(base_j, app_segment(0xE1, b"Exif\0\0Exif\0\0Exif\0\0" + s6))
        ),  # fmt: skip
        Case(
            "exif.jpeg_first_empty",
            "exif",
            jpeg_insert(base_j, app_segment(0xE1, b"Exif\0\0") + app_segment(0xE1, b"Exif\0\0" + s6)),
        ),  # fmt: skip
    ]
    no_tag = b"Exif\0\0" + blocks["value0"][:8] + b"\0\0"  # an IFD0 without entries
    for key, xmp in XMP_PACKETS.items():
        seg = app_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0" + xmp)
        out.append(Case(f"xmp.{key}.jpeg", "exif", jpeg_insert(base_j, seg)))
        out.append(Case(f"xmp.{key}.jpeg_with_exif_no_tag", "exif",
                        jpeg_insert(base_j, app_segment(0xE1, no_tag) + seg)))  # fmt: skip
        out.append(Case(f"xmp.{key}.jpeg_bad_exif", "exif",
                        jpeg_insert(base_j, app_segment(0xE1, b"Exif\0\0IIxx") + seg)))  # fmt: skip
        out.append(Case(f"xmp.{key}.png_itxt", "exif", with_png([(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp)])))
        out.append(Case(f"xmp.{key}.png_itxt_z", "exif",
                        with_png([(b"iTXt", b"XML:com.adobe.xmp\0\1\0\0\0" + zlib.compress(xmp))])))  # fmt: skip
        out.append(Case(f"xmp.{key}.png_text", "exif", with_png([(b"tEXt", b"XML:com.adobe.xmp\0" + xmp)])))
        out.append(Case(f"xmp.{key}.png_text_xmp_key", "exif", with_png([(b"tEXt", b"xmp\0" + xmp)])))
    out.append(
        Case(
            "xmp.png_itxt_bad_utf8",
            "exif",
            with_png([(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + XMP_PACKETS["xmp_attr6"] + b"\xff")]),
        )
    )
    return out
