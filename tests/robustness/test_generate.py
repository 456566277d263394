"""The generation boundary under generated bad input: pipeline and chat arguments, prompts, input image modes and
the CLI's generate. Each case ends in success or the documented error (a ValueError or TypeError naming the
argument; exit code 2 and one line on the CLI), within a time limit."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from omnigen2.cli import main
from omnigen2.errors import ImageError, LimitError
from omnigen2.images import check_image, load_image
from omnigen2.limits import Limits

SMALL = dict(height=32, width=32, num_inference_steps=1, output_type="pt")
TIME_LIMIT_S = 20  # per case: a bad argument must be refused quickly, never after a long run

# Values a caller might pass by mistake, for any argument.
JUNK = st.sampled_from([0, -1, -7, 1.5, 2.0, float("nan"), float("inf"), -float("inf"), "3", "", True, False, [1]])


def valid_int(value, least: int, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and least <= value <= most


def valid_float(value, least: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= least


def valid_pair(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(valid_float(v, 0.0) for v in value)
        and 0.0 <= value[0] <= value[1] <= 1.0
    )


FRACTIONS = st.one_of(st.floats(-0.5, 1.5), st.just(float("nan")))
# argument -> (strategy of values, oracle: is the value valid for a small call)
LIMITS = Limits()
ARGUMENTS = {
    "num_inference_steps": (
        st.one_of(JUNK, st.integers(-3, 3), st.just(LIMITS.steps + 1)),
        lambda v: valid_int(v, 1, 3),
    ),
    "height": (st.one_of(JUNK, st.sampled_from([16, 32, 48, -32, 10**5])), lambda v: valid_int(v, 16, 48)),
    "width": (st.one_of(JUNK, st.sampled_from([16, 32, 48, -32, 10**5])), lambda v: valid_int(v, 16, 48)),
    "text_guidance_scale": (st.one_of(JUNK, st.floats(-2, 6)), lambda v: valid_float(v, 0.0)),
    "image_guidance_scale": (st.one_of(JUNK, st.floats(-2, 3)), lambda v: valid_float(v, 0.0)),
    "cfg_range": (
        st.one_of(JUNK, st.tuples(FRACTIONS, FRACTIONS)),
        valid_pair,
    ),
    "num_images_per_prompt": (
        st.one_of(JUNK, st.integers(-1, 2), st.just(LIMITS.images_per_prompt + 1)),
        lambda v: valid_int(v, 1, 2),
    ),
    "max_sequence_length": (
        st.one_of(JUNK, st.sampled_from([None, 8, 64, LIMITS.prompt_tokens + 1])),
        lambda v: v is None or valid_int(v, 1, 64),
    ),
}


@settings(max_examples=40)
@given(name=st.sampled_from(sorted(ARGUMENTS)), data=st.data())
def test_pipeline_arguments(tiny_pipe, name, data):
    """One argument drawn from valid and bad values, the others valid: a valid value generates an image of the
    requested size, a bad one is refused with a ValueError / TypeError naming the argument and its value."""
    strategy, valid = ARGUMENTS[name]
    value = data.draw(strategy, label=name)
    kwargs = {**SMALL, name: value}
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation and resize warnings of valid small calls
        if valid(value):
            out = tiny_pipe(prompt="a red circle", **kwargs).images
            n = kwargs.get("num_images_per_prompt", 1)
            assert out.shape == (n, 3, kwargs["height"], kwargs["width"]) and torch.isfinite(out).all()
        else:
            with pytest.raises((ValueError, TypeError)) as info:
                tiny_pipe(prompt="a red circle", **kwargs)
            message = str(info.value)
            named = name.split("_scale")[0] in message or (isinstance(info.value, LimitError) and "limit" in message)
            assert named, message
            assert "\n" not in message and len(message) < 400
    assert time.perf_counter() - start < TIME_LIMIT_S


@pytest.mark.parametrize("value", [0, 0.0])
def test_zero_is_refused_not_replaced_by_the_default(tiny_pipe, value):
    for name in ("num_inference_steps", "height", "width"):
        with pytest.raises((ValueError, TypeError), match=name):
            tiny_pipe(prompt="a red circle", **{**SMALL, name: value})


def test_nan_guidance_is_refused(tiny_pipe):
    with pytest.raises(ValueError, match=r"text_guidance_scale must be a finite number, got nan"):
        tiny_pipe(prompt="a red circle", text_guidance_scale=float("nan"), **SMALL)


def test_huge_size_refused_before_any_work(tiny_pipe, monkeypatch):
    """A typo in the height is a LimitError naming the bound and how to raise it, before the MLLM runs."""
    monkeypatch.setattr(tiny_pipe, "encode_text", lambda *a, **k: pytest.fail("encoded text for a refused call"))
    with pytest.raises(LimitError, match=r"height=100000 x width=1024 .* --limit-output-pixels"):
        tiny_pipe(prompt="a cat", height=100000, width=1024, num_inference_steps=1)


def test_aspect_ratio_beyond_the_position_table_refused_before_any_work(tiny_pipe, monkeypatch):
    """Within the pixel bound but with more patch rows than the transformer's positions (axes_lens[1]): refused
    naming the size, before the MLLM runs, not in the position embedding."""
    monkeypatch.setattr(tiny_pipe, "encode_text", lambda *a, **k: pytest.fail("encoded text for a refused call"))
    rows = tiny_pipe.transformer.config.axes_lens[1]
    with pytest.raises(ValueError, match=r"height=100000 x width=32, .* beyond the transformer's position table"):
        tiny_pipe(prompt="a cat", height=100000, width=32, num_inference_steps=1)
    tall = PIL.Image.new("RGB", (16, 24 * rows))  # its patch rows alone overflow the table once resized
    with pytest.raises(ValueError, match=r"input image 0 of prompt 0 \(16x\d+, resized to .* position table"):
        tiny_pipe(prompt="a cat", input_images=[tall], max_pixels=10**6, max_input_image_side_length=None, **SMALL)


def test_raised_limit_allows_more_steps(tiny_pipe):
    with pytest.raises(LimitError, match="num_inference_steps=3 is above the limit of 2"):
        tiny_pipe.limits = Limits(steps=2)
        tiny_pipe(prompt="a cat", **{**SMALL, "num_inference_steps": 3})
    tiny_pipe.limits = Limits(steps=3)
    try:
        assert tiny_pipe(prompt="a cat", **{**SMALL, "num_inference_steps": 3}).images.shape == (1, 3, 32, 32)
    finally:
        tiny_pipe.limits = Limits()


@pytest.mark.parametrize("max_sequence_length", [1024, None])
def test_200k_character_prompt_is_cut_with_a_short_warning(tiny_pipe, max_sequence_length):
    prompt = "a red circle above a blue square " * 6250  # 200,000 characters
    start = time.perf_counter()
    with pytest.warns(UserWarning, match="truncated") as record:
        out = tiny_pipe(prompt=prompt, max_sequence_length=max_sequence_length, **SMALL).images
    assert time.perf_counter() - start < 10
    assert torch.isfinite(out).all()
    for w in record:
        assert len(str(w.message)) < 400, str(w.message)  # counts and an excerpt, never the prompt


@settings(max_examples=10)
@given(prompt=st.text(min_size=0, max_size=300), n_prompts=st.integers(1, 2))
def test_random_prompts(tiny_pipe, prompt, n_prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tiny_pipe(prompt=[prompt] * n_prompts, max_sequence_length=32, **SMALL).images
    assert out.shape == (n_prompts, 3, 32, 32)


@pytest.mark.parametrize("prompt", [None, 3, ["ok", None], [], b"bytes"])
def test_bad_prompt_types(tiny_pipe, prompt):
    with pytest.raises((ValueError, TypeError), match="prompt"):
        tiny_pipe(prompt=prompt, **SMALL)


# -- chat ---------------------------------------------------------------------------------------------------


@pytest.fixture
def chat(tiny_pipe):
    from omnigen2 import OmniGen2ChatPipeline

    return OmniGen2ChatPipeline(tiny_pipe)


CHAT_BAD = [
    (dict(reflect=-1), "reflect must be >= 0, got -1"),
    (dict(reflect=1.0), "reflect must be an integer"),
    (dict(reflect=LIMITS.reflect + 1), "--limit-reflect"),
    (dict(max_new_tokens=10**7), "max_new_tokens=10000000 is above the limit"),
    (dict(max_new_tokens="8"), "max_new_tokens must be an integer"),
    (dict(reflect_candidates=0), "reflect_candidates must be >= 1"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=0.0), "top_p must be > 0"),
    (dict(num_inference_steps=0), "num_inference_steps must be >= 1, got 0"),
    (dict(text_guidance_scale=-1.0), "text_guidance_scale must be >= 0"),
    (dict(height=0), "height must be >= 1, got 0"),
]


@pytest.mark.parametrize(("kwargs", "message"), CHAT_BAD)
def test_chat_arguments_refused_before_the_mllm_runs(chat, monkeypatch, kwargs, message):
    monkeypatch.setattr(chat, "run_mllm", lambda *a, **k: pytest.fail("the MLLM ran for a refused call"))
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(".", r"\.")):
        chat("draw a red circle", **kwargs)


def test_chat_200k_prompt_refused_before_tokenizing(chat, monkeypatch):
    monkeypatch.setattr(chat, "build_inputs", lambda *a, **k: pytest.fail("tokenized a refused prompt"))
    with pytest.raises(LimitError, match=r"the prompt of 200000 characters .* --limit-prompt-chars") as info:
        chat("x" * 200_000)
    assert len(str(info.value)) < 300


def test_chat_conversation_tokens_bounded(chat, monkeypatch):
    chat.pipe.limits = Limits(prompt_tokens=16)
    monkeypatch.setattr(chat, "run_mllm", lambda *a, **k: pytest.fail("the MLLM ran for a refused call"))
    try:
        with pytest.raises(LimitError, match=r"the conversation's \d+ text tokens is above the limit of 16"):
            chat("draw a red circle")
    finally:
        chat.pipe.limits = Limits()


# -- input images ---------------------------------------------------------------------------------------------

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "LA", "PA", "RGBX", "RGBa",
         "I", "F", "I;16", "I;16B", "I;16L", "La"]  # fmt: skip


def random_image(mode: str, w: int, h: int, rng: np.random.Generator) -> PIL.Image.Image:
    if mode in ("I;16", "I;16B", "I;16L"):
        order = ">u2" if mode == "I;16B" else "<u2"
        return PIL.Image.frombytes(mode, (w, h), rng.integers(0, 65536, (h, w)).astype(order).tobytes())
    if mode == "I":
        return PIL.Image.fromarray(rng.integers(0, 65536, (h, w)).astype(np.int32), mode="I")
    if mode == "F":
        return PIL.Image.fromarray(rng.uniform(0, 255, (h, w)).astype(np.float32), mode="F")
    bands = len(PIL.Image.new(mode, (1, 1)).getbands())
    data = rng.integers(0, 256, (h, w, bands), dtype=np.uint8).tobytes()
    return PIL.Image.frombytes(mode, (w, h), data)


@settings(max_examples=40)
@given(mode=st.sampled_from(MODES), w=st.integers(0, 24), h=st.integers(0, 24), seed=st.integers(0, 2**16))
def test_every_mode_becomes_rgb_or_a_clear_error(mode, w, h, seed):
    if w == 0 or h == 0:
        img = PIL.Image.new("L" if mode in ("La", "I;16B", "I;16L") else mode, (w, h))
        with pytest.raises(ImageError, match="is empty"):
            check_image(img)
        return
    img = random_image(mode, w, h, np.random.default_rng(seed))
    if mode == "La":  # premultiplied alpha: Pillow converts it to nothing else
        with pytest.raises(ImageError, match="mode 'La'"):
            check_image(img)
        return
    rgb = check_image(img)
    assert rgb.mode == "RGB" and rgb.size == (w, h)
    values = np.asarray(img).astype(np.float64)
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16 bits scaled to 8, not clipped to white
        np.testing.assert_array_equal(np.asarray(rgb)[..., 0], np.rint(values * 255 / 65535))
    elif mode == "F":
        np.testing.assert_array_equal(np.asarray(rgb)[..., 0], np.rint(values))
    else:  # 8-bit modes: Pillow's own conversion, as the original
        assert rgb.tobytes() == img.convert("RGB").tobytes()


@pytest.mark.parametrize(
    ("mode", "array"),
    [("F", np.full((2, 2), np.nan, np.float32)), ("F", np.full((2, 2), 300, np.float32)),
     ("I", np.full((2, 2), -5, np.int32)), ("I", np.full((2, 2), 70000, np.int32))],
)  # fmt: skip
def test_values_outside_the_mode_scale_are_refused(mode, array):
    with pytest.raises(ImageError, match=f"mode {mode}"):
        check_image(PIL.Image.fromarray(array, mode=mode))


def test_16_bit_png_is_scaled_not_white(tmp_path):
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0..65535 in 256 steps
    PIL.Image.fromarray(ramp).save(tmp_path / "gray16.png")
    img = load_image(tmp_path / "gray16.png")
    np.testing.assert_array_equal(np.asarray(img)[..., 0].ravel(), np.arange(256))


# -- the CLI's generate --------------------------------------------------------------------------------------

FLAG_VALUES = {
    "--steps": ["1", "2", "0", "-1", "2.5", "abc", "nan", "1e9", str(LIMITS.steps + 1)],
    "--height": ["32", "48", "0", "-32", "32.0", "100000"],
    "--width": ["32", "48", "0", "-32", "inf"],
    "--text-guidance": ["0", "1", "4.5", "-1", "nan", "inf", "x"],
    "--image-guidance": ["0", "2", "-0.5", "nan"],
    "--num-images": ["1", "2", "0", "-2", "1.5", str(LIMITS.images_per_prompt + 1)],
    "--seed": ["0", "7", "-1", str(2**64), "1.0"],
    "--max-sequence-length": ["16", "0", str(LIMITS.prompt_tokens + 1)],
}


@settings(max_examples=30)
@given(flags=st.dictionaries(st.sampled_from(sorted(FLAG_VALUES)), st.integers(0, 8), max_size=3))
@example(flags={"--height": 5})  # 100000 x 32: within the pixel bound, beyond the position table
def test_cli_generate_random_flags(official_tiny, tmp_path_factory, capsys, flags):
    out = tmp_path_factory.mktemp("gen") / "out.png"
    argv = ["generate", "a red circle", "--model", str(official_tiny / "checkpoint"), "--device", "cpu"]
    argv += ["-o", str(out), "--steps", "1", "--height", "32", "--width", "32"]
    for flag, k in flags.items():
        values = FLAG_VALUES[flag]
        argv += [flag, values[k % len(values)]]
    capsys.readouterr()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse refuses a flag's value
            rc = e.code
    assert time.perf_counter() - start < TIME_LIMIT_S
    err = capsys.readouterr().err
    if rc == 0:
        assert out.exists() or (out.parent / "out_grid.png").exists()
    else:
        assert rc == 2
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("omnigen2: error: "), err
        assert not list(out.parent.iterdir())  # nothing written


def test_cli_one_line_and_exit_2_end_to_end(official_tiny, tmp_path):
    """The installed entry point, in a subprocess: a refused value is one line on stderr and exit code 2."""
    argv = [sys.executable, "-m", "omnigen2.cli", "generate", "x", "--model", str(official_tiny / "checkpoint")]
    r = subprocess.run(
        [*argv, "--height", "100000", "--width", "100000", "-o", str(tmp_path / "o.png")],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("omnigen2: error: ") and "--limit-output-pixels" in lines[0]
    assert not (tmp_path / "o.png").exists()


def generate_raising(monkeypatch, error: BaseException) -> None:
    """Make ``omnigen2 generate`` raise ``error`` as its first act."""
    import omnigen2.cli as cli

    def raise_it(args):
        raise error

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["generate"].set_defaults(func=raise_it)


def test_cli_bug_keeps_its_traceback(monkeypatch, tmp_path):
    """Only documented errors become one line; anything else is a bug and propagates."""
    generate_raising(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "x", "-o", str(tmp_path / "o.png")])


def test_cli_multiline_error_collapsed(monkeypatch, tmp_path, capsys):
    generate_raising(monkeypatch, FileExistsError("first line\nsecond line"))
    assert main(["generate", "x", "-o", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err == "omnigen2: error: first line second line\n"
