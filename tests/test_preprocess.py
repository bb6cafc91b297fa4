"""Image loading (every PIL mode, EXIF orientation, unreadable files) and the resize/normalise contract."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtop_export.errors import DToPError
from dtop_export.preprocess import (
    PreprocessConfig,
    crop_bbox,
    load_image,
    model_size,
    prepare,
    resize_for_model,
    to_rgb,
    to_tensor,
)


def _rgb(img: Image.Image) -> np.ndarray:
    out = to_rgb(img)
    assert out.mode == "RGB"
    return np.asarray(out)


def test_rgb_is_unchanged() -> None:
    a = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    assert np.array_equal(_rgb(Image.fromarray(a, "RGB")), a)


def test_grayscale_and_one_bit_replicate_the_channel() -> None:
    g = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    out = _rgb(Image.fromarray(g, "L"))
    assert out.shape == (5, 7, 3) and all(np.array_equal(out[..., c], g) for c in range(3))
    bits = Image.fromarray((g > 100).astype(np.uint8) * 255, "L").convert("1")
    assert set(np.unique(_rgb(bits))) == {0, 255}


def test_rgba_is_composited_on_white() -> None:
    a = np.zeros((2, 2, 4), dtype=np.uint8)
    a[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    a[0, 1] = (255, 0, 0, 0)  # transparent red becomes white
    a[1, 0] = (0, 0, 0, 128)  # half-transparent black becomes mid grey
    a[1, 1] = (0, 0, 255, 255)
    out = _rgb(Image.fromarray(a, "RGBA")).astype(int)
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert all(abs(v - 127) <= 1 for v in out[1, 0])
    assert out[1, 1].tolist() == [0, 0, 255]


def test_la_and_palette_with_transparency() -> None:
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], dtype=np.uint8), "LA")
    assert _rgb(la).tolist() == [[[255, 255, 255], [0, 0, 0]]]
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    assert _rgb(p).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    p.info["transparency"] = 0
    assert _rgb(p).tolist() == [[[255, 255, 255], [200, 100, 50]]]


def test_cmyk_converts_to_rgb() -> None:
    c = Image.new("CMYK", (1, 1), (0, 255, 255, 0))  # pure red in CMYK
    assert _rgb(c).tolist() == [[[255, 0, 0]]]


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_is_scaled_to_eight(mode: str) -> None:
    v = np.array([[0, 257 * 100, 65535, 257 * 200 + 100]], dtype=np.uint16)
    img = Image.fromarray(v) if mode == "I;16" else Image.fromarray(v.astype(np.int32))
    assert img.mode == mode
    assert _rgb(img)[..., 0].tolist() == [[0, 100, 255, 200]]


def test_sixteen_bit_png_file(tmp_path: Path) -> None:
    v = (np.arange(12, dtype=np.uint32).reshape(3, 4) * 5000).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(v).save(path)
    out = np.asarray(load_image(path))
    assert out.shape == (3, 4, 3)
    assert np.array_equal(out[..., 1], np.round(v / 257).astype(np.uint8))


def test_float_images() -> None:
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert _rgb(unit)[..., 2].tolist() == [[0, 128, 255]]
    wide = Image.fromarray(np.array([[-3.0, 100.0, 300.0]], dtype=np.float32), "F")
    assert _rgb(wide)[..., 2].tolist() == [[0, 100, 255]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # stored 60 wide x 40 high, left half red, right half blue; orientation 6 = rotate 90° clockwise to view
    a = np.zeros((40, 60, 3), dtype=np.uint8)
    a[:, :30] = (255, 0, 0)
    a[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    Image.fromarray(a).save(path, exif=exif.tobytes(), quality=95)
    img = load_image(path)
    assert img.size == (40, 60)  # upright: 40 wide, 60 high
    px = np.asarray(img).astype(int)
    assert px[5, 20, 0] > 200 and px[5, 20, 2] < 60  # the left (red) half is now on top
    assert px[55, 20, 2] > 200 and px[55, 20, 0] < 60
    raw = load_image(path, apply_exif=False)
    assert raw.size == (60, 40)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_load_image_any_mode_from_file(tmp_path: Path, mode: str) -> None:
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, size=(9, 11, 3), dtype=np.uint8), "RGB")
    img = base.convert(mode)
    path = tmp_path / f"img.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (11, 9)


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    text = tmp_path / "not_an_image.jpg"
    text.write_text("hello")
    with pytest.raises(DToPError, match="not_an_image.jpg"):
        load_image(text)
    truncated = tmp_path / "truncated.jpg"
    Image.new("RGB", (64, 64), (10, 200, 30)).save(truncated, quality=90)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(DToPError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(DToPError, match="missing.png not found"):
        load_image(tmp_path / "missing.png")


def test_model_size_rounds_to_the_stride() -> None:
    cfg = PreprocessConfig(stride=16)
    # 500x300 -> longer side 256: 256 x 153.6 -> 153.6/16 = 9.6 -> 10 strides = 160
    assert model_size(500, 300, cfg, 256) == (256, 160)
    # scale sqrt(2): 362.04 x 217.22 -> 22.6 -> 23, 13.6 -> 14 strides
    assert model_size(500, 300, cfg, 256, math.sqrt(2)) == (368, 224)
    # portrait keeps its orientation; a very thin image gets at least one stride
    assert model_size(300, 500, cfg, 256) == (160, 256)
    assert model_size(1000, 10, cfg, 256) == (256, 16)
    assert model_size(500, 300, cfg) == (1024, 608)  # default cfg.size: 614.4 -> 38.4 -> 38 strides
    assert model_size(500, 300, PreprocessConfig(stride=32), 256) == (256, 160)  # 4.8 -> 5 strides of 32


def test_resize_for_model_and_interpolation() -> None:
    img = Image.new("RGB", (500, 300), (1, 2, 3))
    out = resize_for_model(img, PreprocessConfig(stride=16), 256)
    assert out.size == (256, 160)
    with pytest.raises(DToPError, match="interpolation"):
        resize_for_model(img, PreprocessConfig(interpolation="magic"), 256)
    with pytest.raises(DToPError, match="resize policy"):
        resize_for_model(img, PreprocessConfig(resize="center_crop"), 256)


def test_to_tensor_normalises_per_channel() -> None:
    cfg = PreprocessConfig(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    a = np.zeros((2, 3, 3), dtype=np.uint8)
    a[..., 0] = 255
    a[..., 1] = 51
    a[0, 0, 2] = 102
    t = to_tensor(Image.fromarray(a), cfg)
    assert t.dtype == np.float32 and t.shape == (3, 2, 3)
    assert np.allclose(t[0], (1.0 - 0.485) / 0.229)
    assert np.allclose(t[1], (0.2 - 0.456) / 0.224)
    assert np.isclose(t[2, 0, 0], (0.4 - 0.406) / 0.225) and np.isclose(t[2, 1, 1], -0.406 / 0.225)


def test_crop_bbox_rounds_like_pil_and_clamps() -> None:
    a = np.random.default_rng(2).integers(0, 256, size=(50, 80, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    box = (10.4, 20.6, 50.5, 40.49)
    assert np.array_equal(np.asarray(crop_bbox(img, box)), np.asarray(img.crop(box)))
    clamped = crop_bbox(img, (-5, -5, 500, 30))
    assert clamped.size == (80, 30) and np.array_equal(np.asarray(clamped), a[:30])
    with pytest.raises(DToPError, match="empty"):
        crop_bbox(img, (90, 0, 100, 10))
    with pytest.raises(DToPError, match="4 finite numbers"):
        crop_bbox(img, (1, 2, 3))
    for box in ((1, float("nan"), 30, 40), (1, 2, float("inf"), 40), ("a", "b", "c", "d")):  # was a ValueError
        with pytest.raises(DToPError, match="4 finite numbers"):
            crop_bbox(img, box)


def test_prepare_is_crop_then_resize_then_normalise() -> None:
    cfg = PreprocessConfig(stride=16)
    a = np.zeros((100, 200, 3), dtype=np.uint8)
    a[:, 100:] = 255
    img = Image.fromarray(a)
    t = prepare(img, cfg, 64, bbx=(100, 0, 200, 50))  # the white half at the whole image's scale: 100x50 -> 32x16
    assert t.shape == (3, 16, 32) and np.allclose(t, (1.0 - 0.5) / 0.5)
    t2 = prepare(img, cfg, 64, scale=0.5)
    assert t2.shape == (3, 16, 32)


@pytest.mark.parametrize(
    ("full", "size", "box", "scale", "resize", "hw"),
    [
        # the review's case: a 200x150 box of a 1024x768 photo at 1024 stays 200x150 (-> stride 16: 208x144)
        ((1024, 768), 1024, (400, 300, 600, 450), 1.0, "longest_side", (144, 208)),
        ((1024, 768), 1024, (400, 300, 600, 450), math.sqrt(2), "longest_side", (208, 288)),  # then rescaled
        ((2048, 1536), 1024, (800, 600, 1200, 900), 1.0, "longest_side", (144, 208)),  # shrunk as its photo is
        ((500, 400), 1024, (0, 0, 300, 200), 1.0, "longest_side", (208, 304)),  # a small photo: not enlarged
        ((1024, 768), 64, (400, 300, 600, 450), 1.0, "square", (64, 64)),  # a fixed-size program: its one size
    ],
)
def test_query_crops_are_never_enlarged(
    full: tuple[int, int], size: int, box: tuple[int, ...], scale: float, resize: str, hw: tuple[int, int]
) -> None:
    """Found by review: a query crop was resized to the full longer side (a 200x150 box of a 1024 px photo became
    1024x768); cirtorch crops, then ``thumbnail``s to the scale of the whole photo (never enlarging)."""
    from dtop_export.preprocess import prepare_pixels

    cfg = PreprocessConfig(stride=16, resize=resize, size=size)
    img = Image.new("RGB", full, (10, 20, 30))
    assert prepare(img, cfg, size, scale, box).shape == (3, *hw)
    assert prepare_pixels(img, cfg, size, scale, box).shape == (*hw, 3)


def test_the_path_without_a_box_still_fills_the_size() -> None:
    cfg = PreprocessConfig(stride=16)
    assert prepare(Image.new("RGB", (1024, 768)), cfg, 1024).shape == (3, 768, 1024)
    assert prepare(Image.new("RGB", (500, 400)), cfg, 1024).shape == (3, 816, 1024)  # enlarged, as always


# one preprocessing path for every consumer -------------------------------------------------------------------


def test_image_size_is_the_upright_size(tmp_path: Path) -> None:
    from dtop_export.preprocess import image_size

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: load_image returns it 40 wide, 60 high
    path = tmp_path / "rotated.jpg"
    Image.new("RGB", (60, 40)).save(path, exif=exif.tobytes())
    assert image_size(path) == load_image(path).size == (40, 60)
    for o in (2, 5, 8):  # mirrored: the sides stay; transposed or turned the other way: they swap
        exif[0x0112] = o
        Image.new("RGB", (60, 40)).save(path, exif=exif.tobytes())
        assert image_size(path) == load_image(path).size == ((60, 40) if o == 2 else (40, 60))
    plain = tmp_path / "plain.png"
    Image.new("RGB", (60, 40)).save(plain)
    assert image_size(plain) == (60, 40)
    (tmp_path / "text.jpg").write_text("not an image")
    assert image_size(tmp_path / "text.jpg") is None and image_size(tmp_path / "missing.png") is None


def test_list_and_expand_images_use_one_suffix_set(tmp_path: Path) -> None:
    from dtop_export.preprocess import IMAGE_SUFFIXES, expand_images, list_images

    (tmp_path / "sub").mkdir()
    for name in ("b.JPG", "sub/a.png", "c.webp", "d.gif", "e.tiff"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("x")
    found = list_images(tmp_path)
    assert [p.name for p in found] == ["b.JPG", "c.webp", "d.gif", "e.tiff", "a.png"]
    assert all(p.suffix.lower() in IMAGE_SUFFIXES for p in found)
    assert expand_images([tmp_path / "notes.txt", tmp_path]) == [tmp_path / "notes.txt", *found]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DToPError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(DToPError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(DToPError, match="notes.txt is a file, not a folder of images"):  # was: "does not exist"
        list_images(tmp_path / "notes.txt")


def test_square_crop_rounds_like_the_resize(tmp_path: Path) -> None:
    from dtop_export.preprocess import prepare_square

    cfg = PreprocessConfig(stride=16)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 401, 3), dtype=np.uint8))
    x = prepare_square(img, cfg, 250)  # side rounded down to the stride: 240
    assert x.shape == (3, 240, 240) and x.dtype == np.float32
    # shorter side 300 -> 240: the longer side is floor(401 * 0.8 + 0.5) = 321, then the centre 240 columns
    ref = img.resize((321, 240), Image.Resampling.BILINEAR).crop((40, 0, 280, 240))
    assert np.allclose(x, to_tensor(ref, cfg))


def test_int8_calibration_sees_what_the_engines_see(tmp_path: Path) -> None:
    """The calibration tensors are the engines' inputs: EXIF applied, RGBA composited, sizes rounded alike."""
    from dtop_export.quantize import calibration_tensors

    exif = Image.Exif()
    exif[0x0112] = 6
    rgba = np.random.default_rng(1).integers(0, 256, (50, 70, 4), dtype=np.uint8)
    paths = [tmp_path / "rot.jpg", tmp_path / "alpha.png"]
    Image.fromarray(rgba[..., :3]).save(paths[0], exif=exif.tobytes())
    Image.fromarray(rgba, "RGBA").save(paths[1])
    cfg = PreprocessConfig(stride=16, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4))
    tensors = calibration_tensors(paths, cfg, [72, 40], limit=2)
    expected = [prepare(load_image(p), cfg, s)[None] for p in paths for s in (72, 40)]
    assert len(tensors) == 4
    for got, want in zip(tensors, expected):
        assert got.shape == want.shape and np.array_equal(got, want)
    assert tensors[0].shape[2] > tensors[0].shape[3]  # the rotated photo stands upright


# hostile files: every decoder failure one line, the decode budget ---------------------------------------------


def _png_with(*chunks: tuple[bytes, bytes], mode_color: int = 2) -> bytes:
    from dtop_export.hostile.build import png_image

    rows = [[(x * 9 + y * 5 + c) % 256 for x in range(8) for c in range(3 if mode_color == 2 else 1)] for y in range(6)]
    return png_image(rows, 8, 8, mode_color, extra=list(chunks))


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("exif5.png", lambda: _png_with((b"eXIf", b"II*\x00\x08"))),  # struct.error from Pillow's getexif
        ("ztxt_exif.png", lambda: _png_with((b"zTXt", b"exif\x00\x00x\x9c\x03\x00\x00\x00\x00\x01"))),  # TypeError
        ("grey_text_transparency.png", lambda: _png_with((b"tEXt", b"transparency\x00x"), mode_color=0)),  # TypeError
        ("palette771.png", lambda: _png_with((b"PLTE", bytes(771)), mode_color=3)),  # ValueError
    ],
)
def test_every_decoder_failure_is_one_cannot_read_line(tmp_path: Path, name: str, data: object) -> None:
    path = tmp_path / name
    path.write_bytes(data())  # type: ignore[operator]
    with pytest.raises(DToPError, match=rf"^cannot read image .*{name}: \S") as e:
        load_image(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("block", ["exififd_negative", "software_rational"])
def test_orientation_survives_metadata_exif_transpose_cannot_rewrite(tmp_path: Path, block: str) -> None:
    """ImageOps.exif_transpose turns the image, then rewrites the other tags and raises on these; load_image
    turns the image by the same getexif() value without the rewrite."""
    import io

    from PIL import ImageOps

    from dtop_export.hostile.build import app_segment, jpeg_insert
    from dtop_export.hostile.exif import exif_blocks

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "JPEG", dpi=(72, 72))
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_insert(buf.getvalue(), app_segment(0xE1, b"Exif\0\0" + exif_blocks()[block])))
    with Image.open(path) as im, pytest.raises((ValueError, AttributeError)):
        ImageOps.exif_transpose(im)
    assert load_image(path).size == (30, 40)  # turned a quarter, as orientation 6 / 8 asks


def test_jpeg_scans_walks_segments_as_libjpeg() -> None:
    import io

    from dtop_export.decode_budget import jpeg_scans
    from dtop_export.hostile import many_scans_jpeg

    def jpeg(mode: str, **kw: object) -> bytes:
        buf = io.BytesIO()
        Image.new(mode, (64, 48), 90 if mode == "L" else (90, 30, 200)).save(buf, "JPEG", **kw)
        return buf.getvalue()

    assert jpeg_scans(jpeg("RGB")) == (1, 3)  # one interleaved scan
    assert jpeg_scans(jpeg("RGB", progressive=True)) == (10, 3)  # libjpeg's progression: DC of all three first
    assert jpeg_scans(jpeg("L", progressive=True)) == (6, 1)
    assert jpeg_scans(many_scans_jpeg(250, 32)) == (250, 1)
    assert jpeg_scans(jpeg("RGB") + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00")[0] == 1  # nothing after EOI counts


def test_decode_budget_is_checked_from_the_header(tmp_path: Path) -> None:
    """A progressive JPEG needs libjpeg's whole-image coefficients (3 bytes a pixel at 4:2:0) on top of the 6 a
    pixel every image costs; a baseline one does not: 1000 x 1000 fits 8 MB baseline, not progressive."""
    from dtop_export.preprocess import DecodeBudget

    flat = Image.new("RGB", (1000, 1000), (90, 30, 200))
    for progressive, fits in ((False, True), (True, False)):
        path = tmp_path / f"p{int(progressive)}.jpg"
        flat.save(path, quality=50, progressive=progressive)
        if fits:
            assert load_image(path, budget=DecodeBudget(max_decode_mb=8)).size == (1000, 1000)
        else:
            with pytest.raises(DToPError, match=r"decoding needs 10 MB, over the budget of 8 MB .*--max-decode-mb"):
                load_image(path, budget=DecodeBudget(max_decode_mb=8))
    with pytest.raises(DToPError, match=r"over the limit of 999999 \(raise it with --max-pixels"):
        load_image(tmp_path / "p0.jpg", budget=DecodeBudget(max_pixels=999_999))
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (3 << 20))
    with pytest.raises(DToPError, match=r"the file has 3 MB, over the decode budget of 2 MB"):
        load_image(big, budget=DecodeBudget(max_decode_mb=2))
    with pytest.raises(DToPError, match="max_scans must be >= 1"):
        DecodeBudget(max_scans=0)
