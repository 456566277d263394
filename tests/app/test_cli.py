"""``omnigen2 app``'s options: registered in ``omnigen2 --help`` without importing gradio or torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from omnigen2.app.cli import launch_kwargs
from omnigen2.cli import build_parser


def test_registered_and_lazy():
    code = "import sys, omnigen2.cli as c; c.build_parser(); print('gradio' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_options_become_launch_arguments(monkeypatch):
    monkeypatch.delenv("OMNIGEN2_APP_AUTH", raising=False)
    args = build_parser().parse_args(["app", "--port", "7999", "--auth", "me:pa:ss", "--max-concurrency", "2"])
    assert (args.model, args.host, args.max_concurrency) == ("builtin:shapes", "127.0.0.1", 2)
    kwargs = launch_kwargs(args)
    assert kwargs["server_port"] == 7999 and kwargs["auth"] == ("me", "pa:ss") and kwargs["share"] is False
    monkeypatch.setenv("OMNIGEN2_APP_AUTH", "env:secret")
    assert launch_kwargs(build_parser().parse_args(["app"]))["auth"] == ("env", "secret")
    with pytest.raises(ValueError, match="USER:PASS"):
        launch_kwargs(build_parser().parse_args(["app", "--auth", "nopassword"]))
