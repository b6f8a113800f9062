"""Image loading and validation: bytes or a path in, a decoded RGB `PIL.Image` out, or an `ImageError`.

Limits are checked before the expensive part: the byte size before reading or decoding, the format by
content (magic bytes, never the file name), and the pixel count from the header before the pixel data
is decoded. Plugins are opened through Pillow's registry directly, so Pillow's own decompression-bomb
guard (a mutable module global, `Image.MAX_IMAGE_PIXELS`) is neither consulted nor changed: our own
`ImageLimits.max_pixels` is the only pixel limit.

Every colour mode ends as 8-bit RGB (see DESIGN.md section 2): alpha is composited over white exactly as
the reference does, 16-bit greyscale is scaled to 8 bits (the reference saturates it to white), and the
EXIF orientation is applied.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Formats Tessera accepts, by Pillow's format id. Everything else is refused by content.
SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation value -> the transposition that brings the stored pixels upright.
_ORIENTATION_FIX: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Exceptions Pillow's decoders raise on malformed or truncated data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
                  struct.error, zlib.error)


class ImageError(Exception):
    """A refused or undecodable image. `code` is a short machine-readable reason, one of CODES."""

    CODES = ("empty", "too_large", "unreadable", "unsupported_format", "zero_size", "too_many_pixels", "truncated",
             "decode_failed", "preprocess_failed")

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # both in args, so the error pickles across processes
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20  # largest encoded image accepted, in bytes (20 MiB)
    max_pixels: int = 50_000_000  # largest width x height accepted, read from the header (50 MP)
    formats: frozenset[str] = SUPPORTED_FORMATS  # accepted formats, Pillow format ids, sniffed by content

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive integer, got {self.max_pixels!r}")
        unknown = set(self.formats) - SUPPORTED_FORMATS
        if unknown or not self.formats:
            raise ValueError(
                f"formats must be a non-empty subset of {sorted(SUPPORTED_FORMATS)}, got {sorted(self.formats)}"
            )


def load_image(
    source: bytes | bytearray | memoryview | str | os.PathLike, limits: ImageLimits = ImageLimits()
) -> Image.Image:
    """Decode `source` (encoded bytes or a file path) into an upright 8-bit RGB image, or raise ImageError."""
    image = _checked_header(_read(source, limits), limits)
    try:
        image.load()  # the first frame of an animation; later frames are never decoded
        # Read after load: a PNG may store EXIF after its pixels, and Pillow's TIFF loader applies (and
        # clears) the orientation itself.
        orientation = _exif_orientation(image)
        rgb = to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:  # e.g. a TIFF tile far larger than the image
        raise ImageError("too_many_pixels", f"{image.format} image exceeds Pillow's hard pixel limit ({error})") from error
    except _DECODE_ERRORS as error:
        raise _decode_error(image.format, error) from error
    if orientation in _ORIENTATION_FIX:
        rgb = rgb.transpose(_ORIENTATION_FIX[orientation])
    return rgb


def image_size(source: bytes | bytearray | memoryview | str | os.PathLike,
               limits: ImageLimits = ImageLimits()) -> tuple[int, int]:
    """(width, height) in pixels from the header alone, after the same checks `load_image` makes before
    decoding (byte size, format by content, zero size, pixel count); raises ImageError as it would. No
    pixel data is decoded, so this is cheap whatever the image: what a server needs to count an image's
    tiles (`vision.pan_and_scan.num_tiles`) before accepting the work. The size is the stored one,
    before EXIF orientation, which swaps the sides at most and leaves the tile count unchanged."""
    return _checked_header(_read(source, limits), limits).size


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparency is composited over white (as the reference does);
    16-bit and 32-bit integer greyscale is scaled from [0, 65535] to [0, 255]; float greyscale is read
    as [0, 1]."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I"):  # I;16, I;16L, I;16B, I;16N, I: 16-bit greyscale in practice
        values = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey = (values * 255 + 32767) // 65535  # round(v * 255 / 65535): 0 -> 0, 65535 -> 255
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        grey = np.rint(np.clip(np.nan_to_num(np.asarray(image)), 0.0, 1.0) * 255.0)
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def read_image_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the file at `path`, read only when it is a regular file of at most `max_bytes` bytes.
    Raises ImageError: "unreadable" (cannot be read, or not a regular file: a device such as /dev/zero or
    a pipe can stream without end, or block), "too_large"."""
    path = Path(path)
    try:
        # non-blocking: opening a pipe nobody writes to returns at once; the kind is read from the open file
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a device, pipe or socket"
                raise ImageError("unreadable", f"{str(path)!r} is not a regular file ({kind})")
            if info.st_size > max_bytes:
                raise ImageError("too_large", _too_large_message(info.st_size, max_bytes))
            file, descriptor = os.fdopen(descriptor, "rb"), None  # the file object closes it from here
            with file:
                data = file.read(max_bytes + 1)  # a file that grew since: no more than the limit is read
        finally:
            if descriptor is not None:
                os.close(descriptor)
    except OSError as error:
        raise ImageError("unreadable", f"cannot read {str(path)!r}: {error.strerror or error}") from error
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{str(path)!r} grew past {max_bytes:,} bytes while it was read")
    return data


def _read(source, limits: ImageLimits) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        data = read_image_file(source, limits.max_bytes)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise TypeError(f"image source must be bytes or a path, got {type(source).__name__}")
    if not data:
        raise ImageError("empty", "the image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError("too_large", _too_large_message(len(data), limits.max_bytes))
    return data


def _too_large_message(size: int, max_bytes: int) -> str:
    return f"the image is {size:,} bytes; the limit is {max_bytes:,} bytes ({max_bytes / 2**20:g} MiB)"


def _checked_header(data: bytes, limits: ImageLimits) -> Image.Image:
    """The opened (not decoded) image, with its size checked against `limits`."""
    image = _open_header(data, limits)
    _check_size(image.format, *image.size, limits)
    return image


def _check_size(fmt: str, width: int, height: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise ImageError("zero_size", f"{fmt} image has a side of 0 pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"{fmt} image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {limits.max_pixels / 1e6:.1f} megapixels",
        )


def _open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open `data` with the first allowed plugin whose magic bytes match; reads the header only."""
    _check_png_size(data, limits)
    Image.init()  # registers every plugin once; later calls return at once
    prefix = data[:16]
    for fmt in sorted(limits.formats):
        factory, accept = Image.OPEN[fmt]
        verdict = accept(prefix) if accept else True
        if not verdict:
            continue
        if isinstance(verdict, str):  # the plugin recognises the file and names why it cannot read it
            raise ImageError("unsupported_format", f"{fmt} variant not supported: {verdict}")
        try:
            return factory(io.BytesIO(data), None)
        except Image.DecompressionBombError as error:  # e.g. a GIF frame far larger than its screen
            raise ImageError("too_many_pixels", f"{fmt} image exceeds Pillow's hard pixel limit ({error})") from error
        except _DECODE_ERRORS as error:
            # libwebp only says "could not create decoder object", Pillow's PNG reader names a struct call
            reason = _riff_truncated(data) or _png_truncated(data)
            if reason:
                raise ImageError("truncated", f"{fmt} data is truncated ({reason})") from error
            raise _decode_error(fmt, error) from error
    allowed = ", ".join(sorted(limits.formats))
    raise ImageError(
        "unsupported_format", f"not a supported image (allowed: {allowed}); content starts with {data[:12]!r}"
    )


def _check_png_size(data: bytes, limits: ImageLimits) -> None:
    # From the IHDR chunk, before Pillow reads further: it refuses a zero-sized PNG without saying why, and
    # a file cut off after its header would fail on the missing chunks before the size was checked.
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        _check_size("PNG", *struct.unpack(">II", data[16:24]), limits)


def _png_truncated(data: bytes) -> str:
    # A PNG ends with an IEND chunk (length 0, "IEND", CRC); a file without one was cut off.
    if data.startswith(_PNG_SIGNATURE) and b"IEND" not in data[8:]:
        return "no IEND chunk"
    return ""


def _riff_truncated(data: bytes) -> str:
    # A RIFF container (WebP) states its own length; a shorter file was cut off.
    if data.startswith(b"RIFF") and len(data) >= 8:
        declared = struct.unpack("<I", data[4:8])[0] + 8
        if len(data) < declared:
            return f"the header declares {declared:,} bytes, {len(data):,} present"
    return ""


def _decode_error(fmt: str | None, error: BaseException) -> ImageError:
    text = str(error) or type(error).__name__
    if "truncated" in text.lower() or isinstance(error, (EOFError, struct.error)):
        return ImageError("truncated", f"{fmt or 'image'} data is truncated or incomplete ({text})")
    return ImageError("decode_failed", f"cannot decode {fmt or 'image'} data: {text}")


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not reject an otherwise good image
        return 1
