"""Uploads decode as the library's own image loading does: 16-bit grayscale scaled to 8 bits, not clipped."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest

pytest.importorskip("fastapi")

from omnigen2.serving.codec import decode_image  # noqa: E402
from omnigen2.serving.errors import APIError  # noqa: E402


def _png(img: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_sixteen_bit_grayscale_upload_is_scaled():
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    img = decode_image(_png(PIL.Image.fromarray(ramp, mode="I;16")), "image", max_pixels=10_000)
    got = np.asarray(img)
    assert img.mode == "RGB" and got.shape == (8, 8, 3)
    assert np.array_equal(got[..., 0], got[..., 2])
    assert np.abs(got[..., 0].astype(int) - np.round(ramp / 257.0)).max() <= 1  # a ramp 0..255, not all white


def test_float_image_out_of_range_is_refused_as_unprocessable():
    data = np.full((4, 4), 1000.0, dtype=np.float32)
    buf = io.BytesIO()
    PIL.Image.fromarray(data, mode="F").save(buf, format="TIFF")
    with pytest.raises(APIError) as err:
        decode_image(buf.getvalue(), "image", max_pixels=10_000)
    assert err.value.status == 422 and "image" in str(err.value)
