"""Real Pyncette apps driven by ``ctx.run()`` on the virtual clock: the examples that must hold.

Each runs on the in-memory store and on each of Pyncette's own backends (sqlite, redis, postgres)
under ``track_io``; all must give the same counts.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from pyncette import Context, FailureMode, Pyncette
from pyncette.utils import with_heartbeat

from pyncette_testing import BACKENDS, VirtualClock, VirtualTimeLoop, isolated_backend, memory_repository

UTC = datetime.timezone.utc
START = datetime.datetime(2019, 1, 1, tzinfo=UTC)
pytestmark = [
    pytest.mark.pyncette(start="2019-01-01T00:00:00Z"),
    pytest.mark.parametrize("pyncette_backend", BACKENDS, indirect=True),
]


@pytest_asyncio.fixture(loop_scope="function")
async def on_backend(pyncette_backend: str, pyncette_clock: VirtualClock) -> AsyncIterator[dict[str, Any]]:
    """Pyncette keywords that put an app on this test's backend, in a namespace of its own."""
    async with isolated_backend(pyncette_backend) as backend:
        yield {"repository_factory": backend.factory, **backend.config}


async def run_for(app: Pyncette, clock: VirtualClock, duration: datetime.timedelta) -> None:
    async with app.create() as ctx:
        running = asyncio.create_task(ctx.run())
        await clock.advance(duration)
        ctx.shutdown()
        await running


async def test_interval_task_runs_5_times_in_10_seconds(
    pyncette_clock: VirtualClock, on_backend: dict[str, Any]
) -> None:
    app = Pyncette(**on_backend)
    runs: list[datetime.datetime] = []

    @app.task(interval=datetime.timedelta(seconds=2))
    async def every_2s(context: Context) -> None:
        runs.append(datetime.datetime.now(UTC))

    await run_for(app, pyncette_clock, datetime.timedelta(seconds=10))
    assert runs == [START + datetime.timedelta(seconds=s) for s in (2, 4, 6, 8, 10)]


async def test_cron_task_with_30s_poll_runs_10_times_in_10_minutes(
    pyncette_clock: VirtualClock, on_backend: dict[str, Any]
) -> None:
    app = Pyncette(**on_backend, poll_interval=datetime.timedelta(seconds=30))
    scheduled: list[datetime.datetime] = []

    @app.task(schedule="* * * * *")
    async def every_minute(context: Context) -> None:
        scheduled.append(context.scheduled_at)

    await run_for(app, pyncette_clock, datetime.timedelta(minutes=10))
    assert scheduled == [START + datetime.timedelta(minutes=m) for m in range(1, 11)]


async def test_failing_task_with_unlock_runs_9_times_in_10_seconds(
    pyncette_clock: VirtualClock, on_backend: dict[str, Any]
) -> None:
    app = Pyncette(**on_backend)
    attempts: list[datetime.datetime] = []

    @app.task(interval=datetime.timedelta(seconds=2), failure_mode=FailureMode.UNLOCK)
    async def always_fails(context: Context) -> None:
        attempts.append(datetime.datetime.now(UTC))
        raise RuntimeError("boom")

    await run_for(app, pyncette_clock, datetime.timedelta(seconds=10))
    # due at 2 s, then retried on every 1 s tick because the failure unlocks it
    assert attempts == [START + datetime.timedelta(seconds=s) for s in range(2, 11)]


async def test_heartbeating_task_heartbeats_exactly_9_times(
    pyncette_clock: VirtualClock, on_backend: dict[str, Any]
) -> None:
    app = Pyncette(**on_backend)
    heartbeats: list[datetime.datetime] = []
    finished: list[datetime.datetime] = []

    @app.task(interval=datetime.timedelta(seconds=30), lease_duration=datetime.timedelta(seconds=2))
    @with_heartbeat()
    async def long_job(context: Context) -> None:
        await asyncio.sleep(10)
        finished.append(datetime.datetime.now(UTC))

    @app.middleware
    async def count_heartbeats(context: Context, next: Callable[[], Any]) -> None:
        original = context.heartbeat

        async def counted() -> None:
            heartbeats.append(datetime.datetime.now(UTC))
            await original()

        context.heartbeat = counted
        await next()

    await run_for(app, pyncette_clock, datetime.timedelta(seconds=45))
    begin = START + datetime.timedelta(seconds=30)
    assert finished == [begin + datetime.timedelta(seconds=10)]
    assert heartbeats == [begin + datetime.timedelta(seconds=s) for s in range(1, 10)]


async def test_a_daily_cron_task_over_a_year(pyncette_clock: VirtualClock, on_backend: dict[str, Any]) -> None:
    # A year on memory; a month on a real backend, where raw ctx.run() (no elision) pays a round trip per tick.
    days = 365 if on_backend["repository_factory"] is memory_repository else 31
    app = Pyncette(**on_backend, poll_interval=datetime.timedelta(hours=1))
    runs: list[datetime.datetime] = []

    @app.task(schedule="0 9 * * *")
    async def daily(context: Context) -> None:
        runs.append(datetime.datetime.now(UTC))

    await run_for(app, pyncette_clock, datetime.timedelta(days=days))
    assert runs == [START + datetime.timedelta(days=day, hours=9) for day in range(days)]


def _timeline_of_a_busy_app(backend: str) -> list[tuple[str, str, str]]:
    app = Pyncette(poll_interval=datetime.timedelta(seconds=1))
    timeline: list[tuple[str, str, str]] = []

    def record(context: Context, what: str) -> None:
        timeline.append((datetime.datetime.now(UTC).isoformat(), context.task.canonical_name, what))

    @app.task(interval=datetime.timedelta(seconds=3))
    async def fast(context: Context) -> None:
        record(context, "start")
        await asyncio.sleep(1.5)
        record(context, "end")

    @app.task(schedule="*/1 * * * *", failure_mode=FailureMode.UNLOCK)
    async def flaky(context: Context) -> None:
        record(context, "start")
        if context.scheduled_at.minute % 2:
            raise RuntimeError("odd minute")

    @app.dynamic_task(lease_duration=datetime.timedelta(seconds=4))
    @with_heartbeat()
    async def job(context: Context) -> None:
        record(context, "start")
        await asyncio.sleep(7)
        record(context, "end")

    async def main() -> None:
        async with VirtualClock(START) as clock, isolated_backend(backend) as on_backend:
            app._repository_factory = on_backend.factory
            app._configuration = on_backend.config
            async with app.create() as ctx:
                for name in ("a", "b", "c"):
                    await ctx.schedule_task(job, name, interval=datetime.timedelta(seconds=20))
                    if backend == "postgres":
                        # PostgreSQL returns equally due instances in the order its table holds them
                        # (test_backend_differences.py), which other sessions on the server can change
                        # (they hold back the pruning of dead rows): there, they are due a second apart.
                        await clock.advance(datetime.timedelta(seconds=1))
                running = asyncio.create_task(ctx.run())
                await clock.advance(datetime.timedelta(minutes=2))
                ctx.shutdown()
                await running

    loop = VirtualTimeLoop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return timeline


@pytest.mark.filterwarnings("ignore")
def test_runs_are_deterministic(pyncette_backend: str) -> None:
    first = _timeline_of_a_busy_app(pyncette_backend)
    assert len(first) > 60
    # 20 runs in all on memory; a real backend pays a round trip per call, so 3 there.
    for _ in range(19 if pyncette_backend == "memory" else 2):
        assert _timeline_of_a_busy_app(pyncette_backend) == first
