"""broker.worker.WorkerThread: calls run in its one thread, in order, and always report back."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from broker.worker import WorkerThread


async def test_calls_run_in_the_worker_thread_and_return_their_results():
    worker = WorkerThread("test-worker")
    worker.start()
    try:
        names = [await worker.run(lambda: threading.current_thread().name) for _ in range(3)]
        assert names == ["test-worker"] * 3
        assert await worker.run(divmod, 17, 5) == (3, 2)
    finally:
        worker.stop()


async def test_an_exception_reaches_the_caller_and_the_thread_goes_on():
    worker = WorkerThread("test-worker")
    worker.start()
    try:
        with pytest.raises(ZeroDivisionError):
            await worker.run(divmod, 1, 0)
        assert await worker.run(int, "7") == 7
    finally:
        worker.stop()


async def test_the_loop_keeps_running_while_a_call_blocks():
    worker = WorkerThread("test-worker")
    worker.start()
    ticks = 0

    async def tick():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0.005)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tick)
            await worker.run(time.sleep, 0.5)
            nursery.cancel_scope.cancel()
        # Up to 100 ticks; a blocked loop makes one or two. 10 leaves a loaded machine 50 ms a
        # tick (of 0.2 s, 10 left it 20 ms).
        assert ticks >= 10
    finally:
        worker.stop()


async def test_a_started_call_is_waited_for_even_when_its_caller_is_cancelled():
    worker = WorkerThread("test-worker")
    worker.start()
    finished = []

    def slow():
        time.sleep(0.2)
        finished.append(True)
        return "done"

    try:
        with trio.move_on_after(0.01) as scope:
            result = await worker.run(slow)
        assert result == "done" and finished == [True]
        assert scope.cancel_called  # the deadline passed, yet the call's result came back
    finally:
        worker.stop()


async def test_concurrent_callers_each_get_their_own_result():
    worker = WorkerThread("test-worker")
    worker.start()
    results = {}

    async def call(i):
        results[i] = await worker.run(lambda: i * i)

    try:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(call, i)
        assert results == {i: i * i for i in range(50)}
    finally:
        worker.stop()


async def test_stop_ends_the_thread_and_a_restart_gets_a_new_one():
    worker = WorkerThread("test-worker")
    with pytest.raises(RuntimeError, match="not running"):
        await worker.run(int)
    worker.start()
    with pytest.raises(RuntimeError, match="started already"):
        worker.start()
    first = await worker.run(threading.get_ident)
    worker.stop()
    with pytest.raises(RuntimeError, match="not running"):
        await worker.run(int)
    deadline = time.monotonic() + 5
    while any(t.ident == first for t in threading.enumerate()) and time.monotonic() < deadline:
        await trio.sleep(0.01)
    assert not any(t.ident == first for t in threading.enumerate())
    worker.start()
    try:
        assert await worker.run(int, "3") == 3
    finally:
        worker.stop()


async def test_submit_then_wait_collects_results_in_order_even_after_they_ended():
    """Submitted calls run in order; waiting after a call ended returns its result at once."""
    worker = WorkerThread("test-worker")
    worker.start()
    try:
        order = []
        first = worker.submit(lambda: order.append(1) or "one")
        second = worker.submit(divmod, 1, 0)
        third = worker.submit(lambda: order.append(3) or "three")
        with trio.fail_after(10):
            assert await worker.wait(third) == "three"  # the later call, waited for first
            assert await worker.wait(first) == "one"  # ended long ago
            with pytest.raises(ZeroDivisionError):
                await worker.wait(second)
        assert order == [1, 3]
    finally:
        worker.stop()


async def test_the_trio_thread_works_while_a_submitted_call_runs():
    """Between submit and wait the caller runs on: the call and the caller's work overlap."""
    worker = WorkerThread("test-worker")
    worker.start()
    try:
        started = threading.Event()
        release = threading.Event()

        def blocked() -> str:
            started.set()
            release.wait(10)
            return "done"

        call = worker.submit(blocked)
        assert started.wait(10)  # running in the worker, and this task was never blocked
        assert not call.ended
        release.set()
        with trio.fail_after(10):
            assert await worker.wait(call) == "done"
    finally:
        worker.stop()
