"""A real ``omnigen2 app`` in a subprocess on a free loopback port, shared by the tests of this folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.serving.helpers import free_port

pytest.importorskip("gradio", reason="the app extra is not installed: pip install 'omnigen2[app]'")

THREADS = 1  # torch's CPU threads on both sides: bit-exact comparisons need the same count


class AppProcess:
    """``python -m omnigen2.cli app ARGS`` on 127.0.0.1; its output goes to ``log``."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(THREADS)}
        env["GRADIO_ANALYTICS_ENABLED"] = "False"
        env.pop("OMNIGEN2_APP_AUTH", None)
        cmd = [sys.executable, "-m", "omnigen2.cli", "app", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll the page until it answers; fail with the app's log if it exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"app not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-5000:]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._out.close()


@pytest.fixture(scope="session")
def app(tmp_path_factory) -> AppProcess:
    """The app on builtin:shapes (CPU), started once for the folder."""
    proc = AppProcess(["--model", "builtin:shapes", "--device", "cpu"], tmp_path_factory.mktemp("app") / "app.log")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(app):
    from gradio_client import Client

    return Client(app.url, verbose=False)
