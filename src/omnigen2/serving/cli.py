"""``omnigen2 serve``: load one model, then serve it through OpenAI's API until SIGTERM or Ctrl-C.

``add_parser`` only declares options (nothing heavy is imported until the command runs). On SIGTERM the server
stops accepting connections, answers the queued requests 503, lets the running one finish, and exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

from ..cli import COUNT, PORT, POSITIVE_FLOAT, POSITIVE_INT
from .config import MIB, Limits

DEFAULT_MODEL = "builtin:shapes"
API_KEY_ENV = "OMNIGEN2_API_KEY"
# --max-FLAG -> Limits field
LIMIT_FLAGS = {
    "n": ("--max-n", "images per request (n)"),
    "pixels": ("--max-pixels", "width x height of a requested image"),
    "side": ("--max-side", "longest requested side"),
    "steps": ("--max-steps", "num_inference_steps"),
    "input_images": ("--max-input-images", "images per edit request or chat message (at most 5)"),
    "input_pixels": ("--max-input-pixels", "pixels of an uploaded image (checked before decoding)"),
    "upload_bytes": ("--max-upload-bytes", "bytes of a request body"),
    "prompt_chars": ("--max-prompt-chars", "characters of a prompt or of a chat message"),
    "messages": ("--max-messages", "messages of a chat request"),
    "new_tokens": ("--max-tokens", "max_tokens of a chat answer"),
    "reflect": ("--max-reflect", "reflection rounds of a chat request"),
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve",
        help="serve a model through OpenAI's API (images, edits, chat), with a queue, limits, auth and metrics",
        description="Serve one model over HTTP: POST /v1/images/generations, /v1/images/edits, /v1/chat/completions; "
        "GET /v1/models, /health, /metrics (docs/SERVING.md). Needs the serve extra: pip install 'omnigen2[serve]'.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="pipeline directory, hub id or builtin:NAME")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=PORT, default=8000, help="port to listen on")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (default: ${API_KEY_ENV}; "
        "the environment keeps the key out of the process list)",
    )
    p.add_argument("--max-queue", type=COUNT, default=16, help="requests waiting behind the running one, then 429")
    p.add_argument(
        "--request-timeout",
        type=POSITIVE_FLOAT,
        default=None,
        metavar="S",
        help="seconds from arrival to answer (default: none)",
    )
    p.add_argument(
        "--allow-remote-images", action="store_true", help="fetch http(s) image URLs of chat messages (off: data URLs)"
    )
    # Where the model runs. `generate` has --device, --dtype and --allow-pickle but no offload or quantization
    # (those are `bench` options), so the server declares all five here, with the same names and values.
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--offload", choices=["none", "model", "sequential", "group"], default="none", help="CPU offload")
    p.add_argument("--quantize", choices=["none", "int8", "fp8"], default="none", help="transformer weights")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")
    p.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"], help="log level"
    )
    limits = p.add_argument_group("limits (a request beyond one is refused with 400 or 413)")
    defaults = Limits()
    for name, (flag, what) in LIMIT_FLAGS.items():
        value = getattr(defaults, name)
        shown = f"{value // MIB} MiB" if name == "upload_bytes" else value
        limits.add_argument(
            flag, dest=f"limit_{name}", type=POSITIVE_INT, default=value, metavar="N", help=f"{what} (default {shown})"
        )
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ImportError(
            f"omnigen2 serve needs the serve extra ({e.name} is missing): pip install 'omnigen2[serve]'"
        ) from e

    from .app import create_app
    from .config import ServeConfig
    from .engine import Engine
    from .server import DrainingServer

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    log = logging.getLogger("omnigen2.serve")
    limits = Limits(**{name: getattr(args, f"limit_{name}") for name in LIMIT_FLAGS})
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    config = ServeConfig(
        model_name=args.served_model_name or args.model,
        api_key=api_key,
        max_queue=args.max_queue,
        request_timeout=args.request_timeout,
        allow_remote_images=args.allow_remote_images,
        limits=limits,
    )
    if not _is_loopback(args.host) and config.api_key is None:
        log.warning(
            "listening on %s without an API key: anyone who can reach this address can use the model "
            "(set %s or --api-key)",
            args.host,
            API_KEY_ENV,
        )

    pipe = load_pipeline(args.model, args.device, args.dtype, args.offload, args.quantize, args.allow_pickle)
    pipe.limits = limits.core(pipe.limits)
    app = create_app(Engine(pipe, config.model_name), config)
    server = DrainingServer(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on"),
        app.state.server.scheduler,
    )
    log.info("serving %s on http://%s:%d (queue %d)", config.model_name, args.host, args.port, config.max_queue)
    server.run()
    return 0 if server.started else 1


def load_pipeline(model: str, device, dtype: str, offload: str, quantize: str, allow_pickle: bool):
    """The model, loaded before the port opens, placed as ``generate`` places it, then quantized / offloaded."""
    import torch

    from ..acceleration.memory import enable_offload, quantize_transformer
    from ..loading import parse_device, parse_dtype
    from ..pipelines import OmniGen2Pipeline

    device = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load_on = device if offload == "none" else None  # offload hooks move components themselves
    pipe = OmniGen2Pipeline.from_pretrained(
        model, torch_dtype=parse_dtype(dtype), device=load_on, allow_pickle=allow_pickle
    )
    if quantize != "none":
        quantize_transformer(pipe.transformer, quantize)
    if offload != "none":
        enable_offload(pipe, offload, device)
    return pipe


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
