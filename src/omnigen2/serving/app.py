"""The HTTP side: a FastAPI app serving one loaded pipeline through OpenAI's API.

Request flow: the middleware (auth, body limit, metrics, the last word on errors) -> a route that reads and
validates the body (large bodies and every image decode in a worker thread) -> the scheduler's queue -> the
model on its worker thread (:mod:`.engine`) -> PNG encoding in a worker thread -> the response. The event loop
itself only moves bytes, so ``/health`` answers while a request runs. docs/SERVING.md has the response shapes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import PIL.Image
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..pipelines.pipeline_chat import IMG_TOKEN, Turn
from ..pipelines.pipeline_omnigen2 import SYSTEM_PROMPT
from .codec import data_url, decode_image, decode_image_url, encode_png
from .config import ServeConfig
from .engine import ChatResult, Engine, ImageResult
from .errors import (
    APIError,
    bad_request,
    internal,
    not_found,
    queue_full,
    shutting_down,
    timed_out,
    too_large,
    unauthorized,
    unprocessable,
)
from .metrics import Metrics
from .queue import Cancelled, Job, QueueFull, Scheduler, ShuttingDown
from .schemas import ChatRequest, ImageRequest, Sampling, parse_size, validate

logger = logging.getLogger("omnigen2.serve")

INLINE_JSON_BYTES = 64 * 1024  # image-free JSON bodies above this are parsed in a worker thread
LIST_FIELDS = ("cfg_range",)  # multipart fields that carry a list (sent as cfg_range[] by OpenAI's clients)


class ClientGone(APIError):
    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed_request")


class Server:
    """One server's state: the engine (the loaded model), the scheduler in front of it, metrics and config."""

    def __init__(self, engine: Engine, config: ServeConfig):
        self.engine, self.config, self.limits = engine, config, config.limits
        self.scheduler = Scheduler(config.max_queue)
        self.metrics = Metrics(self.scheduler)
        self.created = int(time.time())

    # -- scheduling -----------------------------------------------------------------------------------------

    def submit(self, fn: Callable[[Job], Any]) -> Job:
        try:
            return self.scheduler.submit(fn)
        except QueueFull as e:
            raise queue_full(e.retry_after) from None
        except ShuttingDown:
            raise shutting_down() from None

    def cancel(self, job: Job, reason: str) -> None:
        if job.state in ("queued", "running") and not job.cancelled:
            self.metrics.cancelled.labels(reason).inc()
        self.scheduler.cancel(job, reason)

    def remaining(self, request: Request) -> float | None:
        """Seconds left of ``--request-timeout``, counted from the request's arrival."""
        if self.config.request_timeout is None:
            return None
        return max(self.config.request_timeout - (time.monotonic() - request.state.arrived), 0.0)

    async def run(self, request: Request, fn: Callable[[Job], Any]) -> Any:
        """Queue ``fn`` and await its result, giving up (and withdrawing or stopping it) when the client goes away
        or the request's time runs out."""
        job = self.submit(fn)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait(
                {job.future, gone}, timeout=self.remaining(request), return_when=asyncio.FIRST_COMPLETED
            )
            if job.future in done:
                if job.finished is not None:  # (a job failed by the drain never ran)
                    request.state.model_s = job.finished - job.started
                return self.outcome(job)
            if gone in done:
                self.cancel(job, "disconnect")
                raise ClientGone()
            self.cancel(job, "timeout")
            raise timed_out(self.config.request_timeout)
        finally:
            gone.cancel()

    def outcome(self, job: Job) -> Any:
        """A finished job's result, its failure as an API error."""
        try:
            return job.future.result()
        except APIError:
            raise
        except ShuttingDown:
            raise shutting_down() from None
        except Cancelled:
            raise timed_out(self.config.request_timeout or 0) from None
        except ValueError as e:  # the library refused the request (sizes, images, settings): the message says why
            raise unprocessable(str(e), code="invalid_request") from None
        except Exception:
            logger.exception("model call failed")
            raise internal() from None

    # -- request checks -------------------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name:
            raise not_found(
                f"model {name!r} is not served here; this server serves {self.config.model_name!r}",
                code="model_not_found",
                param="model",
            )

    def check_text(self, text: str | None, param: str) -> None:
        if text is not None and len(text) > self.limits.prompt_chars:
            raise bad_request(
                f"{param} has {len(text)} characters, above the limit of {self.limits.prompt_chars} "
                "(--max-prompt-chars)",
                param,
                code="prompt_too_long",
            )

    def check_sampling(self, req: Sampling) -> None:
        lim = self.limits
        self.check_text(req.negative_prompt, "negative_prompt")
        if req.num_inference_steps is not None and req.num_inference_steps > lim.steps:
            raise bad_request(
                f"num_inference_steps above the limit of {lim.steps} (--max-steps)", "num_inference_steps"
            )
        height, width = parse_size(req.size)
        if height is not None:
            if max(height, width) > lim.side:
                raise bad_request(f"size {req.size} has a side above {lim.side} (--max-side)", "size")
            if height * width > lim.pixels:
                raise bad_request(f"size {req.size} is above {lim.pixels} pixels (--max-pixels)", "size")

    def check_image_request(self, req: ImageRequest) -> None:
        self.check_model(req.model)
        self.check_text(req.prompt, "prompt")
        if req.n > self.limits.n:
            raise bad_request(f"n above the limit of {self.limits.n} (--max-n)", "n")
        self.check_sampling(req)

    # -- responses ------------------------------------------------------------------------------------------

    def timing_headers(self, request: Request) -> dict[str, str]:
        """The model call's time on the worker thread, and the server's whole time on the request (OpenAI's
        header), in milliseconds: ``scripts/serve_bench.py`` takes the server's overhead from them."""
        total = time.monotonic() - request.state.arrived
        return {
            "openai-processing-ms": f"{total * 1e3:.1f}",
            "x-omnigen2-model-ms": f"{getattr(request.state, 'model_s', 0.0) * 1e3:.1f}",
        }

    async def images_response(self, request: Request, result: ImageResult) -> JSONResponse:
        several = len(result.images) > 1

        def encode():
            return [
                encode_png(im, {**result.params, "index": k} if several else result.params)
                for k, im in enumerate(result.images)
            ]

        pngs = await asyncio.to_thread(encode)
        self.metrics.images.inc(len(pngs))
        w, h = result.images[0].size
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [{"b64_json": p} for p in pngs],
                "output_format": "png",
                "size": f"{w}x{h}",
                "seed": result.seed,
            },
            headers=self.timing_headers(request),
        )


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The app serving ``engine``'s model. ``app.state.server`` is its :class:`Server`."""
    server = Server(engine, config)
    lim = config.limits

    async def lifespan(app):
        yield
        await asyncio.to_thread(server.scheduler.stop, 60.0)  # the running call finishes; the worker ends

    app = FastAPI(title="omnigen2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error_response(not_found(f"no route {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return _error_response(APIError(405, f"method {request.method} not allowed on {request.url.path}"))
        return _error_response(APIError(exc.status_code, str(exc.detail)))

    # -- liveness, models, metrics --------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        return {
            "status": "draining" if server.scheduler.closed else "ok",
            "model": config.model_name,
            "queue_depth": server.scheduler.depth,
            "running": server.scheduler.busy,
        }

    def model_card():
        return {"id": config.model_name, "object": "model", "created": server.created, "owned_by": "omnigen2"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        server.check_model(model_id)
        return model_card()

    @app.get("/metrics")
    async def metrics():
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    # -- images ---------------------------------------------------------------------------------------------

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        req = await _read_json(request, ImageRequest)
        server.check_image_request(req)
        result = await server.run(request, lambda job: engine.generate(job, req, []))
        return await server.images_response(request, result)

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise bad_request(
                "send multipart/form-data: the images as files under 'image' (or 'image[]'), the settings as fields",
                code="invalid_content_type",
            )
        try:
            form = await request.form(max_files=lim.input_images + 1, max_fields=64, max_part_size=lim.upload_bytes)
        except APIError:
            raise
        except Exception as e:  # starlette's MultiPartException / HTTPException for a malformed or oversized form
            detail = getattr(e, "detail", None) or getattr(e, "message", None) or str(e)
            raise bad_request(
                f"malformed multipart form: {detail} (at most {lim.input_images} images)", code="invalid_form"
            ) from None
        try:
            fields, uploads = _split_form(form)
            req = validate(ImageRequest, fields, strict=False)
            server.check_image_request(req)
            if not uploads:
                raise bad_request(
                    "give 1 to 5 images as files under 'image' (or 'image[]')", "image", code="missing_image"
                )
            if len(uploads) > lim.input_images:
                raise bad_request(
                    f"{len(uploads)} images given; at most {lim.input_images} (OmniGen2 takes 5)",
                    "image",
                    code="too_many_images",
                )
            blobs = [(u.filename or f"image {k}", await u.read()) for k, u in enumerate(uploads)]
        finally:
            await form.close()

        def decode():
            return [
                decode_image(data, f"image {k} ({name!r})", lim.input_pixels, "image")
                for k, (name, data) in enumerate(blobs)
            ]

        images = await asyncio.to_thread(decode)
        result = await server.run(request, lambda job: engine.generate(job, req, images))
        return await server.images_response(request, result)

    # -- chat -----------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.body()
        # in a thread always: a small body can hold an image that decodes to many pixels
        req, history, prompt, images = await asyncio.to_thread(_parse_chat, server, body)
        completion_id = "chatcmpl-" + uuid.uuid4().hex
        if req.stream:
            return await _stream_chat(server, request, req, history, prompt, images, completion_id)
        result: ChatResult = await server.run(request, lambda job: engine.chat_turn(job, req, history, prompt, images))
        content, reflection = await asyncio.to_thread(_chat_content, result)
        server.metrics.images.inc(len(result.output.images))
        server.metrics.tokens.inc(result.completion_tokens)
        answer = {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": config.model_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": result.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(result),
            "seed": result.seed,
        }
        if reflection is not None:
            answer["reflection"] = reflection
        return JSONResponse(answer, headers=server.timing_headers(request))

    app.add_middleware(ServingMiddleware, server=server)
    return app


# -- reading requests -------------------------------------------------------------------------------------------


async def _read_json(request: Request, model: type) -> Any:
    body = await request.body()
    if len(body) > INLINE_JSON_BYTES:
        return await asyncio.to_thread(lambda: validate(model, _load_json(body), strict=True))
    return validate(model, _load_json(body), strict=True)


def _load_json(body: bytes) -> Any:
    if not body:
        raise bad_request("the request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None


def _split_form(form) -> tuple[dict[str, Any], list[UploadFile]]:
    """A multipart form -> (its fields, its image files). ``key[]`` fields make lists (OpenAI's clients send
    lists so); a list field may also come as one JSON array (``cfg_range=[0, 0.6]``)."""
    fields: dict[str, Any] = {}
    uploads: list[UploadFile] = []
    for key, value in form.multi_items():
        name = key[:-2] if key.endswith("[]") else key
        if isinstance(value, UploadFile):
            if name == "image":
                uploads.append(value)
            elif name == "mask":
                raise bad_request("masks are not supported: OmniGen2 edits by instruction", "mask", code="unsupported")
            else:
                raise bad_request(
                    f"unexpected file under {key!r}; images go under 'image'", key, code="unknown_parameter"
                )
        elif name == "image":
            raise bad_request("'image' must be a file upload", "image")
        elif name in LIST_FIELDS:
            fields.setdefault(name, []).extend(_list_field(value, name))
        elif name in fields:
            raise bad_request(f"field {name!r} given twice", name)
        else:
            fields[name] = value
    return fields, uploads


def _list_field(value: str, name: str) -> list:
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            raise bad_request(f"{name} must be a JSON array or repeated {name}[] fields", name) from None
        return items if isinstance(items, list) else [items]
    return [v.strip() for v in text.split(",")] if "," in text else [text]


def _parse_chat(server: Server, body: bytes) -> tuple[ChatRequest, list[Turn], str, list[PIL.Image.Image]]:
    """A chat body -> (request, earlier turns, this turn's prompt, this turn's images). Runs in a worker thread:
    it decodes every image of the conversation."""
    lim, cfg = server.limits, server.config
    req: ChatRequest = validate(ChatRequest, _load_json(body), strict=True)
    server.check_model(req.model)
    server.check_sampling(req)
    if len(req.messages) > lim.messages:
        raise bad_request(
            f"{len(req.messages)} messages, above the limit of {lim.messages} (--max-messages)", "messages"
        )
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is not None and max_tokens > lim.new_tokens:
        raise bad_request(f"max_tokens above the limit of {lim.new_tokens} (--max-tokens)", "max_tokens")
    if req.reflect > lim.reflect:
        raise bad_request(f"reflect above the limit of {lim.reflect} (--max-reflect)", "reflect")
    most = max(lim.n, int(server.engine.pipe.sampling_defaults.get("reflect_candidates", 1)))
    if req.reflect_candidates is not None and req.reflect_candidates > most:
        raise bad_request(f"reflect_candidates above the limit of {most} (--max-n)", "reflect_candidates")

    turns: list[Turn] = []
    waiting = False  # the last turn has no answer yet
    for k, m in enumerate(req.messages):
        param = f"messages[{k}]"
        parts = [m.content] if isinstance(m.content, str) else (m.content or [])
        texts = [p if isinstance(p, str) else p.text for p in parts if isinstance(p, str) or p.type == "text"]
        urls = [p.image_url.url for p in parts if not isinstance(p, str) and p.type == "image_url"]
        text = "\n".join(texts)
        server.check_text(text, f"{param}.content")
        if len(urls) > lim.input_images:
            raise bad_request(
                f"{param} has {len(urls)} images; at most {lim.input_images}", param, code="too_many_images"
            )
        if m.role in ("system", "developer"):
            if k != 0 or urls or text.strip() != SYSTEM_PROMPT:
                raise bad_request(
                    f"{param}: this model's chat template has a fixed system prompt; leave system messages out",
                    param,
                    code="unsupported_system_message",
                )
            continue
        images = [
            decode_image_url(
                url,
                f"{param} image {j}",
                lim.input_pixels,
                lim.upload_bytes,
                cfg.allow_remote_images,
                cfg.remote_image_timeout,
                param,
            )
            for j, url in enumerate(urls)
        ]
        if m.role == "user":
            if waiting:
                raise bad_request(
                    f"{param}: user and assistant messages must alternate", param, code="invalid_messages"
                )
            turns.append(Turn(text, images))
        else:  # assistant: the answer to the turn before, <|img|> where it drew (as the library's history)
            if not waiting:
                raise bad_request(
                    f"{param}: an assistant message must answer a user message", param, code="invalid_messages"
                )
            if images and IMG_TOKEN not in text:
                text += IMG_TOKEN
            turns[-1].answer, turns[-1].generated = text, images
        waiting = m.role == "user"
    if not waiting:
        raise bad_request("the last message must be the user's", "messages", code="invalid_messages")
    last = turns.pop()
    return req, turns, last.prompt, last.images


# -- chat responses ---------------------------------------------------------------------------------------------


def _image_part(b64_png: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(b64_png)}}


def _chat_content(result: ChatResult) -> tuple[str | list, dict | None]:
    """The assistant message's content (a string for a text answer; for a drawing, a list of a text part and
    the image parts) and the reflection record (None without reflection). Encodes PNGs: runs in a thread."""
    out = result.output
    content: str | list = out.text
    if out.images:
        content = [
            {"type": "text", "text": out.text},
            *(_image_part(encode_png(im, result.params)) for im in out.images),
        ]
    return content, _reflection(result)


def _reflection(result: ChatResult) -> dict | None:
    out = result.output
    if not out.rounds:
        return None
    rounds = []
    for r in out.rounds:
        rounds.append(
            {
                "question": r.question,
                "answer": r.answer,
                "verdict": r.verdict,
                "problem": r.problem,
                "fix": r.fix,
                "image": data_url(encode_png(r.image, result.params)) if r.image is not None else None,
                "candidate_verdicts": list(r.candidate_verdicts),
                "candidate_scores": [s if s != float("-inf") else None for s in r.candidate_scores],
            }
        )
    return {"kept": out.kept, "rounds": rounds}


def _usage(result: ChatResult) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


async def _stream_chat(server: Server, request: Request, req, history, prompt, images, completion_id: str):
    """Server-sent events in OpenAI's chunk format. The job is queued before the response starts, so a full
    queue is still an ordinary 429."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    live = server.engine.live_text(req)

    def on_text(text: str) -> None:  # on the worker thread, for every decoded token
        loop.call_soon_threadsafe(updates.put_nowait, text)

    job = server.submit(lambda j: server.engine.chat_turn(j, req, history, prompt, images, on_text if live else None))
    job.future.add_done_callback(lambda _: updates.put_nowait(None))
    created, model = int(time.time()), server.config.model_name

    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict | None, finish: str | None = None, **extra) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        return f"data: {json.dumps({**head, 'choices': choices, **extra})}\n\n"

    async def events() -> AsyncIterator[str]:
        sent = ""
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    text = await asyncio.wait_for(updates.get(), server.remaining(request))
                except asyncio.TimeoutError:
                    server.cancel(job, "timeout")
                    raise timed_out(server.config.request_timeout) from None
                if text is None:
                    break
                text = text.rstrip("\ufffd")  # a character still split across tokens waits for the next one
                if len(text) > len(sent) and text.startswith(sent):
                    yield chunk({"content": text[len(sent) :]})
                    sent = text
            result: ChatResult = server.outcome(job)
            out = result.output
            if out.text.startswith(sent) and len(out.text) > len(sent):
                yield chunk({"content": out.text[len(sent) :]})
            if out.images:
                parts = await asyncio.to_thread(
                    lambda: [_image_part(encode_png(im, result.params)) for im in out.images]
                )
                yield chunk({"content": parts})
            reflection = await asyncio.to_thread(_reflection, result)
            extra = {"seed": result.seed}
            if reflection is not None:
                extra["reflection"] = reflection
            yield chunk({}, result.finish_reason, **extra)
            if req.stream_options is not None and req.stream_options.include_usage:
                yield chunk(None, usage=_usage(result))  # OpenAI's usage chunk: no choices
            server.metrics.images.inc(len(out.images))
            server.metrics.tokens.inc(result.completion_tokens)
        except APIError as e:  # the response has started: the error goes in the stream, as OpenAI sends it
            yield f"data: {e.json_bytes().decode()}\n\n"
        except Exception:
            logger.exception("chat stream failed")
            yield f"data: {internal().json_bytes().decode()}\n\n"
        finally:
            if not job.cancelled and not job.future.done():  # the client went away: the stream was cancelled
                server.cancel(job, "disconnect")
        yield "data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# -- middleware -------------------------------------------------------------------------------------------------


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _send_error(send, exc: APIError) -> None:
    headers = [(b"content-type", b"application/json")]
    headers += [(k.lower().encode(), v.encode()) for k, v in exc.headers.items()]
    body = exc.json_bytes()
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ServingMiddleware:
    """Pure ASGI, outermost: metrics for every request, auth (all but /health), the body limit, and an OpenAI
    error object for anything that escapes a route before its response started."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server
        key = server.config.api_key
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrived = time.monotonic()
        scope.setdefault("state", {})["arrived"] = arrived
        metrics = self.server.metrics
        endpoint = metrics.endpoint(scope["path"])
        status: int | None = None

        async def tracked_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        metrics.in_flight.inc()
        try:
            if self.key is not None and scope["path"] != "/health" and not self._authorized(scope):
                return await _send_error(tracked_send, unauthorized())
            limit = self.server.limits.upload_bytes
            length = _header(scope, b"content-length")
            if length is not None and (not length.isdigit() or int(length) > limit):
                exc = too_large(limit) if length.isdigit() else bad_request("invalid Content-Length header")
                return await _send_error(tracked_send, exc)
            await self.app(scope, _limited(receive, limit), tracked_send)
        except Exception as e:
            if status is None:
                if not isinstance(e, APIError):
                    logger.exception("unhandled error on %s", scope["path"])
                    e = internal()
                await _send_error(tracked_send, e)
            else:
                logger.exception("error after the response started on %s", scope["path"])
        finally:
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, str(status or 500)).inc()
            metrics.latency.labels(endpoint).observe(time.monotonic() - arrived)

    def _authorized(self, scope) -> bool:
        value = _header(scope, b"authorization") or ""
        scheme, _, token = value.partition(" ")
        # constant time in the key: compare_digest never stops at the first differing byte
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.key)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


def _limited(receive, limit: int):
    """``receive`` that refuses a body above ``limit`` bytes as it streams in (a chunked upload has no length)."""
    total = 0

    async def wrapped():
        nonlocal total
        message = await receive()
        if message["type"] == "http.request":
            total += len(message.get("body", b""))
            if total > limit:
                raise too_large(limit)
        return message

    return wrapped
