"""Loading user images safely: clear errors for missing, unreadable, corrupt and oversized files, and every
Pillow mode converted to 8-bit RGB without clipping (16-bit grayscale scaled, not turned white)."""

from __future__ import annotations

import os
import warnings

import PIL.Image

from .errors import ImageError

# Refuse images above this many pixels before decoding them (a decompression bomb is a small file that
# decodes to gigabytes). 8192 x 8192 is far above anything the model uses: inputs are resized down to
# ``max_pixels`` (1024 x 1024 by default) anyway.
MAX_IMAGE_PIXELS = 8192 * 8192


def load_image(path: str | os.PathLike, max_image_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Open an image file as RGB, checking existence, format, integrity and size before decoding."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageError(f"input image {path!r} does not exist")
    if os.path.isdir(path):
        raise ImageError(f"input image {path!r} is a directory, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as probe:  # reads the header only
                w, h = probe.size
                if w * h > max_image_pixels:
                    raise ImageError(
                        f"input image {path!r} is {w}x{h} = {w * h} pixels, above the limit of {max_image_pixels}; "
                        "downscale it first (or raise max_image_pixels, and PIL.Image.MAX_IMAGE_PIXELS above "
                        "Pillow's own limit, if you trust the file)"
                    )
                probe.verify()  # structural check without decoding the pixels
            with PIL.Image.open(path) as img:
                img.load()
                rgb = check_image(img, name=f"input image {path!r}", max_image_pixels=max_image_pixels)
                return rgb.copy() if rgb is img else rgb  # closing the file must not drop the pixels
    except ImageError:
        raise
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as e:
        raise ImageError(f"input image {path!r} refused as a decompression bomb: {e}") from e
    except PIL.UnidentifiedImageError as e:
        raise ImageError(f"input image {path!r} is not a readable image (unknown or corrupt format)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"input image {path!r} is corrupt or truncated: {e}") from e


def check_image(img, name: str = "input image", max_image_pixels: int = MAX_IMAGE_PIXELS) -> PIL.Image.Image:
    """Validate an in-memory image for use as a reference: a PIL image of sane size, returned as RGB."""
    if not isinstance(img, PIL.Image.Image):
        raise ImageError(f"{name} must be a PIL.Image.Image, got {type(img).__name__}")
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError(f"{name} is empty ({w}x{h})")
    if w * h > max_image_pixels:
        raise ImageError(f"{name} is {w}x{h} = {w * h} pixels, above the limit of {max_image_pixels}")
    return to_rgb(img, name)


# Integer modes holding 16-bit samples (Pillow opens 16-bit grayscale PNG and TIFF as I;16, older versions as I).
_WIDE_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: PIL.Image.Image, name: str = "input image") -> PIL.Image.Image:
    """``img`` as 8-bit RGB. Pillow's own ``convert("RGB")`` (what the original does) for the 8-bit modes, alpha
    dropped as there (RGBA, LA, PA, P with transparency keep their colour channels); 16-bit grayscale scaled by
    255 / 65535, which ``convert`` clips to 255 instead; float (F) on Pillow's 0-255 scale. Values those scales
    cannot hold (negative, above 65535 or 255, NaN) are refused rather than clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        return _scaled_gray(img, name)
    try:
        return img.convert("RGB")
    except ValueError as e:  # a mode Pillow cannot convert (e.g. premultiplied La)
        raise ImageError(f"{name} has mode {img.mode!r}, which cannot be converted to RGB: {e}") from e


def _scaled_gray(img: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """A 16-bit (or 32-bit integer holding 16-bit) or float grayscale image -> RGB, 8 bits per channel."""
    import numpy as np

    values = np.asarray(img).astype(np.float64)  # (H, W); handles the byte orders of I;16B / I;16L
    top = 255.0 if img.mode == "F" else 65535.0
    if not np.isfinite(values).all():
        raise ImageError(f"{name} (mode {img.mode}) holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > top:
        raise ImageError(
            f"{name} (mode {img.mode}) holds values in [{low:g}, {high:g}], outside the [0, {top:g}] this mode is "
            "read in; rescale it first"
        )
    gray = np.rint(values * (255.0 / top)).astype(np.uint8)
    return PIL.Image.fromarray(gray).convert("RGB")
