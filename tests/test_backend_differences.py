"""Where Pyncette's real backends differ from each other, pinned backend by backend.

Each scenario calls the repositories directly (as Pyncette's tick would), on every backend, and
states what each one answers. The in-memory store follows the majority: sqlite's answer in every
case but the first, where it follows redis and postgres; where all three differ, sqlite's. The
README's fidelity section lists these.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import dateutil.tz
import pytest
from pyncette import Pyncette
from pyncette.errors import TaskLockedException
from pyncette.model import ExecutionMode, ResultType
from pyncette.repository import Repository
from pyncette.task import Task

from pyncette_testing import BACKENDS, isolated_backend

pytestmark = [
    pytest.mark.parametrize("pyncette_backend", BACKENDS, indirect=True),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

T0 = datetime.datetime(2024, 1, 1, tzinfo=dateutil.tz.UTC)
app = Pyncette()


async def _body(context: Any) -> None:
    pass


job = app.task(name="job", interval=datetime.timedelta(minutes=1))(_body)
best_effort = app.task(
    name="best_effort", interval=datetime.timedelta(minutes=1), execution_mode=ExecutionMode.AT_MOST_ONCE
)(_body)
queue = app.dynamic_task(name="queue", lease_duration=datetime.timedelta(seconds=30))(_body)


def at(seconds: float) -> datetime.datetime:
    return T0 + datetime.timedelta(seconds=seconds)


@contextlib.asynccontextmanager
async def processes(backend: str, count: int = 1, **config: Any) -> AsyncIterator[list[Repository]]:
    """``count`` repositories on one namespace of ``backend``, as ``count`` processes would have."""
    async with isolated_backend(backend, **config) as isolated, contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(isolated.factory(**isolated.config)) for _ in range(count)]


def run(backend: str, scenario: Callable[[str], Awaitable[Any]]) -> Any:
    for task in (job, best_effort, queue):
        vars(task).pop("_last_lease", None)  # redis's per-process cache: each scenario is a new process
    return asyncio.run(scenario(backend))


def _lease(lease: Any) -> str:
    return str(getattr(lease, "locked_by", lease))


def test_locked_by_after_a_commit(pyncette_backend: str) -> None:
    """sqlite: the string "None" it stores; redis, postgres and memory: None. The store keeps
    sqlite's string underneath (memory's lease comparisons are sqlite's), but shows the majority's."""

    async def scenario(backend: str) -> Any:
        async with processes(backend) as (repository,):
            await repository.poll_task(at(0), job)
            ready = await repository.poll_task(at(60), job)
            await repository.commit_task(at(61), job, ready.lease)
            state = await repository.get_task_state(at(61), job)
            return state.locked_by, state.locked_until

    expected = "None" if pyncette_backend == "sqlite" else None
    assert run(pyncette_backend, scenario) == (expected, None)


@pytest.mark.parametrize("task", [job, best_effort], ids=["at_least_once", "at_most_once"])
def test_the_first_poll_of_a_record_another_process_created(pyncette_backend: str, task: Task) -> None:
    """redis learns a task's schedule from the lease it cached on the Task object. A process that
    never touched the record, finding it due while the record is as it was created (version 0),
    gets ``scheduled_at=None``, and an AT_MOST_ONCE task's next execution counts from now rather
    than from the missed schedule. The others read the schedule from the record."""

    async def scenario(backend: str) -> Any:
        async with processes(backend, 2) as (first, second):
            await first.poll_task(at(0), task)  # creates the record, due at +60 s
            vars(task).pop("_last_lease", None)  # the second process has its own Task objects
            ready = await second.poll_task(at(90), task)
            if task.execution_mode is ExecutionMode.AT_LEAST_ONCE:
                await second.commit_task(at(90), task, ready.lease)
            state = await second.get_task_state(at(90), task)
            return ready.result, ready.scheduled_at, state.scheduled_at

    result, scheduled_at, next_at = run(pyncette_backend, scenario)
    assert result is ResultType.READY
    if pyncette_backend != "redis":
        assert (scheduled_at, next_at) == (at(60), at(120))  # the missed schedule + 1 minute
    elif task is job:
        assert (scheduled_at, next_at) == (None, at(120))
    else:
        assert (scheduled_at, next_at) == (None, at(150))  # now + 1 minute


def test_a_holder_polling_again_keeps_or_renews_its_lease(pyncette_backend: str) -> None:
    """Pyncette polls each instance of a due batch with the batch's lease. redis keeps that
    ``locked_by`` (a new record version); the others hand out a new one."""

    async def scenario(backend: str) -> Any:
        async with processes(backend) as (repository,):
            await repository.register_task(at(0), queue.instantiate("a", interval=datetime.timedelta(seconds=10)))
            batch = await repository.poll_dynamic_task(at(10), queue)
            ((instance, lease),) = batch.tasks
            ready = await repository.poll_task(at(10), instance, lease)
            return ready.result, _lease(ready.lease) == _lease(lease)

    kept = pyncette_backend == "redis"
    assert run(pyncette_backend, scenario) == (ResultType.READY, kept)


def test_rescheduling_an_instance_whose_lease_ran_out(pyncette_backend: str) -> None:
    """redis leases carry the record's version and every write bumps it: rescheduling an instance
    once its lease has run out (while the body still runs) makes the holder's commit a no-op. The
    others compare ``locked_by`` alone and accept the commit."""

    async def scenario(backend: str) -> Any:
        async with processes(backend) as (repository,):
            instance = queue.instantiate("a", interval=datetime.timedelta(seconds=10))
            await repository.register_task(at(0), instance)
            ((taken, lease),) = (await repository.poll_dynamic_task(at(10), queue)).tasks
            ready = await repository.poll_task(at(10), taken, lease)
            await repository.register_task(at(45), queue.instantiate("a", interval=datetime.timedelta(seconds=10)))
            await repository.commit_task(at(46), taken, ready.lease)
            state = await repository.get_task_state(at(46), taken)
            return state.scheduled_at, state.locked_until

    if pyncette_backend == "redis":
        assert run(pyncette_backend, scenario) == (at(10), at(40))  # commit refused: still the old lease
    else:
        assert run(pyncette_backend, scenario) == (at(20), None)  # committed: next run 10 s after the last


def test_which_equally_due_instances_fill_a_batch(pyncette_backend: str) -> None:
    """Instances due at the same instant, more than a batch: memory and sqlite take them in the
    order they were first stored, redis by name, postgres in whatever order its table has them."""

    async def scenario(backend: str) -> Any:
        async with processes(backend, batch_size=2) as (repository,):
            for name in ("c", "a", "b"):
                await repository.register_task(at(0), queue.instantiate(name, execute_at=at(5)))
            batch = await repository.poll_dynamic_task(at(5), queue)
            return [task.name for task, _ in batch.tasks], batch.continuation_token is not None

    names, more = run(pyncette_backend, scenario)
    assert more
    if pyncette_backend == "postgres":
        assert len(names) == 2 and set(names) <= {"a", "b", "c"}
    else:
        assert names == {"memory": ["c", "a"], "sqlite": ["c", "a"], "redis": ["a", "b"]}[pyncette_backend]


def test_the_order_of_list_task_states(pyncette_backend: str) -> None:
    """memory, sqlite and postgres list instances by name; redis by due time (then name)."""

    async def scenario(backend: str) -> Any:
        async with processes(backend) as (repository,):
            for name, due in (("a", 30), ("b", 10), ("c", 20)):
                await repository.register_task(at(0), queue.instantiate(name, execute_at=at(due)))
            listing = await repository.list_task_states(at(0), queue)
            return [state.task.name for state in listing.tasks]

    expected = ["b", "c", "a"] if pyncette_backend == "redis" else ["a", "b", "c"]
    assert run(pyncette_backend, scenario) == expected


def test_a_locked_instance_refuses_rescheduling_on_every_backend(pyncette_backend: str) -> None:
    """Same exception everywhere; only redis's message does not say until when."""

    async def scenario(backend: str) -> Any:
        async with processes(backend) as (repository,):
            await repository.register_task(at(0), queue.instantiate("a", execute_at=at(5)))
            await repository.poll_dynamic_task(at(5), queue)
            with pytest.raises(TaskLockedException) as raised:
                await repository.register_task(at(6), queue.instantiate("a", execute_at=at(60)))
            return str(raised.value)

    until = "" if pyncette_backend == "redis" else " Task is locked until 2024-01-01 00:00:35+00:00."
    assert run(pyncette_backend, scenario) == (
        f"Cannot update task queue:a while it is locked.{until} Use force=True to override."
    )
