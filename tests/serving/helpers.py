"""A real ``omnigen2 serve`` in a subprocess on a free loopback port, and raw-socket requests for tests that
must close a connection at a chosen moment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m omnigen2.cli serve ARGS`` on 127.0.0.1; its output goes to ``log``."""

    def __init__(self, args: list[str], log: Path, api_key: str | None = None, threads: int | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("OMNIGEN2_API_KEY", None)
        if threads is not None:  # torch's CPU threads; bit-exact comparisons need the same count on both sides
            env["OMP_NUM_THREADS"] = str(threads)
        if api_key:
            env["OMNIGEN2_API_KEY"] = api_key  # the environment, not the command line
        cmd = [sys.executable, "-m", "omnigen2.cli", "serve", "--port", str(self.port), *args]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Poll /health until it answers; fail with the server's log if it exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {'name{labels}': value}."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


def raw_post(server: ServerProcess, path: str, body: dict) -> socket.socket:
    """Send a JSON POST on a socket of its own and return the socket, unread: closing it is a disconnect."""
    data = json.dumps(body).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{server.port}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in server.headers.items()]
    head += [f"Content-Length: {len(data)}", "Connection: close", "", ""]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall("\r\n".join(head).encode() + data)
    return sock


def read_status(sock: socket.socket) -> int:
    """The status code of the response on ``sock`` (read to its end), then close it."""
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    sock.close()
    return int(b"".join(chunks).split(b" ", 2)[1])


def wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
