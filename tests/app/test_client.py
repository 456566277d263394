"""``gradio_client`` against a launched ``omnigen2 app``: the named endpoints ``generate`` and ``chat`` give the
library's images for the same seed and settings, the PNGs carry ``omnigen2 generate``'s metadata, and bad input
gives a readable error while the app keeps serving."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from omnigen2.cli import main as cli_main

from .conftest import THREADS

pytest.importorskip("gradio_client")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

PROMPT = "a red square at the top left"
EDIT = "move the red square to the bottom right"
# The bundled model's recommended settings (model_index.json's omnigen2_sampling), sent explicitly.
SETTINGS = dict(
    negative_prompt="",
    width=64,
    height=64,
    text_guidance=3.0,
    image_guidance=1.5,
    cfg_start=0.0,
    cfg_end=1.0,
    scheduler="euler",
    steps=16,
    num_images=1,
    seed=7,
    randomize_seed=False,
    max_pixels=1024 * 1024,
    max_input_side=1024,
    step_cache="none",
    teacache_threshold=0.05,
    keep_input_size=True,
)


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def pipe():
    from omnigen2.pipelines import OmniGen2Pipeline

    p = OmniGen2Pipeline.from_pretrained("builtin:shapes", device="cpu")
    p.set_progress_bar_config(disable=True)
    return p


def generate(client, prompt=PROMPT, images=(), **changes):
    gallery_in = [{"image": handle_file(str(p)), "caption": None} for p in images] or None
    return client.predict(prompt, gallery_in, **{**SETTINGS, **changes}, api_name="/generate")


def pixels(path) -> np.ndarray:
    with PIL.Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_equals_the_command(client, tmp_path):
    gallery, seed, status = generate(client)
    assert seed == 7 and "64x64" in status
    got = gallery[0]["image"]
    assert cli_main(
        ["generate", PROMPT, "--seed", "7", "--height", "64", "--width", "64", "--steps", "16", "--text-guidance",
         "3", "--image-guidance", "1.5", "--scheduler", "euler", "--device", "cpu", "-o", str(tmp_path / "cli.png")]
    ) == 0  # fmt: skip
    np.testing.assert_array_equal(pixels(got), pixels(tmp_path / "cli.png"))
    with PIL.Image.open(got) as a, PIL.Image.open(tmp_path / "cli.png") as b:
        assert a.size == (64, 64)
        assert json.loads(a.text["parameters"]) == json.loads(b.text["parameters"])  # the same metadata
        assert a.text["Software"] == b.text["Software"]


def test_edit_with_several_outputs_equals_the_library(client, pipe, tmp_path):
    source = tmp_path / "source.png"
    pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0)).images[0].save(source)
    gallery, _, _ = generate(client, EDIT, [source], num_images=2, seed=3)
    assert len(gallery) == 2
    want = pipe(
        prompt=EDIT,
        input_images=[PIL.Image.open(source).convert("RGB")],
        height=64,
        width=64,
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(3),
    ).images
    for item, im in zip(gallery, want, strict=True):
        np.testing.assert_array_equal(pixels(item["image"]), np.asarray(im))
        with PIL.Image.open(item["image"]) as png:
            assert json.loads(png.text["parameters"])["input_images"] == ["source.png"]


def test_randomized_seed_is_returned_and_reproduces(client):
    gallery, seed, _ = generate(client, randomize_seed=True)
    again, seed2, _ = generate(client, seed=seed)
    assert seed2 == seed
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), pixels(again[0]["image"]))


def _texts(conversation, role="assistant") -> list[str]:
    out = []
    for m in conversation:
        if m["role"] == role:
            out += [c["text"] for c in m["content"] if c.get("type") == "text"]
    return out


def _files(conversation, role="assistant") -> list[str]:
    return [c["file"] for m in conversation if m["role"] == role for c in m["content"] if c.get("type") == "file"]


def chat(client, text, files=(), **changes):
    settings = dict(
        reflect=0,
        width=64,
        height=64,
        steps=16,
        text_guidance=3.0,
        image_guidance=1.5,
        seed=0,
        randomize_seed=False,
        max_new_tokens=64,
        force_image=False,
    )
    message = {"text": text, "files": [handle_file(str(f)) for f in files]}
    return client.predict(message, **{**settings, **changes}, api_name="/chat")


def test_chat_answers_draws_and_reflects_over_turns(client, pipe, tmp_path):
    from omnigen2.pipelines import OmniGen2ChatPipeline

    source = tmp_path / "source.png"
    pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0)).images[0].save(source)
    conversation, message, seed = chat(client, "describe the image.", [source])
    assert message == {"text": "", "files": []}  # the box is emptied after a turn
    library = OmniGen2ChatPipeline(pipe)
    want = library("describe the image.", input_images=[PIL.Image.open(source).convert("RGB")], max_new_tokens=64)
    assert _texts(conversation) == [want.text]
    assert len(_files(conversation, "user")) == 1

    # The second turn continues the conversation (the app keeps the turns, with their images, per session).
    conversation, _, _ = chat(client, "a red square on a sky background", reflect=1)
    out = library(
        "a red square on a sky background",
        reflect=1,
        generator=torch.Generator().manual_seed(0),
        height=64,
        width=64,
        num_inference_steps=16,
        text_guidance_scale=3.0,
        image_guidance_scale=1.5,
        max_new_tokens=64,
    )
    assert out.images, "the bundled model draws this prompt"
    drawn = _files(conversation)
    assert len(drawn) >= 1
    np.testing.assert_array_equal(pixels(drawn[0]), np.asarray(out.rounds[0].judged if out.rounds else out.images[0]))
    texts = _texts(conversation)
    assert texts[0] == want.text  # the first turn is still there
    assert any(t.startswith(f"The model said: “{out.rounds[0].answer}”") for t in texts)
    titles = [m["metadata"]["title"] for m in conversation if m.get("metadata") and m["metadata"].get("title")]
    assert titles == [f"Reflection {k}: {r.verdict}" for k, r in enumerate(out.rounds, 1)]
    assert len(drawn) == 1 + sum(r.image is not None for r in out.rounds)  # the drawing and each repair


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(width=65), "width must be a multiple of 16"),
        (dict(steps=0), "less than minimum value 1|steps must lie in"),  # the slider checks too
        (dict(cfg_start=0.8, cfg_end=0.2), "CFG range"),
        (dict(scheduler="ddim"), "ddim is not in the list of choices"),
    ],
)
def test_out_of_range_settings_are_refused_readably(client, changes, message):
    with pytest.raises(AppError, match=message):
        generate(client, **changes)


def test_bad_uploads_are_refused_and_the_app_goes_on(app, client, tmp_path):
    good = tmp_path / "good.png"
    PIL.Image.new("RGB", (64, 64), "white").save(good)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not an image")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    huge = tmp_path / "huge.png"  # 9000 x 9000: a small file above the 8192 x 8192 pixel limit of load_image
    PIL.Image.new("1", (9000, 9000)).save(huge)
    with pytest.raises(AppError, match=r"input image 1 \(corrupt.png\) is not a readable image"):
        generate(client, EDIT, [corrupt])
    with pytest.raises(AppError, match=r"input image 2 \(truncated.png\) is corrupt or truncated"):
        generate(client, EDIT, [good, truncated])
    with pytest.raises(AppError, match=r"input image 1 \(huge.png\) is 9000x9000 = 81000000 pixels, above"):
        generate(client, EDIT, [huge])
    with pytest.raises(AppError, match="6 input images given; OmniGen2 takes at most 5"):
        generate(client, EDIT, [good] * 6)
    with pytest.raises(AppError, match="is not a readable image"):
        chat(client, "describe the image.", [corrupt])
    assert app.alive()
    gallery, _, _ = generate(client)  # still serving
    assert pixels(gallery[0]["image"]).shape == (64, 64, 3)


def test_cancel_stops_the_pipeline_at_the_next_step(pipe, tmp_path):
    """The Cancel button's path: the session's flag, checked in callback_on_step_end (in-process, no server)."""
    from omnigen2.app.session import Cancelled, CreateSettings, Session

    session = Session(pipe, "builtin:shapes", out_dir=str(tmp_path))
    settings = CreateSettings(PROMPT, width=64, height=64, steps=16, seed=0)
    seen = []

    def on_step(step):
        seen.append(step)
        if step == 3:
            session.cancel("tab")  # what the Cancel button does, from another thread in the app

    with pytest.raises(Cancelled):
        session.generate(settings, [], key="tab", on_step=on_step)
    assert seen == [1, 2, 3]
    assert len(session.generate(settings, [], key="tab")) == 1  # the next request runs: the flag is cleared


def test_the_documented_calls(client, tmp_path):
    """docs/APP.md's gradio_client example: every setting left out takes the page's default."""
    source = tmp_path / "out.png"
    PIL.Image.new("RGB", (64, 64), (235, 235, 235)).save(source)
    gallery, seed, status = client.predict(
        "move the red square to the bottom right",
        [{"image": handle_file(str(source)), "caption": None}],
        seed=0,
        api_name="/generate",
    )
    assert seed == 0 and PIL.Image.open(gallery[0]["image"]).size == (64, 64)
    client.predict(api_name="/chat_clear")
    conversation, _, _ = client.predict({"text": "describe the image.", "files": [handle_file(str(source))]},
                                        api_name="/chat")  # fmt: skip
    assert [m["role"] for m in conversation] == ["user", "user", "assistant"]
    client.predict(api_name="/chat_clear")
