"""Planned faults: crashes, repository failures and delays, lost acknowledgements, outages, lease
faults and seeded chaos. Every one takes effect at a virtual instant, is journaled as an event, and
is reproducible. Repository faults act at the one boundary between Pyncette and its repository.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pyncette.task import Task

from .backends import force_lease
from .clock import to_seconds, to_utc
from .journal import Outcome, Settlement
from .loop import detached_call_at

if TYPE_CHECKING:
    from .simulation import Simulation, Worker

__all__ = ["OPERATIONS", "Faults"]

OPERATIONS = (
    "poll_task",
    "poll_dynamic_task",
    "commit_task",
    "unlock_task",
    "extend_lease",
    "register_task",
    "unregister_task",
    "get_task_state",
    "list_task_states",
)
"""The ``Repository`` operations a fault can target."""

_POLLS = frozenset({"poll_task", "poll_dynamic_task"})

chaos_seeds_used: list[int] = []
"""Seeds of the chaos runs since the pytest plugin last cleared it (it reports them on failure)."""


def _check_operation(operation: str) -> str:
    if operation not in OPERATIONS:
        raise ValueError(f"unknown repository operation {operation!r}; choose from: {', '.join(OPERATIONS)}")
    return operation


def _check_times(times: int | None, *, allow_none: bool) -> int | None:
    if times is None and allow_none:
        return None
    if isinstance(times, bool) or not isinstance(times, int) or times < 1:
        raise ValueError(f"times must be a positive int{' or None (every call)' if allow_none else ''}, got {times!r}")
    return times


def task_label(task: Task | str) -> str:
    if isinstance(task, str):
        return task
    if isinstance(task, Task):
        return task.canonical_name
    raise TypeError(f"task must be a Task or a task name, got {type(task).__name__}")


def task_matches(wanted: str | None, task: Task | None) -> bool:
    """Whether ``task`` (a static task, a template or an instance) is, or belongs to, ``wanted``."""
    if wanted is None:
        return True
    if task is None:
        return False
    while task is not None:
        if wanted in (task.canonical_name, task.name):
            return True
        task = task.parent_task
    return False


@dataclasses.dataclass
class _Rule:
    kind: str  # "fail", "delay", "lose_ack"
    operation: str
    task: str | None
    worker: str | None
    remaining: int | None  # None: every matching call
    error: BaseException | None = None
    delay: float = 0.0

    def applies(self, operation: str, worker: str, task: Task | None) -> bool:
        return (
            self.operation == operation
            and (self.remaining is None or self.remaining > 0)
            and (self.worker is None or self.worker == worker)
            and task_matches(self.task, task)
        )

    def use(self) -> None:
        if self.remaining is not None:
            self.remaining -= 1

    def __str__(self) -> str:
        scope = "".join([f" task={self.task}" if self.task else "", f" worker={self.worker}" if self.worker else ""])
        return f"{self.kind} {self.operation}{scope}"


@dataclasses.dataclass
class _Outage:
    start: float
    end: float
    worker: str | None


class Faults:
    """``sim.faults``: plan what goes wrong, and when."""

    def __init__(self, simulation: Simulation) -> None:
        self._simulation = simulation
        self._rules: list[_Rule] = []
        self._outages: list[_Outage] = []
        self._crash_plans: list[tuple[str, str, float]] = []  # (worker, task, after seconds)
        self._chaos: tuple[float, frozenset[str], random.Random] | None = None
        self.chaos_seed: int | None = None
        self.armed = False  # any repository fault planned: the boundary checks only then

    def __repr__(self) -> str:
        return f"<Faults: {len(self._rules)} rule(s), {len(self._outages)} outage(s), chaos={self._chaos is not None}>"

    # -- crashes ----------------------------------------------------------------------------------

    def crash(
        self,
        worker: Worker | str,
        *,
        at: datetime.datetime | str | None = None,
        during: Task | str | None = None,
        after: datetime.timedelta | float = datetime.timedelta(0),
    ) -> None:
        """Crash ``worker`` at the instant ``at``, or ``after`` into its next run of ``during``."""
        name = self._worker_name(worker)
        delay = to_seconds(after, what="after")
        if (at is None) == (during is None):
            raise ValueError("crash() takes exactly one of at= (an instant) and during= (a task)")
        if during is not None:
            self._simulation._task_matcher(during)  # unknown task: a clear error now
            self._crash_plans.append((name, task_label(during), delay))
            return
        if delay:
            raise ValueError("after= goes with during=; for a crash at an instant give at= alone")
        self._at(to_utc(at, what="at"), lambda: self._simulation.worker(name)._crash_now("planned crash"))

    def _execution_started(self, worker: str, task: Task) -> None:
        for plan in list(self._crash_plans):
            name, wanted, delay = plan
            if name == worker and task_matches(wanted, task):
                self._crash_plans.remove(plan)
                target = self._simulation.worker(name)
                loop = self._simulation.clock.loop
                detached_call_at(loop, loop.time() + delay, target._crash_now, f"crash during {task.canonical_name}")

    # -- repository faults --------------------------------------------------------------------------

    def fail(
        self,
        operation: str,
        *,
        task: Task | str | None = None,
        worker: Worker | str | None = None,
        times: int = 1,
        error: BaseException | None = None,
    ) -> None:
        """The next ``times`` matching ``operation`` calls raise ``error`` (default ``ConnectionError``)."""
        if error is not None and not isinstance(error, BaseException):
            raise TypeError(f"error must be an exception instance, got {error!r}")
        self._add(
            _Rule(
                "fail",
                _check_operation(operation),
                *self._scope(task, worker),
                _check_times(times, allow_none=False),
                error or ConnectionError(f"injected failure of {operation}"),
            )
        )

    def delay(
        self,
        operation: str,
        by: datetime.timedelta | float,
        *,
        task: Task | str | None = None,
        worker: Worker | str | None = None,
        times: int | None = None,
    ) -> None:
        """Matching ``operation`` calls take ``by`` of virtual time (every one, or the next ``times``)."""
        seconds = to_seconds(by, what="by")
        self._add(
            _Rule(
                "delay",
                _check_operation(operation),
                *self._scope(task, worker),
                _check_times(times, allow_none=True),
                delay=seconds,
            )
        )

    def lose_ack(
        self,
        operation: str,
        *,
        task: Task | str | None = None,
        worker: Worker | str | None = None,
        times: int = 1,
    ) -> None:
        """The next ``times`` matching calls are applied, but the caller sees a ``ConnectionError``."""
        self._add(
            _Rule(
                "lose_ack",
                _check_operation(operation),
                *self._scope(task, worker),
                _check_times(times, allow_none=False),
            )
        )

    def outage(
        self,
        duration: datetime.timedelta | float,
        *,
        worker: Worker | str | None = None,
        at: datetime.datetime | str | None = None,
    ) -> None:
        """Every repository call (of ``worker``, or of all) raises ``ConnectionError`` for ``duration``,
        from ``at`` (default: now)."""
        seconds = to_seconds(duration, what="outage duration")
        name = None if worker is None else self._worker_name(worker)
        loop = self._simulation.clock.loop
        start = loop.time() if at is None else self._loop_time(to_utc(at, what="at"))
        outage = _Outage(start, start + seconds, name)
        self._outages.append(outage)
        self.armed = True
        scope = f" worker={name}" if name else ""
        # Timers at both ends: the events land at their instants, and idle ticks inside the
        # window are never elided (a failing tick does not update last_tick).
        detached_call_at(
            loop,
            start,
            self._journal,
            "outage started",
            name,
            None,
            f"for {datetime.timedelta(seconds=seconds)}{scope}",
        )
        detached_call_at(loop, outage.end, self._journal, "outage ended", name, None, scope.strip())

    # -- lease faults -------------------------------------------------------------------------------

    def expire_lease(self, task: Task | str) -> None:
        """The lease on ``task`` (a running execution's) expires now: the next poll can take it."""
        name = task_label(task)
        if self._simulation._is_memory:
            row, _ = self._locked_row(task)
            store = self._simulation.store
            now = self._simulation.now.timestamp()
            store._update(row, execute_after=row.execute_after, locked_until=now, locked_by=row.locked_by)
            store._changed()
        else:
            self._check_leased(name)
            self._write_lease(name, self._simulation.now, None)
        self._journal("lease expired", None, name, "forced")

    def steal_lease(self, task: Task | str, by: Worker | str) -> None:
        """Another worker takes the lease on ``task``: the running execution's commit will be refused."""
        thief = self._worker_name(by)
        name = task_label(task)
        lease_duration = self._lease_duration(name)
        if self._simulation._is_memory:
            row, _ = self._locked_row(task)
            store = self._simulation.store
            store._update(
                row,
                execute_after=row.execute_after,
                locked_until=self._simulation.now.timestamp() + lease_duration,
                locked_by=str(uuid.uuid4()),
            )
            store._changed()
        else:
            self._check_leased(name)
            until = self._simulation.now + datetime.timedelta(seconds=lease_duration)
            self._write_lease(name, until, str(uuid.uuid4()))
        self._journal("lease stolen", thief, name, f"by {thief}")

    # -- chaos --------------------------------------------------------------------------------------

    def chaos(self, probability: float, *, operations: Iterable[str] | None = None, seed: int | None = None) -> None:
        """Every matching repository call fails with ``probability``, drawn from a generator seeded
        with ``seed`` (default: the simulation's seed), so a run replays exactly."""
        if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not 0 <= probability <= 1:
            raise ValueError(f"probability must be a number in [0, 1], got {probability!r}")
        chosen = frozenset(_check_operation(op) for op in (operations if operations is not None else OPERATIONS))
        if not chosen:
            raise ValueError("operations must name at least one repository operation")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.chaos_seed = self._simulation.seed if seed is None else seed
        chaos_seeds_used.append(self.chaos_seed)
        self._chaos = (float(probability), chosen, random.Random(self.chaos_seed))
        self.armed = True
        self._journal(
            "chaos", None, None, f"p={probability} seed={self.chaos_seed} operations={','.join(sorted(chosen))}"
        )

    # -- applied by the repository boundary ---------------------------------------------------------

    async def before(self, operation: str, worker: str, task: Task | None) -> None:
        now = self._simulation.clock.loop.time()
        for outage in self._outages:
            if outage.start <= now < outage.end and (outage.worker is None or outage.worker == worker):
                raise ConnectionError(f"storage outage ({operation})")
        if self._chaos is not None:
            probability, operations, generator = self._chaos
            if operation in operations and generator.random() < probability:
                self._journal("chaos failure", worker, _name(task), operation)
                raise ConnectionError(f"chaos: {operation} failed")
        for rule in self._rules:
            if rule.kind in ("fail", "delay") and rule.applies(operation, worker, task):
                rule.use()
                self._journal(f"injected {rule.kind}", worker, _name(task), operation)
                if rule.kind == "fail":
                    assert rule.error is not None
                    raise rule.error
                await asyncio.sleep(rule.delay)

    def after(self, operation: str, worker: str, task: Task | None) -> None:
        for rule in self._rules:
            if rule.kind == "lose_ack" and rule.applies(operation, worker, task):
                rule.use()
                self._journal("acknowledgement lost", worker, _name(task), operation)
                raise ConnectionError(f"{operation} was applied, but its acknowledgement was lost")

    def blocks_elision(self) -> bool:
        """Whether skipping idle ticks could change what happens: a fault counts or slows polls, or
        a storage outage is on (its ticks fail, and a failed tick leaves ``last_tick`` alone)."""
        if not self.armed:
            return False
        if self._chaos is not None and self._chaos[1] & _POLLS:
            return True
        if self._outages:
            now = self._simulation.clock.loop.time()
            if any(outage.start <= now < outage.end for outage in self._outages):
                return True
        return any(rule.operation in _POLLS and (rule.remaining is None or rule.remaining > 0) for rule in self._rules)

    # -- helpers ------------------------------------------------------------------------------------

    def _add(self, rule: _Rule) -> None:
        self._rules.append(rule)
        self.armed = True
        self._journal("fault planned", rule.worker, rule.task, str(rule))

    def _scope(self, task: Task | str | None, worker: Worker | str | None) -> tuple[str | None, str | None]:
        name = None
        if task is not None:
            self._simulation._task_matcher(task)
            name = task_label(task)
        return name, (None if worker is None else self._worker_name(worker))

    def _worker_name(self, worker: Worker | str) -> str:
        name = worker if isinstance(worker, str) else getattr(worker, "name", None)
        if not isinstance(name, str):
            raise TypeError(f"worker must be a Worker or a worker name, got {worker!r}")
        self._simulation.worker(name)  # unknown worker: KeyError naming the known ones
        return name

    def _locked_row(self, task: Task | str) -> tuple[Any, str]:
        name = task_label(task)
        store = self._simulation.store
        row = store._row(name)
        if row is None:
            raise ValueError(_NO_TASK.format(name=name))
        if row.locked_until is None or row.locked_until <= self._simulation.now.timestamp():
            raise ValueError(_NO_LEASE.format(name=name))
        return row, name

    def _check_leased(self, name: str) -> None:
        """On a real backend, whose store cannot be read synchronously: the journal must show an
        execution of ``name`` whose lease still holds (running, or crashed with its lease unexpired)."""
        simulation = self._simulation
        entries = [entry for entry in simulation._journal.entries if entry.task == name]
        if not entries and name not in simulation._scheduled_instances and name not in simulation._static_names():
            raise ValueError(_NO_TASK.format(name=name))
        now = simulation.clock.loop.time()
        for entry in entries:
            if entry.lease is None or entry.settlement is not Settlement.NONE:
                continue
            if entry.outcome is Outcome.RUNNING or (
                entry.outcome is Outcome.CRASHED and entry.started_at + (entry.lease_duration or 0.0) > now
            ):
                return
        raise ValueError(_NO_LEASE.format(name=name))

    def _write_lease(self, name: str, locked_until: datetime.datetime, locked_by: str | None) -> None:
        """Write the lease on a real backend now, before any later repository call."""
        simulation = self._simulation
        backend = simulation._isolated.name if simulation._isolated is not None else None
        if backend not in ("sqlite", "redis", "postgres"):
            raise NotImplementedError(
                "lease faults write the stored lease directly, which works on memory, sqlite, redis and postgres, "
                "not on a custom repository factory"
            )

        admin = simulation._backend_admin()
        admin.backend.run(force_lease(admin.inner, name, locked_until, locked_by, new_holder=bool(locked_by)))
        if simulation._due_times is not None:
            simulation._due_times.after("lease fault", None, None)

    def _lease_duration(self, name: str) -> float:
        for entry in reversed(self._simulation._journal.entries):
            if entry.task == name and entry.lease_duration is not None:
                return entry.lease_duration
        return 60.0

    def _at(self, when: datetime.datetime, action: Callable[[], None]) -> None:
        if when < self._simulation.now:
            raise ValueError(
                f"cannot plan a fault in the past: {when.isoformat()} is before now ({self._simulation.now.isoformat()})"
            )
        loop = self._simulation.clock.loop
        detached_call_at(loop, self._loop_time(when), action)

    def _loop_time(self, when: datetime.datetime) -> float:
        clock = self._simulation.clock
        return clock.loop.time() + max(0.0, (when - clock.now()).total_seconds())

    def _journal(self, kind: str, worker: str | None, task: str | None, detail: str = "") -> None:
        self._simulation._event(kind, worker, task, detail)


# What the lease faults say, whether the store is read directly (memory) or the journal is (real backends).
_NO_TASK = "no task {name!r} in the store; give a static task or a concrete dynamic instance"
_NO_LEASE = "task {name!r} holds no lease now; lease faults act on a running AT_LEAST_ONCE execution"


def _name(task: Task | None) -> str | None:
    return None if task is None else task.canonical_name
