"""Example tests for ``InMemoryRepository`` / ``memory_repository`` and the ``InMemoryStore``.

The differential test (test_repository_differential.py) checks that the repository behaves like
Pyncette's sqlite backend on random operation sequences; these tests pin down each method's edge
cases one by one, with concrete expected values, plus the deliberate divergences (clear errors
where sqlite would assert or answer garbage) and one end-to-end run through a real Pyncette app.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import uuid
from typing import Any

import dateutil.tz
import pytest
from pyncette import Pyncette
from pyncette.errors import PyncetteException, TaskLockedException
from pyncette.model import ExecutionMode, FailureMode, ResultType
from pyncette.task import PartitionedTask, Task

from pyncette_testing import InMemoryRepository, InMemoryStore, TaskRecord, memory_repository

UTC = dateutil.tz.UTC
T0 = datetime.datetime(2019, 1, 1, tzinfo=UTC)
MINUTE = datetime.timedelta(minutes=1)
LEASE = datetime.timedelta(seconds=30)
REPOSITORY_LOGGER = "pyncette_testing.repository"


async def noop(ctx: Any) -> None:
    pass


def at(minutes: float = 0, seconds: float = 0) -> datetime.datetime:
    return T0 + datetime.timedelta(minutes=minutes, seconds=seconds)


def dynamic(name: str = "dyn", mode: ExecutionMode = ExecutionMode.AT_LEAST_ONCE) -> Task:
    failure = FailureMode.NONE if mode == ExecutionMode.AT_MOST_ONCE else FailureMode.UNLOCK
    return Task(name=name, func=noop, dynamic=True, execution_mode=mode, failure_mode=failure, lease_duration=LEASE)


def static(name: str = "static", mode: ExecutionMode = ExecutionMode.AT_LEAST_ONCE) -> Task:
    return Task(name=name, func=noop, interval=MINUTE, execution_mode=mode, lease_duration=LEASE)


def repository(batch_size: int = 100) -> InMemoryRepository:
    return InMemoryRepository(InMemoryStore(), batch_size=batch_size)


def record(repo: InMemoryRepository, name: str) -> TaskRecord:
    found = repo.store.get(name)
    assert found is not None, f"{name} is not stored"
    return found


# -- the factory and the constructor -----------------------------------------------------------


@pytest.mark.asyncio
async def test_memory_repository_ignores_unknown_configuration() -> None:
    async with memory_repository(
        sqlite_database="/nonexistent/db.sqlite", redis_url="redis://nowhere", poll_interval=MINUTE, batch_size=7
    ) as repo:
        assert isinstance(repo, InMemoryRepository)
        assert repo.batch_size == 7
        assert len(repo.store) == 0


@pytest.mark.asyncio
async def test_memory_repository_default_batch_size_is_sqlites() -> None:
    async with memory_repository() as repo:
        assert repo.batch_size == 100


@pytest.mark.asyncio
async def test_memory_store_is_shared_between_factory_calls() -> None:
    store = InMemoryStore()
    template = dynamic()
    async with memory_repository(memory_store=store) as first, memory_repository(memory_store=store) as second:
        assert first.store is store
        assert second.store is store
        await first.register_task(T0, template.instantiate("a", interval=MINUTE))
        state = await second.get_task_state(T0, template.instantiate("a", interval=MINUTE))
        assert state is not None
        assert state.scheduled_at == at(1)
        assert "dyn:a" in store


@pytest.mark.asyncio
async def test_without_memory_store_each_factory_call_gets_a_private_store() -> None:
    template = dynamic()
    async with memory_repository() as first, memory_repository() as second:
        assert first.store is not second.store
        await first.register_task(T0, template.instantiate("a", interval=MINUTE))
        assert await second.get_task_state(T0, template.instantiate("a", interval=MINUTE)) is None
        assert len(first.store) == 1
        assert len(second.store) == 0


def test_repository_without_store_makes_its_own() -> None:
    assert InMemoryRepository().store is not InMemoryRepository().store
    assert len(InMemoryRepository().store) == 0


@pytest.mark.parametrize("batch_size", [0, -1])
@pytest.mark.asyncio
async def test_batch_size_below_one_is_rejected(batch_size: int) -> None:
    with pytest.raises(ValueError, match="Batch size must be greater than 0"):
        InMemoryRepository(batch_size=batch_size)
    with pytest.raises(ValueError, match="Batch size must be greater than 0"):
        async with memory_repository(batch_size=batch_size):
            pass


@pytest.mark.parametrize("batch_size", [1.5, "10", None, True])
@pytest.mark.asyncio
async def test_batch_size_must_be_an_int(batch_size: Any) -> None:
    with pytest.raises(TypeError, match="batch_size must be an int"):
        InMemoryRepository(batch_size=batch_size)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        async with memory_repository(batch_size=batch_size):
            pass


@pytest.mark.parametrize("store", [{}, "store", object()])
@pytest.mark.asyncio
async def test_memory_store_of_the_wrong_type_is_rejected(store: Any) -> None:
    with pytest.raises(TypeError, match="memory_store must be an InMemoryStore"):
        async with memory_repository(memory_store=store):
            pass
    with pytest.raises(TypeError, match="store must be an InMemoryStore"):
        InMemoryRepository(store)


# -- poll_task --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_poll_creates_a_static_task_on_first_poll() -> None:
    repo = repository()
    task = static()
    response = await repo.poll_task(T0, task)
    assert response.result == ResultType.PENDING
    assert response.scheduled_at == at(1)
    assert response.lease is None
    stored = record(repo, "static")
    assert stored.parent is None
    assert stored.spec is None
    assert stored.execute_after == at(1)
    assert stored.locked_until is None
    assert stored.locked_by is None


@pytest.mark.asyncio
async def test_poll_of_a_missing_dynamic_instance_raises_and_creates_nothing() -> None:
    repo = repository()
    instance = dynamic().instantiate("ghost", interval=MINUTE)
    with pytest.raises(PyncetteException, match=r"^Task not found$") as raised:
        await repo.poll_task(T0, instance)
    assert type(raised.value) is PyncetteException
    assert len(repo.store) == 0


@pytest.mark.asyncio
async def test_at_least_once_poll_pending_ready_locked() -> None:
    repo = repository()
    task = static()
    assert (await repo.poll_task(T0, task)).result == ResultType.PENDING
    assert (await repo.poll_task(at(0, 59), task)).result == ResultType.PENDING

    ready = await repo.poll_task(at(1), task)
    assert ready.result == ResultType.READY
    assert ready.scheduled_at == at(1)
    assert isinstance(ready.lease, uuid.UUID)
    stored = record(repo, "static")
    assert stored.locked_by == str(ready.lease)
    assert stored.locked_until == at(1) + LEASE
    assert stored.execute_after == at(1)  # not rescheduled until committed

    # another worker, without the lease, while the lease holds: LOCKED, told the holder
    locked = await repo.poll_task(at(1, 10), task)
    assert locked.result == ResultType.LOCKED
    assert locked.scheduled_at == at(1)
    assert locked.lease == str(ready.lease)
    # the holder polls again with its lease: READY, with a fresh lease
    again = await repo.poll_task(at(1, 15), task, ready.lease)
    assert again.result == ResultType.READY
    assert isinstance(again.lease, uuid.UUID)
    assert again.lease != ready.lease
    assert record(repo, "static").locked_by == str(again.lease)
    assert record(repo, "static").locked_until == at(1, 15) + LEASE
    # the old lease no longer opens it; it is still locked one microsecond before the expiry
    before_expiry = await repo.poll_task(at(1, 15) + LEASE - datetime.timedelta(microseconds=1), task, ready.lease)
    assert before_expiry.result == ResultType.LOCKED
    assert before_expiry.lease == str(again.lease)


@pytest.mark.asyncio
async def test_an_expired_lease_lets_another_worker_take_the_task() -> None:
    repo = repository()
    task = static()
    await repo.poll_task(T0, task)
    first = await repo.poll_task(at(1), task)
    taken = await repo.poll_task(at(1) + LEASE, task)
    assert taken.result == ResultType.READY
    assert isinstance(taken.lease, uuid.UUID)
    assert taken.lease != first.lease
    assert record(repo, "static").locked_by == str(taken.lease)


@pytest.mark.asyncio
async def test_at_most_once_poll_reschedules_without_a_lease() -> None:
    repo = repository()
    task = static("amo", ExecutionMode.AT_MOST_ONCE)
    await repo.poll_task(T0, task)
    ready = await repo.poll_task(at(2, 30), task)
    assert ready.result == ResultType.READY
    assert ready.scheduled_at == at(1)
    assert ready.lease is None
    stored = record(repo, "amo")
    assert stored.execute_after == at(2)  # last execution + interval (no fast-forward)
    assert stored.locked_until is None
    assert stored.locked_by == "None"  # sqlite stores str(None); so do we
    # a second poll at the same instant: the task is due again (at(2) <= now), READY again
    again = await repo.poll_task(at(2, 30), task)
    assert again.result == ResultType.READY
    assert again.scheduled_at == at(2)
    assert record(repo, "amo").execute_after == at(3)


# -- commit_task ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_commit_with_the_lease_reschedules_and_releases() -> None:
    repo = repository()
    task = static()
    await repo.poll_task(T0, task)
    ready = await repo.poll_task(at(1, 5), task)
    await repo.commit_task(at(1, 10), task, ready.lease)
    stored = record(repo, "static")
    assert stored.execute_after == at(2)
    assert stored.locked_until is None
    assert stored.locked_by == "None"
    assert (await repo.poll_task(at(1, 11), task)).result == ResultType.PENDING


@pytest.mark.asyncio
async def test_commit_after_the_lease_was_lost_is_a_no_op_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    repo = repository()
    task = static()
    await repo.poll_task(T0, task)
    lost = await repo.poll_task(at(1), task)
    current = await repo.poll_task(at(1) + LEASE, task)  # lease expired, another worker took it
    before = record(repo, "static")

    with caplog.at_level(logging.WARNING, logger=REPOSITORY_LOGGER):
        await repo.commit_task(at(1) + LEASE, task, lost.lease)

    assert record(repo, "static") == before
    assert record(repo, "static").locked_by == str(current.lease)
    assert [r.getMessage() for r in caplog.records if r.name == REPOSITORY_LOGGER] == [
        "Lease lost on task static, skipping."
    ]


@pytest.mark.asyncio
async def test_commit_of_a_missing_task_is_a_no_op_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    repo = repository()
    instance = dynamic().instantiate("gone", interval=MINUTE)
    with caplog.at_level(logging.WARNING, logger=REPOSITORY_LOGGER):
        await repo.commit_task(T0, instance, uuid.uuid4())
    assert len(repo.store) == 0
    assert [r.getMessage() for r in caplog.records if r.name == REPOSITORY_LOGGER] == [
        "Task dyn:gone not found, skipping."
    ]


@pytest.mark.asyncio
async def test_once_off_instance_disappears_after_commit() -> None:
    repo = repository()
    template = dynamic()
    await repo.register_task(T0, template.instantiate("once", execute_at=at(5)))
    query = await repo.poll_dynamic_task(at(5), template)
    [(instance, lease)] = query.tasks
    ready = await repo.poll_task(at(5), instance, lease)
    assert ready.result == ResultType.READY
    await repo.commit_task(at(5), instance, ready.lease)
    assert "dyn:once" not in repo.store
    assert await repo.get_task_state(at(5), instance) is None
    with pytest.raises(PyncetteException, match="Task not found"):
        await repo.poll_task(at(6), instance)


@pytest.mark.asyncio
async def test_at_most_once_once_off_instance_disappears_when_polled() -> None:
    repo = repository()
    template = dynamic("amo", ExecutionMode.AT_MOST_ONCE)
    instance = template.instantiate("once", execute_at=at(5))
    await repo.register_task(T0, instance)
    ready = await repo.poll_task(at(5), instance)
    assert ready.result == ResultType.READY
    assert ready.lease is None
    assert "amo:once" not in repo.store


# -- unlock_task / extend_lease ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_unlock_releases_the_lease_without_rescheduling() -> None:
    repo = repository()
    task = static()
    await repo.poll_task(T0, task)
    ready = await repo.poll_task(at(1), task)

    await repo.unlock_task(at(1, 1), task, uuid.uuid4())  # not the holder: nothing happens
    assert record(repo, "static").locked_by == str(ready.lease)

    await repo.unlock_task(at(1, 1), task, ready.lease)
    stored = record(repo, "static")
    assert stored.locked_by is None  # NULL, unlike the "None" string a commit leaves
    assert stored.locked_until is None
    assert stored.execute_after == at(1)
    retry = await repo.poll_task(at(1, 2), task)
    assert retry.result == ResultType.READY
    assert retry.scheduled_at == at(1)


@pytest.mark.asyncio
async def test_unlock_of_a_missing_task_does_nothing() -> None:
    repo = repository()
    await repo.unlock_task(T0, static(), uuid.uuid4())
    assert len(repo.store) == 0


@pytest.mark.asyncio
async def test_extend_lease_while_held_then_none_once_lost() -> None:
    repo = repository()
    task = static()
    await repo.poll_task(T0, task)
    ready = await repo.poll_task(at(1), task)

    extended = await repo.extend_lease(at(1, 20), task, ready.lease)
    assert extended is ready.lease
    assert record(repo, "static").locked_until == at(1, 20) + LEASE

    # Expiry alone does not lose the lease (as in sqlite, extend_lease only checks the holder) ...
    late = at(1, 20) + LEASE + datetime.timedelta(seconds=5)
    assert await repo.extend_lease(late, task, ready.lease) is ready.lease
    # ... but once another poller took the expired task, it is gone.
    taken = await repo.poll_task(late + LEASE, task)
    assert taken.result == ResultType.READY
    assert await repo.extend_lease(late + LEASE, task, ready.lease) is None
    assert record(repo, "static").locked_by == str(taken.lease)
    assert record(repo, "static").locked_until == late + 2 * LEASE


@pytest.mark.asyncio
async def test_extend_lease_of_a_missing_task_returns_none() -> None:
    repo = repository()
    assert await repo.extend_lease(T0, static(), uuid.uuid4()) is None
    assert len(repo.store) == 0


# -- register_task / unregister_task ----------------------------------------------------------


async def _locked_instance(repo: InMemoryRepository, template: Task) -> tuple[Task, Any]:
    await repo.register_task(T0, template.instantiate("a", interval=MINUTE))
    query = await repo.poll_dynamic_task(at(1), template)
    [(instance, lease)] = query.tasks
    ready = await repo.poll_task(at(1), instance, lease)
    assert ready.result == ResultType.READY
    return instance, ready.lease


@pytest.mark.asyncio
async def test_register_of_a_locked_instance_raises_unless_forced() -> None:
    repo = repository()
    template = dynamic()
    _, lease = await _locked_instance(repo, template)
    before = record(repo, "dyn:a")

    with pytest.raises(TaskLockedException, match="Cannot update task dyn:a while it is locked"):
        await repo.register_task(at(1, 10), template.instantiate("a", interval=2 * MINUTE))
    assert record(repo, "dyn:a") == before

    await repo.register_task(at(1, 10), template.instantiate("a", interval=2 * MINUTE), force=True)
    stored = record(repo, "dyn:a")
    assert stored.execute_after == at(3, 10)  # the new schedule from now, not the sooner one
    assert stored.locked_until is None
    assert stored.locked_by is None
    assert stored.spec is not None
    assert stored.spec["interval"] == 120.0
    assert str(lease) != stored.locked_by


@pytest.mark.asyncio
async def test_register_after_the_lock_expired_keeps_the_lease_fields() -> None:
    repo = repository()
    template = dynamic()
    _, lease = await _locked_instance(repo, template)
    expired = at(1) + LEASE  # locked_until == now: no longer locked
    await repo.register_task(expired, template.instantiate("a", interval=MINUTE))
    stored = record(repo, "dyn:a")
    assert stored.locked_by == str(lease)
    assert stored.locked_until == expired
    assert stored.execute_after == at(1)  # min(existing at(1), new expired + 1 min)


@pytest.mark.asyncio
async def test_register_without_force_keeps_the_sooner_schedule() -> None:
    repo = repository()
    template = dynamic()
    await repo.register_task(T0, template.instantiate("a", interval=datetime.timedelta(hours=1)))
    await repo.register_task(T0, template.instantiate("a", interval=datetime.timedelta(minutes=10)))
    assert record(repo, "dyn:a").execute_after == at(10)  # the new one is sooner
    await repo.register_task(T0, template.instantiate("a", interval=datetime.timedelta(hours=1), colour="red"))
    stored = record(repo, "dyn:a")
    assert stored.execute_after == at(10)  # the old one is sooner: kept ...
    assert stored.spec is not None
    assert stored.spec["interval"] == 3600.0  # ... but the spec is the new one
    assert stored.spec["extra_args"] == {"colour": "red"}


@pytest.mark.asyncio
async def test_register_of_a_new_instance_schedules_it() -> None:
    repo = repository()
    template = dynamic()
    await repo.register_task(T0, template.instantiate("cron", schedule="0 12 * * *", timezone="Europe/Ljubljana"))
    await repo.register_task(T0, template.instantiate("once", execute_at=at(90)))
    assert record(repo, "dyn:cron").execute_after == datetime.datetime(2019, 1, 1, 11, tzinfo=UTC)  # noon CET
    assert record(repo, "dyn:once").execute_after == at(90)
    assert record(repo, "dyn:once").parent == "dyn"


@pytest.mark.asyncio
async def test_unregister_removes_the_instance_and_ignores_missing_ones() -> None:
    repo = repository()
    template = dynamic()
    await repo.register_task(T0, template.instantiate("a", interval=MINUTE))
    await repo.register_task(T0, template.instantiate("b", interval=MINUTE))
    await repo.unregister_task(T0, template.instantiate("a", interval=datetime.timedelta()))
    assert list(repo.store) == ["dyn:b"]
    await repo.unregister_task(T0, template.instantiate("a", interval=datetime.timedelta()))
    assert list(repo.store) == ["dyn:b"]
    assert (await repo.poll_dynamic_task(at(5), template)).tasks[0][0].name == "b"


# -- poll_dynamic_task ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_poll_dynamic_task_returns_due_instances_in_due_order_in_batches() -> None:
    repo = repository(batch_size=2)
    template = dynamic()
    # names deliberately not in due order; "later" is not due at the poll time
    due_minutes = {"d": 4, "a": 3, "c": 1, "b": 2, "e": 5, "later": 30}
    for name, minutes in due_minutes.items():
        await repo.register_task(T0, template.instantiate(name, execute_at=at(minutes), payload=name))

    now = at(10)
    first = await repo.poll_dynamic_task(now, template)
    assert [task.name for task, _ in first.tasks] == ["c", "b"]
    assert first.continuation_token is not None  # a full batch: there may be more
    leases = {lease for _, lease in first.tasks}
    assert len(leases) == 1  # one lease for the whole batch
    assert isinstance(next(iter(leases)), uuid.UUID)
    assert [task.extra_args for task, _ in first.tasks] == [{"payload": "c"}, {"payload": "b"}]
    assert all(task.parent_task is template for task, _ in first.tasks)
    assert record(repo, "dyn:c").locked_until == now + LEASE
    assert record(repo, "dyn:c").locked_by == str(next(iter(leases)))

    second = await repo.poll_dynamic_task(now, template, first.continuation_token)
    assert [task.name for task, _ in second.tasks] == ["a", "d"]
    assert second.continuation_token is not None
    assert {lease for _, lease in second.tasks} != leases

    third = await repo.poll_dynamic_task(now, template, second.continuation_token)
    assert [task.name for task, _ in third.tasks] == ["e"]
    assert third.continuation_token is None  # fewer than batch_size: done

    assert (await repo.poll_dynamic_task(now, template)).tasks == []


@pytest.mark.parametrize(("batch_size", "due", "token"), [(1, 1, True), (3, 2, False), (3, 3, True), (2, 0, False)])
@pytest.mark.asyncio
async def test_poll_dynamic_task_token_means_a_full_batch(batch_size: int, due: int, token: bool) -> None:
    repo = repository(batch_size=batch_size)
    template = dynamic()
    for i in range(due):
        await repo.register_task(T0, template.instantiate(f"i{i}", execute_at=T0))
    await repo.register_task(T0, template.instantiate("later", execute_at=at(60)))
    query = await repo.poll_dynamic_task(T0, template)
    assert len(query.tasks) == due
    assert (query.continuation_token is not None) is token


@pytest.mark.asyncio
async def test_at_most_once_poll_after_the_query_clears_the_querys_lock() -> None:
    repo = repository()
    template = dynamic("amo", ExecutionMode.AT_MOST_ONCE)
    await repo.register_task(T0, template.instantiate("a", interval=MINUTE))
    [(instance, lease)] = (await repo.poll_dynamic_task(at(1), template)).tasks
    assert record(repo, "amo:a").locked_by == str(lease)
    assert record(repo, "amo:a").locked_until == at(1) + LEASE

    ready = await repo.poll_task(at(1), instance, lease)
    assert ready.result == ResultType.READY
    assert ready.lease is None  # no lease for at-most-once, not the query's
    stored = record(repo, "amo:a")
    assert stored.locked_until is None
    assert stored.locked_by == "None"
    assert stored.execute_after == at(2)
    # without a lock, the next worker's poll is PENDING, not LOCKED
    assert (await repo.poll_task(at(1, 1), instance)).result == ResultType.PENDING


@pytest.mark.asyncio
async def test_poll_dynamic_task_breaks_due_time_ties_by_insertion_order() -> None:
    repo = repository()
    template = dynamic()
    for name in ["m", "z", "a"]:
        await repo.register_task(T0, template.instantiate(name, interval=MINUTE))
    query = await repo.poll_dynamic_task(at(1), template)
    assert [task.name for task, _ in query.tasks] == ["m", "z", "a"]


@pytest.mark.asyncio
async def test_poll_dynamic_task_skips_locked_instances_until_the_lease_expires() -> None:
    repo = repository()
    template = dynamic()
    await repo.register_task(T0, template.instantiate("a", interval=MINUTE))
    assert len((await repo.poll_dynamic_task(at(1), template)).tasks) == 1
    assert (await repo.poll_dynamic_task(at(1) + LEASE - datetime.timedelta(microseconds=1), template)).tasks == []
    assert len((await repo.poll_dynamic_task(at(1) + LEASE, template)).tasks) == 1


@pytest.mark.asyncio
async def test_poll_dynamic_task_order_and_index_size_survive_many_changes() -> None:
    # The due index keeps superseded entries until they surface: thousands of polls, commits,
    # re-registrations and deletions must neither change the answers nor let it grow unbounded.
    repo = repository(batch_size=3)
    template = dynamic()
    names = [f"i{number:02d}" for number in range(20)]
    for number, name in enumerate(names):
        await repo.register_task(T0, template.instantiate(name, interval=datetime.timedelta(seconds=60 + number)))
    order = {f"{template.canonical_name}:{name}": number for number, name in enumerate(names)}  # rowids
    now, returned = T0, 0
    for step in range(300):
        now += datetime.timedelta(seconds=7)
        due = sorted(
            (max(r.locked_until or T0, r.execute_after or T0), order[r.name], r.name)
            for r in repo.store.instances(template.canonical_name)
        )
        expected = [name.split(":")[1] for when, _, name in due if when <= now][:3]
        query = await repo.poll_dynamic_task(now, template)
        assert [task.name for task, _ in query.tasks] == expected
        returned += len(expected)
        for task, lease in query.tasks:
            polled = await repo.poll_task(now, task, lease)
            await repo.commit_task(now, task, polled.lease)
        if step % 50 == 49:
            gone = names.pop(0)
            await repo.unregister_task(now, template.instantiate(gone, interval=MINUTE))
    assert returned > 300  # most polls found a full batch
    index = repo.store._due[template.canonical_name]
    assert index.live == len(names) == 14
    assert len(index._heap) <= 2 * index.live + 64


@pytest.mark.asyncio
async def test_poll_dynamic_task_only_sees_its_own_instances() -> None:
    repo = repository()
    template, other = dynamic("one"), dynamic("two")
    partitioned = PartitionedTask(name="part", func=noop, partition_count=2)
    await repo.register_task(T0, template.instantiate("a", interval=MINUTE))
    await repo.register_task(T0, other.instantiate("b", interval=MINUTE))
    await repo.register_task(T0, partitioned.instantiate("c", interval=MINUTE))
    assert [task.canonical_name for task, _ in (await repo.poll_dynamic_task(at(1), other)).tasks] == ["two:b"]
    assert (await repo.poll_dynamic_task(at(1), partitioned)).tasks == []  # instances live under partitions
    found = [
        task.canonical_name
        for partition in partitioned.get_partitions()
        for task, _ in (await repo.poll_dynamic_task(at(1), partition)).tasks
    ]
    assert len(found) == 1
    assert found[0].startswith("part:")
    assert found[0].endswith(":c")


# -- get_task_state / list_task_states --------------------------------------------------------


@pytest.mark.asyncio
async def test_get_task_state() -> None:
    repo = repository()
    template = dynamic()
    instance = template.instantiate("a", interval=MINUTE, colour="red")
    assert await repo.get_task_state(T0, instance) is None
    await repo.register_task(T0, instance)

    # asked with a different (stale) instance object, the state carries the stored spec
    state = await repo.get_task_state(T0, template.instantiate("a", interval=datetime.timedelta()))
    assert state is not None
    assert state.task.extra_args == {"colour": "red"}
    assert state.task.interval == MINUTE
    assert state.task.parent_task is template
    assert state.scheduled_at == at(1)
    assert state.locked_until is None
    assert state.locked_by is None

    task = static()
    assert await repo.get_task_state(T0, task) is None
    await repo.poll_task(T0, task)
    static_state = await repo.get_task_state(T0, task)
    assert static_state is not None
    assert static_state.task is task
    assert static_state.scheduled_at == at(1)


@pytest.mark.asyncio
async def test_list_task_states_pages_in_name_order() -> None:
    repo = repository(batch_size=3)
    template = dynamic()
    for name in ["e", "b", "d", "a", "c"]:
        await repo.register_task(T0, template.instantiate(name, interval=MINUTE))

    first = await repo.list_task_states(T0, template, limit=2)
    assert [state.task.name for state in first.tasks] == ["a", "b"]
    assert first.continuation_token == "dyn:b"
    second = await repo.list_task_states(T0, template, limit=2, continuation_token=first.continuation_token)
    assert [state.task.name for state in second.tasks] == ["c", "d"]
    assert second.continuation_token == "dyn:d"
    third = await repo.list_task_states(T0, template, limit=2, continuation_token=second.continuation_token)
    assert [state.task.name for state in third.tasks] == ["e"]
    assert third.continuation_token is None

    default = await repo.list_task_states(T0, template)  # limit defaults to batch_size
    assert [state.task.name for state in default.tasks] == ["a", "b", "c"]
    assert default.continuation_token == "dyn:c"

    everything = await repo.list_task_states(T0, template, limit=5)
    assert len(everything.tasks) == 5
    assert everything.continuation_token is None  # exactly a full page, nothing more


@pytest.mark.asyncio
async def test_list_task_states_token_survives_deleting_its_instance() -> None:
    repo = repository()
    template = dynamic()
    for name in ["a", "b", "c"]:
        await repo.register_task(T0, template.instantiate(name, interval=MINUTE))
    first = await repo.list_task_states(T0, template, limit=1)
    assert first.continuation_token == "dyn:a"
    await repo.unregister_task(T0, template.instantiate("a", interval=MINUTE))
    await repo.register_task(T0, template.instantiate("0", interval=MINUTE))  # sorts before the token
    rest = await repo.list_task_states(T0, template, limit=5, continuation_token=first.continuation_token)
    assert [state.task.name for state in rest.tasks] == ["b", "c"]
    assert rest.continuation_token is None


@pytest.mark.asyncio
async def test_list_task_states_of_a_template_without_instances() -> None:
    repo = repository()
    response = await repo.list_task_states(T0, dynamic())
    assert response.tasks == []
    assert response.continuation_token is None


# -- the stored spec --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stored_spec_is_a_json_copy() -> None:
    repo = repository()
    template = dynamic()
    payload: dict[str, Any] = {"to": ["ann"], "n": 1}
    instance = template.instantiate("a", interval=MINUTE, payload=payload)
    await repo.register_task(T0, instance)

    payload["to"].append("bob")
    payload["n"] = 2
    instance.extra_args["payload"]["extra"] = True

    stored = record(repo, "dyn:a")
    assert stored.spec is not None
    assert stored.spec["extra_args"] == {"payload": {"to": ["ann"], "n": 1}}
    state = await repo.get_task_state(T0, instance)
    assert state is not None
    assert state.task.extra_args == {"payload": {"to": ["ann"], "n": 1}}
    [(polled, _)] = (await repo.poll_dynamic_task(at(1), template)).tasks
    assert polled.extra_args == {"payload": {"to": ["ann"], "n": 1}}


@pytest.mark.asyncio
async def test_record_spec_is_read_only_and_detached() -> None:
    repo = repository()
    await repo.register_task(T0, dynamic().instantiate("a", interval=MINUTE, payload={"k": 1}))
    stored = record(repo, "dyn:a")
    assert stored.spec is not None
    with pytest.raises(TypeError):
        stored.spec["name"] = "b"  # type: ignore[index]
    stored.spec["extra_args"]["payload"]["k"] = 2  # a nested value is a private copy
    fresh = record(repo, "dyn:a")
    assert fresh.spec is not None
    assert fresh.spec["name"] == "a"
    assert fresh.spec["extra_args"] == {"payload": {"k": 1}}


def test_non_json_extra_arg_fails_at_instantiate_as_in_sqlite() -> None:
    with pytest.raises(ValueError, match="Extra parameters must be JSON serializable"):
        dynamic().instantiate("a", interval=MINUTE, when=datetime.datetime(2019, 1, 1))
    with pytest.raises(ValueError, match="Extra parameters must be JSON serializable"):
        dynamic().instantiate("a", interval=MINUTE, payload={1, 2})


# -- the store --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_store_len_get_snapshot_and_frozen_records() -> None:
    repo = repository()
    store = repo.store
    template = dynamic()
    assert len(store) == 0
    assert store.snapshot() == ()
    assert store.get("dyn:a") is None

    await repo.register_task(T0, template.instantiate("b", interval=MINUTE))
    await repo.register_task(T0, template.instantiate("a", interval=MINUTE))
    await repo.poll_task(T0, static())
    assert len(store) == 3
    assert "dyn:a" in store
    assert "dyn:zzz" not in store
    assert list(store) == ["dyn:a", "dyn:b", "static"]

    snapshot = store.snapshot()
    assert isinstance(snapshot, tuple)
    assert [r.name for r in snapshot] == ["dyn:a", "dyn:b", "static"]
    assert all(isinstance(r, TaskRecord) for r in snapshot)
    assert snapshot[0] == store.get("dyn:a")
    assert snapshot[0].parent == "dyn"
    assert snapshot[0].execute_after == at(1)
    assert [r.name for r in store.instances("dyn")] == ["dyn:a", "dyn:b"]
    assert store.instances("nothing") == ()

    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot[0].execute_after = at(5)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot[2].locked_by = "me"  # type: ignore[misc]

    # a snapshot does not follow later changes
    await repo.unregister_task(T0, template.instantiate("a", interval=MINUTE))
    assert len(store) == 2
    assert [r.name for r in snapshot] == ["dyn:a", "dyn:b", "static"]
    assert snapshot[0].execute_after == at(1)


# -- deliberate divergences from sqlite: clear errors -----------------------------------------


NAIVE = datetime.datetime(2019, 1, 1)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda repo, t, i: repo.poll_task(NAIVE, static()), id="poll_task"),
        pytest.param(lambda repo, t, i: repo.poll_dynamic_task(NAIVE, t), id="poll_dynamic_task"),
        pytest.param(lambda repo, t, i: repo.register_task(NAIVE, i), id="register_task"),
        pytest.param(lambda repo, t, i: repo.unregister_task(NAIVE, i), id="unregister_task"),
        pytest.param(lambda repo, t, i: repo.commit_task(NAIVE, i, uuid.uuid4()), id="commit_task"),
        pytest.param(lambda repo, t, i: repo.extend_lease(NAIVE, i, uuid.uuid4()), id="extend_lease"),
        pytest.param(lambda repo, t, i: repo.unlock_task(NAIVE, i, uuid.uuid4()), id="unlock_task"),
        pytest.param(lambda repo, t, i: repo.get_task_state(NAIVE, i), id="get_task_state"),
        pytest.param(lambda repo, t, i: repo.list_task_states(NAIVE, t), id="list_task_states"),
    ],
)
@pytest.mark.asyncio
async def test_naive_utc_now_is_rejected(call: Any) -> None:
    repo = repository()
    template = dynamic()
    instance = template.instantiate("a", interval=MINUTE)
    await repo.register_task(T0, instance)
    before = repo.store.snapshot()
    with pytest.raises(ValueError, match="utc_now must be timezone-aware"):
        await call(repo, template, instance)
    assert repo.store.snapshot() == before


@pytest.mark.parametrize("limit", [0, -1])
@pytest.mark.asyncio
async def test_list_task_states_limit_below_one_is_rejected(limit: int) -> None:
    repo = repository()
    template = dynamic()
    await repo.register_task(T0, template.instantiate("a", interval=MINUTE))
    with pytest.raises(ValueError, match="limit must be a positive int"):
        await repo.list_task_states(T0, template, limit=limit)


@pytest.mark.parametrize(
    "task",
    [
        pytest.param(static(), id="static task"),
        pytest.param(dynamic(), id="dynamic template"),
        pytest.param(PartitionedTask(name="part", func=noop, partition_count=2), id="partitioned template"),
    ],
)
@pytest.mark.asyncio
async def test_register_of_a_non_instance_is_rejected(task: Task) -> None:
    repo = repository()
    with pytest.raises(ValueError, match="register_task takes a concrete dynamic task instance"):
        await repo.register_task(T0, task)
    assert len(repo.store) == 0


# -- end to end through a real Pyncette app ---------------------------------------------------


@pytest.mark.asyncio
async def test_pyncette_app_schedules_lists_and_unschedules_through_the_store() -> None:
    store = InMemoryStore()
    app = Pyncette(repository_factory=memory_repository, memory_store=store, batch_size=2)

    @app.dynamic_task(execution_mode=ExecutionMode.AT_LEAST_ONCE)
    async def reminder(context: Any) -> None:
        pass

    async with app.create() as ctx:
        instance = await ctx.schedule_task(reminder, "alice", interval=datetime.timedelta(hours=1), note="hi")
        await ctx.schedule_task(reminder, "bob", schedule="0 9 * * *", timezone="Europe/Ljubljana")
        await ctx.schedule_task(reminder, "carol", execute_at=datetime.datetime(2030, 1, 1, tzinfo=UTC))

        assert instance.canonical_name == "reminder:alice"
        assert list(store) == ["reminder:alice", "reminder:bob", "reminder:carol"]
        alice = store.get("reminder:alice")
        assert alice is not None
        assert alice.parent == "reminder"
        assert alice.spec is not None
        assert alice.spec["extra_args"] == {"note": "hi"}
        carol = store.get("reminder:carol")
        assert carol is not None
        assert carol.execute_after == datetime.datetime(2030, 1, 1, tzinfo=UTC)

        state = await ctx.get_task(reminder, "alice")
        assert state is not None
        assert state.task.extra_args == {"note": "hi"}
        assert state.task.interval == datetime.timedelta(hours=1)
        assert state.scheduled_at == alice.execute_after
        assert await ctx.get_task(reminder, "nobody") is None

        page = await ctx.list_tasks(reminder)  # limit defaults to the app's batch_size
        assert [s.task.name for s in page.tasks] == ["alice", "bob"]
        assert page.continuation_token is not None
        rest = await ctx.list_tasks(reminder, continuation_token=page.continuation_token)
        assert [s.task.name for s in rest.tasks] == ["carol"]
        assert rest.continuation_token is None

        await ctx.unschedule_task(reminder, "bob")
        await ctx.unschedule_task(instance)
        assert list(store) == ["reminder:carol"]
        assert [s.task.name for s in (await ctx.list_tasks(reminder, limit=10)).tasks] == ["carol"]

    # the store outlives the app
    assert len(store) == 1
