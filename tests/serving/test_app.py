"""The app in-process with a stand-in engine (no model): timeouts, queue-full, drain and error objects, with
exact control over how long a "model call" takes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'omnigen2[serve]'")
httpx = pytest.importorskip("httpx")

import PIL.Image  # noqa: E402

from omnigen2.serving.app import create_app  # noqa: E402
from omnigen2.serving.config import Limits, ServeConfig  # noqa: E402
from omnigen2.serving.engine import ImageResult  # noqa: E402


class StandInEngine:
    """Answers image requests with a grey image after ``num_inference_steps`` 'steps' of ``step_s`` seconds,
    checking for cancellation at each step as the real engine's callback does."""

    def __init__(self, step_s: float = 0.01):
        self.step_s = step_s
        self.pipe = SimpleNamespace(sampling_defaults={}, reflection_adapter=None)
        self.steps_run = 0
        self.release = threading.Event()

    def generate(self, job, req, images):
        for _ in range(req.num_inference_steps or 1):
            job.check()
            if req.negative_prompt == "wait":  # hold the worker until the test releases it
                self.release.wait(10)
            time.sleep(self.step_s)
            self.steps_run += 1
        return ImageResult([PIL.Image.new("RGB", (8, 8), "grey")] * req.n, req.seed or 0, {})

    def live_text(self, req):
        return True

    def chat_turn(self, job, req, history, prompt, images, on_text=None):
        for k in range(req.num_inference_steps or 1):
            job.check()
            if on_text is not None:
                on_text("word " * (k + 1))
            time.sleep(self.step_s)
        raise AssertionError("the stand-in's chat always runs out of time in these tests")


def make(engine=None, **config):
    engine = engine or StandInEngine()
    app = create_app(engine, ServeConfig(model_name="stand-in", **config))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return app, engine, client


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_request_timeout_answers_504_and_stops_the_model_call():
    async def main():
        app, engine, client = make(StandInEngine(step_s=0.05), request_timeout=0.3)
        async with client:
            r = await client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 100})
            err = error_of(r, 504)
            assert err["code"] == "timeout"
            sched = app.state.server.scheduler
            t0 = time.monotonic()
            while sched.busy and time.monotonic() - t0 < 5:
                await asyncio.sleep(0.01)
            assert not sched.busy and engine.steps_run < 100  # stopped at a step, long before its end
            r = await client.post("/v1/images/generations", json={"prompt": "x", "num_inference_steps": 1})
            assert r.status_code == 200  # and the server goes on
        app.state.server.scheduler.stop(5)

    run(main())


def test_full_queue_429_with_retry_after_then_drain_503():
    async def main():
        app, engine, client = make(max_queue=1)
        sched = app.state.server.scheduler
        async with client:
            body = {"prompt": "x", "num_inference_steps": 1, "negative_prompt": "wait"}
            running = asyncio.ensure_future(client.post("/v1/images/generations", json=body))
            while not sched.busy:
                await asyncio.sleep(0.005)
            queued = asyncio.ensure_future(client.post("/v1/images/generations", json={"prompt": "y"}))
            while sched.depth < 1:
                await asyncio.sleep(0.005)
            r = await client.post("/v1/images/generations", json={"prompt": "z"})
            err = error_of(r, 429)
            assert err["type"] == "rate_limit_error" and int(r.headers["retry-after"]) >= 1
            sched.drain()  # what SIGTERM does
            assert error_of(await queued, 503)["code"] == "shutting_down"
            r = await client.post("/v1/images/generations", json={"prompt": "late"})
            assert error_of(r, 503)["code"] == "shutting_down"
            engine.release.set()
            assert (await running).status_code == 200  # the running request finishes
            r = await client.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "draining"
        sched.stop(5)

    run(main())


def test_limits_and_validation_errors():
    async def main():
        app, engine, client = make(limits=Limits(n=2, side=128, pixels=128 * 64, steps=10, prompt_chars=20))
        async with client:
            post = lambda body: client.post("/v1/images/generations", json=body)  # noqa: E731
            cases = [
                ({"prompt": "x", "n": 3}, "n"),
                ({"prompt": "x", "size": "256x64"}, "size"),
                ({"prompt": "x", "size": "128x128"}, "size"),
                ({"prompt": "x", "size": "big"}, "size"),
                ({"prompt": "x", "num_inference_steps": 11}, "num_inference_steps"),
                ({"prompt": "x" * 21}, "prompt"),
                ({"prompt": "x", "n": "2"}, "n"),  # strict JSON types
                ({"prompt": "x", "response_format": "url"}, "response_format"),
                ({"prompt": "x", "guidance_scale_2": 2.0, "image_guidance_scale": 3.0}, "image_guidance_scale"),
                ({"prompt": "x", "cfg_range": [0.8, 0.2]}, "cfg_range"),
                ({"prompt": "x", "cfg_range": [0.1]}, "cfg_range"),
                ({"prompt": "x", "seed": -1}, "seed"),
                ({}, "prompt"),
            ]
            for body, param in cases:
                err = error_of(await post(body), 400)
                assert err["param"] == param, (body, err)
            assert error_of(await post({"prompt": "x", "model": "other"}), 404)["code"] == "model_not_found"
            assert error_of(await client.get("/v1/images/generations"), 405)
            r = await post({"prompt": "x", "size": "128x64", "n": 2, "seed": 5})
            assert r.status_code == 200 and len(r.json()["data"]) == 2 and r.json()["seed"] == 5
        app.state.server.scheduler.stop(5)

    run(main())


def test_auth_is_constant_time_bearer_and_health_stays_open():
    async def main():
        app, engine, client = make(api_key="sesame")
        async with client:
            assert (await client.get("/health")).status_code == 200
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic sesame"}):
                err = error_of(await client.get("/v1/models", headers=headers), 401)
                assert err["code"] == "invalid_api_key"
            assert (await client.get("/v1/models", headers={"Authorization": "Bearer sesame"})).status_code == 200
            assert error_of(await client.get("/metrics"), 401)
        app.state.server.scheduler.stop(5)

    run(main())


def test_a_stream_that_runs_out_of_time_ends_with_an_error_event():
    async def main():
        app, engine, client = make(StandInEngine(step_s=0.05), request_timeout=0.5)
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "num_inference_steps": 100}
        async with client:
            r = await client.post("/v1/chat/completions", json=body)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            first, *deltas, error = (json.loads(e) for e in events[:-1])
            assert first["choices"][0]["delta"]["role"] == "assistant"
            text = "".join(d["choices"][0]["delta"]["content"] for d in deltas)
            assert text.startswith("word word ")  # streamed as decoded, before the time ran out
            assert error["error"]["code"] == "timeout"
        app.state.server.scheduler.stop(5)

    run(main())


def test_remote_image_urls_only_when_allowed():
    """Served from a loopback HTTP server in this process: nothing leaves the machine."""
    import http.server
    import io

    from omnigen2.serving.codec import decode_image_url
    from omnigen2.serving.errors import APIError

    buf = io.BytesIO()
    PIL.Image.new("RGB", (16, 8), "blue").save(buf, format="PNG")
    png = buf.getvalue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/blue.png"
    try:
        with pytest.raises(APIError) as refused:
            decode_image_url(url, "image", 10**6, 10**6, allow_remote=False, timeout=5, param="messages")
        assert refused.value.status == 400 and refused.value.code == "remote_images_disabled"
        image = decode_image_url(url, "image", 10**6, 10**6, allow_remote=True, timeout=5, param="messages")
        assert image.size == (16, 8) and image.getpixel((0, 0)) == (0, 0, 255)
        with pytest.raises(APIError) as big:
            decode_image_url(url, "image", 10**6, len(png) - 1, allow_remote=True, timeout=5, param="messages")
        assert big.value.status == 413
        with pytest.raises(APIError) as many:  # above the pixel limit, refused from the header
            decode_image_url(url, "image", 100, 10**6, allow_remote=True, timeout=5, param="messages")
        assert many.value.status == 422 and many.value.code == "image_too_large"
    finally:
        httpd.shutdown()


def test_loopback_hosts():
    from omnigen2.serving.cli import _is_loopback

    assert all(_is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(_is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.5", "example.org"))


def test_a_failing_model_call_is_a_500_without_a_traceback_and_the_server_goes_on(caplog):
    class Broken(StandInEngine):
        def generate(self, job, req, images):
            if req.prompt == "boom":
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().generate(job, req, images)

    async def main():
        app, engine, client = make(Broken())
        async with client:
            r = await client.post("/v1/images/generations", json={"prompt": "boom"})
            err = error_of(r, 500)
            assert err["type"] == "server_error" and "CUDA" not in r.text and "Traceback" not in r.text
            r = await client.post("/v1/images/generations", json={"prompt": "fine", "num_inference_steps": 1})
            assert r.status_code == 200
            r = await client.get("/metrics")
            assert 'omnigen2_requests_total{endpoint="/v1/images/generations",status="500"} 1.0' in r.text
        app.state.server.scheduler.stop(5)

    run(main())
    assert "illegal memory access" in caplog.text  # the details go to the server's log
