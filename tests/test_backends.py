"""Backends by name: choosing them (marker, option, ini), isolating simulations on a shared server,
and what happens when a server is missing."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pyncette import Context, ExecutionMode, Pyncette
from pyncette.sqlite import sqlite_repository

from pyncette_testing import (
    BACKENDS,
    InMemoryRepository,
    InMemoryStore,
    Simulation,
    SimulationStalled,
    VirtualClock,
    VirtualTimeLoop,
    backend_unavailable,
    isolated_backend,
    memory_repository,
    track_io,
)

from .conftest import run_inner

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def _run(coroutine: Any, **options: float) -> Any:
    loop = VirtualTimeLoop(**options)
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


@pytest.mark.parametrize("pyncette_backend", BACKENDS, indirect=True)
def test_each_simulation_has_a_namespace_of_its_own_and_removes_it(pyncette_backend: str) -> None:
    app = Pyncette()

    @app.task(interval=datetime.timedelta(seconds=10))
    async def tick(context: Context) -> None:
        pass

    async def main() -> tuple[list[int], bool]:
        # Two simulations at once on one server (and one clock), the same app and task names: had they
        # shared the store, the task would run 3 times between them, not 3 times in each.
        async with (
            Simulation(app, start=START, backend=pyncette_backend) as first,
            Simulation(app, backend=pyncette_backend) as second,
        ):
            await second.start()
            await first.advance(seconds=30)
            counts = [len(first.executions()), len(second.executions())]
            namespace = dict(first._config)
        return counts, await track_io(_namespace_exists)(pyncette_backend, namespace)

    counts, left_behind = _run(main())
    assert counts == [3, 3]
    assert not left_behind


async def _namespace_exists(backend: str, config: dict[str, Any]) -> bool:
    if backend == "sqlite":
        return pathlib.Path(config["sqlite_database"]).parent.exists()  # the folder made for it
    if backend == "redis":
        import redis.asyncio

        async with redis.asyncio.from_url(config["redis_url"]) as client:
            return bool([key async for key in client.scan_iter(match=f"pyncette:{config['redis_namespace']}:*")])
    if backend == "postgres":
        import asyncpg

        connection = await asyncpg.connect(config["postgres_url"])
        try:
            return bool(await connection.fetchval("SELECT to_regclass($1)", config["postgres_table_name"]))
        finally:
            await connection.close()
    return False


@pytest.mark.parametrize("pyncette_backend", ["sqlite", "redis", "postgres"], indirect=True)
def test_a_namespace_the_caller_chose_is_used_and_left_in_place(pyncette_backend: str, tmp_path: Any) -> None:
    chosen = {
        "sqlite": {"sqlite_database": str(tmp_path / "mine.db")},
        "redis": {"redis_namespace": f"mine-{os.getpid()}"},
        "postgres": {"postgres_table_name": "pyncette_testing_mine"},
    }[pyncette_backend]

    async def main() -> bool:
        async with isolated_backend(pyncette_backend, **chosen) as backend:
            assert backend.config.items() >= chosen.items()
            app = Pyncette(repository_factory=backend.factory, **backend.config)

            @app.dynamic_task()
            async def queue(context: Context) -> None:
                pass

            async with app.create() as context:
                await context.schedule_task(queue, "kept", interval=datetime.timedelta(hours=1))
        exists = await track_io(_namespace_exists)(pyncette_backend, backend.config)
        async with isolated_backend(pyncette_backend, **chosen) as again:  # clean up after ourselves
            app = Pyncette(repository_factory=again.factory, **again.config)
            queue = app.dynamic_task()(_noop)
            async with app.create() as context:
                await context.unschedule_task(queue, "kept")
        return exists

    assert _run(main())


async def _noop(context: Context) -> None:
    pass


def test_bad_backends_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'mongo'; use one of memory, sqlite, redis, postgres"):
        Simulation(Pyncette(), backend="mongo")
    with pytest.raises(TypeError, match="backend must be a backend name or a Pyncette repository factory"):
        Simulation(Pyncette(), backend=42)  # type: ignore[arg-type]

    async def main() -> None:
        with pytest.raises(ValueError, match="unknown backend 'mongo'"):
            async with isolated_backend("mongo"):
                pass

    _run(main())


def test_an_unreachable_server_is_named_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # the discard port: nothing listens
    reason = backend_unavailable("redis")
    assert reason is not None
    assert "no redis server at redis://127.0.0.1:9/0" in reason
    assert "set REDIS_URL" in reason
    assert backend_unavailable("memory") is None
    assert backend_unavailable("sqlite") is None


INNER_TESTS = """
import datetime
import pytest

async def test_configured(pyncette_app, pyncette_backend):
    @pyncette_app.task(interval=datetime.timedelta(seconds=1))
    async def tick(context):
        pass
    await pyncette_app.advance(seconds=3)
    pyncette_app.assert_executed(tick, 3)
    print("RAN ON", pyncette_backend)

@pytest.mark.pyncette(backend="sqlite")
async def test_pinned(pyncette_app, pyncette_backend):
    assert pyncette_backend == "sqlite"
    with pytest.raises(RuntimeError, match="no in-memory store"):
        pyncette_app.store
"""


def test_marker_option_and_ini_choose_the_backend(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=INNER_TESTS)
    pytester.makeini("[pytest]\npyncette_backend = sqlite\n")
    result = run_inner(pytester, "-v", "-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*RAN ON sqlite*"])

    # the option wins over the ini, and several backends run each test once per backend
    result = run_inner(pytester, "-v", "--pyncette-backend", "memory,sqlite")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*test_configured?memory? PASSED*", "*test_configured?sqlite? PASSED*"])
    result.stdout.no_fnmatch_line("*test_pinned[[]*")  # the marker pins one backend: not parametrized


def test_an_unknown_backend_in_the_configuration_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_it=INNER_TESTS)
    result = run_inner(pytester, "--pyncette-backend", "memory,mongo")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown backend 'mongo' in --pyncette-backend; use one or more of memory, sqlite*"])


def test_a_missing_server_skips_locally_and_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_it=INNER_TESTS)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")
    monkeypatch.delenv("CI", raising=False)
    result = run_inner(pytester, "--pyncette-backend", "redis", subprocess=True)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*pyncette backends*",
            "1 test(s) skipped: redis backend unavailable: no redis server at redis://127.0.0.1:9/0*set REDIS_URL",
        ]
    )

    monkeypatch.setenv("CI", "true")
    result = run_inner(pytester, "--pyncette-backend", "redis", subprocess=True)
    result.assert_outcomes(passed=1, errors=1)  # the fixture fails: the test never runs
    result.stdout.fnmatch_lines(["*the redis backend is required under CI but unavailable*"])


def test_backend_calls_are_serialized_so_runs_do_not_depend_on_the_server() -> None:
    # Two workers at the same instants: their calls reach the server one at a time, in call order,
    # so that the journal is the same on every run (and as on the in-memory store).
    app = Pyncette()

    @app.task(interval=datetime.timedelta(seconds=2))
    async def job(context: Context) -> None:
        await asyncio.sleep(0.5)

    def journal(backend: str) -> list[tuple[Any, ...]]:
        async def main() -> list[tuple[Any, ...]]:
            async with Simulation(app, start=START, backend=backend, workers=2) as sim:
                await sim.advance(seconds=20)
                return [(run.worker, run.scheduled_at, run.started_at) for run in sim.executions()]

        return _run(main())

    expected = journal("memory")
    assert len(expected) == 10
    assert journal("sqlite") == expected


class _SlowServer:
    """A backend that yields to its event loop in the middle of each call, as a driver waiting for
    its server does, and notes how far a task body got meanwhile."""

    def __init__(self) -> None:
        self.store = InMemoryStore()  # one for every worker, as a server would be
        self.steps = 0
        self.progress_during_calls: list[int] = []
        self.app = Pyncette()
        self.app.task(name="job", interval=datetime.timedelta(seconds=1))(self.body)

    async def body(self, context: Context) -> None:
        for _ in range(20):
            self.steps += 1
            await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def factory(self, **config: Any) -> AsyncIterator[Any]:
        repository = InMemoryRepository(self.store)
        for name in ("poll_task", "poll_dynamic_task", "commit_task"):
            setattr(repository, name, self._answering_after_a_while(getattr(repository, name)))
        yield repository

    def _answering_after_a_while(self, call: Any) -> Any:
        async def slow_call(*args: Any) -> Any:
            before = self.steps
            for _ in range(20):
                await asyncio.sleep(0)
            self.progress_during_calls.append(self.steps - before)
            return await call(*args)

        return slow_call


def test_a_backend_call_is_atomic_in_virtual_time() -> None:
    # Nothing of the simulation may run while a call waits for the server: had another worker's
    # step run there, the journal would depend on how fast the server answered.
    server = _SlowServer()

    async def main() -> None:
        async with Simulation(server.app, start=START, backend=server.factory, workers=2) as sim:
            await sim.advance(seconds=10)
            sim.assert_executed("job", times=10)

    _run(main())
    assert len(server.progress_during_calls) >= 30  # two workers' polls and commits (fewer: elision skips some)
    assert set(server.progress_during_calls) == {0}


def test_the_calls_of_a_track_io_factory_are_atomic_too() -> None:
    # Bare Pyncette, two app instances on one store: the same guarantee without a Simulation.
    server = _SlowServer()
    app = Pyncette(repository_factory=track_io(server.factory))
    app.task(name="job", interval=datetime.timedelta(seconds=1))(server.body)

    async def main() -> None:
        async with VirtualClock(START) as clock, app.create() as first, app.create() as second:
            running = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
            await clock.advance(10.5)
            first.shutdown()
            second.shutdown()
            await asyncio.gather(*running)

    _run(main())
    assert server.steps == 10 * 20  # at 1 s, 2 s, ..., 10 s: once each, between the two instances
    assert len(server.progress_during_calls) >= 50
    assert set(server.progress_during_calls) == {0}


def test_a_repository_used_after_its_backend_closed_says_so() -> None:
    app = Pyncette()

    @app.task(interval=datetime.timedelta(seconds=1))
    async def job(context: Context) -> None:
        pass

    async def main() -> None:
        async with VirtualClock(START) as clock:
            async with track_io(memory_repository)() as repository:
                assert await repository.get_task_state(clock.now(), job) is None
            with pytest.raises(RuntimeError, match="the backend is closed"):
                await repository.get_task_state(clock.now(), job)

    _run(main())


def test_a_backend_call_that_never_answers_is_a_clear_error_not_a_hang() -> None:
    app = Pyncette()

    @app.task(interval=datetime.timedelta(seconds=1))
    async def job(context: Context) -> None:
        pass

    @contextlib.asynccontextmanager
    async def never_answering(**config: Any) -> AsyncIterator[Any]:
        repository = InMemoryRepository()

        async def poll_task(*args: Any) -> Any:
            await asyncio.Event().wait()  # a server that never replies

        repository.poll_task = poll_task  # type: ignore[method-assign]
        yield repository

    async def main() -> None:
        async with Simulation(app, start=START, backend=never_answering) as sim:
            # Pyncette logs and goes on past any error in a tick: the advance raises it instead.
            with pytest.raises(
                SimulationStalled, match=r"poll_task\) has not completed in 0.05 real seconds"
            ) as caught:
                await sim.advance(seconds=1)
            assert "tasks waiting" in str(caught.value)  # and what the simulation was doing
            with pytest.raises(SimulationStalled, match="has not completed"):  # at once, not in another 0.05 s
                await sim.get_task(job)
            backend = sim._backend_loop
        assert backend is not None and backend._loop.is_closed()

    _run(main(), io_timeout=0.05)


def test_a_backend_left_open_by_an_abandoned_run_is_closed_with_the_loop() -> None:
    @contextlib.asynccontextmanager
    async def custom(**config: Any) -> AsyncIterator[Any]:
        yield InMemoryRepository()

    loop = VirtualTimeLoop()
    try:
        with VirtualClock(START, loop=loop):
            simulation = Simulation(Pyncette(), backend=custom)
            loop.run_until_complete(simulation.__aenter__())  # and never exited, as after a stall
            backend = simulation._backend_loop
            assert backend is not None and loop._closing_with == [backend.close]
    finally:
        loop.close()
    assert backend._loop.is_closed()


@pytest.mark.parametrize("pyncette_backend", [name for name in BACKENDS if name != "memory"], indirect=True)
def test_a_run_on_a_real_backend_is_the_same_every_time_and_as_on_memory(pyncette_backend: str) -> None:
    # Found by the elision differential on postgres: a restarted worker's poll failed at once while
    # the other worker's call was still with the server, and which of the two ran the task next
    # depended on how fast the server answered.
    app = Pyncette(poll_interval=datetime.timedelta(seconds=0.5))

    @app.task(interval=datetime.timedelta(seconds=1), execution_mode=ExecutionMode.AT_MOST_ONCE)
    async def job(context: Context) -> None:
        pass

    @app.partitioned_task(partition_count=3, interval=datetime.timedelta(seconds=1))
    async def shards(context: Context) -> None:
        pass

    def journal(backend: str) -> list[tuple[Any, ...]]:
        async def main() -> list[tuple[Any, ...]]:
            async with Simulation(app, start=START, backend=backend) as sim:
                await sim.advance(0)  # w1 starts polling
                await sim.add_worker()
                await sim.worker("w1").restart()
                sim.faults.fail("poll_task", times=1)
                await sim.advance(seconds=2.5)
                return [(run.task, run.worker, run.started_at) for run in sim.executions()]

        return _run(main())

    expected = journal("memory")
    assert [worker for _, worker, _ in expected] == ["w2", "w2"]
    for _ in range(5):
        assert journal(pyncette_backend) == expected


def test_lease_faults_on_a_custom_factory_say_they_cannot(tmp_path: pathlib.Path) -> None:
    app = Pyncette()

    @app.task(interval=datetime.timedelta(minutes=1), lease_duration=datetime.timedelta(minutes=5))
    async def job(context: Context) -> None:
        await asyncio.sleep(60)

    @contextlib.asynccontextmanager
    async def custom(**config: Any) -> AsyncIterator[Any]:  # sqlite, seen as someone's own factory
        async with sqlite_repository(**config) as repository:
            yield repository

    async def main() -> None:
        database = str(tmp_path / "custom.db")
        async with Simulation(app, start=START, backend=custom, sqlite_database=database) as sim:
            await sim.advance(seconds=70)
            with pytest.raises(NotImplementedError, match="not on a custom repository factory"):
                sim.faults.expire_lease(job)
            sim.assert_executed(job, times=1)

    _run(main())
