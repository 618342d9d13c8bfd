"""VirtualTimeLoop: jumps, FIFO timers, I/O, stall detection."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time

import pytest

from pyncette_testing import SimulationStalled, VirtualTimeLoop, track_io


def test_time_starts_at_zero_and_jumps_to_timers(loop: VirtualTimeLoop) -> None:
    seen: list[float] = []

    async def main() -> None:
        for delay in (5, 0.25, 3600):
            await asyncio.sleep(delay)
            seen.append(loop.time())

    assert loop.time() == 0
    real = time.monotonic()
    loop.run_until_complete(main())
    assert seen == [5, 5.25, 3605.25]
    assert time.monotonic() - real < 5  # virtual: no real waiting (generous bound, not a speed target)


def test_wait_for_and_timeout_fire_at_the_virtual_deadline(loop: VirtualTimeLoop) -> None:
    async def main() -> tuple[float, float]:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), timeout=10)
        first = loop.time()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(2.5):  # type: ignore[attr-defined,unused-ignore]
                await asyncio.sleep(100)
        return first, loop.time()

    if not hasattr(asyncio, "timeout"):  # Python 3.10
        pytest.skip("asyncio.timeout needs Python 3.11")
    assert loop.run_until_complete(main()) == (10, 12.5)


def test_call_later_and_call_at(loop: VirtualTimeLoop) -> None:
    fired: list[tuple[str, float]] = []

    async def main() -> None:
        loop.call_later(7, lambda: fired.append(("later", loop.time())))
        loop.call_at(3, lambda: fired.append(("at", loop.time())))
        cancelled = loop.call_later(1, lambda: fired.append(("cancelled", loop.time())))
        cancelled.cancel()
        await asyncio.sleep(10)

    loop.run_until_complete(main())
    assert fired == [("at", 3), ("later", 7)]


def test_timers_at_the_same_instant_fire_in_scheduling_order(loop: VirtualTimeLoop) -> None:
    order: list[int] = []

    async def main() -> None:
        for index in range(50):
            loop.call_at(5, order.append, index)
        await asyncio.sleep(6)

    loop.run_until_complete(main())
    assert order == list(range(50))


def test_work_made_ready_by_a_timer_settles_before_the_next_timer_at_that_instant(loop: VirtualTimeLoop) -> None:
    # Real time: the later-scheduled sleeper is always a little later, so the first one's
    # follow-up work (several hops through the ready queue) happens before the second wakes.
    log: list[str] = []

    async def first() -> None:
        await asyncio.sleep(10)
        for _ in range(5):
            await asyncio.sleep(0)
        log.append("first settled")

    async def second() -> None:
        await asyncio.sleep(10)
        log.append("second woke")

    async def main() -> None:
        await asyncio.gather(first(), second())

    loop.run_until_complete(main())
    assert log == ["first settled", "second woke"]


def test_spinning_code_lets_time_pass_instead_of_hanging(loop: VirtualTimeLoop) -> None:
    async def main() -> float:
        done = asyncio.Event()
        loop.call_later(1, done.set)
        while not done.is_set():
            await asyncio.sleep(0)
        return loop.time()

    assert loop.run_until_complete(main()) == 1


def test_the_loop_stops_after_the_batch_that_stopped_it(loop: VirtualTimeLoop) -> None:
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        loop.call_soon(ran.append, "later")  # the next batch: after the stop, as on asyncio's own loop
        loop.stop()

    loop.call_soon(first)
    loop.call_soon(ran.append, "same batch")
    loop.run_forever()
    assert ran == ["first", "same batch"]
    loop.run_until_complete(asyncio.sleep(0))
    assert ran == ["first", "same batch", "later"]


def test_executor_work_holds_time_still(loop: VirtualTimeLoop) -> None:
    release = threading.Event()
    fired: list[float] = []

    def blocking() -> float:
        release.wait(5)
        return 42.0

    async def main() -> float:
        loop.call_later(1, lambda: fired.append(loop.time()))
        future = loop.run_in_executor(None, blocking)
        loop.call_soon(lambda: threading.Timer(0.05, release.set).start())
        result = await future
        # the thread took real time, but virtual time did not jump past the 1 s timer meanwhile
        assert loop.time() == 0
        assert fired == []
        return result

    assert loop.run_until_complete(main()) == 42.0
    loop.run_until_complete(loop.shutdown_default_executor())


@pytest.mark.filterwarnings("error")
def test_shutting_down_the_default_executor_waits_for_its_threads(loop: VirtualTimeLoop) -> None:
    assert loop.run_until_complete(loop.run_in_executor(None, int, "3")) == 3
    # asyncio.Runner passes a 300 s timeout (3.12+): virtual time must not reach it while threads join
    timeout = (300,) if "timeout" in inspect.signature(loop.shutdown_default_executor).parameters else ()
    loop.run_until_complete(loop.shutdown_default_executor(*timeout))
    assert loop.time() == 0


def test_track_io_holds_time_for_a_coroutine_function(loop: VirtualTimeLoop) -> None:
    async def from_thread() -> str:
        future: asyncio.Future[str] = loop.create_future()
        threading.Timer(0.05, lambda: loop.call_soon_threadsafe(future.set_result, "done")).start()
        return await future

    tracked = track_io(from_thread)

    async def main() -> tuple[str, float]:
        timer_fired = asyncio.Event()
        loop.call_later(30, timer_fired.set)
        result = await tracked()
        return result, loop.time()

    assert loop.run_until_complete(main()) == ("done", 0)


def test_sockets_are_polled_before_a_jump(loop: VirtualTimeLoop) -> None:
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)

    async def main() -> tuple[bytes, float]:
        reader, writer = await asyncio.open_connection(sock=left)
        right.send(b"ping\n")
        line = await asyncio.wait_for(reader.readline(), timeout=60)
        writer.close()
        return line, loop.time()

    try:
        assert loop.run_until_complete(main()) == (b"ping\n", 0)
    finally:
        right.close()


def test_a_stuck_simulation_raises_naming_the_waiting_tasks(loop: VirtualTimeLoop) -> None:
    async def waits_forever() -> None:
        await asyncio.Event().wait()

    async def main() -> None:
        await asyncio.create_task(waits_forever(), name="the-stuck-one")

    with pytest.raises(SimulationStalled) as caught:
        loop.run_until_complete(main())
    message = str(caught.value)
    assert "the-stuck-one" in message
    assert "waits_forever" in message
    assert "no timers" in message
    # the loop can still clean up afterwards
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.run_until_complete(asyncio.sleep(0))


def test_untracked_thread_work_gets_the_stall_grace() -> None:
    loop = VirtualTimeLoop(stall_timeout=2)

    async def main() -> str:
        future: asyncio.Future[str] = loop.create_future()
        threading.Timer(0.05, lambda: loop.call_soon_threadsafe(future.set_result, "late but fine")).start()
        return await future

    try:
        assert loop.run_until_complete(main()) == "late but fine"
    finally:
        loop.close()


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "1"])
def test_loop_timeouts_are_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="stall_timeout"):
        VirtualTimeLoop(stall_timeout=bad)  # type: ignore[arg-type]


def test_many_cancelled_timers_do_not_accumulate(loop: VirtualTimeLoop) -> None:
    async def main() -> int:
        for _ in range(1000):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.sleep(0), timeout=100)
        return len(loop._timers)

    assert loop.run_until_complete(main()) < 300
