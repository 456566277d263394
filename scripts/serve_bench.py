"""Benchmark ``omnigen2 serve``: the server's overhead over a direct pipeline call, then throughput and latency
under concurrent clients. Not a test: it prints a markdown table (docs/SERVING.md, "Measured").

    python scripts/serve_bench.py                                   # builtin:shapes, its sampling defaults
    python scripts/serve_bench.py --threads 1 --pairs 30 --requests 48

1. Overhead: ``--pairs`` times, a direct ``OmniGen2Pipeline.__call__`` in this process, then the same request
   (``POST /v1/images/generations``, same prompt, seed and settings) to a server in a subprocess, one after the
   other so that they never compete for the CPU. The server's overhead on a request is its latency as the client
   sees it minus the model call inside it (the ``x-omnigen2-model-ms`` header: the call's time on the worker
   thread); taking both from the same request keeps the model call's own jitter (tens of ms on a shared CPU) out
   of a figure of a few ms. It covers HTTP, validation, the queue hand-off to the model thread, PNG encoding and
   base64 of the result and the client's JSON decoding. The direct calls show that the worker's model call costs
   what a direct call costs.
2. Load: for 1, 4 and 16 clients, each sending requests back to back (``--requests`` in all per level; the
   server's queue holds all of them, so none is refused): throughput and p50 / p95 latency.

Both sides run torch with ``--threads`` CPU threads (OMP_NUM_THREADS for the server), so their model calls cost
the same.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def start_server(model: str, threads: int | None, port: int, queue: int) -> subprocess.Popen:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "omnigen2.cli", "serve", "--model", model, "--port", str(port)]
    cmd += ["--max-queue", str(queue), "--log-level", "warning"]
    log = tempfile.TemporaryFile()  # a file, not a pipe: a pipe nobody reads would block the server when full
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            proc.log.seek(0)
            raise SystemExit(f"the server exited: {proc.log.read().decode(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server did not answer /health within {timeout} s")


def load_level(url: str, body: dict, clients: int, total: int) -> tuple[float, list[float]]:
    """``clients`` threads share ``total`` requests, each sending its next one as soon as the last returns."""
    latencies: list[float] = []
    left = [total]
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            start.wait()
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                t0 = time.perf_counter()
                r = c.post("/v1/images/generations", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                with lock:
                    latencies.append(dt)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, latencies


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:shapes")
    ap.add_argument("--prompt", default="a red circle above a blue square")
    ap.add_argument("--steps", type=int, default=None, help="denoising steps (default: the checkpoint's)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads on both sides (default: torch's)")
    ap.add_argument("--pairs", type=int, default=20, help="direct / server pairs for the overhead")
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    ap.add_argument("--levels", default="1,4,16", help="concurrent clients, comma-separated")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    import torch

    from omnigen2 import OmniGen2Pipeline

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model, args.threads, port, queue=max(levels) + 4)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        pipe = OmniGen2Pipeline.from_pretrained(args.model)
        pipe.set_progress_bar_config(disable=True)
        wait_ready(server, url)
        body = {"prompt": args.prompt, "seed": 0}
        if args.steps:
            body["num_inference_steps"] = args.steps

        def direct() -> float:
            t0 = time.perf_counter()
            pipe(prompt=args.prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
            return time.perf_counter() - t0

        with httpx.Client(base_url=url, timeout=600) as c:

            def served() -> tuple[float, float, float]:
                """(latency, the server's processing time, its model call), in seconds."""
                t0 = time.perf_counter()
                r = c.post("/v1/images/generations", json=body)
                r.raise_for_status()
                r.json()
                latency = time.perf_counter() - t0
                return (
                    latency,
                    float(r.headers["openai-processing-ms"]) / 1e3,
                    float(r.headers["x-omnigen2-model-ms"]) / 1e3,
                )

            for _ in range(3):  # warm-up: first calls pay for lazy initialisation on both sides
                direct(), served()
            direct_s, served_s = [], []
            for _ in range(args.pairs):
                direct_s.append(direct())
                served_s.append(served())

        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731 - ms
        print(f"# omnigen2 serve benchmark, {args.model}, {date.today().isoformat()}")
        print(f"threads={args.threads or torch.get_num_threads()} steps={args.steps or 'checkpoint'}\n")
        print(f"| measure (median of {args.pairs}) | ms |")
        print("| --- | --- |")
        print(f"| direct pipeline call | {med(direct_s):.1f} |")
        print(f"| the model call inside a served request | {med([m for _, _, m in served_s]):.1f} |")
        print(f"| a served request, as the client sees it | {med([lat for lat, _, _ in served_s]):.1f} |")
        overhead = med([lat - m for lat, _, m in served_s])
        print(f"| **server overhead per request** (latency - model call) | {overhead:.1f} |")
        print(f"| of which inside the server (processing - model call) | {med([p - m for _, p, m in served_s]):.1f} |")
        print()
        print("| clients | requests | throughput (img/s) | p50 latency | p95 latency |")
        print("| --- | --- | --- | --- | --- |")
        for clients in levels:
            wall, lat = load_level(url, body, clients, args.requests)
            print(
                f"| {clients} | {len(lat)} | {len(lat) / wall:.2f} | {percentile(lat, 50) * 1e3:.0f} ms "
                f"| {percentile(lat, 95) * 1e3:.0f} ms |",
                flush=True,
            )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
