"""Simulation: workers, inline definitions, fixtures, time control, the journal, queries, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import gc
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pyncette import Context, ExecutionMode, FailureMode, Pyncette

from pyncette_testing import (
    Execution,
    InMemoryStore,
    Outcome,
    Simulation,
    SimulationStalled,
    VirtualTimeLoop,
    simulate,
)

UTC = datetime.timezone.utc
START = datetime.datetime(2019, 1, 1, tzinfo=UTC)
pytestmark = pytest.mark.pyncette(start="2019-01-01T00:00:00Z")


def seconds(n: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=n)


# -- the clock issue's examples, written with pyncette_app ---------------------------------------


async def test_interval_task_runs_5_times_in_10_seconds(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(2))
    async def every_2s(context: Context) -> None:
        pass

    await pyncette_app.advance(seconds=10)
    runs = pyncette_app.assert_executed(every_2s, 5, outcome=Outcome.SUCCEEDED)
    assert [run.started_at for run in runs] == [START + seconds(s) for s in (2, 4, 6, 8, 10)]


@pytest.mark.pyncette(poll_interval=30)
async def test_cron_task_with_30s_poll_runs_10_times_in_10_minutes(pyncette_app: Simulation) -> None:
    @pyncette_app.task(schedule="* * * * *")
    async def every_minute(context: Context) -> None:
        pass

    await pyncette_app.advance(minutes=10)
    pyncette_app.assert_executed(every_minute, 10)


async def test_failing_task_with_unlock_runs_9_times_in_10_seconds(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(2), failure_mode=FailureMode.UNLOCK)
    async def always_fails(context: Context) -> None:
        raise RuntimeError("boom")

    await pyncette_app.advance(seconds(10))
    runs = pyncette_app.assert_executed(always_fails, 9, outcome=Outcome.FAILED)
    assert all(isinstance(run.error, RuntimeError) for run in runs)


# -- workers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [ExecutionMode.AT_LEAST_ONCE, ExecutionMode.AT_MOST_ONCE])
async def test_two_workers_never_run_the_same_slot_twice(pyncette_app: Simulation, mode: ExecutionMode) -> None:
    @pyncette_app.task(interval=seconds(7.5), execution_mode=mode)
    async def shared(context: Context) -> None:
        await asyncio.sleep(3)

    await pyncette_app.advance(seconds=0.5)
    # w2 starts half a poll interval later, so the two workers' ticks interleave
    second = await pyncette_app.add_worker("w2")
    assert second.name == "w2"
    assert [worker.name for worker in pyncette_app.workers] == ["w1", "w2"]
    await pyncette_app.advance(minutes=30)

    runs = pyncette_app.executions(shared)
    slots = [run.scheduled_at for run in runs]
    assert len(runs) == 30 * 60 / 7.5
    assert len(set(slots)) == len(slots)
    assert {run.worker for run in runs} == {"w1", "w2"}  # both take part


async def test_worker_shutdown_is_graceful_and_the_other_worker_takes_over(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(10))
    async def job(context: Context) -> None:
        await asyncio.sleep(4)

    await pyncette_app.add_worker("w2")
    await pyncette_app.advance(seconds=12)
    first = pyncette_app.worker("w1")
    await first.shutdown()
    assert first.stopped and not first.running
    assert all(run.outcome is Outcome.SUCCEEDED for run in pyncette_app.executions(worker="w1"))
    before = len(pyncette_app.executions(job))
    await pyncette_app.advance(minutes=1)
    later = pyncette_app.executions(job)[before:]
    assert later and {run.worker for run in later} == {"w2"}


async def test_a_second_app_can_join_the_cluster(pyncette_app: Simulation) -> None:
    other = Pyncette()

    @other.task(interval=seconds(5))
    async def from_other_app(context: Context) -> None:
        pass

    await pyncette_app.add_worker("other", app=other)
    await pyncette_app.advance(seconds=20)
    pyncette_app.assert_executed(from_other_app, 4)
    assert {run.worker for run in pyncette_app.executions(from_other_app)} == {"other"}


async def test_worker_names_must_be_unique_and_known(pyncette_app: Simulation) -> None:
    with pytest.raises(ValueError, match="already a worker called 'w1'"):
        await pyncette_app.add_worker("w1")
    with pytest.raises(KeyError, match="unknown worker 'nope'"):
        pyncette_app.worker("nope")
    with pytest.raises(KeyError, match="unknown worker"):
        pyncette_app.executions(worker="nope")


# -- the user's app, inline definitions, fixtures ---------------------------------------------------


def _make_app() -> tuple[Pyncette, Any]:
    app = Pyncette(poll_interval=seconds(5), batch_size=7)

    @app.fixture()
    async def db(app_context: Any) -> AsyncIterator[str]:
        yield "real database"

    @app.middleware
    async def passthrough(context: Context, next: Any) -> None:
        await next()

    @app.task(interval=seconds(10))
    async def uses_db(context: Context) -> None:
        context.seen.append((context.db, context.greeting))

    return app, uses_db


async def test_the_context_exists_once_the_simulation_starts() -> None:
    async with Simulation(None) as sim:
        with pytest.raises(RuntimeError, match="has not started yet"):
            sim.context  # noqa: B018
        await sim.start()
        assert sim.context is sim.workers[0].context


async def test_the_users_app_is_left_untouched_by_a_run() -> None:
    app, uses_db = _make_app()
    before = (
        list(app._tasks),
        list(app._fixtures),
        list(app._middlewares),
        app._repository_factory,
        dict(app._configuration),
    )
    seen: list[tuple[str, str]] = []
    async with Simulation(app, context_items={"greeting": "hi", "seen": seen}) as sim:

        @sim.task(interval=seconds(3))
        async def inline(context: Context) -> None:
            pass

        sim.override_fixture("db", "fake database")
        await sim.advance(seconds=30)
        sim.assert_executed(uses_db, 3)
        # an interval counts from the previous slot, so with a 5 s poll each run is later than the last
        assert [run.lateness for run in sim.assert_executed(inline, 6)] == [seconds(2 * n) for n in range(1, 7)]
        assert seen == [("fake database", "hi")] * 3
        assert sim.workers[0].app is not app
        assert sim.workers[0].app._poll_interval == seconds(5)
        assert sim.workers[0].app._configuration["batch_size"] == 7
    after = (
        list(app._tasks),
        list(app._fixtures),
        list(app._middlewares),
        app._repository_factory,
        dict(app._configuration),
    )
    assert after == before


async def test_override_fixture_with_an_async_generator_sets_up_and_tears_down() -> None:
    app, _ = _make_app()
    events: list[str] = []

    async def fake_db(app_context: Any) -> AsyncIterator[str]:
        events.append("open")
        yield "fake"
        events.append("close")

    seen: list[tuple[str, str]] = []
    async with Simulation(app, context_items={"greeting": "hi", "seen": seen}) as sim:
        sim.override_fixture("db", fake_db)
        await sim.advance(seconds=10)
        assert seen == [("fake", "hi")]
        assert events == ["open"]
    assert events == ["open", "close"]


async def test_bad_definitions_are_clear_errors() -> None:
    app, _ = _make_app()
    async with Simulation(app) as sim:
        with pytest.raises(KeyError, match=r"unknown fixture 'cache'.*db"):
            sim.override_fixture("cache", 1)
        await sim.advance(seconds=1)
        with pytest.raises(RuntimeError, match="already started"):
            sim.task(interval=seconds(1))
        with pytest.raises(RuntimeError, match="already started"):
            sim.override_fixture("db", 1)
    with pytest.raises(TypeError, match="Pyncette app"):
        Simulation("app:app")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers"):
        Simulation(None, workers=0)


async def test_config_overrides_reach_the_repository(pyncette_store: InMemoryStore) -> None:
    async with Simulation(None, store=pyncette_store, batch_size=2) as sim:

        @sim.dynamic_task()
        async def queue(context: Context) -> None:
            pass

        for name in "abcde":
            await sim.schedule_task(queue, name, interval=seconds(1))
        await sim.advance(seconds=1)
        sim.assert_executed(queue, 5)
        assert sim.store is pyncette_store
        repository = sim.context._repository
        assert repository.batch_size == 2


# -- time -------------------------------------------------------------------------------------------


async def test_advance_forms_and_advance_to(pyncette_app: Simulation) -> None:
    await pyncette_app.advance(datetime.timedelta(minutes=1))
    await pyncette_app.advance(30)
    await pyncette_app.advance(hours=1, seconds=30)
    assert pyncette_app.now == START + datetime.timedelta(hours=1, minutes=2)
    await pyncette_app.advance_to("2019-01-02T00:00:00+01:00")
    assert pyncette_app.now == datetime.datetime(2019, 1, 1, 23, tzinfo=UTC)
    with pytest.raises(TypeError, match="not both"):
        await pyncette_app.advance(1, hours=1)
    with pytest.raises(TypeError, match="needs a duration"):
        await pyncette_app.advance()
    with pytest.raises(TypeError, match="timedelta keywords"):
        await pyncette_app.advance(fortnights=1)
    with pytest.raises(ValueError, match="negative"):
        await pyncette_app.advance(minutes=-1)
    with pytest.raises(ValueError, match="backwards"):
        await pyncette_app.advance_to(START)


async def test_run_until_and_its_timeout(pyncette_app: Simulation) -> None:
    @pyncette_app.task(schedule="*/5 * * * *")
    async def every_5_minutes(context: Context) -> None:
        pass

    await pyncette_app.run_until(lambda sim: len(sim.executions(every_5_minutes)) == 3)
    assert pyncette_app.now == START + datetime.timedelta(minutes=15)
    with pytest.raises(TimeoutError, match=r"(?s)did not hold within 0:10:00.*every_5_minutes"):
        await pyncette_app.run_until(lambda sim: False, timeout=datetime.timedelta(minutes=10))
    assert pyncette_app.now == START + datetime.timedelta(minutes=25)


async def test_run_until_executed(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=datetime.timedelta(hours=1))
    async def hourly(context: Context) -> None:
        await asyncio.sleep(30)

    runs = await pyncette_app.run_until_executed(hourly, times=2)
    assert [run.finished_at for run in runs] == [
        START + datetime.timedelta(hours=1, seconds=30),
        START + datetime.timedelta(hours=2, seconds=30),
    ]
    assert pyncette_app.now == runs[-1].finished_at
    with pytest.raises(TimeoutError, match="'hourly' finished 0 of 1"):
        await pyncette_app.run_until_executed(hourly, timeout=datetime.timedelta(minutes=30))
    with pytest.raises(ValueError, match="times"):
        await pyncette_app.run_until_executed(hourly, times=0)


# -- the journal ----------------------------------------------------------------------------------


async def test_executions_filters_by_task_instance_worker_and_outcome(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(30))
    async def static(context: Context) -> None:
        pass

    @pyncette_app.dynamic_task(failure_mode=FailureMode.COMMIT)
    async def dynamic(context: Context) -> None:
        if context.args.get("fail"):
            raise ValueError("bad input")

    @pyncette_app.partitioned_task(partition_count=4)
    async def sharded(context: Context) -> None:
        pass

    ok = await pyncette_app.schedule_task(dynamic, "ok", interval=seconds(20))
    await pyncette_app.schedule_task(dynamic, "bad", interval=seconds(20), fail=True)
    for name in ("x", "y", "z"):
        await pyncette_app.schedule_task(sharded, name, interval=seconds(60))
    await pyncette_app.advance(minutes=1)

    assert len(pyncette_app.executions(static)) == 2
    assert len(pyncette_app.executions("static")) == 2
    assert len(pyncette_app.executions(dynamic)) == 6
    assert len(pyncette_app.executions("dynamic")) == 6
    assert len(pyncette_app.executions(ok)) == 3
    assert len(pyncette_app.executions("dynamic:ok")) == 3
    assert len(pyncette_app.executions(dynamic, instance="bad")) == 3
    assert [run.error.args for run in pyncette_app.executions(dynamic, outcome=Outcome.FAILED)] == [("bad input",)] * 3
    assert all(run.args == {"fail": True} for run in pyncette_app.executions(dynamic, instance="bad"))
    shard_runs = pyncette_app.executions(sharded)
    assert sorted(run.instance for run in shard_runs) == ["x", "y", "z"]
    assert {run.template for run in shard_runs} == {"sharded"}
    assert all(run.task.startswith("sharded:") for run in shard_runs)
    assert len(pyncette_app.executions(worker="w1")) == len(pyncette_app.executions())
    starts = [run.started_at for run in pyncette_app.executions()]
    assert starts == sorted(starts)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        pyncette_app.executions("nope")
    with pytest.raises(TypeError, match="Outcome"):
        pyncette_app.executions(outcome="failed")  # type: ignore[arg-type]

    foreign = Pyncette()

    @foreign.task(interval=seconds(1))
    async def elsewhere(context: Context) -> None:
        pass

    with pytest.raises(ValueError, match="not part of the simulated app"):
        pyncette_app.executions(elsewhere)


async def test_execution_values_compare_print_and_are_frozen(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(5))
    async def tick(context: Context) -> None:
        await asyncio.sleep(1)

    await pyncette_app.advance(seconds=5)
    running = pyncette_app.executions(tick)
    assert running[0].outcome is Outcome.RUNNING
    assert running[0].finished_at is None
    await pyncette_app.advance(seconds=1)
    (done,) = pyncette_app.executions(tick)
    assert done.outcome is Outcome.SUCCEEDED
    assert done.duration == seconds(1)
    assert done.lateness == datetime.timedelta(0)
    assert done == dataclasses.replace(done)
    assert vars(done).keys() == {field.name for field in dataclasses.fields(Execution)}
    assert done != running[0]
    assert hash(done) == hash(dataclasses.replace(done))
    assert str(done) == "tick on w1: scheduled 2019-01-01 00:00:05, ran 2019-01-01 00:00:05 to 00:00:06, succeeded"
    assert "Execution(task='tick'" in repr(done)
    with pytest.raises(dataclasses.FrozenInstanceError):
        done.outcome = Outcome.FAILED  # type: ignore[misc]


async def test_assert_executed_explains_itself_with_the_timeline(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(10), failure_mode=FailureMode.COMMIT)
    async def flaky(context: Context) -> None:
        if context.scheduled_at.second == 20:
            raise ConnectionError("upstream down")

    await pyncette_app.advance(seconds=30)
    with pytest.raises(AssertionError) as caught:
        pyncette_app.assert_executed(flaky, 3, outcome=Outcome.SUCCEEDED)
    message = str(caught.value)
    assert "expected exactly 3 execution(s) of 'flaky' with outcome succeeded, found 2 (of 3 in all" in message
    assert "2019-01-01 00:00:20" in message
    assert "failed (ConnectionError: upstream down)" in message
    assert "worker" in message and "late" in message

    at = START + seconds(20)
    assert len(pyncette_app.assert_executed(flaky, at=at)) == 1
    assert len(pyncette_app.assert_executed(flaky, 2, at=[at, START + seconds(10)])) == 2
    pyncette_app.assert_executed(flaky, 0, at=START + seconds(5))
    with pytest.raises(AssertionError, match="at least one"):
        pyncette_app.assert_executed(flaky, outcome=Outcome.CANCELLED)
    with pytest.raises(ValueError, match="times"):
        pyncette_app.assert_executed(flaky, -1)


# -- dynamic tasks and queries ----------------------------------------------------------------------


async def test_schedule_unschedule_get_and_list(pyncette_app: Simulation) -> None:
    @pyncette_app.dynamic_task()
    async def reminder(context: Context) -> None:
        pass

    for name in ("a", "b", "c"):
        await pyncette_app.schedule_task(reminder, name, interval=datetime.timedelta(hours=1))
    state = await pyncette_app.get_task(reminder, "b")
    assert state is not None and state.scheduled_at == START + datetime.timedelta(hours=1)
    page = await pyncette_app.list_tasks(reminder, limit=2)
    assert [task.task.name for task in page.tasks] == ["a", "b"]
    rest = await pyncette_app.list_tasks(reminder, limit=2, continuation_token=page.continuation_token)
    assert [task.task.name for task in rest.tasks] == ["c"]
    await pyncette_app.unschedule_task(reminder, "b")
    assert await pyncette_app.get_task(reminder, "b") is None
    assert pyncette_app.context is pyncette_app.workers[0].context
    await pyncette_app.advance(hours=1)
    assert sorted(run.instance for run in pyncette_app.executions(reminder)) == ["a", "c"]
    with pytest.raises(TypeError, match="takes a Task"):
        await pyncette_app.schedule_task("reminder", "x")  # type: ignore[arg-type]


# -- shutdown and misuse ---------------------------------------------------------------------------


async def test_leaving_waits_for_running_executions() -> None:
    async with Simulation(None, start=START) as sim:

        @sim.task(interval=seconds(10))
        async def slow(context: Context) -> None:
            await asyncio.sleep(300)

        await sim.advance(seconds=10)
        assert sim.executions(slow)[0].outcome is Outcome.RUNNING
    (run,) = sim.executions(slow)
    assert run.outcome is Outcome.SUCCEEDED
    assert run.finished_at == START + seconds(310)


async def test_a_simulation_after_shutdown_says_so() -> None:
    async with Simulation(None) as sim:
        pass
    with pytest.raises(RuntimeError, match="has ended"):
        await sim.advance(1)
    with pytest.raises(RuntimeError, match="has ended"):
        sim.context  # noqa: B018
    with pytest.raises(RuntimeError, match="only once"):
        await sim.__aenter__()


def test_an_execution_that_never_finishes_fails_with_simulation_stalled() -> None:
    async def main() -> None:
        async with Simulation(None, start=START, shutdown_timeout=datetime.timedelta(hours=1)) as sim:

            @sim.task(interval=seconds(10))
            async def forever(context: Context) -> None:
                while True:
                    await asyncio.sleep(60)

            await sim.advance(seconds=10)

    loop = VirtualTimeLoop()
    try:
        with pytest.raises(SimulationStalled, match=r"(?s)never finished.*forever"):
            loop.run_until_complete(main())
    finally:
        loop.close()


def test_an_execution_waiting_on_nothing_fails_with_simulation_stalled() -> None:
    async def main() -> None:
        async with Simulation(None, start=START) as sim:

            @sim.task(interval=seconds(10))
            async def stuck(context: Context) -> None:
                await asyncio.Event().wait()

            await sim.advance(seconds=10)

    loop = VirtualTimeLoop(stall_timeout=0.1)
    try:
        with pytest.raises(SimulationStalled, match=r"(?s)stuck"):
            loop.run_until_complete(main())
    finally:
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


def test_simulation_needs_a_virtual_loop() -> None:
    async def main() -> None:
        async with Simulation(None):
            pass

    with pytest.raises(RuntimeError, match=r"needs a VirtualTimeLoop.*@pytest.mark.pyncette"):
        asyncio.run(main())


def test_a_finished_simulation_can_be_collected() -> None:
    async def main() -> tuple[weakref.ref[Simulation], list[Execution]]:
        async with Simulation(None, start=START) as sim:

            @sim.task(interval=seconds(1), failure_mode=FailureMode.COMMIT)
            async def fails(context: Context) -> None:
                local_reference = context  # noqa: F841 - lives in the traceback's frame
                raise ValueError("x")

            await sim.advance(seconds=3)
        return weakref.ref(sim), sim.executions()

    loop = VirtualTimeLoop()
    try:
        ref, executions = loop.run_until_complete(main())
    finally:
        loop.close()
    del loop
    gc.collect()
    assert len(executions) == 3 and all(run.error is not None for run in executions)
    assert ref() is None


# -- simulate() -------------------------------------------------------------------------------------


def test_simulate_runs_an_app_from_synchronous_code() -> None:
    app = Pyncette(poll_interval=datetime.timedelta(minutes=1))

    @app.task(schedule="0 * * * *", failure_mode=FailureMode.COMMIT)
    async def hourly(context: Context) -> None:
        if context.scheduled_at.hour == 3:
            raise RuntimeError("3 am")

    report = simulate(app, datetime.timedelta(hours=6), start=START, workers=2, seed=7)
    assert report.start == START
    assert report.end == START + datetime.timedelta(hours=6)
    summary = report.summary["hourly"]
    assert (summary.runs, summary.succeeded, summary.failed) == (6, 5, 1)
    assert summary.first_start == START + datetime.timedelta(hours=1)
    assert summary.last_start == START + datetime.timedelta(hours=6)
    assert summary.worst_lateness == datetime.timedelta(0)
    assert len(report.executions) == 6
    assert "hourly" in report.timeline()


async def test_simulate_refuses_to_run_inside_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="async with Simulation"):
        simulate(None, 10)


async def test_scheduled_at_reads_in_utc_for_a_task_with_a_timezone(pyncette_app: Simulation) -> None:
    @pyncette_app.task(schedule="0 9 * * *", timezone="Europe/Berlin")
    async def morning(context: Context) -> None:
        pass

    await pyncette_app.advance(days=1)
    (run,) = pyncette_app.executions(morning)
    assert run.scheduled_at.tzinfo is UTC
    assert run.scheduled_at == datetime.datetime(2019, 1, 1, 8, tzinfo=UTC)  # 09:00 in Berlin


def test_restarting_a_worker_set_up_but_not_started_leaves_no_task_behind() -> None:
    # schedule_task before the first advance sets the worker up (its context) without starting it
    app = Pyncette()

    @app.dynamic_task()
    async def job(context: Context) -> None:
        pass

    async def main() -> tuple[int, list[asyncio.Task[Any]]]:
        async with Simulation(app, start=START) as sim:
            await sim.schedule_task(job, "a", interval=seconds(60))
            await sim.workers[0].restart()
            await sim.advance(seconds=90)
            runs = len(sim.executions(job))
        return runs, [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]

    loop = VirtualTimeLoop()
    try:
        runs, left = loop.run_until_complete(main())
    finally:
        loop.close()
    assert runs == 1
    assert left == []


async def test_get_task_and_list_tasks_read_the_store_with_every_worker_crashed(pyncette_app: Simulation) -> None:
    @pyncette_app.dynamic_task()
    async def reminder(context: Context) -> None:
        pass

    await pyncette_app.schedule_task(reminder, "a", interval=seconds(60))
    await pyncette_app.advance(seconds=1)
    await pyncette_app.workers[0].crash()
    listing = await pyncette_app.list_tasks(reminder)
    assert [state.task.name for state in listing.tasks] == ["a"]
    state = await pyncette_app.get_task(reminder, "a")
    assert state is not None and state.scheduled_at == START + seconds(60)
