"""Byte-level builders of the hostile set: PNG chunks and images (any mode, depth, Adam7, filters), TIFF/EXIF
blocks, JPEG segments, a lossless (SOF3) JPEG encoder and progressive JPEGs with many scans. Standard library,
plus PIL inside the functions that encode with it."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Case:
    """One generated file: ``kind`` groups the cases (seed, truncate, flip, header, length, exif, ...)."""

    name: str
    kind: str
    data: bytes
    ci: bool = False


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(cid: bytes, data: bytes, length: int | None = None, crc: int | None = None) -> bytes:
    """A PNG chunk; ``length``/``crc`` replace the true ones (a lie)."""
    true_crc = zlib.crc32(cid + data) & 0xFFFFFFFF
    return (
        struct.pack(">I", len(data) if length is None else length)
        + cid
        + data
        + struct.pack(">I", true_crc if crc is None else crc)
    )


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of a well-formed PNG's chunks, in order."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]))
        pos += 12 + n
    return out


def png_build(chunks: Iterable[tuple[bytes, bytes]]) -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(c, d) for c, d in chunks)


def ihdr(width: int, height: int, depth: int, color: int, interlace: int = 0, compression: int = 0) -> bytes:
    return struct.pack(">IIBBBBB", width, height, depth, color, compression, 0, interlace)


def _pack_row(values: Sequence[int], bits: int) -> bytes:
    """Samples of ``bits`` (1/2/4/8/16) packed MSB first / big-endian."""
    if bits == 16:
        return b"".join(struct.pack(">H", v) for v in values)
    if bits == 8:
        return bytes(values)
    out, acc, n = bytearray(), 0, 0
    for v in values:
        acc = (acc << bits) | v
        n += bits
        if n == 8:
            out.append(acc)
            acc = n = 0
    if n:
        out.append(acc << (8 - n))
    return bytes(out)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_image(rows: list[list[int]], width: int, depth: int, color: int, interlace: bool = False,
              extra: Sequence[tuple[bytes, bytes]] = (), after: Sequence[tuple[bytes, bytes]] = (),
              filters: Sequence[int] = (0,)) -> bytes:  # fmt: skip
    """A PNG of sample rows (``width`` pixels, channels by ``color``), Adam7-interlaced on request, the rows
    filtered in turn with ``filters`` (0 none, 1 sub, 2 up, 3 average, 4 paeth)."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color]
    height = len(rows)
    bpp = max(1, depth * channels // 8)

    def filtered(raw_rows: list[bytes]) -> bytes:
        out, prev = bytearray(), bytes(len(raw_rows[0]) if raw_rows else 0)
        for k, r in enumerate(raw_rows):
            f = filters[k % len(filters)]
            enc = bytearray(r)
            for i in range(len(r) if f else 0):
                a = r[i - bpp] if i >= bpp else 0
                b, c = prev[i], prev[i - bpp] if i >= bpp else 0
                if f == 1:
                    enc[i] = (r[i] - a) & 255
                elif f == 2:
                    enc[i] = (r[i] - b) & 255
                elif f == 3:
                    enc[i] = (r[i] - (a + b) // 2) & 255
                elif f == 4:
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    enc[i] = (r[i] - (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
            out += bytes([f]) + enc
            prev = r
        return bytes(out)

    if not interlace:
        raw = filtered([_pack_row(r, depth) for r in rows])
    else:
        raw = b""
        for x0, y0, dx, dy in ADAM7:
            sub = [[v for x in range(x0, width, dx) for v in rows[y][x * channels : (x + 1) * channels]]
                   for y in range(y0, height, dy)]  # fmt: skip
            if sub and sub[0]:
                raw += filtered([_pack_row(r, depth) for r in sub])
    chunks = [(b"IHDR", ihdr(width, height, depth, color, int(interlace))), *extra]
    chunks += [(b"IDAT", zlib.compress(raw)), *after, (b"IEND", b"")]
    return png_build(chunks)


def tiff_block(entries: Sequence[tuple[int, int, int, bytes]], order: str = "II", magic: bytes | None = None,
               ifd: int = 8, count: int | None = None, tail: bytes = b"") -> bytes:  # fmt: skip
    """A TIFF header + IFD0 (an EXIF block): entries (tag, type, count, value bytes; more than 4 bytes go after
    the IFD, at the offset written), ``magic`` replaces the 4-byte header, ``count`` the entry count."""
    e = "<" if order == "II" else ">"
    head = magic if magic is not None else order.encode() + struct.pack(e + "H", 42)
    body = struct.pack(e + "H", len(entries) if count is None else count)
    data_at = ifd + 2 + 12 * len(entries) + 4
    blobs = b""
    for tag, typ, n, value in entries:
        if len(value) <= 4:
            body += struct.pack(e + "HHI", tag, typ, n) + value.ljust(4, b"\0")
        else:
            body += struct.pack(e + "HHII", tag, typ, n, data_at + len(blobs))
            blobs += value
    body += struct.pack(e + "I", 0)
    return head + struct.pack(e + "I", ifd) + b"\0" * (ifd - 8) + body + blobs + tail


def orientation_entry(value: int | float | tuple[int, int], typ: int, order: str = "II", n: int = 1) -> tuple:
    e = "<" if order == "II" else ">"
    fmt = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 11: "f", 12: "d", 13: "I", 16: "Q"}
    if typ in (5, 10):
        num, den = value if isinstance(value, tuple) else (value, 1)
        raw = struct.pack(e + ("II" if typ == 5 else "ii"), num, den) * n
    elif typ == 2:
        raw = (str(value).encode() + b"\0") * n
        n = len(raw)
    elif typ == 7:
        raw = bytes([int(value)]) * n
    else:
        raw = struct.pack(e + fmt[typ], value) * n
    return (0x0112, typ, n, raw)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of a JPEG's marker segments up to the first SOS (``end`` past its payload)."""
    out, pos = [], 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        m = data[pos + 1]
        (n,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        out.append((m, pos, pos + 2 + n))
        if m == 0xDA:
            break
        pos += 2 + n
    return out


def jpeg_insert(data: bytes, segment: bytes) -> bytes:
    """``segment`` (marker + length + payload) inserted right after SOI and any APP0."""
    pos = 2
    for m, _start, end in jpeg_segments(data):
        if m != 0xE0:
            break
        pos = end
    return data[:pos] + segment + data[pos:]


def app_segment(marker: int, payload: bytes, length: int | None = None) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2 if length is None else length) + payload


def encode(img: Any, fmt: str, **kw: Any) -> bytes:

    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def split_idat(data: bytes, size: int) -> bytes:
    out = []
    for cid, payload in png_chunks(data):
        if cid == b"IDAT":
            out += [(b"IDAT", payload[i : i + size]) for i in range(0, len(payload), size)]
        else:
            out.append((cid, payload))
    return png_build(out)


def patch_sof(data: bytes, f: Callable[[bytes], bytes]) -> bytes:
    for m, s, e in jpeg_segments(data):
        if m in (0xC0, 0xC1, 0xC2):
            return data[:s] + f(data[s:e]) + data[e:]
    raise ValueError("no SOF")


def many_scans_jpeg(scans: int, size: int = 256) -> bytes:
    """A flat grey progressive JPEG whose last AC scan repeats until it has ``scans`` scans: every scan revisits
    every block of the image (the time a few KB of scans cost grows with scans x pixels)."""
    from PIL import Image

    data = encode(Image.new("L", (size, size), 128), "JPEG", quality=50, progressive=True)
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    eoi = data.rindex(b"\xff\xd9")
    last = data[starts[-1] : eoi]
    have = len(starts)
    return data[:eoi] + last * max(0, scans - have) + b"\xff\xd9"


def lossless_jpeg(rows: Sequence[Sequence[int]]) -> bytes:
    """An 8-bit grey lossless JPEG (SOF3, predictor 1, the standard DC luminance Huffman table): what Pillow's
    libjpeg-turbo 3 reads and libjpeg-turbo 2.x (Debian 12's) refuses."""
    bits = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    codes, code, k = {}, 0, 0
    for length, count in enumerate(bits, 1):
        for _ in range(count):
            codes[k] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    out, acc, n = bytearray(), 0, 0

    def put(value: int, length: int) -> None:
        nonlocal acc, n
        acc, n = (acc << length) | (value & ((1 << length) - 1)), n + length
        while n >= 8:
            byte = (acc >> (n - 8)) & 255
            out.append(byte)
            if byte == 0xFF:
                out.append(0)
            n -= 8

    h, w = len(rows), len(rows[0])
    for y in range(h):
        for x in range(w):
            pred = 128 if x == 0 and y == 0 else rows[y][x - 1] if x else rows[y - 1][x]
            d = rows[y][x] - pred
            ssss = abs(d).bit_length()
            put(*codes[ssss])
            if ssss:
                put(d if d > 0 else d - 1, ssss)
    if n:
        put((1 << (8 - n)) - 1, 8 - n)
    dht = bytes([0x00, *bits, *range(12)])
    sof = struct.pack(">BHHB", 8, h, w, 1) + bytes([1, 0x11, 0])
    sos = bytes([1, 1, 0x00, 1, 0, 0])
    return (b"\xff\xd8" + app_segment(0xC4, dht) + app_segment(0xC3, sof) + app_segment(0xDA, sos) + bytes(out)
            + b"\xff\xd9")  # fmt: skip
