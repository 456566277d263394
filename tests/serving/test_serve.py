"""``omnigen2 serve`` as a user runs it: a real server process on a loopback port with builtin:shapes, the official
``openai`` client, httpx and raw sockets for what a client library would never send.

One server starts for the module (API key, --max-queue 4, a small upload limit), while the library's own pipeline,
which the exactness tests compare against, loads here. The last test stops it with SIGTERM. Both sides run torch
with one CPU thread: the same thread count on both sides keeps float reductions in the same order (bit-exact
pixels), and one thread stays fast on a machine whose cores other jobs share.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'omnigen2[serve]'")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from .helpers import ServerProcess, raw_post, read_status, wait_for  # noqa: E402

MODEL = "builtin:shapes"
KEY = "test-key-0123456789"
UPLOAD_LIMIT = 300_000
T2I = "a red circle above a blue square"
EDIT = "make the red circle green"
THREADS = 1


@pytest.fixture(scope="module")
def process(tmp_path_factory):
    args = ["--model", MODEL, "--max-queue", "4", "--max-upload-bytes", str(UPLOAD_LIMIT)]
    proc = ServerProcess(args, tmp_path_factory.mktemp("serve") / "server.log", KEY, threads=THREADS)
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield proc
    torch.set_num_threads(threads)
    proc.stop()


@pytest.fixture(scope="module")
def pipe(process):
    """The library's pipeline (loaded while the server starts)."""
    from omnigen2 import OmniGen2Pipeline

    pipe = OmniGen2Pipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def chat(pipe):
    """The library's chat pipeline, built once: it injects the answering adapter into the MLLM."""
    from omnigen2 import OmniGen2ChatPipeline

    chat = OmniGen2ChatPipeline(pipe)
    yield chat
    chat.reset()


@pytest.fixture(scope="module")
def server(process, pipe):
    process.wait_ready()
    return process


@pytest.fixture(scope="module")
def client(server):
    # no retries: a 429 must reach the test, not be retried away
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=300) as c:
        yield c


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def scene(*objects: tuple[str, str, str]) -> Image.Image:
    """A rendered Shapes World scene of (color, shape, cell) objects: an input image without a model call."""
    from omnigen2.shapes.render import render
    from omnigen2.shapes.world import Object, Scene

    return render(Scene(tuple(Object(shape, color, cell=cell) for color, shape, cell in objects)))


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text
    return body["error"]


# -- the openai client, and exactness against the library ----------------------------------------------------


def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = httpx.get(server.url + "/health")  # open without a key
    assert r.status_code == 200 and r.json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        for path in ("/v1/models", "/metrics"):
            assert error_of(httpx.get(server.url + path, headers=headers), 401)["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": T2I})
    assert error_of(r, 401)["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_generation_is_exactly_the_library(client, pipe):
    r = client.images.generate(
        model=MODEL,
        prompt=T2I,
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": 2},
    )
    ref = pipe(prompt=T2I, height=64, width=64, num_inference_steps=2, num_images_per_prompt=2, generator=seeded(7))
    assert len(r.data) == 2 and r.seed == 7 and r.size == "64x64"
    for got, want in zip(r.data, ref.images):
        assert np.array_equal(png_pixels(got.b64_json), np.asarray(want))
    params = json.loads(Image.open(io.BytesIO(base64.b64decode(r.data[1].b64_json))).text["parameters"])
    assert params["seed"] == 7 and params["steps"] == 2 and params["prompt"] == T2I and params["index"] == 1


def test_edit_and_in_context_are_exactly_the_library(client, pipe, tmp_path):
    from omnigen2.images import load_image

    base = scene(("red", "circle", "top"), ("blue", "square", "bottom"))
    other = scene(("yellow", "square", "center"))
    paths = [tmp_path / "base.png", tmp_path / "other.png"]
    for im, p in zip((base, other), paths):
        p.write_bytes(png_bytes(im))
    extra = {"seed": 3, "num_inference_steps": 2, "guidance_scale_2": 1.8, "cfg_range": [0.0, 0.8]}
    with open(paths[0], "rb") as f:
        r = client.images.edit(model=MODEL, image=f, prompt=EDIT, extra_body=extra)
    ref = pipe(
        prompt=EDIT,
        input_images=[load_image(paths[0])],
        num_inference_steps=2,
        image_guidance_scale=1.8,
        cfg_range=(0.0, 0.8),
        generator=seeded(3),
    ).images[0]
    assert np.array_equal(png_pixels(r.data[0].b64_json), np.asarray(ref))

    prompt = "put the object from image 1 left of the object from image 2"
    with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:  # a list: sent as image[]
        r = client.images.edit(
            model=MODEL, image=[f0, f1], prompt=prompt, extra_body={"seed": 4, "num_inference_steps": 2}
        )
    ref = pipe(
        prompt=prompt, input_images=[load_image(p) for p in paths], num_inference_steps=2, generator=seeded(4)
    ).images[0]
    assert np.array_equal(png_pixels(r.data[0].b64_json), np.asarray(ref))


def test_chat_is_exactly_the_library(client, pipe, chat):
    # a drawing: the assistant message is a text part ("<|img|>") and an image part
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "draw a red circle"}],
        extra_body={"seed": 5, "num_inference_steps": 2, "force_image": True},
    )
    ref = chat("draw a red circle", generator=seeded(5), num_inference_steps=2, assistant_prefix="<|img|>")
    chat.reset()
    text, image = r.choices[0].message.content
    assert text == {"type": "text", "text": ref.text} and image["type"] == "image_url"
    url = image["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    assert np.array_equal(png_pixels(url.split(",", 1)[1]), np.asarray(ref.images[0]))
    assert r.choices[0].finish_reason == "stop" and r.seed == 5

    # a text answer about an image sent as a data URL, after an earlier turn (history from the messages)
    picture = scene(("red", "circle", "top"), ("blue", "square", "bottom"))
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()
    messages = [
        {"role": "user", "content": "what color is the sky?"},
        {"role": "assistant", "content": "yellow"},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": "describe the image."},
            ],
        },
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24)
    from omnigen2.pipelines.pipeline_chat import Turn

    chat.history = [Turn("what color is the sky?", answer="yellow")]
    ref = chat(
        "describe the image.",
        input_images=[Image.open(io.BytesIO(png_bytes(picture))).convert("RGB")],
        max_new_tokens=24,
    )
    chat.reset()
    assert r.choices[0].message.content == ref.text and ref.text
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 10


def test_chat_reflection_rounds_are_the_library(client, chat):
    extra = {"seed": 6, "num_inference_steps": 2, "force_image": True, "reflect": 1, "reflect_candidates": 1}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a red circle above a blue square"}], extra_body=extra
    )
    ref = chat(
        "a red circle above a blue square",
        generator=seeded(6),
        num_inference_steps=2,
        assistant_prefix="<|img|>",
        reflect=1,
        reflect_candidates=1,
    )
    chat.reset()
    got = r.reflection
    assert got["kept"] == ref.kept and len(got["rounds"]) == len(ref.rounds) >= 1
    for g, w in zip(got["rounds"], ref.rounds):
        assert (g["answer"], g["verdict"], g["fix"]) == (w.answer, w.verdict, w.fix)
        assert (g["image"] is None) == (w.image is None)
    image = r.choices[0].message.content[1]["image_url"]["url"].split(",", 1)[1]
    assert np.array_equal(png_pixels(image), np.asarray(ref.images[0]))


def test_chat_stream(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "what color is the sky?"}])
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices

    # a drawing streams its text, then one chunk whose content is the image part
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "draw a red circle"}],
            stream=True,
            extra_body={"seed": 5, "num_inference_steps": 2, "force_image": True},
        )
    )
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(x for x in contents if isinstance(x, str)) == "<|img|>"
    (parts,) = [x for x in contents if isinstance(x, list)]
    assert parts[0]["type"] == "image_url" and parts[0]["image_url"]["url"].startswith("data:image/png;base64,")


# -- malformed and hostile requests ---------------------------------------------------------------------------


def msg(role: str, content) -> dict:
    return {"role": role, "content": content}


def with_image(url: str) -> list[dict]:
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is this?"}]


def test_malformed_requests_get_openai_errors(server, http):
    gen, edit, chat = "/v1/images/generations", "/v1/images/edits", "/v1/chat/completions"
    png = png_bytes(Image.new("RGB", (32, 32), "red"))
    big = b"\0" * (UPLOAD_LIMIT + 1)
    junk_url = "data:image/png;base64," + base64.b64encode(b"junk").decode()

    def form(*files, **fields):  # a multipart edit request
        return dict(data={"prompt": "x", **fields}, files=list(files))

    def conversation(*messages, **extra):
        return dict(json={"model": MODEL, "messages": list(messages), **extra})

    hi = msg("user", "hi")
    cases = [  # (method, path, request, status, the error's code or param)
        ("POST", gen, dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "invalid_json"),
        ("POST", gen, dict(content=b""), 400, "invalid_json"),
        ("POST", gen, dict(json=[1, 2]), 400, "invalid_request"),
        ("POST", gen, dict(json={"prompt": 12}), 400, "prompt"),
        ("POST", gen, dict(json={"prompt": "x", "n": "2"}), 400, "n"),
        ("POST", gen, dict(json={"prompt": "x", "steps": 4}), 400, "unknown_parameter"),
        ("POST", gen, dict(json={"prompt": "x", "size": "4096x4096"}), 400, "size"),
        ("POST", gen, dict(json={"prompt": "x", "n": 5}), 400, "n"),
        ("POST", gen, dict(json={"prompt": "x", "model": "dall-e-3"}), 404, "model_not_found"),
        ("POST", gen, dict(json={"prompt": "x" * 9000}), 400, "prompt_too_long"),
        ("POST", gen, dict(content=big), 413, "request_too_large"),
        ("POST", edit, dict(json={"prompt": "x"}), 400, "invalid_content_type"),
        ("POST", edit, dict(data={"prompt": "x"}), 400, "invalid_content_type"),
        ("POST", edit, form(("x", ("a.png", png))), 400, "unknown_parameter"),
        ("POST", edit, form(("image", ("a.png", b"not an image"))), 422, "invalid_image"),
        ("POST", edit, form(("image", ("a.png", png[:60]))), 422, "invalid_image"),  # truncated
        ("POST", edit, form(("image", ("a.png", png)), ("mask", ("m.png", png))), 400, "unsupported"),
        ("POST", edit, form(*[("image[]", ("a.png", png))] * 6), 400, "too_many_images"),
        ("POST", edit, form(("image", ("a.png", png)), seed="abc"), 400, "seed"),
        ("POST", edit, form(("image", ("a.png", big))), 413, "request_too_large"),
        ("POST", chat, conversation(), 400, "messages"),
        ("POST", chat, conversation(msg("tool", "x")), 400, "messages[0].role"),
        ("POST", chat, conversation(msg("system", "be brief"), hi), 400, "unsupported_system_message"),
        ("POST", chat, conversation(hi, msg("assistant", "yo")), 400, "invalid_messages"),
        ("POST", chat, conversation(hi, hi), 400, "invalid_messages"),
        (
            "POST",
            chat,
            conversation(msg("user", with_image("http://127.0.0.1:9/a.png"))),
            400,
            "remote_images_disabled",
        ),
        ("POST", chat, conversation(msg("user", with_image("data:image/png;base64,@@@"))), 400, "invalid_value"),
        ("POST", chat, conversation(msg("user", with_image(junk_url))), 422, "invalid_image"),
        ("POST", chat, conversation(hi, n=2), 400, "n"),
        ("POST", chat, conversation(hi, max_tokens=5000), 400, "max_tokens"),
        ("POST", chat, conversation(hi, temperature="hot"), 400, "temperature"),
        ("POST", chat, conversation(msg("user", "x" * (UPLOAD_LIMIT + 1))), 413, "request_too_large"),
        ("GET", "/v1/nothing", {}, 404, "not_found"),
        ("GET", gen, {}, 405, None),
    ]
    for method, path, kwargs, status, what in cases:
        err = error_of(http.request(method, path, **kwargs), status)
        assert what in (err["code"], err["param"]), (path, kwargs.get("json"), err)

    # a chunked upload (no Content-Length) above the limit is cut off as it streams in
    def body():
        for _ in range(UPLOAD_LIMIT // 10_000 + 2):
            yield b"x" * 10_000

    assert error_of(http.post(gen, content=body()), 413)["code"] == "request_too_large"
    # the server is none the worse
    r = http.post(gen, json={"prompt": T2I, "num_inference_steps": 1})
    assert r.status_code == 200 and len(r.json()["data"]) == 1


# -- load, cancellation, drain --------------------------------------------------------------------------------


def generation_counts(server) -> dict[str, float]:
    m = server.metrics()
    prefix = 'omnigen2_requests_total{endpoint="/v1/images/generations",status="'
    counts = {k[len(prefix) : -2]: v for k, v in m.items() if k.startswith(prefix)}
    return {**counts, "images": m["omnigen2_images_generated_total"], "depth": m["omnigen2_queue_depth"]}


def test_bounded_load(server):
    """64 requests from 16 concurrent clients against --max-queue 4: only 200s and 429s, every one answered."""
    before = generation_counts(server)
    body = {"prompt": T2I, "num_inference_steps": 1, "guidance_scale": 1.0}
    statuses: list[int] = []
    start = threading.Barrier(16)

    def client_loop():
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
            start.wait()
            for _ in range(4):
                r = c.post("/v1/images/generations", json=body)
                if r.status_code == 429:
                    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "queue_full"
                statuses.append(r.status_code)

    threads = [threading.Thread(target=client_loop) for _ in range(16)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert len(statuses) == 64 and set(statuses) <= {200, 429}, statuses
    ok, rejected = statuses.count(200), statuses.count(429)
    assert ok >= 5 and rejected > 0, statuses  # the running one and 4 queued are always accepted
    after = generation_counts(server)
    assert after.get("200", 0) - before.get("200", 0) == ok
    assert after.get("429", 0) - before.get("429", 0) == rejected
    assert after["images"] - before["images"] == ok and after["depth"] == 0
    assert not any(k.startswith("5") for k in after), after
    r = httpx.post(server.url + "/v1/images/generations", json=body, headers=server.headers, timeout=120)
    assert r.status_code == 200
    print(f"load: {ok} x 200, {rejected} x 429 in {time.monotonic() - t0:.1f} s")


def test_disconnect_frees_the_queue_slot_and_stops_the_running_call(server):
    def counts():
        m = server.metrics()
        gone = m.get('omnigen2_requests_total{endpoint="/v1/images/generations",status="499"}', 0)
        return m['omnigen2_requests_cancelled_total{reason="disconnect"}'], gone

    before = counts()
    # a call far longer than the test (256x256, 100 steps), then a full queue of quick ones
    running = raw_post(server, "/v1/images/generations", {"prompt": T2I, "size": "256x256", "num_inference_steps": 100})
    wait_for(lambda: server.health()["running"] == 1, 60, "the long call to start")
    quick = {"prompt": T2I, "num_inference_steps": 1, "guidance_scale": 1.0}
    queued = [raw_post(server, "/v1/images/generations", quick) for _ in range(4)]
    wait_for(lambda: server.health()["queue_depth"] == 4, 30, "4 queued requests")
    r = httpx.post(server.url + "/v1/images/generations", json=quick, headers=server.headers, timeout=30)
    assert r.status_code == 429

    queued.pop(0).close()  # a queued client leaves: its slot frees at once
    wait_for(lambda: server.health()["queue_depth"] == 3, 10, "the slot to free")
    queued.append(raw_post(server, "/v1/images/generations", quick))
    wait_for(lambda: server.health()["queue_depth"] == 4, 10, "the freed slot to be taken")

    running.close()  # the running client leaves: its call stops at the next denoising step
    wait_for(lambda: server.health()["queue_depth"] < 4, 60, "the running call to stop")
    assert [read_status(s) for s in queued] == [200] * 4
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (2, 2)  # cancelled, and answered "499" to nobody


def test_sigterm_drains(server):
    """SIGTERM: the running request finishes (200), the queued ones get 503, the process exits 0. Last: it stops
    the module's server."""
    srv = server
    running = raw_post(srv, "/v1/images/generations", {"prompt": T2I, "size": "128x128", "num_inference_steps": 40})
    wait_for(lambda: srv.health()["running"] == 1, 60, "the call to start")
    queued = [raw_post(srv, "/v1/images/generations", {"prompt": T2I, "num_inference_steps": 1}) for _ in range(2)]
    wait_for(lambda: srv.health()["queue_depth"] == 2, 30, "2 queued requests")
    srv.proc.terminate()  # SIGTERM
    assert [read_status(s) for s in queued] == [503, 503]
    assert read_status(running) == 200
    assert srv.proc.wait(60) == 0, srv.output()
    assert "draining; 2 queued request(s) answered 503" in srv.output()
