"""Does ``poll_dynamic_task`` cost depend on how many instances are stored? (It should not.)

First times what a user does: ``Simulation.schedule_task`` for 100,000 instances. Then stores 100
and 100,000 instances of one dynamic template, only 10 of them due, and times
``InMemoryRepository.poll_dynamic_task`` on both stores in the same run (interleaved, median of many
polls). Everything runs under a virtual clock, as in every simulation. Run with
``python -m benchmarks.poll_scale``.

Most of both costs is Pyncette's own ``Task`` construction: ``poll_dynamic_task`` builds one ``Task``
per returned instance from its stored spec, so its time is mostly that of 10 such constructions,
which is the same for any store size.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from typing import Any

import dateutil.tz
from pyncette import Pyncette
from pyncette.task import Task

from pyncette_testing import InMemoryRepository, InMemoryStore, Simulation, VirtualClock, VirtualTimeLoop

START = datetime.datetime(2019, 1, 1, tzinfo=dateutil.tz.UTC)
LEASE = datetime.timedelta(seconds=30)
FAR_FUTURE = datetime.datetime(2100, 1, 1, tzinfo=dateutil.tz.UTC)


async def noop(ctx: Any) -> None:
    pass


def template() -> Task:
    return Task(name="bench", func=noop, dynamic=True, lease_duration=LEASE)


async def fill(repo: InMemoryRepository, task: Task, total: int, due: int) -> tuple[float, float]:
    """Schedules ``total`` instances, ``due`` of them due at START.

    Returns the seconds spent creating the instances (Pyncette's ``Task.instantiate``, which
    validates each one) and the seconds spent in ``register_task``.
    """
    started = time.perf_counter()
    instances = [task.instantiate(f"i{i:06d}", execute_at=START if i < due else FAR_FUTURE) for i in range(total)]
    instantiated = time.perf_counter()
    for instance in instances:
        await repo.register_task(START, instance)
    return instantiated - started, time.perf_counter() - instantiated


async def schedule_in_a_simulation(total: int) -> None:
    app = Pyncette()
    task = app.dynamic_task()(noop)
    async with Simulation(app, start=START) as sim:
        started = time.perf_counter()
        for i in range(total):
            await sim.schedule_task(task, f"i{i:06d}", interval=LEASE)
        print(f"Simulation.schedule_task x {total:,}: {time.perf_counter() - started:7.3f} s  [< 5 s]")


async def compare(small: int, large: int, due: int, polls: int) -> None:
    task = template()
    repos = {}
    for size in (small, large):
        repo = InMemoryRepository(InMemoryStore(), batch_size=max(due, 1))
        instantiate_s, register_s = await fill(repo, task, size, due)
        assert len(repo.store) == size
        repos[size] = repo
        print(
            f"scheduling {size:>7,} instances: {instantiate_s + register_s:7.3f} s"
            f" = Task.instantiate {instantiate_s:7.3f} s + register_task {register_s:7.3f} s"
            f" ({register_s / size * 1e6:5.1f} us per register_task)"
        )

    # Each poll locks the due instances for LEASE; polling one LEASE later finds the same ones due
    # again, so every poll does the same work. The two sizes are interleaved so that any drift in
    # machine speed hits both alike.
    samples: dict[int, list[float]] = {small: [], large: []}
    now = START
    for _ in range(polls):
        now += LEASE
        for size in (small, large):
            started = time.perf_counter_ns()
            response = await repos[size].poll_dynamic_task(now, task)
            samples[size].append(time.perf_counter_ns() - started)
            assert len(response.tasks) == due, (size, len(response.tasks))

    medians = {size: statistics.median(values) / 1000 for size, values in samples.items()}
    print(f"poll_dynamic_task, {small:>7,} stored, {due} due: median {medians[small]:8.1f} us over {polls} polls")
    print(f"poll_dynamic_task, {large:>7,} stored, {due} due: median {medians[large]:8.1f} us over {polls} polls")
    print(f"ratio ({large:,} / {small:,}): {medians[large] / medians[small]:.2f}x (independent of store size: ~1x)")


def run(small: int, large: int, due: int, polls: int) -> None:
    """Both measurements, each on its own virtual loop."""
    for scenario in (schedule_in_a_simulation(large), _under_a_clock(compare(small, large, due, polls))):
        loop = VirtualTimeLoop()
        try:
            loop.run_until_complete(scenario)
        finally:
            loop.close()


async def _under_a_clock(scenario: Any) -> None:
    async with VirtualClock(START):
        await scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--due", type=int, default=10)
    parser.add_argument("--polls", type=int, default=1000)
    args = parser.parse_args()
    run(args.small, args.large, args.due, args.polls)


if __name__ == "__main__":
    main()
