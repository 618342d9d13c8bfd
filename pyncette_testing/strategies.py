"""Hypothesis strategies for Pyncette apps, and a stateful test kit (``pip install pyncette-testing[hypothesis]``).

Everything generated is accepted by Pyncette and shrinks toward the simplest case: ``* * * * *``,
the shortest interval, UTC, AT_LEAST_ONCE with no failure handling, an empty fault plan.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from hypothesis import note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pyncette import ExecutionMode, FailureMode, Pyncette
from pyncette.errors import TaskLockedException
from pyncette.task import Task

from .faults import OPERATIONS
from .journal import Execution, Outcome, render_timeline
from .loop import VirtualTimeLoop
from .simulation import Simulation, _close_loop
from .target import templates

__all__ = [
    "FaultPlan",
    "PyncetteStateMachine",
    "at_most_once",
    "cron_expressions",
    "eventually_runs",
    "execute_at_times",
    "fault_plans",
    "intervals",
    "no_lost_dynamic_instances",
    "no_overlapping_runs",
    "runs_on_schedule",
    "task_options",
    "timezones",
]

UTC = datetime.timezone.utc
_MONTHS = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"]
_DAYS = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"]
ZONES = (
    "UTC",
    "Europe/Ljubljana",
    "America/New_York",
    "Australia/Sydney",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Pacific/Chatham",
)
"""UTC first (so it is what shrinking lands on), then zones with and without daylight saving."""


def _field(low: int, high: int, names: Sequence[str] = ()) -> st.SearchStrategy[str]:
    number = st.integers(low, high)
    value = st.one_of(number.map(str), st.sampled_from(list(names))) if names else number.map(str)
    ranges = st.tuples(number, number).map(sorted).map(lambda pair: f"{pair[0]}-{pair[1]}")
    step = st.integers(1, max(1, (high - low) // 2))
    return st.one_of(
        st.just("*"),
        step.map(lambda n: f"*/{n}"),
        value,
        ranges,
        st.tuples(ranges, step).map(lambda pair: f"{pair[0]}/{pair[1]}"),
        st.lists(number, min_size=2, max_size=4, unique=True).map(lambda values: ",".join(map(str, sorted(values)))),
    )


@st.composite
def cron_expressions(draw: st.DrawFn, *, seconds: bool | None = None) -> str:
    """Valid 5-field (or, with ``seconds``, 6-field) cron expressions that always have a next run.

    Ranges, steps, lists and month/day names; ``L`` (last day of the month) and ``#`` (the n-th
    weekday) where croniter accepts them. Days of the month stop at 28 so that every expression
    fires in every month.
    """
    minute = draw(_field(0, 59))
    hour = draw(_field(0, 23))
    day = draw(st.one_of(_field(1, 28), st.just("L")))
    month = draw(_field(1, 12, _MONTHS))
    weekday = draw(
        st.one_of(_field(0, 6, _DAYS), st.tuples(st.integers(0, 6), st.integers(1, 4)).map(lambda p: f"{p[0]}#{p[1]}"))
    )
    if day != "*" and weekday != "*":
        weekday = "*"  # both restricted means "either" in cron: legal, but rarely what a schedule means
    fields = [minute, hour, day, month, weekday]
    with_seconds = draw(st.booleans()) if seconds is None else seconds
    if with_seconds:
        fields.append(draw(_field(0, 59)))
    return " ".join(fields)


def intervals(
    min_value: datetime.timedelta = datetime.timedelta(seconds=1),
    max_value: datetime.timedelta = datetime.timedelta(days=1),
) -> st.SearchStrategy[datetime.timedelta]:
    """Intervals in whole seconds between ``min_value`` and ``max_value``."""
    if min_value <= datetime.timedelta(0) or max_value < min_value:
        raise ValueError(f"need 0 < min_value <= max_value, got {min_value!r} and {max_value!r}")
    low, high = int(min_value.total_seconds()), int(max_value.total_seconds())
    return st.integers(max(low, 1), high).map(lambda n: datetime.timedelta(seconds=n))


def timezones() -> st.SearchStrategy[str]:
    """IANA zone names, UTC first, including zones that observe daylight saving."""
    return st.sampled_from(ZONES)


def execute_at_times(
    start: datetime.datetime = datetime.datetime(2024, 1, 1, tzinfo=UTC),
    horizon: datetime.timedelta = datetime.timedelta(days=2),
) -> st.SearchStrategy[datetime.datetime]:
    """Aware instants in ``[start, start + horizon]``, to the second."""
    return st.integers(0, int(horizon.total_seconds())).map(lambda n: start + datetime.timedelta(seconds=n))


@st.composite
def task_options(draw: st.DrawFn) -> dict[str, Any]:
    """``execution_mode``, ``failure_mode`` and ``lease_duration`` as Pyncette validates them
    (AT_MOST_ONCE goes with FailureMode.NONE only)."""
    mode = draw(st.sampled_from([ExecutionMode.AT_LEAST_ONCE, ExecutionMode.AT_MOST_ONCE]))
    failure = draw(st.sampled_from(list(FailureMode)))  # always drawn, so that shrinking keeps AT_LEAST_ONCE
    if mode is ExecutionMode.AT_MOST_ONCE:
        failure = FailureMode.NONE
    lease = draw(st.integers(1, 600).map(lambda n: datetime.timedelta(seconds=n)))
    return {"execution_mode": mode, "failure_mode": failure, "lease_duration": lease}


# -- fault plans -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """Crashes, repository failures and outages at offsets from the start of a simulation."""

    crashes: tuple[tuple[str, datetime.timedelta], ...] = ()
    failures: tuple[tuple[str, int], ...] = ()
    outages: tuple[tuple[datetime.timedelta, datetime.timedelta], ...] = ()

    def apply(self, simulation: Simulation) -> None:
        """Plan every fault on ``simulation`` (offsets count from its current instant)."""
        now = simulation.now
        for worker, offset in self.crashes:
            simulation.faults.crash(worker, at=now + offset)
        for operation, times in self.failures:
            simulation.faults.fail(operation, times=times)
        for offset, duration in self.outages:
            simulation.faults.outage(duration, at=now + offset)

    def __str__(self) -> str:
        parts = [f"crash {w} at +{o}" for w, o in self.crashes]
        parts += [f"fail {op} x{n}" for op, n in self.failures]
        parts += [f"outage at +{o} for {d}" for o, d in self.outages]
        return "; ".join(parts) or "no faults"


def fault_plans(
    workers: Sequence[str] = ("w1",),
    horizon: datetime.timedelta = datetime.timedelta(hours=1),
    operations: Sequence[str] = OPERATIONS,
) -> st.SearchStrategy[FaultPlan]:
    """Fault plans within ``horizon``: each worker crashes at most once."""
    unknown = set(operations) - set(OPERATIONS)
    if unknown:
        raise ValueError(f"unknown operations {sorted(unknown)}; choose from {', '.join(OPERATIONS)}")
    offsets = st.integers(0, int(horizon.total_seconds())).map(lambda n: datetime.timedelta(seconds=n))
    crashes = st.lists(
        st.tuples(st.sampled_from(list(workers)), offsets), max_size=len(workers), unique_by=lambda c: c[0]
    )
    failures = st.lists(st.tuples(st.sampled_from(list(operations)), st.integers(1, 3)), max_size=3)
    outages = st.lists(st.tuples(offsets, st.integers(1, 600).map(lambda n: datetime.timedelta(seconds=n))), max_size=2)
    return st.builds(
        lambda c, f, o: FaultPlan(tuple(c), tuple(f), tuple(o)),
        crashes,
        failures,
        outages,
    )


# -- invariants over the journal ------------------------------------------------------------------------

Check = Callable[[Simulation], None]


def _fail(simulation: Simulation, message: str, runs: Sequence[Execution]) -> None:
    raise AssertionError(
        f"{message}\nTimeline:\n{render_timeline(runs)}\nEvents:\n"
        + "\n".join(f"  {e}" for e in simulation.events() if not e.kind.startswith("lease "))
    )


def no_overlapping_runs(task: Task | str) -> Check:
    """No two executions of ``task`` (of one instance) overlap, unless the earlier one lost its lease."""

    def check(simulation: Simulation) -> None:
        runs = simulation.executions(task)
        by_task: dict[str, list[Execution]] = {}
        for run in runs:
            by_task.setdefault(run.task, []).append(run)
        for same in by_task.values():
            for earlier, later in itertools.pairwise(same):
                end = earlier.finished_at or simulation.now
                lost = earlier.outcome is Outcome.CRASHED or earlier.settlement.name in (
                    "LEASE_LOST",
                    "LEFT_LOCKED",
                    "COMMIT_FAILED",
                )
                if later.started_at < end and not lost:
                    _fail(
                        simulation,
                        f"{later.task} started at {later.started_at} while the run from {earlier.started_at} still held its lease",
                        same,
                    )

    return check


def runs_on_schedule(task: Task | str, tolerance: datetime.timedelta) -> Check:
    """Every execution of ``task`` starts within ``tolerance`` of its scheduled instant."""

    def check(simulation: Simulation) -> None:
        late = [run for run in simulation.executions(task) if run.lateness > tolerance]
        if late:
            _fail(
                simulation,
                f"{len(late)} run(s) of {late[0].task} started more than {tolerance} late",
                simulation.executions(task),
            )

    return check


def at_most_once(task: Task | str) -> Check:
    """No scheduled instant of ``task`` (per instance) runs twice, whatever the outcome."""

    def check(simulation: Simulation) -> None:
        seen: dict[tuple[str, datetime.datetime], Execution] = {}
        for run in simulation.executions(task):
            key = (run.task, run.scheduled_at)
            if key in seen:
                _fail(simulation, f"{run.task} ran twice for its slot {run.scheduled_at}", simulation.executions(task))
            seen[key] = run

    return check


def eventually_runs(task: Task | str, within: datetime.timedelta) -> Check:
    """After the last fault, ``task`` succeeds within ``within`` (checked once that much time passed)."""

    def check(simulation: Simulation) -> None:
        faults = [event.at for event in simulation.events() if not event.kind.startswith("lease ")]
        since = max(faults, default=simulation.clock.start)
        if simulation.now - since < within:
            return
        if not any(run.started_at >= since and run.outcome is Outcome.SUCCEEDED for run in simulation.executions(task)):
            _fail(
                simulation,
                f"no successful run of {task if isinstance(task, str) else task.canonical_name} within {within} after the last fault",
                simulation.executions(task),
            )

    return check


def no_lost_dynamic_instances() -> Check:
    """Every dynamic instance that was scheduled is still stored, or ran to its end (once-off)."""

    def check(simulation: Simulation) -> None:
        stored = {record.name for record in simulation.store.snapshot()}
        for name, once_off in simulation._scheduled_instances.items():
            if name in stored:
                continue
            ran = [run for run in simulation.executions() if run.task == name and run.outcome is not Outcome.RUNNING]
            if not (once_off and ran):
                _fail(simulation, f"dynamic instance {name} disappeared without running to its end", ran)

    return check


# -- the stateful kit --------------------------------------------------------------------------------------


class PyncetteStateMachine(RuleBasedStateMachine):
    """Subclass with your app; hypothesis then searches for the schedule of time, crashes and storage
    faults that breaks an invariant. Each example runs on its own virtual loop and in-memory store.

    Set ``app`` (a ``Pyncette``), optionally ``workers``, ``start``, ``poll_interval``, and
    ``checks``: a list of invariant functions (``no_overlapping_runs(task)``, ...). Add your own
    ``@rule``\\ s and ``@invariant``\\ s; ``self.simulation`` is the running ``Simulation``.
    """

    app: ClassVar[Pyncette | None] = None
    workers: ClassVar[int] = 2
    start: ClassVar[datetime.datetime] = datetime.datetime(2024, 1, 1, tzinfo=UTC)
    poll_interval: ClassVar[datetime.timedelta | None] = None
    checks: ClassVar[Sequence[Check]] = ()
    fault_kinds: ClassVar[Sequence[str]] = ("crash", "restart", "storage")
    """Which built-in fault rules run: ``crash`` (now, or during a run), ``restart``, ``storage``."""
    instances: ClassVar[Mapping[str, st.SearchStrategy[dict[str, Any]]]] = {}
    """Dynamic templates (by name) to schedule and unschedule instances of, each with a strategy
    of schedule keywords, e.g. ``{"reminder": st.builds(lambda i: {"interval": i}, intervals())}``."""
    instance_names: ClassVar[Sequence[str]] = ("i0", "i1", "i2")

    def __init__(self) -> None:
        super().__init__()
        if self.app is None:
            raise TypeError(f"{type(self).__name__}.app must be set to the Pyncette app under test")
        self.loop = VirtualTimeLoop()
        self.simulation = Simulation(self.app, start=self.start, workers=self.workers, poll_interval=self.poll_interval)
        self.run(self.simulation.__aenter__())
        self.run(self.simulation.start())
        self.plan: list[str] = []

    def run(self, awaitable: Any) -> Any:
        """Run a coroutine on this example's virtual loop."""
        return self.loop.run_until_complete(awaitable)

    def _note(self, step: str) -> None:
        self.plan.append(f"{self.simulation.now.isoformat()}: {step}")

    @rule(seconds=st.sampled_from([1, 5, 30, 60, 300, 1800, 3600, 4 * 3600, 86400]))
    def advance(self, seconds: int) -> None:
        """Time moves on: seconds to a day (on a rough log scale, so that hourly and daily
        schedules come due within a few steps)."""
        self.run(self.simulation.advance(seconds))

    @precondition(lambda self: "crash" in self.fault_kinds)
    @rule(index=st.integers(0, 7))
    def crash_worker(self, index: int) -> None:
        running = [worker for worker in self.simulation.workers if worker.running]
        if len(running) > 1:  # keep one worker up, so that work can go on
            worker = running[index % len(running)]
            self._note(f"crash {worker.name}")
            self.run(worker.crash())

    @precondition(lambda self: "crash" in self.fault_kinds)
    @rule(index=st.integers(0, 7), task=st.integers(0, 15), after=st.sampled_from([0, 1, 2, 5, 10, 30, 60, 120]))
    def crash_during_a_run(self, index: int, task: int, after: int) -> None:
        """Crash a worker ``after`` seconds into its next run of one of the app's tasks."""
        names = sorted(templates(self.simulation.workers[0].app))
        running = [worker for worker in self.simulation.workers if worker.running]
        if names and len(running) > 1:
            worker, name = running[index % len(running)], names[task % len(names)]
            self._note(f"crash {worker.name} {after} s into its next run of {name}")
            self.simulation.faults.crash(worker.name, during=name, after=after)

    @precondition(lambda self: "restart" in self.fault_kinds)
    @rule(index=st.integers(0, 7))
    def restart_worker(self, index: int) -> None:
        stopped = [worker for worker in self.simulation.workers if worker.crashed]
        if stopped:
            worker = stopped[index % len(stopped)]
            self._note(f"restart {worker.name}")
            self.run(worker.restart())

    @precondition(lambda self: "storage" in self.fault_kinds)
    @rule(
        operation=st.sampled_from(["commit_task", "poll_task", "extend_lease", "unlock_task"]), times=st.integers(1, 3)
    )
    def inject_fault(self, operation: str, times: int) -> None:
        self._note(f"fail {operation} x{times}")
        self.simulation.faults.fail(operation, times=times)

    def _template(self, name: str) -> Task:
        owner = templates(self.simulation.workers[0].app).get(name)
        if owner is not None and owner.dynamic:
            return owner
        raise KeyError(f"{type(self).__name__}.instances names {name!r}, which is not a dynamic task of the app")

    @precondition(lambda self: bool(self.instances))
    @rule(data=st.data())
    def schedule_instance(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.instances)), label="template")
        instance = data.draw(st.sampled_from(list(self.instance_names)), label="instance")
        keywords = data.draw(self.instances[name], label="schedule")
        if not self._someone_running():
            return
        self._note(f"schedule {name}:{instance} {keywords}")
        try:
            self.run(self.simulation.schedule_task(self._template(name), instance, **keywords))
        except (TaskLockedException, ConnectionError) as error:
            self._note(f"  refused: {error}")  # Pyncette's answer while it runs, or a storage fault

    @precondition(lambda self: bool(self.instances))
    @rule(data=st.data())
    def unschedule_instance(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.instances)), label="template")
        instance = data.draw(st.sampled_from(list(self.instance_names)), label="instance")
        if not self._someone_running():
            return
        self._note(f"unschedule {name}:{instance}")
        try:
            self.run(self.simulation.unschedule_task(self._template(name), instance))
        except ConnectionError as error:
            self._note(f"  refused: {error}")

    def _someone_running(self) -> bool:
        # Planned crashes can take every worker down; the app's calls need a live worker.
        return any(worker.running for worker in self.simulation.workers)

    @invariant()
    def journal_invariants(self) -> None:
        for check in self.checks:
            try:
                check(self.simulation)
            except AssertionError:
                note("Fault plan:\n" + ("\n".join(f"  {step}" for step in self.plan) or "  no faults"))
                raise

    def teardown(self) -> None:
        try:
            self.run(self.simulation.shutdown())
        finally:
            _close_loop(self.loop)
