"""VirtualClock: advance, advance_to, run_until_idle, jump, the wall clock, validation, interop."""

from __future__ import annotations

import asyncio
import datetime
import time

import dateutil.tz
import freezegun
import pyncette.pyncette
import pyncette.task
import pytest
import time_machine
from pyncette.task import Task

from pyncette_testing import VirtualClock, VirtualTimeLoop

UTC = datetime.timezone.utc
START = datetime.datetime(2019, 1, 1, tzinfo=UTC)


@pytest.mark.filterwarnings("ignore:datetime.datetime.utcnow:DeprecationWarning")
def test_now_elapsed_and_the_wall_clock_follow_loop_time(loop: VirtualTimeLoop) -> None:
    async def main(clock: VirtualClock) -> None:
        assert clock.now() == START
        assert datetime.datetime.now(UTC) == START
        await asyncio.sleep(90)
        assert clock.elapsed == datetime.timedelta(seconds=90)
        assert clock.now() == START + datetime.timedelta(seconds=90)
        assert datetime.datetime.now(UTC) == clock.now()
        assert datetime.datetime.utcnow() == clock.now().replace(tzinfo=None)
        assert time.time() == clock.now().timestamp()
        await clock.advance(datetime.timedelta(days=400))
        assert datetime.date.today() == datetime.date(2020, 2, 5)

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))


def test_everything_is_restored_when_the_clock_stops(loop: VirtualTimeLoop) -> None:
    real_time_module = pyncette.pyncette.time
    real_dateutil = pyncette.task.dateutil
    real_current_time = pyncette.pyncette._current_time
    seen: list[object] = []

    def failing_test() -> None:
        with VirtualClock(START, loop=loop):
            seen.extend([datetime.datetime.now(UTC), pyncette.pyncette.time, pyncette.task.dateutil])
            seen.append(pyncette.pyncette._current_time)
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        failing_test()
    assert seen[0] == START
    assert seen[1] is not real_time_module
    assert seen[2] is not real_dateutil
    assert datetime.datetime.now(UTC).year >= 2025
    assert abs(time.time() - datetime.datetime.now(UTC).timestamp()) < 5
    assert pyncette.pyncette.time is real_time_module
    assert pyncette.task.dateutil is real_dateutil
    assert seen[3] is not real_current_time
    assert pyncette.pyncette._current_time is real_current_time


def test_pyncettes_now_is_the_wall_clock_read_once_per_instant(loop: VirtualTimeLoop) -> None:
    async def main(clock: VirtualClock) -> None:
        first = pyncette.pyncette._current_time()
        assert first == datetime.datetime.now(UTC) == START
        assert first.tzinfo is dateutil.tz.UTC  # what Pyncette's own returns
        assert pyncette.pyncette._current_time() is first  # the same instant: read once
        await asyncio.sleep(0.25)
        assert (
            pyncette.pyncette._current_time() == datetime.datetime.now(UTC) == START + datetime.timedelta(seconds=0.25)
        )
        clock.jump(datetime.timedelta(minutes=3))
        assert pyncette.pyncette._current_time() == datetime.datetime.now(UTC) == clock.now()

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))
        assert pyncette.pyncette._current_time() == START + datetime.timedelta(minutes=3, seconds=0.25)


def test_task_validation_reads_the_local_zone_once_and_still_rejects_bad_zones(
    loop: VirtualTimeLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str | None] = []
    real_gettz = dateutil.tz.gettz

    def counting_gettz(name: str | None = None) -> object:
        lookups.append(name)
        return real_gettz(name)

    monkeypatch.setattr(dateutil.tz, "gettz", counting_gettz)
    with VirtualClock(START, loop=loop):
        for _ in range(3):
            Task(name="t", func=_noop, interval=datetime.timedelta(seconds=1))
        Task(name="t", func=_noop, schedule="0 * * * *", timezone="Europe/Berlin")
        with pytest.raises(ValueError, match="Invalid timezone specifier 'Nowhere/Atlantis'"):
            Task(name="t", func=_noop, schedule="0 * * * *", timezone="Nowhere/Atlantis")
    assert lookups == [None, "Europe/Berlin", "Nowhere/Atlantis"]
    with VirtualClock(START, loop=loop):
        Task(name="t", func=_noop, interval=datetime.timedelta(seconds=1))
    assert lookups[-1] is None and len(lookups) == 4  # a new clock looks the zone up afresh


async def _noop(context: object) -> None:
    pass


def test_advance_runs_everything_due_including_the_target_and_stops_exactly_there(loop: VirtualTimeLoop) -> None:
    fired: list[float] = []

    async def main(clock: VirtualClock) -> None:
        for at in (1, 5, 10, 10.5):
            loop.call_at(at, lambda at=at: fired.append(at))
        await clock.advance(10)
        assert fired == [1, 5, 10]
        assert clock.elapsed == datetime.timedelta(seconds=10)
        await clock.advance(datetime.timedelta(seconds=0))
        assert fired == [1, 5, 10]
        await clock.advance_to(START + datetime.timedelta(seconds=11))
        assert fired == [1, 5, 10, 10.5]
        assert clock.now() == START + datetime.timedelta(seconds=11)

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))


def test_advance_lets_work_made_ready_at_the_target_settle(loop: VirtualTimeLoop) -> None:
    log: list[str] = []

    async def worker() -> None:
        await asyncio.sleep(10)
        for _ in range(3):
            await asyncio.sleep(0)
        log.append("settled")

    async def main(clock: VirtualClock) -> None:
        task = asyncio.create_task(worker())
        await clock.advance(10)
        assert log == ["settled"]
        assert task.done()

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))


def test_run_until_idle_and_its_limit(loop: VirtualTimeLoop) -> None:
    async def ticking_forever() -> None:
        while True:
            await asyncio.sleep(60)

    async def main(clock: VirtualClock) -> None:
        loop.call_later(5, lambda: None)
        loop.call_later(50, lambda: None)
        await clock.run_until_idle()
        assert clock.elapsed == datetime.timedelta(seconds=50)
        task = asyncio.create_task(ticking_forever(), name="ticker")
        with pytest.raises(TimeoutError, match="ticker"):
            await clock.run_until_idle(limit=datetime.timedelta(hours=1))
        task.cancel()

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))


def test_jump_skips_ahead_and_overdue_timers_fire_late_in_order(loop: VirtualTimeLoop) -> None:
    fired: list[tuple[int, float]] = []

    async def main(clock: VirtualClock) -> None:
        loop.call_later(2, lambda: fired.append((2, loop.time())))
        loop.call_later(1, lambda: fired.append((1, loop.time())))
        clock.jump(datetime.timedelta(seconds=30))
        assert fired == []
        assert clock.now() == START + datetime.timedelta(seconds=30)
        assert datetime.datetime.now(UTC) == clock.now()
        await clock.advance(0)
        assert fired == [(1, 30), (2, 30)]

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: c.advance(-1), ValueError, "negative"),
        (lambda c: c.advance(float("inf")), ValueError, "finite"),
        (lambda c: c.advance(float("nan")), ValueError, "finite"),
        (lambda c: c.advance("1s"), TypeError, "timedelta or a number"),
        (lambda c: c.advance(True), TypeError, "timedelta or a number"),
        (lambda c: c.advance(datetime.timedelta(seconds=-1)), ValueError, "backwards"),
        (lambda c: c.advance_to(START - datetime.timedelta(seconds=1)), ValueError, "backwards"),
        (lambda c: c.advance_to(datetime.datetime(2030, 1, 1)), ValueError, "naive"),
        (lambda c: c.run_until_idle(-5), ValueError, "negative"),
    ],
)
def test_bad_time_requests_are_clear_errors(loop: VirtualTimeLoop, call, error, match) -> None:  # type: ignore[no-untyped-def]
    async def main(clock: VirtualClock) -> None:
        with pytest.raises(error, match=match):
            await call(clock)

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))
        with pytest.raises(ValueError, match="negative"):
            clock.jump(-1)


def test_naive_start_and_wrong_loop_are_rejected() -> None:
    with pytest.raises(ValueError, match="naive"):
        VirtualClock(datetime.datetime(2024, 1, 1))
    with pytest.raises(TypeError, match="VirtualTimeLoop"):
        VirtualClock(START, loop=asyncio.new_event_loop())  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="needs a loop"), VirtualClock(START):
        pass


def test_a_stopped_clock_says_so(loop: VirtualTimeLoop) -> None:
    with VirtualClock(START, loop=loop) as clock:
        pass
    with pytest.raises(RuntimeError, match="stopped"):
        clock.jump(1)
    with pytest.raises(RuntimeError, match="only once"), clock:
        pass


def test_only_one_advance_at_a_time(loop: VirtualTimeLoop) -> None:
    async def main(clock: VirtualClock) -> None:
        first = asyncio.create_task(clock.advance(10))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match="already in progress"):
            await clock.advance(5)
        await first

    with VirtualClock(START, loop=loop) as clock:
        loop.run_until_complete(main(clock))


def test_async_with_binds_to_the_running_loop() -> None:
    async def main() -> datetime.datetime:
        async with VirtualClock("2020-02-29T12:00:00+01:00") as clock:
            await clock.advance(datetime.timedelta(hours=1))
            return datetime.datetime.now(UTC)

    loop = VirtualTimeLoop()
    try:
        assert loop.run_until_complete(main()) == datetime.datetime(2020, 2, 29, 12, tzinfo=UTC)
    finally:
        loop.close()


def test_freezegun_instant_is_the_default_start_and_follows_virtual_time(loop: VirtualTimeLoop) -> None:
    with freezegun.freeze_time("2021-06-01 08:00:00"):
        clock = VirtualClock(loop=loop)
        assert clock.start == datetime.datetime(2021, 6, 1, 8, tzinfo=UTC)

        async def main() -> None:
            await clock.advance(datetime.timedelta(minutes=30))
            assert datetime.datetime.now(UTC) == datetime.datetime(2021, 6, 1, 8, 30, tzinfo=UTC)
            assert time.time() == clock.now().timestamp()

        with clock:
            loop.run_until_complete(main())
        assert datetime.datetime.now(UTC) == datetime.datetime(2021, 6, 1, 8, tzinfo=UTC)


def test_time_machine_instant_is_the_default_start_and_follows_virtual_time(loop: VirtualTimeLoop) -> None:
    with time_machine.travel(datetime.datetime(2022, 3, 4, 5, 6, 7, tzinfo=UTC), tick=False):
        clock = VirtualClock(loop=loop)
        assert clock.start == datetime.datetime(2022, 3, 4, 5, 6, 7, tzinfo=UTC)

        async def main() -> None:
            await clock.advance(60)
            assert datetime.datetime.now(UTC) == datetime.datetime(2022, 3, 4, 5, 7, 7, tzinfo=UTC)

        with clock:
            loop.run_until_complete(main())
        assert datetime.datetime.now(UTC) == datetime.datetime(2022, 3, 4, 5, 6, 7, tzinfo=UTC)


def test_default_start_without_any_travel_is_fixed() -> None:
    assert VirtualClock().start == datetime.datetime(2024, 1, 1, tzinfo=UTC)


def test_pyncette_tick_timing_reads_loop_time(loop: VirtualTimeLoop) -> None:
    async def main() -> float:
        before = pyncette.pyncette.time.perf_counter()
        await asyncio.sleep(12.5)
        return pyncette.pyncette.time.perf_counter() - before

    with VirtualClock(START, loop=loop):
        assert loop.run_until_complete(main()) == 12.5
