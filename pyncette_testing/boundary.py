"""The one boundary between a simulated worker and the store, and the journal's middleware.

Every cross-cutting concern sits here: a crashed incarnation's calls are refused, clock skew shifts
``utc_now``, planned faults apply, lease changes become events, and each execution is journaled with
how it was settled.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from pyncette.model import (
    Context,
    ContinuationToken,
    ExecutionMode,
    FailureMode,
    Lease,
    PollResponse,
    QueryResponse,
    ResultType,
)
from pyncette.repository import Repository
from pyncette.task import Task

from .clock import VirtualClock
from .journal import Journal, Outcome, Settlement, _Entry
from .loop import TASK_GROUP
from .repository import _RepositoryProxy

if TYPE_CHECKING:
    from .simulation import Simulation
    from .worker import Worker

__all__: list[str] = []

# What backends cache on Task objects, which every process of a real cluster has its own copy of.
_TASK_CACHES = ("_last_lease",)
# The calls that settle an execution's lease.
_SETTLING = frozenset({"commit_task", "unlock_task"})
_SETTLED = "settled"  # an execution's lease key once its commit or unlock went through


# -- the repository boundary ----------------------------------------------------------------------------


class _SimulationRepository(_RepositoryProxy):
    """What each worker's Pyncette talks to: the backend's repository, seen through the simulation.

    The one boundary for every cross-cutting concern: a crashed incarnation's calls are refused,
    the worker's clock skew shifts ``utc_now``, planned faults apply, and the journal learns how
    each execution was settled and how leases changed hands.
    """

    def __init__(self, inner: Repository, simulation: Simulation, worker: Worker, group: object) -> None:
        super().__init__(inner)
        self._simulation = simulation
        self._worker = worker
        self._group = group
        self._task_caches: dict[str, dict[str, Any]] = {}

    async def _call(self, operation: str, *args: Any) -> Any:
        simulation = self._simulation
        worker = self._worker
        if worker._group is not self._group:
            raise ConnectionError(f"worker {worker.name} crashed: this incarnation can no longer reach the store")
        utc_now, task = args[0], args[1]
        if worker._clock_skew:
            args = (utc_now + worker._clock_skew, *args[1:])
        faults = simulation.faults
        lease = _lease_key(args[2]) if operation in _SETTLING else None
        entry = simulation._by_lease.pop(lease, None) if lease is not None else None
        try:
            if faults.armed:
                await faults.before(operation, worker.name, task)
            if simulation._is_memory:
                holds = entry is not None and self._holds_lease_in_memory(task.canonical_name, lease)
                result = await getattr(self._inner, operation)(*args)
            else:
                holds, result = await self._call_backend(operation, args, entry is not None, lease)
        except Exception:
            if entry is not None:
                entry.settlement = Settlement.COMMIT_FAILED
            raise
        if entry is not None:
            self._settled(entry, operation, task, holds)
        elif operation == "poll_task" and isinstance(result, PollResponse):
            self._polled(task, result)
        elif operation == "extend_lease" and result is None:
            simulation._event("lease lost", worker.name, task, "extend_lease refused")
        if operation == "register_task":
            simulation._scheduled_instances[task.canonical_name] = task.execute_at is not None
        elif operation == "unregister_task":
            simulation._scheduled_instances.pop(task.canonical_name, None)
        if faults.armed:
            faults.after(operation, worker.name, task)
        return result

    def _settled(self, entry: _Entry, operation: str, task: Task | str, holds: bool) -> None:
        """A commit or unlock of ``entry``'s lease went through: journal how it was settled."""
        commit = operation == "commit_task"
        # No longer needed once settled: dropping it halves what each past execution leaves for the
        # garbage collector to walk (a UUID is a tracked object) on long simulations.
        entry.lease = _SETTLED
        if holds:
            entry.settlement = Settlement.COMMITTED if commit else Settlement.UNLOCKED
            self._simulation._event("lease released", self._worker.name, task, "committed" if commit else "unlocked")
        else:
            entry.settlement = Settlement.LEASE_LOST
            self._simulation._event(
                "lease lost", self._worker.name, task, f"{'commit' if commit else 'unlock'} refused"
            )

    def _polled(self, task: Task, result: PollResponse) -> None:
        if result.result == ResultType.READY and task.execution_mode == ExecutionMode.AT_LEAST_ONCE:
            self._simulation._event("lease taken", self._worker.name, task)

    # -- the calls on every tick and every execution: straight to the in-memory store ----------------
    #
    # On the in-memory store, with no fault planned, a call needs none of _call's generic work: these
    # make it directly and do only the journal's bookkeeping.

    def _direct(self, utc_now: datetime.datetime) -> datetime.datetime | None:
        """``utc_now`` as this worker sees it, if the call can go straight to the store; else None."""
        simulation, worker = self._simulation, self._worker
        if not simulation._is_memory or simulation.faults.armed or worker._group is not self._group:
            return None
        skew = worker._clock_skew
        return utc_now + skew if skew else utc_now

    def poll_dynamic_task(
        self, utc_now: datetime.datetime, task: Task, continuation_token: ContinuationToken | None = None
    ) -> Coroutine[Any, Any, QueryResponse]:
        # Pyncette makes this call for every task on every tick: there is nothing to record about it.
        now = self._direct(utc_now)
        if now is not None:
            return self._inner.poll_dynamic_task(now, task, continuation_token)
        return self._call("poll_dynamic_task", utc_now, task, continuation_token)

    def poll_task(
        self, utc_now: datetime.datetime, task: Task, lease: Lease | None = None
    ) -> Coroutine[Any, Any, PollResponse]:
        now = self._direct(utc_now)
        if now is not None:
            return self._poll_in_memory(now, task, lease)
        return self._call("poll_task", utc_now, task, lease)

    def commit_task(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> Coroutine[Any, Any, None]:
        now = self._direct(utc_now)
        if now is not None:
            return self._settle_in_memory("commit_task", now, task, lease)
        return self._call("commit_task", utc_now, task, lease)

    def unlock_task(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> Coroutine[Any, Any, None]:
        now = self._direct(utc_now)
        if now is not None:
            return self._settle_in_memory("unlock_task", now, task, lease)
        return self._call("unlock_task", utc_now, task, lease)

    async def _poll_in_memory(self, utc_now: datetime.datetime, task: Task, lease: Lease | None) -> PollResponse:
        result = await self._inner.poll_task(utc_now, task, lease)
        self._polled(task, result)
        return result

    async def _settle_in_memory(self, operation: str, utc_now: datetime.datetime, task: Task, lease: Lease) -> None:
        entry = self._simulation._by_lease.pop(_lease_key(lease), None)
        if entry is None:  # not an execution's lease: nothing to journal
            return await getattr(self._inner, operation)(utc_now, task, lease)  # type: ignore[no-any-return]
        name = entry.task  # the canonical name, as the journal took it when the run started
        holds = self._holds_lease_in_memory(name, lease)
        try:
            await getattr(self._inner, operation)(utc_now, task, lease)
        except Exception:
            entry.settlement = Settlement.COMMIT_FAILED
            raise
        self._settled(entry, operation, name, holds)

    @contextlib.contextmanager
    def _own_task_state(self, task: Task | None) -> Iterator[None]:
        """Give ``task`` this worker's own copy of what a backend caches on task objects.

        Pyncette's redis backend keeps the last lease on the Task (``task._last_lease``) to save a
        round trip. In a real cluster every process has its own Task objects; here the workers
        share the app's, so each worker's cache is swapped in for its call and out afterwards.
        """
        if task is None:
            yield
            return
        attributes = vars(task)
        theirs = {name: attributes.pop(name) for name in _TASK_CACHES if name in attributes}
        attributes.update(self._task_caches.get(task.canonical_name, {}))
        try:
            yield
        finally:
            self._task_caches[task.canonical_name] = {
                name: attributes.pop(name) for name in _TASK_CACHES if name in attributes
            }
            attributes.update(theirs)

    async def _call_backend(
        self, operation: str, args: tuple[Any, ...], settles: bool, lease: object
    ) -> tuple[bool, Any]:
        """A call to a real backend: ``_inner`` runs it on the backend's own loop while the
        virtual loop waits, so it is atomic in virtual time, as on the in-memory store, and a run
        never depends on how fast the server answers (see ``backend_loop``)."""
        task, due_times, result = args[1], self._simulation._due_times, None
        try:
            with self._own_task_state(task):
                holds = settles and await self._holds_lease(args[0], task, lease)
                result = await getattr(self._inner, operation)(*args)
        finally:
            if due_times is not None:
                due_times.after(operation, task, result)
        return holds, result

    def _holds_lease_in_memory(self, name: str, key: object) -> bool:
        """Whether the stored lock of the task named ``name`` is the lease with this :func:`_lease_key`."""
        row = self._simulation._store._row(name)
        return row is not None and row.locked_by == str(key)

    async def _holds_lease(self, utc_now: datetime.datetime, task: Task, key: object) -> bool:
        state = await self._inner.get_task_state(utc_now, task)
        return state is not None and str(state.locked_by) == str(key)


def _lease_key(lease: object) -> object:
    """What identifies a lease for the whole execution. Memory, sqlite and postgres leases are
    UUIDs, kept as they are (hashing one is cheaper than formatting it). Redis leases are records
    whose version changes on every heartbeat; their ``locked_by`` stays the same throughout."""
    if isinstance(lease, (str, uuid.UUID)):
        return lease
    return str(getattr(lease, "locked_by", lease))


# -- the journal's middleware ---------------------------------------------------------------------


def _recording_middleware(
    journal: Journal,
    clock: VirtualClock,
    worker: str,
    by_lease: dict[object, _Entry],
    started: Callable[[str, Task], None],
    crash_plans: list[Any],
) -> Callable[[Context, Callable[[], Awaitable[None]]], Awaitable[None]]:
    """The first middleware of every worker: journals each execution. It closes over the journal
    and the clock only, so that tracebacks kept in the journal never keep a simulation alive."""

    loop = clock.loop
    entries = journal.entries

    async def record_execution(context: Context, next: Callable[[], Awaitable[None]]) -> None:
        task = context.task
        parent = task.parent_task
        args = context.args
        entry = _Entry(
            task.canonical_name,
            None if parent is None else parent.name,
            None if parent is None else task.name,
            worker,
            context.scheduled_at,
            loop._now,
            dict(args) if args else {},
            TASK_GROUP.get(),
        )
        entries.append(entry)
        if task.execution_mode == ExecutionMode.AT_MOST_ONCE:
            entry.settlement = Settlement.NOT_APPLICABLE
        elif context._lease is not None:
            entry.lease = _lease_key(context._lease)
            entry.lease_duration = task.lease_duration.total_seconds()
            by_lease[entry.lease] = entry
        if crash_plans:  # a crash planned during some task's run: is it this one?
            started(worker, task)
        try:
            await next()
        except asyncio.CancelledError:
            entry.finish(Outcome.CANCELLED, loop.time())
            raise
        except BaseException as error:
            entry.finish(Outcome.FAILED, loop.time(), error)
            if task.execution_mode == ExecutionMode.AT_LEAST_ONCE and task.failure_mode == FailureMode.NONE:
                entry.settlement = Settlement.LEFT_LOCKED
            raise
        else:
            entry.finish(Outcome.SUCCEEDED, loop.time())
        finally:
            # Pyncette bails out without a commit when heartbeating lost the lease.
            if entry.lease is not None and context._lease is None and entry.outcome is not Outcome.CRASHED:
                entry.settlement = Settlement.LEASE_LOST

    return record_execution
