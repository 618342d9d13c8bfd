"""Idle-tick elision changes nothing observable: random apps, run with and without it, agree.

Compared: every execution (task, instance, worker, scheduled_at, started_at, finished_at,
outcome), each worker's ``last_tick`` and Pyncette's default healthcheck after every step, and
the store's schedules at the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pyncette import Context, ExecutionMode, FailureMode, Pyncette
from pyncette.healthcheck import default_healthcheck

from pyncette_testing import Simulation, VirtualTimeLoop, simulate

UTC = datetime.timezone.utc
START = datetime.datetime(2024, 3, 30, 22, tzinfo=UTC)  # the spring DST change is 3 hours later
EXAMPLES = int(os.environ.get("PYNCETTE_ELISION_EXAMPLES", "25"))
# A real backend pays a round trip per call (and, with elision, a read of the due times after each
# write): fewer and smaller apps there.
REAL_BACKEND_EXAMPLES = int(os.environ.get("PYNCETTE_ELISION_BACKEND_EXAMPLES", "8"))


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    kind: str  # "static", "dynamic", "partitioned"
    schedule: dict[str, Any]
    mode: ExecutionMode
    failure: FailureMode
    lease: float
    duration: float
    fail_one_in: int  # 0: never fails
    spawns: bool  # its body schedules a once-off dynamic instance


@dataclasses.dataclass(frozen=True)
class AppPlan:
    poll_interval: float
    tasks: list[TaskPlan]
    instances: int
    workers: list[float]  # start offsets of the extra workers, in seconds
    steps: list[float]  # advance() chunks, in seconds
    faults: list[tuple[int, tuple[Any, ...]]] = dataclasses.field(default_factory=list)  # (before step, fault)


def schedules(poll: float) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(
            lambda s: {"interval": datetime.timedelta(seconds=s)}, st.sampled_from([1, 2, 3.5, 7, 45, 600, 3600])
        ),
        st.builds(
            lambda cron, tz: {"schedule": cron, "timezone": tz},
            st.sampled_from(["* * * * *", "*/7 * * * *", "30 1 * * *", "0 2,3 * * *", "* * * * * */20"]),
            st.sampled_from([None, "Europe/Ljubljana", "America/New_York"]),
        ),
    )


@st.composite
def task_plans(draw: st.DrawFn, poll: float) -> TaskPlan:
    mode = draw(st.sampled_from(list(ExecutionMode)))
    failure = FailureMode.NONE if mode is ExecutionMode.AT_MOST_ONCE else draw(st.sampled_from(list(FailureMode)))
    lease = draw(st.sampled_from([2, 15, 60, 300]))
    return TaskPlan(
        kind=draw(st.sampled_from(["static", "dynamic", "partitioned"])),
        schedule=draw(schedules(poll)),
        mode=mode,
        failure=failure,
        lease=lease,
        duration=draw(st.sampled_from([0, 0.25, 1, 5, lease * 1.5])),
        fail_one_in=draw(st.sampled_from([0, 0, 2, 3])),
        spawns=draw(st.booleans()),
    )


@st.composite
def app_plans(draw: st.DrawFn, max_ticks: int = 400, max_tasks: int = 4, max_instances: int = 3) -> AppPlan:
    poll = draw(st.sampled_from([0.5, 1, 2.5, 10, 60]))
    tasks = draw(st.lists(task_plans(poll), min_size=1, max_size=max_tasks))
    # bounded in ticks, so that the run without elision stays quick
    total = poll * draw(st.integers(min_value=5, max_value=max_ticks))
    cuts = sorted(draw(st.lists(st.floats(min_value=0, max_value=total), max_size=3)))
    steps = [b - a for a, b in zip([0.0, *cuts], [*cuts, total], strict=True)]
    return AppPlan(
        poll_interval=poll,
        tasks=tasks,
        instances=draw(st.integers(min_value=0, max_value=max_instances)),
        workers=draw(st.lists(st.sampled_from([0.0, 0.3, poll / 2, 7.0]), max_size=2)),
        steps=steps,
        faults=draw(st.lists(st.tuples(st.integers(0, len(steps) - 1), FAULTS), max_size=2)),
    )


# Crashes and freezes of worker #n (modulo the workers there are), outages (duration, from how
# far ahead), failed and slow repository calls, restarts: what a fault plan does to elision.
FAULTS = st.one_of(
    st.tuples(st.just("crash"), st.integers(0, 2), st.sampled_from([0.0, 0.5, 3.0, 61.0])),
    st.tuples(st.just("outage"), st.sampled_from([1.0, 30.0, 200.0]), st.sampled_from([0.0, 2.5, 45.0])),
    st.tuples(
        st.just("fail"), st.sampled_from(["commit_task", "poll_task", "unlock_task", "extend_lease"]), st.integers(1, 3)
    ),
    st.tuples(st.just("delay"), st.sampled_from(["commit_task", "poll_task"]), st.sampled_from([0.5, 5.0])),
    st.tuples(st.just("restart"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("freeze"), st.integers(0, 2), st.sampled_from([0.5, 4.0, 90.0])),
)


async def apply_fault(sim: Simulation, fault: tuple[Any, ...]) -> str:
    """Plan one fault; what refused it (the same with and without elision), else ``"ok"``."""
    kind, first, second = fault
    worker = sim.workers[first % len(sim.workers)] if kind in ("crash", "restart", "freeze") else None
    try:
        if kind == "crash":
            sim.faults.crash(worker, at=sim.now + datetime.timedelta(seconds=second))
        elif kind == "outage":
            sim.faults.outage(first, at=sim.now + datetime.timedelta(seconds=second))
        elif kind == "fail":
            sim.faults.fail(first, times=second)
        elif kind == "delay":
            sim.faults.delay(first, second, times=2)
        elif kind == "freeze":
            worker.freeze(second)
        else:
            await worker.restart()
    except (RuntimeError, ValueError) as refused:
        return f"{type(refused).__name__}: {refused}"
    return "ok"


def _fails(name: str, scheduled_at: datetime.datetime, one_in: int) -> bool:
    digest = hashlib.sha256(f"{name}@{scheduled_at.isoformat()}".encode()).digest()
    return one_in > 0 and digest[0] % one_in == 0


def build_app(plan: AppPlan) -> tuple[Pyncette, list[Any]]:
    app = Pyncette(poll_interval=datetime.timedelta(seconds=plan.poll_interval))
    templates: list[Any] = []

    @app.dynamic_task(execution_mode=ExecutionMode.AT_LEAST_ONCE)
    async def spawned(context: Context) -> None:
        await asyncio.sleep(0.5)

    for index, task in enumerate(plan.tasks):

        async def body(context: Context, task: TaskPlan = task) -> None:
            if task.spawns:
                at = datetime.datetime.now(UTC) + datetime.timedelta(seconds=13)
                name = f"{context.task.canonical_name}@{context.scheduled_at.timestamp():.0f}"
                await context.app_context.schedule_task(spawned, name.replace(":", "_"), execute_at=at)
            if task.duration:
                await asyncio.sleep(task.duration)
            if _fails(context.task.canonical_name, context.scheduled_at, task.fail_one_in):
                raise RuntimeError("planned failure")

        options: dict[str, Any] = {
            "name": f"t{index}",
            "execution_mode": task.mode,
            "failure_mode": task.failure,
            "lease_duration": datetime.timedelta(seconds=task.lease),
        }
        if task.kind == "static":
            app.task(**options, **task.schedule)(body)
        elif task.kind == "dynamic":
            templates.append((app.dynamic_task(**options)(body), task.schedule))
        else:
            templates.append((app.partitioned_task(partition_count=3, **options)(body), task.schedule))
    return app, templates


async def run(plan: AppPlan, elide: bool, backend: str) -> tuple[list[tuple[Any, ...]], list[Any], list[Any]]:
    app, templates = build_app(plan)
    health: list[Any] = []
    async with Simulation(app, start=START, elide_idle_ticks=elide, backend=backend) as sim:
        for template, schedule in templates:
            for number in range(plan.instances):
                await sim.schedule_task(template, f"i{number}", **schedule)
        for offset in plan.workers:
            await sim.advance(offset)
            await sim.add_worker()
        for index, step in enumerate(plan.steps):
            for _, fault in (planned for planned in plan.faults if planned[0] == index):
                health.append(await apply_fault(sim, fault))
            await sim.advance(step)
            for worker in sim.workers:
                context = worker.context
                health.append((worker.name, context.last_tick, await default_healthcheck(context)))
        journal = [
            (e.task, e.instance, e.worker, e.scheduled_at, e.started_at, e.finished_at, e.outcome)
            for e in sim.executions()
        ]
        store = await _stored_schedules(sim, app) if backend != "memory" else _memory_schedules(sim)
    return journal, health, store


def _memory_schedules(sim: Simulation) -> list[tuple[Any, ...]]:
    return [(r.name, r.execute_after, r.locked_until is None) for r in sim.store.snapshot()]


async def _stored_schedules(sim: Simulation, app: Pyncette) -> list[tuple[Any, ...]]:
    """What is stored, read through Pyncette's API (which every backend answers)."""
    states = []
    for task in app._tasks:
        if not task.dynamic:
            states.append(await sim.get_task(task))
            continue
        token = None
        while True:
            page = await sim.list_tasks(task, continuation_token=token)
            states.extend(page.tasks)
            token = page.continuation_token
            if token is None:
                break
    return sorted(
        (state.task.canonical_name, state.scheduled_at, state.locked_until is None)
        for state in states
        if state is not None
    )


def run_on_fresh_loop(
    plan: AppPlan, elide: bool, backend: str = "memory"
) -> tuple[list[tuple[Any, ...]], list[Any], list[Any]]:
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(run(plan, elide, backend))
    finally:
        loop.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(app_plans())
# A second worker whose ticks land exactly on the end of the run: last_tick once came out a tick late.
@example(
    AppPlan(
        poll_interval=10,
        tasks=[
            TaskPlan(
                "static",
                {"interval": datetime.timedelta(seconds=600)},
                ExecutionMode.AT_LEAST_ONCE,
                FailureMode.NONE,
                2,
                0,
                0,
                False,
            ),
            TaskPlan(
                "dynamic",
                {"interval": datetime.timedelta(seconds=1)},
                ExecutionMode.AT_LEAST_ONCE,
                FailureMode.NONE,
                2,
                0,
                0,
                False,
            ),
        ],
        instances=0,
        workers=[0.3],
        steps=[30.340248923601493, 139.6597510763985],
    )
)
def test_elision_changes_nothing_observable(plan: AppPlan) -> None:
    elided = run_on_fresh_loop(plan, elide=True)
    ticked = run_on_fresh_loop(plan, elide=False)
    assert elided[0] == ticked[0], "journals differ"
    assert elided[1] == ticked[1], "last_tick / healthcheck differ"
    assert elided[2] == ticked[2], "final store differs"


@pytest.mark.parametrize("pyncette_backend", ["sqlite", "redis", "postgres"], indirect=True)
@settings(
    max_examples=REAL_BACKEND_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
@given(plan=app_plans(max_ticks=60, max_tasks=3, max_instances=2))
def test_elision_changes_nothing_observable_on_real_backends(pyncette_backend: str, plan: AppPlan) -> None:
    # There the due times are read from the backend itself after each write. Postgres hands out
    # equally due instances in no defined order, so journals are compared as sets per instant.
    elided = run_on_fresh_loop(plan, elide=True, backend=pyncette_backend)
    ticked = run_on_fresh_loop(plan, elide=False, backend=pyncette_backend)
    assert sorted(elided[0], key=repr) == sorted(ticked[0], key=repr), "journals differ"
    assert elided[1] == ticked[1], "last_tick / healthcheck differ"
    assert elided[2] == ticked[2], "final store differs"


def test_elision_skips_the_idle_ticks_of_a_sparse_app() -> None:
    app = Pyncette()

    @app.task(schedule="0 9 * * *")
    async def daily(context: Context) -> None:
        pass

    async def main() -> int:
        async with Simulation(app, start=START) as sim:
            await sim.advance(days=30)
            assert sim._elision is not None
            return sim._elision.elided_ticks

    loop = VirtualTimeLoop()
    try:
        elided = loop.run_until_complete(main())
    finally:
        loop.close()
    # one tick per second for 30 days, all but the ones around the 30 runs skipped
    assert elided > 30 * 86_400 - 200


def test_a_decade_of_a_daily_job() -> None:
    app = Pyncette()

    @app.task(schedule="0 9 * * *", timezone="Europe/Ljubljana")
    async def daily(context: Context) -> None:
        pass

    report = simulate(app, datetime.timedelta(days=3653), start="2020-01-01T00:00:00Z")
    assert report.summary["daily"].runs == 3653
    assert report.summary["daily"].worst_lateness == datetime.timedelta(0)


def test_ticks_while_a_body_sleeps_are_skipped_too() -> None:
    # An hourly job that takes half an hour: its worker's ticks during the run find it locked and
    # are skipped up to the body's own timer, with the same journal, last_tick and healthcheck.
    app = Pyncette(poll_interval=datetime.timedelta(seconds=1))

    @app.task(interval=datetime.timedelta(hours=1), lease_duration=datetime.timedelta(hours=2))
    async def slow(context: Context) -> None:
        await asyncio.sleep(1800)

    async def main(elide: bool) -> tuple[list[Any], list[Any], int]:
        health = []
        async with Simulation(app, start=START, elide_idle_ticks=elide) as sim:
            for _ in range(12):
                await sim.advance(minutes=30, seconds=7)
                context = sim.workers[0].context
                health.append((context.last_tick, await default_healthcheck(context)))
            journal = [(e.scheduled_at, e.started_at, e.finished_at, e.outcome) for e in sim.executions()]
            return journal, health, sim._elision.elided_ticks if sim._elision is not None else 0

    results = {}
    for elide in (True, False):
        loop = VirtualTimeLoop()
        try:
            results[elide] = loop.run_until_complete(main(elide))
        finally:
            loop.close()
    assert results[True][:2] == results[False][:2]
    assert len(results[True][0]) == 6
    # 6 h of 1 s ticks; only those around each start, end and step are left to run
    assert results[True][2] > 6 * 3600 - 6 * 20


def test_a_busy_app_on_a_real_backend_reads_its_due_times_rarely_and_still_skips_once_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every tick of a 1 s task writes, so due times read after each write are stale by the next
    # idle moment: reads back off while they skip nothing, and the first skip starts over.
    from pyncette_testing import elision

    reads = 0
    static_due = elision._static_due

    async def counted(*args: Any) -> float | None:
        nonlocal reads
        reads += 1
        return await static_due(*args)

    monkeypatch.setattr(elision, "_static_due", counted)
    app = Pyncette()

    @app.dynamic_task(interval=datetime.timedelta(seconds=1))
    async def busy(context: Context) -> None:
        pass

    @app.task(schedule="0 * * * *")
    async def hourly(context: Context) -> None:
        pass

    async def main() -> tuple[int, int, int, int]:
        async with Simulation(app, start=START, backend="sqlite") as sim:
            assert sim._elision is not None
            await sim.schedule_task(busy, "only")
            await sim.advance(600)
            busy_reads, busy_elided = reads, sim._elision.elided_ticks
            await sim.unschedule_task(busy, "only")
            await sim.advance(hours=2)
            return busy_reads, busy_elided, sim._elision.elided_ticks, len(sim.executions(hourly))

    loop = VirtualTimeLoop()
    try:
        busy_reads, busy_elided, elided, hourly_runs = loop.run_until_complete(main())
    finally:
        loop.close()
    assert busy_elided == 0  # nothing to skip while the 1 s task runs
    assert busy_reads <= 20  # 600 idle moments: reads at the 1st, 2nd, 4th, ... then every 64th
    assert hourly_runs == 2
    assert elided > 2 * 3600 - 200  # once idle, at most 64 ticks run before skipping resumes
