"""One model call at a time, fed by a bounded FIFO queue.

The event loop only enqueues and awaits: every model call runs on one worker thread, in arrival order. A job
waiting in the queue can be withdrawn (its client went away, or its time ran out), which frees its slot at once;
the running job is asked to stop through :meth:`Job.check`, which the model's callbacks call at every denoising
step and every decoded token and which raises :class:`Cancelled` there. ``drain()`` refuses new jobs, fails the
queued ones with :class:`ShuttingDown` and lets the running one finish.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


class Cancelled(Exception):
    """Raised inside a running model call (from a step callback) to stop it."""


class Job:
    """One model call: ``fn(job)`` runs on the worker thread; its result or exception lands in ``future``."""

    def __init__(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop):
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        # A job given up on (timeout, disconnect) still fails later; its failure is retrieved here so asyncio does
        # not log it as "never retrieved".
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.state = "queued"  # -> "running" -> "done"; or "withdrawn" from the queue
        self.cancel_reason: str | None = None
        self._cancel = threading.Event()
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.finished: float | None = None

    def check(self) -> None:
        """Stop here if the job was cancelled: called by the model's callbacks on the worker thread."""
        if self._cancel.is_set():
            raise Cancelled(self.cancel_reason or "cancelled")

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Set the future from any thread (a no-op once it is done, e.g. after its awaiter gave up)."""

        def settle():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop closed between the check and the call
            pass


class Scheduler:
    """A bounded FIFO queue in front of one worker thread. ``max_queue`` jobs may wait behind the running one."""

    def __init__(self, max_queue: int, name: str = "omnigen2-model"):
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._stopped = False
        self._service_s = 1.0  # running mean of a job's time on the model, for Retry-After
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    # -- state, read by /health and /metrics ----------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return int(self._running is not None)

    @property
    def closed(self) -> bool:
        return self._closed

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the running job and the queue ahead at the mean service time."""
        return max(1, math.ceil(self._service_s * (len(self._queue) + 1)))

    # -- the event loop's side ------------------------------------------------------------------------------

    def submit(self, fn: Callable[[Job], Any], loop: asyncio.AbstractEventLoop | None = None) -> Job:
        job = Job(fn, loop or asyncio.get_running_loop())
        with self._cond:
            if self._closed:
                raise ShuttingDown()
            if len(self._queue) >= self.max_queue and (self._running is not None or self._queue):
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Withdraw ``job`` from the queue (its slot frees at once), or ask it to stop if it is running."""
        with self._cond:
            job.cancel_reason = reason
            job._cancel.set()
            if job.state == "queued":
                try:
                    self._queue.remove(job)
                except ValueError:
                    pass
                job.state = "withdrawn"
                job._resolve(error=Cancelled(reason))

    def drain(self) -> int:
        """Refuse new jobs and fail the queued ones with ShuttingDown; the running job goes on. Returns how
        many queued jobs were failed. Safe to call from a signal handler's thread."""
        with self._cond:
            self._closed = True
            failed = list(self._queue)
            self._queue.clear()
            for job in failed:
                job.state = "withdrawn"
                job._resolve(error=ShuttingDown())
            self._cond.notify_all()
        return len(failed)

    def stop(self, timeout: float | None = None) -> bool:
        """Drain, then wait for the running job and the worker to end. True when the worker ended."""
        self.drain()
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- the worker thread ----------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopped:
                    self._cond.wait()
                if not self._queue:
                    return  # stopped and nothing left
                job = self._queue.popleft()
                job.state, job.started = "running", time.monotonic()
                self._running = job
            result, error = None, None
            try:
                result = job.fn(job)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the request that caused it
                error = e
            job.finished = time.monotonic()
            with self._cond:
                self._running, job.state = None, "done"
                if not job.cancelled:
                    self._service_s = 0.8 * self._service_s + 0.2 * (job.finished - job.started)
            job._resolve(result, error)
