"""The hypothesis strategies: everything they generate is accepted by Pyncette, and shrinks simply."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any, ClassVar

import dateutil.tz
import pytest
from croniter import croniter
from hypothesis import find, given, settings
from hypothesis import strategies as st
from pyncette import Context, Pyncette
from pyncette.task import Task

from pyncette_testing import Simulation, VirtualTimeLoop
from pyncette_testing.strategies import (
    FaultPlan,
    PyncetteStateMachine,
    at_most_once,
    cron_expressions,
    eventually_runs,
    execute_at_times,
    fault_plans,
    intervals,
    no_lost_dynamic_instances,
    no_overlapping_runs,
    runs_on_schedule,
    task_options,
    timezones,
)

UTC = datetime.timezone.utc
START = datetime.datetime(2024, 1, 1, tzinfo=UTC)


async def noop(context: Context) -> None:
    pass


@given(cron_expressions(), timezones(), task_options())
def test_generated_cron_tasks_are_accepted_and_always_have_a_next_run(
    expression: str, zone: str, options: dict
) -> None:
    task = Task(name="t", func=noop, schedule=expression, timezone=zone, **options)
    first = task.get_next_execution(START, None)
    assert first is not None and first > START
    second = task.get_next_execution(START, first)
    assert second is not None and second > first
    assert croniter.is_valid(expression)


@given(intervals(datetime.timedelta(seconds=5), datetime.timedelta(hours=2)), execute_at_times(START))
def test_intervals_and_execute_at_times(interval: datetime.timedelta, when: datetime.datetime) -> None:
    assert datetime.timedelta(seconds=5) <= interval <= datetime.timedelta(hours=2)
    template = Task(name="d", func=noop, dynamic=True)
    instance = template.instantiate("i", execute_at=when)
    assert instance.get_next_execution(START, None) == when
    assert Task(name="s", func=noop, interval=interval).get_next_execution(START, None) == START + interval


@given(timezones())
def test_timezones_are_known(zone: str) -> None:
    assert dateutil.tz.gettz(zone) is not None


def test_strategies_shrink_to_the_simplest_case() -> None:
    assert find(cron_expressions(seconds=False), lambda _: True) == "* * * * *"
    assert find(intervals(), lambda _: True) == datetime.timedelta(seconds=1)
    assert find(timezones(), lambda _: True) == "UTC"
    assert find(fault_plans(("w1", "w2")), lambda _: True) == FaultPlan()
    options = find(task_options(), lambda _: True)
    assert options["execution_mode"].name == "AT_LEAST_ONCE" and options["failure_mode"].name == "NONE"
    crash = find(fault_plans(("w1", "w2")), lambda plan: bool(plan.crashes))
    assert crash == FaultPlan(crashes=(("w1", datetime.timedelta(0)),))


def test_bad_strategy_arguments() -> None:
    with pytest.raises(ValueError, match="0 < min_value"):
        intervals(datetime.timedelta(0))
    with pytest.raises(ValueError, match="unknown operations"):
        fault_plans(operations=["explode"])


@settings(max_examples=15)
@given(fault_plans(("w1", "w2"), horizon=datetime.timedelta(minutes=10)))
def test_fault_plans_apply_to_a_simulation(plan: FaultPlan) -> None:
    app = Pyncette()

    @app.task(interval=datetime.timedelta(minutes=5))
    async def job(context: Context) -> None:
        await asyncio.sleep(1)

    async def main() -> tuple[int, int, int]:
        async with Simulation(app, start=START, workers=2) as sim:
            await sim.start()
            plan.apply(sim)
            await sim.advance(minutes=15)
            crashes = len(sim.events("worker crashed"))
            outages = len(sim.events("outage started"))
            return crashes, outages, len(sim.executions(job))

    loop = VirtualTimeLoop()
    try:
        crashes, outages, runs = loop.run_until_complete(main())
    finally:
        loop.close()
    assert (crashes, outages) == (len(plan.crashes), len(plan.outages))
    if len(plan.crashes) < 2 and not plan.failures and not plan.outages:
        assert runs >= 3  # someone is left to run it at 5, 10 and 15 minutes
    assert str(plan)


def test_the_invariants_pass_and_fail_with_a_timeline() -> None:
    app = Pyncette()

    @app.task(interval=datetime.timedelta(minutes=1), lease_duration=datetime.timedelta(seconds=20))
    async def slow(context: Context) -> None:
        await asyncio.sleep(30)  # outlives its lease: runs overlap

    @app.dynamic_task()
    async def once(context: Context) -> None:
        pass

    messages: list[str] = []

    async def main() -> list[str]:
        failures = []
        async with Simulation(app, start=START) as sim:
            await sim.schedule_task(once, "a", execute_at=START + datetime.timedelta(seconds=30))
            await sim.advance(minutes=3)
            checks = {
                "no_overlapping_runs": no_overlapping_runs(slow),
                "runs_on_schedule": runs_on_schedule(slow, datetime.timedelta(seconds=5)),
                "at_most_once": at_most_once(slow),
                "eventually_runs": eventually_runs(slow, datetime.timedelta(minutes=2)),
                "no_lost_dynamic_instances": no_lost_dynamic_instances(),
            }
            for name, check in checks.items():
                try:
                    check(sim)
                except AssertionError as error:
                    failures.append(name)
                    messages.append(str(error))
        return failures

    loop = VirtualTimeLoop()
    try:
        failures = loop.run_until_complete(main())
    finally:
        loop.close()
    # the lease expires at +20 s, so the same slot runs again while the first run goes on
    assert failures == ["runs_on_schedule", "at_most_once"]
    assert all("Timeline:" in message for message in messages)


@given(st.data())
def test_no_lost_dynamic_instances_catches_a_deleted_recurring_instance(data: st.DataObject) -> None:
    app = Pyncette()

    @app.dynamic_task()
    async def recurring(context: Context) -> None:
        pass

    async def main() -> bool:
        async with Simulation(app, start=START) as sim:
            await sim.schedule_task(recurring, "r", interval=datetime.timedelta(minutes=1))
            sim.store._delete("recurring:r")  # a bug that loses it
            try:
                no_lost_dynamic_instances()(sim)
            except AssertionError:
                return True
            return False

    loop = VirtualTimeLoop()
    try:
        assert loop.run_until_complete(main())
    finally:
        loop.close()


class Reminders(PyncetteStateMachine):
    """The kit's own rules, dynamic instances included, keep the journal invariants."""

    app = Pyncette()
    instances: ClassVar[dict[str, Any]] = {
        "reminder": st.one_of(
            intervals(datetime.timedelta(seconds=30), datetime.timedelta(hours=2)).map(lambda i: {"interval": i}),
            cron_expressions(seconds=False).map(lambda c: {"schedule": c}),
            execute_at_times(START, datetime.timedelta(hours=3)).map(lambda t: {"execute_at": t}),
        )
    }
    fault_kinds = ("crash", "restart")
    checks = (no_lost_dynamic_instances(),)


@Reminders.app.dynamic_task()
async def reminder(context: Context) -> None:
    await asyncio.sleep(1)


TestReminders = Reminders.TestCase
TestReminders.settings = settings(max_examples=25, stateful_step_count=10, deadline=None)
