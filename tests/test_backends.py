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
from pyncette import Context, Pyncette
from pyncette.sqlite import sqlite_repository

from pyncette_testing import BACKENDS, Simulation, VirtualTimeLoop, backend_unavailable, isolated_backend, track_io

from .conftest import run_inner

START = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def _run(coroutine: Any) -> Any:
    loop = VirtualTimeLoop()
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
