"""Bad inputs through the public pipeline call, the CLI and ``omnigen2.images.load_image``: each one fails with an
error that names the problem (or, for recoverable ones, warns and still produces the requested output)."""

from __future__ import annotations

import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from omnigen2.cli import main as cli_main
from omnigen2.images import MAX_IMAGE_PIXELS, ImageError, load_image

SMALL = dict(height=64, width=64, num_inference_steps=2)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def pipe(tiny_pipe):
    return tiny_pipe


def latents(n: int = 1, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 4, h, w, generator=torch.Generator().manual_seed(seed))


def noise_image(size=(32, 32), mode="RGB", seed=0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (size[1], size[0], channels) if channels else (size[1], size[0])
    return PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def write_png(path: Path, image: PIL.Image.Image | None = None) -> Path:
    (image or noise_image()).save(path, format="PNG")
    return path


def patch_png_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the IHDR width/height of a PNG (with a valid CRC): a tiny file whose header claims a huge image."""
    assert data[12:16] == b"IHDR"
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return data[:16] + bytes(ihdr) + crc + data[33:]


def path_in(message: str, path: Path) -> bool:
    return str(path) in message


# -- too many reference images ---------------------------------------------------------------------------------


def test_more_than_five_reference_images_pipeline(pipe):
    images = [noise_image(seed=i) for i in range(6)]
    with pytest.raises(ValueError, match="6 input images; OmniGen2 takes at most 5"):
        pipe(prompt="Combine them.", input_images=images, **SMALL, output_type="pt")
    nested = [[noise_image()], images]
    with pytest.raises(ValueError, match="prompt 1 has 6 input images; OmniGen2 takes at most 5"):
        pipe(prompt=["One.", "Two."], input_images=nested, **SMALL, output_type="pt")


def test_five_reference_images_accepted(pipe):
    images = [noise_image((16, 16), seed=i) for i in range(5)]
    out = pipe(prompt="Combine them.", input_images=images, **SMALL, output_type="pt").images
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()


def test_more_than_five_reference_images_cli(tmp_path, capsys, official_tiny):
    args = ["generate", "Combine them.", "--model", str(official_tiny / "checkpoint"), "--device", "cpu"]
    args += ["--steps", "1", "--height", "64", "--width", "64", "-o", str(tmp_path / "out.png")]
    for i in range(6):
        args += ["-i", str(write_png(tmp_path / f"in{i}.png", noise_image(seed=i)))]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "omnigen2: error:" in err
    assert "6 input images given; OmniGen2 takes at most 5" in err
    assert not (tmp_path / "out.png").exists()


def test_cli_missing_image_names_the_path(tmp_path, capsys, official_tiny):
    missing = tmp_path / "nope.png"
    args = ["generate", "Edit it.", "-i", str(missing), "--model", str(official_tiny / "checkpoint")]
    assert cli_main(args + ["-o", str(tmp_path / "out.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err


# -- load_image: files that are not usable images --------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "missing.png"
    with pytest.raises(ImageError, match="does not exist") as e:
        load_image(path)
    assert path_in(str(e.value), path)


def test_directory(tmp_path):
    folder = tmp_path / "images.png"
    folder.mkdir()
    with pytest.raises(ImageError, match="is a directory") as e:
        load_image(folder)
    assert path_in(str(e.value), folder)


@pytest.mark.parametrize("content", [b"this is not an image\n", b""], ids=["text", "empty"])
def test_not_an_image(tmp_path, content):
    path = tmp_path / "notes.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match="is not a readable image") as e:
        load_image(path)
    assert path_in(str(e.value), path)


def test_truncated_png(tmp_path):
    good = write_png(tmp_path / "good.png", noise_image((64, 64)))
    data = good.read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(path)
    assert path_in(str(e.value), path)


def test_corrupt_png_data(tmp_path):
    data = bytearray(write_png(tmp_path / "good.png", noise_image((64, 64))).read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 40] ^= 0xFF  # a flipped byte inside the compressed pixels: the chunk CRC no longer matches
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="corrupt or truncated") as e:
        load_image(path)
    assert path_in(str(e.value), path)


@pytest.mark.parametrize("side", [9000, 100_000])
def test_decompression_bomb_header(tmp_path, side):
    """A ~12 kB file whose header claims side x side pixels is refused before any pixel is decoded (9000: by
    our own limit; 100000: above Pillow's hard limit as well)."""
    data = write_png(tmp_path / "small.png", noise_image((64, 64))).read_bytes()
    path = tmp_path / "bomb.png"
    path.write_bytes(patch_png_size(data, side, side))
    assert path.stat().st_size < 20_000
    with pytest.raises(ImageError, match="above the limit|decompression bomb") as e:
        load_image(path)
    assert path_in(str(e.value), path)


def test_large_but_cheap_image_refused(tmp_path):
    """A real, valid 1-bit image just above the pixel limit: a few kB on disk, tens of MB once decoded."""
    w, h = 8192 + 64, 8192
    assert w * h > MAX_IMAGE_PIXELS
    path = tmp_path / "big.png"
    PIL.Image.new("1", (w, h)).save(path, format="PNG")
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match=rf"is {w}x{h} = {w * h} pixels, above the limit of {MAX_IMAGE_PIXELS}") as e:
        load_image(path)
    assert path_in(str(e.value), path)


def test_pixel_limit_is_a_parameter(tmp_path):
    path = write_png(tmp_path / "img.png", noise_image((40, 30)))
    with pytest.raises(ImageError, match="40x30 = 1200 pixels, above the limit of 1000"):
        load_image(path, max_image_pixels=1000)
    assert load_image(path, max_image_pixels=1200).size == (40, 30)


# -- load_image: valid files -----------------------------------------------------------------------------------


def test_valid_png_is_rgb(tmp_path):
    image = noise_image((48, 32))
    loaded = load_image(write_png(tmp_path / "ok.png", image))
    assert isinstance(loaded, PIL.Image.Image)
    assert loaded.mode == "RGB" and loaded.size == (48, 32)
    assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_string_path_accepted(tmp_path):
    path = write_png(tmp_path / "ok.png")
    assert load_image(str(path)).mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "1"])
def test_other_modes_converted_to_rgb(tmp_path, mode):
    source = noise_image((24, 20), mode="RGBA")
    image = source if mode in ("RGBA", "LA") else source.convert("RGB")
    image = image.convert(mode)
    path = write_png(tmp_path / f"{mode}.png", image)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (24, 20)
    expected = np.asarray(PIL.Image.open(path).convert("RGB"))
    assert np.array_equal(np.asarray(loaded), expected)
    if mode == "RGBA":  # the colour channels are kept as they are
        assert np.array_equal(np.asarray(loaded), np.asarray(source)[..., :3])
    if mode == "L":  # grey replicated into the three channels
        grey = np.asarray(image)
        assert all(np.array_equal(np.asarray(loaded)[..., c], grey) for c in range(3))


def test_jpeg_is_rgb(tmp_path):
    path = tmp_path / "photo.jpg"
    noise_image((32, 32)).convert("CMYK").save(path, format="JPEG")
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (32, 32)


# -- sizes -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(70, 70), (68, 68), (64, 70), (75, 66)])
def test_size_not_a_multiple_warns_and_resizes(pipe, height, width):
    multiple = pipe.size_multiple
    assert height % multiple or width % multiple
    with pytest.warns(UserWarning, match="resizing") as record:
        out = pipe(prompt="A red circle.", height=height, width=width, num_inference_steps=2, output_type="pt")
    assert any(f"requested {width}x{height}" in str(w.message) for w in record)
    assert out.images.shape == (1, 3, height, width)
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_size_multiple_does_not_warn(pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = pipe(prompt="A red circle.", height=48, width=80, num_inference_steps=2, output_type="pt")
    assert out.images.shape == (1, 3, 48, 80)


def test_size_below_one_patch(pipe):
    with pytest.raises(ValueError, match="below one latent patch"):
        pipe(prompt="A red circle.", height=4, width=64, num_inference_steps=2, output_type="pt")


# -- prompt length ---------------------------------------------------------------------------------------------


def test_prompt_over_max_sequence_length_warns_and_truncates(pipe):
    long_a = "A red circle on a blue square, " * 20 + "at night."
    long_b = "A green triangle under a yellow sun, " * 20 + "in winter."
    with pytest.warns(UserWarning, match=r"truncated to 20 tokens \(max_sequence_length"):
        a = pipe(prompt=long_a, max_sequence_length=20, latents=latents(), **SMALL, output_type="pt").images
    assert a.shape == (1, 3, 64, 64) and torch.isfinite(a).all()
    # both prompts are cut to the same first 20 tokens (the chat template's start), so the images are the same
    with pytest.warns(UserWarning, match="truncated"):
        b = pipe(prompt=long_b, max_sequence_length=20, latents=latents(), **SMALL, output_type="pt").images
    assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        full_a = pipe(prompt=long_a, latents=latents(), **SMALL, output_type="pt").images
        full_b = pipe(prompt=long_b, latents=latents(), **SMALL, output_type="pt").images
    assert not torch.equal(full_a, full_b)


def test_warning_names_dropped_text(pipe):
    prompt = "A cat. " + "zebra " * 40
    with pytest.warns(UserWarning, match="dropped") as record:
        pipe(prompt=prompt, max_sequence_length=60, **SMALL, output_type="latent")
    assert any("zebra" in str(w.message) for w in record)


# -- argument errors -------------------------------------------------------------------------------------------


def test_wrong_latents_shape(pipe):
    with pytest.raises(ValueError, match=re.escape("expected (1, 4, 16, 16)")) as e:
        pipe(prompt="A red circle.", latents=latents(h=8, w=8), **SMALL, output_type="pt")
    assert "(1, 4, 8, 8)" in str(e.value)
    with pytest.raises(ValueError, match=re.escape("expected (2, 4, 16, 16)")):
        pipe(prompt="A red circle.", num_images_per_prompt=2, latents=latents(), **SMALL, output_type="pt")


@pytest.mark.parametrize("output_type", ["png", "PIL", "tensor", None])
def test_bad_output_type(pipe, output_type):
    with pytest.raises(ValueError, match="output_type must be one of pil, np, pt, latent"):
        pipe(prompt="A red circle.", **SMALL, output_type=output_type)


@pytest.mark.parametrize("cfg_range", [(0.5, 0.2), (-0.1, 1.0), (0.0, 1.5)])
def test_bad_cfg_range(pipe, cfg_range):
    with pytest.raises(ValueError, match=r"cfg_range must satisfy 0 <= start <= end <= 1"):
        pipe(prompt="A red circle.", cfg_range=cfg_range, **SMALL, output_type="pt")


@pytest.mark.parametrize("n", [0, -1])
def test_bad_num_images_per_prompt(pipe, n):
    with pytest.raises(ValueError, match=f"num_images_per_prompt must be >= 1, got {n}"):
        pipe(prompt="A red circle.", num_images_per_prompt=n, **SMALL, output_type="pt")


@pytest.mark.parametrize(
    "bad, type_name",
    [
        (np.zeros((32, 32, 3), dtype=np.uint8), "ndarray"),
        (torch.zeros(3, 32, 32), "Tensor"),
        ("photo.png", "str"),
    ],
)
def test_non_pil_input_image(pipe, bad, type_name):
    with pytest.raises((TypeError, ValueError), match=type_name):
        pipe(prompt="Edit it.", input_images=[bad], **SMALL, output_type="pt")


def test_non_list_input_images(pipe):
    with pytest.raises(TypeError, match="input_images must be a list of PIL images, got Tensor"):
        pipe(prompt="Edit it.", input_images=torch.zeros(1, 3, 32, 32), **SMALL, output_type="pt")


def test_input_images_count_mismatch(pipe):
    imgs = [[noise_image()], [noise_image()], [noise_image()]]
    with pytest.raises(ValueError, match="input_images has 3 entries for 2 prompts"):
        pipe(prompt=["One.", "Two."], input_images=imgs, **SMALL, output_type="pt")


def test_negative_prompt_wrong_length(pipe):
    with pytest.raises(ValueError, match="negative_prompt has 2 entries for 1 prompts"):
        pipe(prompt="A red circle.", negative_prompt=["blurry", "dark"], text_guidance_scale=4.0, **SMALL)
    with pytest.raises(ValueError, match="negative_prompt has 1 entries for 2 prompts"):
        pipe(prompt=["One.", "Two."], negative_prompt=["blurry"], text_guidance_scale=4.0, **SMALL)


def test_missing_prompt(pipe):
    with pytest.raises(ValueError, match="give a prompt"):
        pipe(**SMALL)


# -- output types ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outputs(pipe):
    lat = latents(2)
    return {
        t: pipe(prompt="A red circle.", num_images_per_prompt=2, latents=lat, **SMALL, output_type=t).images
        for t in ("pil", "np", "pt", "latent")
    }


def test_output_pil(outputs):
    images = outputs["pil"]
    assert isinstance(images, list) and len(images) == 2
    for im in images:
        assert isinstance(im, PIL.Image.Image)
        assert im.mode == "RGB" and im.size == (64, 64)


def test_output_np(outputs):
    arr = outputs["np"]
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (2, 64, 64, 3)
    assert np.issubdtype(arr.dtype, np.floating)
    assert arr.min() >= 0.0 and arr.max() <= 1.0
    assert arr.std() > 0  # an image, not a constant fill


def test_output_pt(outputs):
    t = outputs["pt"]
    assert isinstance(t, torch.Tensor)
    assert t.shape == (2, 3, 64, 64)
    assert t.dtype == torch.float32
    assert t.min() >= 0.0 and t.max() <= 1.0


def test_output_latent(outputs, pipe):
    lat = outputs["latent"]
    assert isinstance(lat, torch.Tensor)
    assert lat.shape == (2, 4, 16, 16)
    # the latents decode to the very images the other output types return
    decoded = (pipe.decode_latents(lat) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(decoded, outputs["pt"])


def test_output_types_agree(outputs):
    pt, arr = outputs["pt"], outputs["np"]
    assert np.array_equal(arr, pt.permute(0, 2, 3, 1).numpy())
    for k, im in enumerate(outputs["pil"]):
        assert np.array_equal(np.asarray(im), (arr[k] * 255).round().astype(np.uint8))
    assert not torch.equal(pt[0], pt[1])  # two different noises: two different images


def test_return_dict_false(pipe):
    out = pipe(prompt="A red circle.", latents=latents(), **SMALL, output_type="pt", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert out[0].shape == (1, 3, 64, 64)
