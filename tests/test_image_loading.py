"""load_image: formats by content, limits before decoding, typed errors, EXIF, every mode to RGB.

Mode conversions are checked against the reference processor's RGB conversion (the public
`Gemma3ImageProcessorPil` call with resizing, rescaling and normalising off), except 16-bit greyscale,
where the reference saturates to white and we check the scaled greys instead."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from vision.image import ImageError, ImageLimits, load_image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pattern(width: int = 64, height: int = 40, mode: str = "RGB") -> Image.Image:
    """An asymmetric picture: gradients plus a bright block near the top-left corner."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], -1)
    rgb[: height // 4, : width // 4] = [250, 10, 10]
    return Image.fromarray(rgb.astype(np.uint8), "RGB").convert(mode)


def reference_rgb(data: bytes) -> np.ndarray:
    """The reference processor's uint8 RGB pixels (H, W, 3) of the decoded file."""
    from transformers import Gemma3ImageProcessorPil

    processor = Gemma3ImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    image = Image.open(io.BytesIO(data))
    out = processor(images=[image], return_tensors="np", input_data_format="channels_last")
    return out["pixel_values"][0].transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height RGB pixels: a decompression bomb if believed."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + png_chunk(b"IEND", b""))


def error_of(source, limits: ImageLimits = ImageLimits()) -> ImageError:
    with pytest.raises(ImageError) as caught:
        load_image(source, limits)
    assert caught.value.message and str(caught.value) == caught.value.message
    return caught.value


@pytest.mark.parametrize("fmt, lossless", [
    ("PNG", True), ("BMP", True), ("TIFF", True), ("WEBP", False), ("JPEG", False), ("GIF", False),
])
def test_supported_formats_decode_to_rgb(fmt, lossless):
    image = pattern()
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(image, fmt, **params)
    loaded = load_image(data)
    assert loaded.mode == "RGB" and loaded.size == image.size
    if lossless or fmt == "WEBP":
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
    np.testing.assert_array_equal(np.asarray(loaded), reference_rgb(data))


def test_path_input_and_format_by_content_not_name(tmp_path):
    image = pattern()
    misnamed = tmp_path / "photo.jpg"  # really a PNG
    misnamed.write_bytes(encode(image, "PNG"))
    for source in (misnamed, str(misnamed)):
        np.testing.assert_array_equal(np.asarray(load_image(source)), np.asarray(image))
    fake = tmp_path / "fake.png"
    fake.write_text("just text, not a picture\n")
    assert error_of(fake).code == "unsupported_format"
    assert error_of(tmp_path / "missing.png").code == "unreadable"


@pytest.mark.parametrize("name, data, code", [
    ("empty", b"", "empty"),
    ("random bytes", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "unsupported_format"),
    ("text", b"hello, this is plain text\n" * 20, "unsupported_format"),
    ("svg", b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b'<rect width="10" height="10" fill="red"/></svg>', "unsupported_format"),
    ("html", b"<!doctype html><html><body><img src=x></body></html>", "unsupported_format"),
    ("zero-width PNG", png_claiming(0, 10), "zero_size"),
    ("zero-height PNG", png_claiming(10, 0), "zero_size"),
])
def test_bad_inputs_give_typed_errors(name, data, code):
    assert error_of(data).code == code


def test_image_error_pickles():
    import pickle

    error = pickle.loads(pickle.dumps(error_of(b"")))
    assert (error.code, str(error)) == ("empty", "the image is empty (0 bytes)")


def test_formats_pillow_knows_but_we_refuse():
    for fmt in ("PPM", "ICO", "TGA"):
        assert error_of(encode(pattern(32, 32), fmt)).code == "unsupported_format"
    png = encode(pattern(), "PNG")
    assert error_of(png, ImageLimits(formats=frozenset({"JPEG"}))).code == "unsupported_format"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_files(fmt):
    data = encode(pattern(256, 192), fmt)
    for keep in (len(data) // 2, 30):
        error = error_of(data[:keep])
        assert error.code in {"truncated", "decode_failed", "unsupported_format"}
    assert error_of(data[: len(data) // 2]).code == "truncated"


def test_a_png_cut_off_after_its_header():
    """Only the signature and IHDR: the size is checked from IHDR first, and a size within the limits is
    named truncated (Pillow's own error names a struct call)."""
    header_only = png_claiming(100_000, 100_000)[:33]  # signature (8) + IHDR chunk (25)
    assert error_of(header_only).code == "too_many_pixels"
    for width, height in ((4_000, 3_000), (64, 48)):
        error = error_of(png_claiming(width, height)[:33])
        assert (error.code, error.message) == ("truncated", "PNG data is truncated (no IEND chunk)")


@pytest.mark.parametrize("width, height", [(100_000, 100_000), (8_000, 7_000)])
def test_decompression_bomb_refused_from_header(width, height, monkeypatch):
    pixels_max_before = Image.MAX_IMAGE_PIXELS

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the pixels were decoded: the header alone must refuse this image")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    error = error_of(png_claiming(width, height))
    assert error.code == "too_many_pixels"
    assert f"{width}x{height}" in error.message and "50.0 megapixels" in error.message
    assert Image.MAX_IMAGE_PIXELS == pixels_max_before  # Pillow's global is left alone


@pytest.mark.parametrize("side", [20_000, 9_000])
def test_gif_frame_larger_than_its_screen_refused(side):
    data = bytearray(encode(Image.new("P", (10, 10)), "GIF"))
    descriptor = data.find(b",")  # image descriptor: ",", x, y, width, height (little-endian u16)
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", side, side)
    assert error_of(bytes(data)).code == "too_many_pixels"


def test_pixel_and_byte_limits_are_configurable():
    data = encode(pattern(100, 50), "PNG")
    assert error_of(data, ImageLimits(max_pixels=4_999)).code == "too_many_pixels"
    assert load_image(data, ImageLimits(max_pixels=5_000)).size == (100, 50)
    error = error_of(data, ImageLimits(max_bytes=len(data) - 1))
    assert error.code == "too_large" and f"{len(data) - 1:,}" in error.message
    assert load_image(data, ImageLimits(max_bytes=len(data))).size == (100, 50)
    with pytest.raises(ValueError):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError):
        ImageLimits(formats=frozenset({"SVG"}))


def test_byte_limit_checked_on_paths_before_reading(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encode(pattern(), "PNG") + b"\0" * 4096)
    assert error_of(path, ImageLimits(max_bytes=1024)).code == "too_large"


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_exif_orientation_applied(orientation, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(pattern(48, 32), fmt, exif=exif.tobytes())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")  # Pillow as the oracle
    loaded = load_image(data)
    assert loaded.size == expected.size == ((48, 32) if orientation <= 4 else (32, 48))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(expected))


def test_exif_orientation_6_turns_the_picture_upright():
    upright = pattern(48, 32)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone held sideways writes
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    loaded = load_image(encode(stored, "PNG", exif=exif.tobytes()))
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(upright))


def with_alpha(mode: str) -> Image.Image:
    base = pattern(40, 30)
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1)), "L")
    rgba = base.copy()
    rgba.putalpha(alpha)
    return rgba if mode == "RGBA" else rgba.convert(mode)


@pytest.mark.parametrize("name, make, fmt", [
    ("RGBA", lambda: with_alpha("RGBA"), "PNG"),
    ("LA", lambda: with_alpha("LA"), "PNG"),
    ("RGBA webp", lambda: with_alpha("RGBA"), "WEBP"),
    ("L", lambda: pattern(mode="L"), "PNG"),
    ("1", lambda: pattern(mode="1"), "PNG"),
    ("P", lambda: pattern(mode="P"), "PNG"),
    ("CMYK jpeg", lambda: pattern(mode="CMYK"), "JPEG"),
    ("CMYK tiff", lambda: pattern(mode="CMYK"), "TIFF"),
    ("L jpeg", lambda: pattern(mode="L"), "JPEG"),
])
def test_modes_convert_like_the_reference(name, make, fmt):
    data = encode(make(), fmt)
    loaded = load_image(data)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), reference_rgb(data))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_composited_over_white(fmt):
    image = pattern(mode="P")
    image.info["transparency"] = int(np.asarray(image)[0, 0])  # the top-left block's palette entry
    data = encode(image, fmt, transparency=image.info["transparency"])
    loaded = np.asarray(load_image(data))
    np.testing.assert_array_equal(loaded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(loaded, reference_rgb(data))


def test_alpha_composited_over_white_values():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((1, 1), (0, 0, 0, 255))
    rgba.putpixel((2, 2), (100, 0, 200, 128))
    loaded = np.asarray(load_image(encode(rgba, "PNG")))
    np.testing.assert_array_equal(loaded[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(loaded[1, 1], [0, 0, 0])
    expected = np.round((np.array([100, 0, 200]) * 128 + 255 * 127) / 255)
    np.testing.assert_allclose(loaded[2, 2], expected, atol=1)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_greyscale_scaled_not_saturated(fmt):
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    image = Image.fromarray(values)  # mode I;16
    data = encode(image, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    loaded = np.asarray(load_image(data))
    expected_grey = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(loaded, np.repeat(expected_grey[..., None], 3, axis=-1))
    # The defect we fix: the reference turns every non-zero 16-bit grey into (near) white.
    assert reference_rgb(data)[0, 2, 0] == 255 and loaded[0, 2, 0] == 128


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (20, 10), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    np.testing.assert_array_equal(np.asarray(load_image(data))[5, 5], [255, 0, 0])


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt TIFF tags it skips
def test_corrupted_files_never_crash():
    """Random byte flips, overwritten headers and cuts of valid files: an RGB image or an ImageError."""
    rng = np.random.default_rng(1)
    originals = [encode(pattern(96, 64), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")]
    for trial in range(300):
        data = bytearray(originals[trial % len(originals)])
        kind = trial % 3
        if kind == 0:
            for position in rng.integers(0, len(data), rng.integers(1, 10)):
                data[position] = rng.integers(0, 256)
        elif kind == 1:
            data = data[: rng.integers(0, len(data))]
        else:
            start = rng.integers(0, 64)
            data[start : start + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        try:
            assert load_image(bytes(data)).mode == "RGB"
        except ImageError as error:
            assert error.code in {"empty", "truncated", "decode_failed", "unsupported_format",
                                  "too_many_pixels", "zero_size"}
