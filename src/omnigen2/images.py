"""Loading user images safely: clear errors for missing, unreadable, corrupt and oversized files."""

from __future__ import annotations

import os
import warnings

import PIL.Image

# Refuse images above this many pixels before decoding them (a decompression bomb is a small file that
# decodes to gigabytes). 8192 x 8192 is far above anything the model uses: inputs are resized down to
# ``max_pixels`` (1024 x 1024 by default) anyway.
MAX_IMAGE_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """An input image could not be used; the message names the image and the problem."""


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
                return check_image(img.convert("RGB"), name=path, max_image_pixels=max_image_pixels)
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
    return img if img.mode == "RGB" else img.convert("RGB")
