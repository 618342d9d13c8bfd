"""Failure injection: worker crashes, restarts, freezes, clock skew, repository and lease faults, chaos."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pyncette import Context, ExecutionMode, FailureMode, Pyncette

from pyncette_testing import Outcome, Settlement, Simulation, VirtualTimeLoop, track_io

from .conftest import run_inner

UTC = datetime.timezone.utc
START = datetime.datetime(2024, 1, 1, tzinfo=UTC)
pytestmark = pytest.mark.pyncette(start="2024-01-01T00:00:00Z")


def at(seconds: float) -> datetime.datetime:
    return START + datetime.timedelta(seconds=seconds)


def seconds(n: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=n)


# -- crashes and restarts --------------------------------------------------------------------------


async def test_a_crash_is_kill_minus_9(pyncette_app: Simulation) -> None:
    events: list[str] = []

    @pyncette_app.fixture()
    async def resource(app_context: Any) -> AsyncIterator[str]:
        events.append("fixture set up")
        yield "resource"
        events.append("fixture torn down")

    @pyncette_app.middleware
    async def audit(context: Context, next: Any) -> None:
        try:
            await next()
        finally:
            events.append("middleware finally")

    @pyncette_app.task(interval=seconds(60), lease_duration=seconds(30))
    async def job(context: Context) -> None:
        events.append("body started")
        await asyncio.sleep(20)
        events.append("body finished")

    await pyncette_app.advance(seconds=65)
    worker = pyncette_app.worker("w1")
    await worker.crash()
    assert worker.crashed and worker.stopped and not worker.running
    (run,) = pyncette_app.executions(job)
    assert (run.outcome, run.settlement, run.finished_at) == (Outcome.CRASHED, Settlement.NONE, at(65))

    await pyncette_app.advance(minutes=5)
    assert events == ["fixture set up", "body started"]  # nothing after the crash ever ran
    state = await pyncette_app.get_task(job)
    assert state is not None
    assert state.locked_until == at(60 + 30)  # its lock stays until the lease expires
    assert state.scheduled_at == at(60)
    with pytest.raises(RuntimeError, match="not running"):
        await worker.crash()


async def test_restart_sets_up_fixtures_again_and_runs_again(pyncette_app: Simulation) -> None:
    setups: list[datetime.datetime] = []

    @pyncette_app.fixture()
    async def connection(app_context: Any) -> AsyncIterator[int]:
        setups.append(datetime.datetime.now(UTC))
        yield len(setups)

    @pyncette_app.task(interval=seconds(60), lease_duration=seconds(30))
    async def job(context: Context) -> None:
        await asyncio.sleep(10)

    pyncette_app.faults.crash("w1", during=job, after=seconds(5))
    await pyncette_app.advance(minutes=2)
    worker = pyncette_app.worker("w1")
    assert worker.crashed
    await worker.restart()
    assert worker.running
    await pyncette_app.advance(minutes=2)

    assert setups == [START, at(120)]
    runs = pyncette_app.executions(job)
    assert [(r.scheduled_at, r.started_at, r.outcome) for r in runs] == [
        (at(60), at(60), Outcome.CRASHED),
        (at(60), at(120), Outcome.SUCCEEDED),  # the lease (60 + 30 s) had expired: the slot runs again
        (at(120), at(130), Outcome.SUCCEEDED),  # and the next slot, already due, right after it
        (at(180), at(180), Outcome.SUCCEEDED),
        (at(240), at(240), Outcome.RUNNING),
    ]
    assert [e.kind for e in pyncette_app.events() if e.kind.startswith("worker")] == [
        "worker crashed",
        "worker restarted",
    ]


async def test_planned_crash_at_an_instant_and_exactly_one_reexecution(pyncette_app: Simulation) -> None:
    @pyncette_app.task(schedule="*/10 * * * *", lease_duration=seconds(90))
    async def report(context: Context) -> None:
        await asyncio.sleep(60)

    await pyncette_app.advance(seconds=0.5)
    await pyncette_app.add_worker("w2")
    pyncette_app.faults.crash("w1", at=at(600 + 30))
    await pyncette_app.advance(minutes=19)

    runs = pyncette_app.executions(report)
    assert [(r.worker, r.started_at, r.outcome, r.settlement) for r in runs] == [
        ("w1", at(600), Outcome.CRASHED, Settlement.NONE),
        ("w2", at(600 + 90 + 0.5), Outcome.SUCCEEDED, Settlement.COMMITTED),
    ]


# -- freezes and skew ---------------------------------------------------------------------------


async def test_freeze_pauses_one_worker_while_the_other_goes_on(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(10))
    async def tick(context: Context) -> None:
        await asyncio.sleep(4)

    @pyncette_app.task(interval=seconds(5))
    async def other(context: Context) -> None:
        pass

    await pyncette_app.advance(seconds=0.5)
    await pyncette_app.add_worker("w2")
    await pyncette_app.advance(seconds=9.5)  # t=10: w1 took the run of tick at 10
    pyncette_app.worker("w1").freeze(seconds(30))
    await pyncette_app.advance(seconds=40)

    first = pyncette_app.executions(tick)[0]
    assert (first.worker, first.started_at) == ("w1", at(10))
    assert first.finished_at == at(40)  # its 4 s sleep ended while frozen: it resumes late
    during = [r for r in pyncette_app.executions() if at(10) < r.started_at < at(40)]
    assert during
    assert {r.worker for r in during} == {"w2"}  # the other worker went on
    assert [e.kind for e in pyncette_app.events() if "frozen" in e.kind or "thawed" in e.kind] == [
        "worker frozen",
        "worker thawed",
    ]


async def test_a_worker_frozen_with_a_call_in_another_thread_does_not_hold_time(pyncette_app: Simulation) -> None:
    loop = pyncette_app.clock.loop
    loop.io_timeout = 1.0  # a regression fails fast: time held for the frozen call would stall
    frozen_at: list[float] = []

    @track_io
    async def in_a_thread() -> int:
        return await asyncio.get_running_loop().run_in_executor(None, int, "7")

    @pyncette_app.task(interval=seconds(10))
    async def tick(context: Context) -> None:
        if not frozen_at:  # the first run, on w1 (asserted below)
            frozen_at.append(loop.time())
            pyncette_app.worker("w1").freeze(seconds(30))
        assert await in_a_thread() == 7

    @pyncette_app.task(interval=seconds(5), lease_duration=seconds(2))  # w1 holds its run at 10 briefly
    async def other(context: Context) -> None:
        assert await in_a_thread() == 7

    await pyncette_app.advance(seconds=0.5)
    await pyncette_app.add_worker("w2")
    await pyncette_app.advance(seconds=60)

    first = pyncette_app.executions(tick)[0]
    assert (first.worker, first.started_at, first.finished_at) == ("w1", at(10), at(40))
    during = [r for r in pyncette_app.executions() if at(10) < r.started_at < at(40)]
    assert len(during) >= 5  # other, every 5 s
    assert {r.worker for r in during} == {"w2"}  # the other worker went on
    assert all(r.outcome is Outcome.SUCCEEDED for r in pyncette_app.executions())
    assert loop._in_flight == 0


async def test_clock_skew_makes_a_worker_see_tasks_due_early(pyncette_app: Simulation) -> None:
    @pyncette_app.task(schedule="0 * * * *")
    async def hourly(context: Context) -> None:
        pass

    await pyncette_app.advance(seconds=0.5)
    await pyncette_app.add_worker("fast", clock_skew=datetime.timedelta(minutes=2))
    await pyncette_app.advance(hours=1)
    (run,) = pyncette_app.executions(hourly)
    assert run.worker == "fast"
    assert run.scheduled_at == at(3600)
    assert run.started_at == at(3600 - 120 + 0.5)  # it thinks it is two minutes later
    with pytest.raises(TypeError, match="timedelta"):
        pyncette_app.worker("w1").clock_skew = 5  # type: ignore[assignment]


# -- repository faults --------------------------------------------------------------------------


async def test_fail_counts_filters_by_task_and_worker(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(10))
    async def a(context: Context) -> None:
        pass

    @pyncette_app.task(interval=seconds(10))
    async def b(context: Context) -> None:
        pass

    pyncette_app.faults.fail("commit_task", task=a, times=2, error=TimeoutError("slow store"))
    await pyncette_app.advance(minutes=3)
    a_runs = pyncette_app.executions(a)
    assert [r.settlement for r in a_runs[:3]] == [
        Settlement.COMMIT_FAILED,
        Settlement.COMMIT_FAILED,
        Settlement.COMMITTED,
    ]
    assert a_runs[1].started_at == at(10 + 60)  # retried once the 60 s lease expired
    assert all(r.settlement is Settlement.COMMITTED for r in pyncette_app.executions(b))
    assert len(pyncette_app.events("injected fail")) == 2


async def test_delay_makes_a_call_take_virtual_time(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(10))
    async def job(context: Context) -> None:
        pass

    pyncette_app.faults.delay("commit_task", seconds(3), times=1)
    await pyncette_app.advance(seconds=25)
    assert [e.at for e in pyncette_app.events("lease released")] == [at(13), at(20)]


async def test_lose_ack_applies_the_write_but_raises(pyncette_app: Simulation) -> None:
    @pyncette_app.dynamic_task()
    async def queue(context: Context) -> None:
        pass

    pyncette_app.faults.lose_ack("register_task")
    with pytest.raises(ConnectionError, match="acknowledgement was lost"):
        await pyncette_app.schedule_task(queue, "x", interval=seconds(5))
    assert await pyncette_app.get_task(queue, "x") is not None
    await pyncette_app.advance(seconds=5)
    pyncette_app.assert_executed(queue, 1)


async def test_outage_for_one_worker(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(10))
    async def job(context: Context) -> None:
        pass

    await pyncette_app.advance(seconds=0.5)
    await pyncette_app.add_worker("w2")
    pyncette_app.faults.outage(seconds(60), worker="w1")
    await pyncette_app.advance(seconds=59)
    assert {r.worker for r in pyncette_app.executions(job)} == {"w2"}
    await pyncette_app.advance(seconds=2)
    assert [e.kind for e in pyncette_app.events() if e.kind.startswith("outage")] == ["outage started", "outage ended"]


# -- lease faults ---------------------------------------------------------------------------------


async def test_expire_lease_lets_another_run_start_and_refuses_the_first_commit(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=datetime.timedelta(hours=1), lease_duration=seconds(600))
    async def long(context: Context) -> None:
        await asyncio.sleep(30)

    await pyncette_app.advance(hours=1, seconds=10)
    pyncette_app.faults.expire_lease(long)
    await pyncette_app.advance(minutes=1)
    first, second = pyncette_app.executions(long)
    assert second.started_at == at(3600 + 11)  # the next tick took it
    assert (first.settlement, second.settlement) == (Settlement.LEASE_LOST, Settlement.COMMITTED)
    assert pyncette_app.events("lease expired")[0].at == at(3610)


async def test_steal_lease(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=datetime.timedelta(hours=1), lease_duration=seconds(60))
    async def job(context: Context) -> None:
        await asyncio.sleep(30)

    await pyncette_app.add_worker("w2")
    await pyncette_app.advance(hours=1, seconds=10)
    pyncette_app.faults.steal_lease(job, by="w2")
    await pyncette_app.advance(minutes=1)
    (run, *_) = pyncette_app.executions(job)
    assert run.settlement is Settlement.LEASE_LOST
    (event,) = pyncette_app.events("lease stolen")
    assert (event.worker, event.task, event.at) == ("w2", "job", at(3610))


async def test_lease_faults_need_a_lease(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=datetime.timedelta(hours=1), execution_mode=ExecutionMode.AT_MOST_ONCE)
    async def job(context: Context) -> None:
        pass

    await pyncette_app.advance(seconds=1)
    with pytest.raises(ValueError, match="holds no lease"):
        pyncette_app.faults.expire_lease(job)
    with pytest.raises(ValueError, match="no task 'nope'"):
        pyncette_app.faults.steal_lease("nope", by="w1")


# -- chaos -------------------------------------------------------------------------------------------


def _chaos_journal(seed: int) -> list[tuple[Any, ...]]:
    app = Pyncette()

    @app.task(interval=seconds(7), failure_mode=FailureMode.UNLOCK, lease_duration=seconds(20))
    async def job(context: Context) -> None:
        await asyncio.sleep(2)

    @app.dynamic_task()
    async def queue(context: Context) -> None:
        await asyncio.sleep(1)

    async def main() -> list[tuple[Any, ...]]:
        async with Simulation(app, start=START, seed=seed) as sim:
            for name in "abc":
                await sim.schedule_task(queue, name, interval=seconds(11))
            await sim.add_worker("w2")
            sim.faults.chaos(0.2)
            await sim.advance(minutes=3)
            return [
                (e.task, e.worker, e.started_at, e.finished_at, e.outcome, e.settlement) for e in sim.executions()
            ] + [(e.at, e.kind, e.worker, e.task, e.detail) for e in sim.events() if e.kind.startswith("chaos")]

    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


@pytest.mark.filterwarnings("ignore")
def test_chaos_with_a_fixed_seed_gives_the_identical_journal_20_times() -> None:
    first = _chaos_journal(seed=42)
    assert any(row[1] == "chaos failure" for row in first if len(row) == 5)
    for _ in range(19):
        assert _chaos_journal(seed=42) == first
    assert _chaos_journal(seed=43) != first


def test_a_failing_chaos_test_prints_its_seed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_it="""
        import pytest

        @pytest.mark.pyncette(seed=1234)
        async def test_it(pyncette_app):
            pyncette_app.faults.chaos(0.5)
            assert False
        """
    )
    result = run_inner(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*pyncette chaos*", "*seed 1234*--pyncette-seed 1234*"])


# -- bad requests -------------------------------------------------------------------------------------


async def test_bad_fault_requests_are_clear_errors(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=seconds(10))
    async def job(context: Context) -> None:
        pass

    faults = pyncette_app.faults
    with pytest.raises(ValueError, match=r"unknown repository operation 'poll'.*poll_task"):
        faults.fail("poll")
    with pytest.raises(KeyError, match="unknown worker 'w9'"):
        faults.fail("poll_task", worker="w9")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        faults.fail("poll_task", task="nope")
    with pytest.raises(ValueError, match="times must be a positive int"):
        faults.fail("poll_task", times=0)
    with pytest.raises(ValueError, match="negative"):
        faults.delay("commit_task", -1)
    with pytest.raises(ValueError, match="negative"):
        faults.outage(seconds(-5))
    with pytest.raises(ValueError, match=r"probability must be a number in \[0, 1\]"):
        faults.chaos(1.5)
    with pytest.raises(ValueError, match=r"exactly one of at= .* and during="):
        faults.crash("w1")
    await pyncette_app.advance(seconds=10)
    with pytest.raises(ValueError, match="in the past"):
        faults.crash("w1", at=START)
    with pytest.raises(TypeError, match="exception instance"):
        faults.fail("poll_task", error="boom")  # type: ignore[arg-type]
    assert pyncette_app.executions(job)  # nothing above broke the simulation


async def test_count_faults_on_polls_keep_every_tick(pyncette_app: Simulation) -> None:
    @pyncette_app.task(interval=datetime.timedelta(minutes=1))
    async def job(context: Context) -> None:
        pass

    pyncette_app.faults.fail("poll_task", times=100)
    await pyncette_app.advance(minutes=3)
    # every one-second tick's poll failed until 100 were used up, so the task was first stored at
    # 100 s, due a minute later
    assert [r.started_at for r in pyncette_app.executions(job)] == [at(160)]
