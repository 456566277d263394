"""uvicorn, with SIGTERM as a drain and a clean exit."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvicorn

from .queue import Scheduler

logger = logging.getLogger("omnigen2.serve")


class DrainingServer(uvicorn.Server):
    """On SIGTERM the scheduler drains (queued requests are answered 503, the running one finishes) while uvicorn
    closes the listening socket and waits for the open responses; then the process exits 0. A second SIGTERM,
    or Ctrl-C twice, stops waiting."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None):
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig, frame):
        if self._loop is not None:  # drain on the loop, never inside a critical section the signal interrupted
            self._loop.call_soon_threadsafe(self._drain, sig)
        if sig == signal.SIGTERM:
            # Not recorded as a captured signal: uvicorn re-raises those after shutting down (exit 143).
            self.force_exit = self.should_exit
            self.should_exit = True
        else:
            super().handle_exit(sig, frame)

    def _drain(self, sig) -> None:
        failed = self.scheduler.drain()
        logger.info(
            "%s: draining; %d queued request(s) answered 503, the running one finishes",
            signal.Signals(sig).name,
            failed,
        )
