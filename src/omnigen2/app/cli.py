"""``omnigen2 app``: load one model, then serve the Gradio page (docs/APP.md) until Ctrl-C.

``add_parser`` only declares options: gradio and torch load when the command runs.
"""

from __future__ import annotations

import argparse
import os

from ..cli import PORT, POSITIVE_INT

DEFAULT_MODEL = "builtin:shapes"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "app",
        help="the web page: generation, editing, in-context generation and chat",
        description="Serve a Gradio page with a Create view (text-to-image, editing, in-context generation) and a "
        "Chat view (answers, drawings, reflection), and the named API endpoints generate and chat (docs/APP.md). "
        "Needs the app extra: pip install 'omnigen2[app]'.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="pipeline directory, hub id or builtin:NAME")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=PORT, default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also publish the page through a gradio.live link")
    p.add_argument(
        "--auth", default=None, metavar="USER:PASS", help="require this login (default: none; OMNIGEN2_APP_AUTH)"
    )
    p.add_argument(
        "--max-concurrency",
        type=POSITIVE_INT,
        default=1,
        help="requests run at once (pipeline calls still take turns: one model is loaded); the rest wait in line",
    )
    p.add_argument("--max-file-size", default="20mb", help="largest upload, e.g. 20mb")
    # Where the model runs: the same names and values as `omnigen2 serve` (generate's --device, --dtype and
    # --allow-pickle, and bench's --offload and --quantize).
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16")
    p.add_argument("--offload", choices=["none", "model", "sequential", "group"], default="none", help="CPU offload")
    p.add_argument("--quantize", choices=["none", "int8", "fp8"], default="none", help="transformer weights")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) weights")
    p.set_defaults(func=cmd_app)
    return p


def launch_kwargs(args) -> dict:
    """The arguments of ``Blocks.launch`` for the parsed options."""
    auth = args.auth if args.auth is not None else os.environ.get("OMNIGEN2_APP_AUTH")
    if auth is not None and ":" not in auth:
        raise ValueError("--auth must read USER:PASS")
    return dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=tuple(auth.split(":", 1)) if auth else None,
        max_file_size=args.max_file_size,
        show_error=True,  # an unexpected failure shows its message in the page too
        ssr_mode=False,  # no Node server: the page is the prebuilt one shipped in the wheel
    )


def build(args):
    """Load the model and build the page (``cmd_app`` launches it; tests launch it on a free port)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no phoning home
    try:
        import gradio  # noqa: F401
    except ImportError as e:
        raise ImportError(f"omnigen2 app needs the app extra ({e.name} is missing): pip install 'omnigen2[app]'") from e
    from ..serving.cli import load_pipeline
    from .session import Session
    from .ui import build_demo

    if args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    pipe = load_pipeline(args.model, args.device, args.dtype, args.offload, args.quantize, args.allow_pickle)
    demo = build_demo(Session(pipe, args.model, args.dtype))
    demo.queue(default_concurrency_limit=args.max_concurrency)
    return demo


def cmd_app(args) -> int:
    kwargs = launch_kwargs(args)
    demo = build(args)
    from .ui import offline_theme

    demo.launch(**kwargs, theme=offline_theme())
    return 0
