"""Images in and out of requests: uploads and data URLs to RGB PIL images, PIL images to base64 PNGs.

Decoding follows ``omnigen2.images.load_image`` step for step (header-only size check, structural verify, full
decode, RGB), so an uploaded file gives the pixels that the library gets from the same file. These functions run
in worker threads, off the event loop.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import urllib.request
import warnings

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from ..errors import ImageError
from ..images import to_rgb
from .errors import APIError, bad_request, unprocessable

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)


def decode_image(data: bytes, name: str, max_pixels: int, param: str | None = None) -> PIL.Image.Image:
    """Bytes of an image file -> an RGB PIL image; 422 for anything that is not a sane image."""
    if not data:
        raise unprocessable(f"{name} is empty", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as probe:  # the header only
                w, h = probe.size
                if w < 1 or h < 1:
                    raise unprocessable(f"{name} is empty ({w}x{h})", param)
                if w * h > max_pixels:
                    raise unprocessable(
                        f"{name} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} (--max-input-pixels)",
                        param,
                        code="image_too_large",
                    )
                probe.verify()
            with PIL.Image.open(io.BytesIO(data)) as img:
                img.load()
                return to_rgb(img, name)  # 16-bit grayscale scaled, not clipped to white
    except APIError:
        raise
    except ImageError as e:
        raise unprocessable(str(e), param) from None
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise unprocessable(f"{name} was refused as a decompression bomb", param, code="image_too_large") from None
    except PIL.UnidentifiedImageError:
        raise unprocessable(f"{name} is not a readable image (unknown or corrupt format)", param) from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise unprocessable(f"{name} is corrupt or truncated: {e}", param) from None


def decode_image_url(
    url: str, name: str, max_pixels: int, max_bytes: int, allow_remote: bool, timeout: float, param: str
) -> PIL.Image.Image:
    """A chat ``image_url``: a ``data:`` URL, or (only with ``allow_remote``) an http(s) URL fetched here."""
    if url.startswith("data:"):
        m = _DATA_URL.match(url)
        if m is None:
            raise bad_request(f"{name}: a data URL must read data:image/...;base64,...", param)
        if m["mime"] and not m["mime"].startswith("image/"):
            raise bad_request(f"{name}: the data URL holds {m['mime']}, not an image", param)
        try:
            data = base64.b64decode(m["data"], validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{name}: the data URL's base64 does not decode", param) from None
        return decode_image(data, name, max_pixels, param)
    if url.startswith(("http://", "https://")):
        if not allow_remote:
            raise bad_request(
                f"{name}: remote image URLs are refused; send the image as a data: URL (or start the server with "
                "--allow-remote-images)",
                param,
                code="remote_images_disabled",
            )
        return decode_image(_fetch(url, name, max_bytes, timeout, param), name, max_pixels, param)
    raise bad_request(f"{name}: image_url must be a data: URL (or http(s) with --allow-remote-images)", param)


def _fetch(url: str, name: str, max_bytes: int, timeout: float, param: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "omnigen2-serve"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) checked above
            data = response.read(max_bytes + 1)
    except (OSError, ValueError) as e:
        raise unprocessable(f"{name}: could not fetch {url!r}: {e}", param, code="image_fetch_failed") from None
    if len(data) > max_bytes:
        raise APIError(413, f"{name}: the image at {url!r} is above {max_bytes} bytes", code="request_too_large")
    return data


def encode_png(image: PIL.Image.Image, params: dict) -> str:
    """A PIL image -> base64 PNG (lossless), with the request's settings in a ``parameters`` text chunk as
    ``omnigen2 generate`` writes them."""
    from .. import __version__

    info = PngInfo()
    info.add_text("parameters", json.dumps(params, sort_keys=True))
    info.add_text("Software", f"omnigen2 {__version__}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def data_url(b64_png: str) -> str:
    return "data:image/png;base64," + b64_png
