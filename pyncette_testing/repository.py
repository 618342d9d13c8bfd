"""``InMemoryRepository``: Pyncette's ``Repository`` on an ``InMemoryStore``.

Every method reproduces the observable behaviour of Pyncette's own ``SqliteRepository`` (results,
leases, raised exceptions, quirks included, such as the ``"None"`` string it stores as ``locked_by``
after a commit), except where redis and postgres agree against it: a cleared lease reads ``None``
in the ``TaskState`` it returns. Methods never ``await`` between reading and writing the store, so concurrent
workers on one event loop never see a half-applied change.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from pyncette.errors import PyncetteException, TaskLockedException
from pyncette.model import (
    ContinuationToken,
    ExecutionMode,
    Lease,
    ListTasksResponse,
    PollResponse,
    QueryResponse,
    ResultType,
    TaskState,
)
from pyncette.repository import Repository
from pyncette.task import Task

from .store import InMemoryStore, _Row
from .store import _to_datetime as _datetime

__all__ = ["InMemoryRepository", "memory_repository"]

logger = logging.getLogger(__name__)

# poll_dynamic_task's token only says "poll again": the next query skips what this one locked.
_POLL_AGAIN = ContinuationToken(object())


def _timestamp(value: datetime.datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _check_now(utc_now: datetime.datetime) -> float:
    if not isinstance(utc_now, datetime.datetime):
        raise TypeError(f"utc_now must be an aware datetime, got {utc_now!r}")
    if utc_now.utcoffset() is None:
        raise ValueError(f"utc_now must be timezone-aware, got naive {utc_now!r}; use datetime.now(timezone.utc)")
    return utc_now.timestamp()


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"Batch size must be greater than 0 (got {batch_size}); use batch_size=1 or more")
    return batch_size


class InMemoryRepository(Repository):
    """A Pyncette ``Repository`` backed by an :class:`InMemoryStore`."""

    def __init__(self, store: InMemoryStore | None = None, *, batch_size: int = 100) -> None:
        if store is None:
            store = InMemoryStore()
        elif not isinstance(store, InMemoryStore):
            raise TypeError(f"store must be an InMemoryStore, got {type(store).__name__}")
        self._store = store
        self._batch_size = _check_batch_size(batch_size)

    @property
    def store(self) -> InMemoryStore:
        return self._store

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def __repr__(self) -> str:
        return f"<InMemoryRepository batch_size={self._batch_size} store={self._store!r}>"

    async def poll_dynamic_task(
        self,
        utc_now: datetime.datetime,
        task: Task,
        continuation_token: ContinuationToken | None = None,
    ) -> QueryResponse:
        now = _check_now(utc_now)
        rows = self._store._due_rows(task.canonical_name, now, self._batch_size)
        if not rows:
            return QueryResponse(tasks=[], continuation_token=None)
        locked_by = uuid.uuid4()
        locked_until = _timestamp(utc_now + task.lease_duration)
        concrete_tasks = [task.instantiate_from_spec(json.loads(row.spec or "null")) for row in rows]
        for row in rows:
            self._store._update(
                row, execute_after=row.execute_after, locked_until=locked_until, locked_by=str(locked_by)
            )
        self._store._changed()
        return QueryResponse(
            tasks=[(concrete_task, Lease(locked_by)) for concrete_task in concrete_tasks],
            continuation_token=_POLL_AGAIN if len(concrete_tasks) == self._batch_size else None,
        )

    async def register_task(self, utc_now: datetime.datetime, task: Task, force: bool = False) -> None:
        _check_now(utc_now)
        if task.parent_task is None:
            raise ValueError(
                f"register_task takes a concrete dynamic task instance, not {task.canonical_name!r}; use task.instantiate(name, ...)"
            )
        new_execute_after = task.get_next_execution(utc_now, None)
        spec = json.dumps(task.as_spec())
        row = self._store._row(task.canonical_name)
        if row is None:
            self._store._insert(
                task.canonical_name, task.parent_task.canonical_name, _timestamp(new_execute_after), spec
            )
        else:
            locked_until = _datetime(row.locked_until)
            if not force and locked_until is not None and locked_until > utc_now:
                raise TaskLockedException(task, locked_until)
            if force:
                execute_after, new_locked_until, locked_by = new_execute_after, None, None
            else:
                existing = _datetime(row.execute_after)
                if existing is not None and new_execute_after is not None:
                    execute_after = min(existing, new_execute_after)
                else:
                    execute_after = new_execute_after or existing
                new_locked_until, locked_by = locked_until, row.locked_by
            self._store._update(
                row,
                execute_after=_timestamp(execute_after),
                locked_until=_timestamp(new_locked_until),
                locked_by=locked_by,
                spec=spec,
            )
        self._store._changed()

    async def unregister_task(self, utc_now: datetime.datetime, task: Task) -> None:
        _check_now(utc_now)
        if task.canonical_name in self._store:
            self._store._delete(task.canonical_name)
            self._store._changed()

    async def poll_task(self, utc_now: datetime.datetime, task: Task, lease: Lease | None = None) -> PollResponse:
        _check_now(utc_now)
        row = self._store._row(task.canonical_name)
        locked_by: Any
        if row is None:
            # Static tasks are created on first poll; dynamic instances must be registered, so
            # that a stray poll cannot resurrect a deleted one.
            if task.parent_task is not None:
                raise PyncetteException("Task not found")
            locked_until, locked_by = None, None
            execute_after = task.get_next_execution(utc_now, None)
            row = self._store._insert(task.canonical_name, None, _timestamp(execute_after))
            self._store._changed()
        else:
            execute_after = _datetime(row.execute_after)
            locked_until = _datetime(row.locked_until)
            locked_by = row.locked_by

        if execute_after is None:
            raise AssertionError(f"Task {task.canonical_name} has no execute_after")
        scheduled_at = execute_after

        if locked_until is not None and locked_until > utc_now and str(lease) != locked_by:
            result = ResultType.LOCKED
        elif execute_after <= utc_now and task.execution_mode == ExecutionMode.AT_MOST_ONCE:
            result = ResultType.READY
            locked_by = None
            self._update_record(row, None, None, task.get_next_execution(utc_now, execute_after))
        elif execute_after <= utc_now and task.execution_mode == ExecutionMode.AT_LEAST_ONCE:
            result = ResultType.READY
            locked_by = uuid.uuid4()
            self._update_record(row, utc_now + task.lease_duration, locked_by, execute_after)
        else:
            result = ResultType.PENDING

        return PollResponse(result=result, scheduled_at=scheduled_at, lease=locked_by)

    async def commit_task(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> None:
        _check_now(utc_now)
        row = self._store._row(task.canonical_name)
        if row is None:
            logger.warning(f"Task {task} not found, skipping.")
            return
        if row.locked_by != str(lease):
            logger.warning(f"Lease lost on task {task}, skipping.")
            return
        # As in sqlite: a zero timestamp reads as "no previous execution".
        execute_after = _datetime(row.execute_after) if row.execute_after else None
        self._update_record(row, None, None, task.get_next_execution(utc_now, execute_after))

    async def extend_lease(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> Lease | None:
        _check_now(utc_now)
        row = self._store._row(task.canonical_name)
        if row is None or row.locked_by != str(lease):
            return None
        self._store._update(
            row,
            execute_after=row.execute_after,
            locked_until=_timestamp(utc_now + task.lease_duration),
            locked_by=row.locked_by,
        )
        self._store._changed()
        return lease

    async def unlock_task(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> None:
        _check_now(utc_now)
        row = self._store._row(task.canonical_name)
        if row is None or row.locked_by != str(lease):
            return
        self._store._update(row, execute_after=row.execute_after, locked_until=None, locked_by=None)
        self._store._changed()

    async def get_task_state(self, utc_now: datetime.datetime, task: Task) -> TaskState | None:
        _check_now(utc_now)
        row = self._store._row(task.canonical_name)
        if row is None:
            return None
        if task.parent_task is not None:
            spec = json.loads(row.spec) if row.spec else None
            if not spec:
                raise PyncetteException(f"Task {task.canonical_name} has no task_spec stored")
            instantiated_task = task.parent_task.instantiate_from_spec(spec)
        else:
            instantiated_task = task
        return self._task_state(instantiated_task, row)

    async def list_task_states(
        self,
        utc_now: datetime.datetime,
        parent_task: Task,
        limit: int | None = None,
        continuation_token: ContinuationToken | None = None,
    ) -> ListTasksResponse:
        _check_now(utc_now)
        if limit is None:
            limit = self._batch_size
        elif isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            # Deliberate: sqlite answers limit <= 0 with an empty page and no token, which reads
            # as "no instances"; a clear error is better than that silent wrong answer.
            raise ValueError(f"limit must be a positive int or None, got {limit!r}")
        if continuation_token is not None and not isinstance(continuation_token, str):
            raise ValueError(
                f"continuation_token must be the token of a previous list_task_states call, got {continuation_token!r}"
            )

        rows = self._store._children(parent_task.canonical_name, continuation_token, limit + 1)
        has_more = len(rows) > limit
        rows = rows[:limit]
        tasks = []
        for row in rows:
            spec = json.loads(row.spec) if row.spec else None
            if not spec:
                logger.warning(f"Task {row.name} has no task_spec, skipping")
                continue
            tasks.append(self._task_state(parent_task.instantiate_from_spec(spec), row))
        return ListTasksResponse(
            tasks=tasks,
            continuation_token=ContinuationToken(rows[-1].name) if has_more and rows else None,
        )

    def _task_state(self, task: Task, row: _Row) -> TaskState:
        scheduled_at = _datetime(row.execute_after)
        if scheduled_at is None:
            raise AssertionError("execute_after should not be None for existing tasks")
        return TaskState(
            task=task,
            scheduled_at=scheduled_at,
            locked_until=_datetime(row.locked_until),
            # The store keeps sqlite's "None" string for a cleared lease (so that lease comparisons
            # match sqlite's exactly); what Pyncette's API shows follows redis and postgres: None.
            locked_by=None if row.locked_by == "None" else row.locked_by,
        )

    def _update_record(
        self,
        row: _Row,
        locked_until: datetime.datetime | None,
        locked_by: uuid.UUID | None,
        execute_after: datetime.datetime | None,
    ) -> None:
        # Once-off tasks (and exhausted schedules) disappear; the lease is stored as str(), so a
        # cleared lease is the string "None", exactly as the sqlite backend stores it.
        if execute_after is None:
            self._store._delete(row.name)
        else:
            self._store._update(
                row,
                execute_after=_timestamp(execute_after),
                locked_until=_timestamp(locked_until),
                locked_by=str(locked_by),
            )
        self._store._changed()


@contextlib.asynccontextmanager
async def memory_repository(**kwargs: Any) -> AsyncIterator[InMemoryRepository]:
    """Pyncette ``RepositoryFactory`` for the in-memory store.

    ``Pyncette(repository_factory=memory_repository, memory_store=store, batch_size=...)``.
    Without ``memory_store`` each call gets a fresh private store (like sqlite ``:memory:``);
    other configuration keys are ignored.
    """
    yield _configured(**kwargs)


def _configured(**config: Any) -> InMemoryRepository:
    """The repository ``memory_repository`` opens for this app configuration."""
    store = config.get("memory_store")
    if store is not None and not isinstance(store, InMemoryStore):
        raise TypeError(f"memory_store must be an InMemoryStore, got {type(store).__name__}")
    return InMemoryRepository(store, batch_size=config.get("batch_size", 100))


class _RepositoryProxy(Repository):
    """Forwards every ``Repository`` method through :meth:`_call`: the one boundary where wrappers
    (I/O tracking, faults, journal, clock skew) hook in. The methods hand back ``_call``'s coroutine
    rather than awaiting it: one coroutine less per call, on the path of every tick."""

    def __init__(self, inner: Repository) -> None:
        self._inner = inner

    @property
    def inner(self) -> Repository:
        return self._inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def _call(self, operation: str, *args: Any) -> Any:
        return await getattr(self._inner, operation)(*args)

    def poll_dynamic_task(
        self, utc_now: datetime.datetime, task: Task, continuation_token: ContinuationToken | None = None
    ) -> Coroutine[Any, Any, QueryResponse]:
        return self._call("poll_dynamic_task", utc_now, task, continuation_token)

    def register_task(self, utc_now: datetime.datetime, task: Task, force: bool = False) -> Coroutine[Any, Any, None]:
        return self._call("register_task", utc_now, task, force)

    def unregister_task(self, utc_now: datetime.datetime, task: Task) -> Coroutine[Any, Any, None]:
        return self._call("unregister_task", utc_now, task)

    def poll_task(
        self, utc_now: datetime.datetime, task: Task, lease: Lease | None = None
    ) -> Coroutine[Any, Any, PollResponse]:
        return self._call("poll_task", utc_now, task, lease)

    def commit_task(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> Coroutine[Any, Any, None]:
        return self._call("commit_task", utc_now, task, lease)

    def extend_lease(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> Coroutine[Any, Any, Lease | None]:
        return self._call("extend_lease", utc_now, task, lease)

    def unlock_task(self, utc_now: datetime.datetime, task: Task, lease: Lease) -> Coroutine[Any, Any, None]:
        return self._call("unlock_task", utc_now, task, lease)

    def get_task_state(self, utc_now: datetime.datetime, task: Task) -> Coroutine[Any, Any, TaskState | None]:
        return self._call("get_task_state", utc_now, task)

    def list_task_states(
        self,
        utc_now: datetime.datetime,
        parent_task: Task,
        limit: int | None = None,
        continuation_token: ContinuationToken | None = None,
    ) -> Coroutine[Any, Any, ListTasksResponse]:
        return self._call("list_task_states", utc_now, parent_task, limit, continuation_token)
