"""The scheduler alone: FIFO order, the bound, withdrawal from the queue, stopping a running job, draining."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from omnigen2.serving.queue import Cancelled, QueueFull, Scheduler, ShuttingDown


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def gated(gate: threading.Event, log: list, name: str):
    """A job that records its start, then waits for ``gate`` while checking for cancellation (a 'step')."""

    def fn(job):
        log.append(name)
        while not gate.wait(0.005):
            job.check()
        return name

    return fn


async def until(cond, timeout: float = 10.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        await asyncio.sleep(0.005)


def test_fifo_order_and_bound():
    async def main():
        sched, gate, log = Scheduler(max_queue=2), threading.Event(), []
        first = sched.submit(gated(gate, log, "a"))
        await until(lambda: sched.busy)
        queued = [sched.submit(gated(gate, log, n)) for n in "bc"]
        with pytest.raises(QueueFull) as full:
            sched.submit(gated(gate, log, "d"))
        assert full.value.retry_after >= 1
        gate.set()
        results = [await j.future for j in (first, *queued)]
        sched.stop(5)
        return results, log

    results, log = run(main())
    assert results == ["a", "b", "c"] and log == ["a", "b", "c"]


def test_withdrawn_job_frees_its_slot_and_never_runs():
    async def main():
        sched, gate, log = Scheduler(max_queue=1), threading.Event(), []
        sched.submit(gated(gate, log, "a"))
        await until(lambda: sched.busy)
        b = sched.submit(gated(gate, log, "b"))
        sched.cancel(b, "disconnect")
        assert sched.depth == 0
        with pytest.raises(Cancelled):
            await b.future
        c = sched.submit(gated(gate, log, "c"))  # the slot is free again
        gate.set()
        assert await c.future == "c"
        sched.stop(5)
        return log

    assert run(main()) == ["a", "c"]


def test_running_job_stops_at_its_next_check():
    async def main():
        sched, gate, log = Scheduler(max_queue=1), threading.Event(), []
        a = sched.submit(gated(gate, log, "a"))
        await until(lambda: sched.busy)
        sched.cancel(a, "timeout")
        with pytest.raises(Cancelled):
            await a.future
        await until(lambda: not sched.busy)
        sched.stop(5)

    run(main())


def test_drain_fails_the_queue_and_finishes_the_running_job():
    async def main():
        sched, gate, log = Scheduler(max_queue=3), threading.Event(), []
        a = sched.submit(gated(gate, log, "a"))
        await until(lambda: sched.busy)
        queued = [sched.submit(gated(gate, log, n)) for n in "bc"]
        assert sched.drain() == 2
        with pytest.raises(ShuttingDown):
            sched.submit(gated(gate, log, "d"))
        for j in queued:
            with pytest.raises(ShuttingDown):
                await j.future
        gate.set()
        assert await a.future == "a"
        assert sched.stop(5)
        return log

    assert run(main()) == ["a"]


def test_a_failing_job_does_not_stop_the_worker():
    async def main():
        sched = Scheduler(max_queue=2)

        def boom(job):
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await sched.submit(boom).future
        assert await sched.submit(lambda job: 42).future == 42
        sched.stop(5)

    run(main())


def test_max_ref_images_agrees_with_the_transformer():
    from omnigen2.models.transformer_omnigen2 import MAX_REF_IMAGES
    from omnigen2.serving import config

    assert config.MAX_REF_IMAGES == MAX_REF_IMAGES
