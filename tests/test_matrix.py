"""Pyncette's delivery guarantees: every valid ExecutionMode x FailureMode pair under eight
scenarios, with exact counts, instants, outcomes and settlements.

Each expectation was derived from Pyncette's own code (``PyncetteContext._execute_task`` and the
repositories' lease handling) and is checked on the in-memory store *and* on each of Pyncette's real
backends (sqlite, redis, postgres) under ``track_io``. The README's table of guarantees is generated from these very runs:
``python -m tests.test_matrix`` rewrites it, and ``test_readme_table_matches_the_simulation`` fails
when the two disagree.

Every scenario: a static task due every 10 minutes (first at +10 min), a 60 s lease, a 1 s poll
interval, a body that takes 5 s (90 s in the "outlives its lease" scenarios); the window ends two
minutes after the due time. Offsets below are seconds after the due time.
"""

from __future__ import annotations

import asyncio
import datetime
import pathlib
import re
import sys
from typing import Any

import pytest
from pyncette import Context, ExecutionMode, FailureMode, Pyncette
from pyncette.utils import with_heartbeat

from pyncette_testing import BACKENDS, Simulation, VirtualTimeLoop

UTC = datetime.timezone.utc
START = datetime.datetime(2024, 1, 1, tzinfo=UTC)
DUE = START + datetime.timedelta(minutes=10)
END = DUE + datetime.timedelta(minutes=2)
ALO, AMO = ExecutionMode.AT_LEAST_ONCE, ExecutionMode.AT_MOST_ONCE
PAIRS = [(ALO, FailureMode.NONE), (ALO, FailureMode.UNLOCK), (ALO, FailureMode.COMMIT), (AMO, FailureMode.NONE)]
SCENARIOS = {
    "succeeds": "task succeeds",
    "raises": "task raises",
    "crash": "worker crashes mid-run (a second worker is present)",
    "commit_fails": "commit fails",
    "lost_ack": "lost acknowledgement on commit",
    "outlives_lease": "execution outlives its lease, no heartbeat",
    "outlives_lease_heartbeat": "execution outlives its lease, with `with_heartbeat`",
    "outage": "storage outage across the due time (from -30 s to +90 s)",
}

Run = tuple[float, str, str, str]  # (offset, worker, outcome, settlement)

LEFT_EVERY_60 = [
    (0.0, "w1", "FAILED", "LEFT_LOCKED"),
    (60.0, "w1", "FAILED", "LEFT_LOCKED"),
    (120.0, "w1", "RUNNING", "NONE"),
]
UNLOCKED_EVERY_5 = [(float(s), "w1", "FAILED", "UNLOCKED") for s in range(0, 120, 5)] + [
    (120.0, "w1", "RUNNING", "NONE")
]
CRASH_THEN_W2 = [(0.0, "w1", "CRASHED", "NONE"), (60.5, "w2", "SUCCEEDED", "COMMITTED")]
COMMIT_RETRIED = [(0.0, "w1", "SUCCEEDED", "COMMIT_FAILED"), (60.0, "w1", "SUCCEEDED", "COMMITTED")]
OVERLAPPING = [
    (0.0, "w1", "SUCCEEDED", "LEASE_LOST"),
    (60.0, "w1", "RUNNING", "NONE"),
    (120.0, "w1", "RUNNING", "NONE"),
]
ONCE = [(0.0, "w1", "SUCCEEDED", "COMMITTED")]
ONCE_AMO = [(0.0, "w1", "SUCCEEDED", "NOT_APPLICABLE")]
LATE = [(90.0, "w1", "SUCCEEDED", "COMMITTED")]

# (mode, failure mode, scenario) -> (the journal, what it means)
EXPECTED: dict[tuple[ExecutionMode, FailureMode, str], tuple[list[Run], str]] = {}
for _failure in (FailureMode.NONE, FailureMode.UNLOCK, FailureMode.COMMIT):
    EXPECTED[ALO, _failure, "succeeds"] = (ONCE, "runs once, committed")
    EXPECTED[ALO, _failure, "crash"] = (
        CRASH_THEN_W2,
        "the lease outlives the crash: another worker re-runs it once the lease expires",
    )
    EXPECTED[ALO, _failure, "commit_fails"] = (COMMIT_RETRIED, "still locked: runs again after the lease, then commits")
    EXPECTED[ALO, _failure, "lost_ack"] = (ONCE, "the commit took effect: runs once")
    EXPECTED[ALO, _failure, "outlives_lease"] = (
        OVERLAPPING,
        "re-run every lease period while still running; the late commit is refused",
    )
    EXPECTED[ALO, _failure, "outlives_lease_heartbeat"] = (ONCE, "heartbeats keep the lease: runs once")
    EXPECTED[ALO, _failure, "outage"] = (LATE, "runs late, on the first tick after the outage")
EXPECTED[ALO, FailureMode.NONE, "raises"] = (LEFT_EVERY_60, "left locked: retried each time the lease expires")
EXPECTED[ALO, FailureMode.UNLOCK, "raises"] = (UNLOCKED_EVERY_5, "unlocked: retried on the next tick")
EXPECTED[ALO, FailureMode.COMMIT, "raises"] = ([(0.0, "w1", "FAILED", "COMMITTED")], "committed anyway: not retried")
EXPECTED[AMO, FailureMode.NONE, "succeeds"] = (ONCE_AMO, "runs once; rescheduled when polled")
EXPECTED[AMO, FailureMode.NONE, "raises"] = ([(0.0, "w1", "FAILED", "NOT_APPLICABLE")], "not retried")
EXPECTED[AMO, FailureMode.NONE, "crash"] = ([(0.0, "w1", "CRASHED", "NONE")], "that run is lost")
EXPECTED[AMO, FailureMode.NONE, "commit_fails"] = (ONCE_AMO, "nothing to commit: runs once")
EXPECTED[AMO, FailureMode.NONE, "lost_ack"] = (ONCE_AMO, "nothing to commit: runs once")
EXPECTED[AMO, FailureMode.NONE, "outlives_lease"] = (ONCE_AMO, "no lease to outlive: runs once")
EXPECTED[AMO, FailureMode.NONE, "outlives_lease_heartbeat"] = (ONCE_AMO, "no lease to keep: runs once")
EXPECTED[AMO, FailureMode.NONE, "outage"] = (
    [(90.0, "w1", "SUCCEEDED", "NOT_APPLICABLE")],
    "runs late, on the first tick after the outage",
)


def simulate_cell(mode: ExecutionMode, failure: FailureMode, scenario: str, backend: dict[str, Any]) -> list[Run]:
    app = Pyncette()
    seconds = 90 if scenario.startswith("outlives_lease") else 5

    async def body(context: Context) -> None:
        await asyncio.sleep(seconds)
        if scenario == "raises":
            raise RuntimeError("boom")

    if scenario == "outlives_lease_heartbeat":
        body = with_heartbeat()(body)
    task = app.task(
        name="job",
        interval=datetime.timedelta(minutes=10),
        execution_mode=mode,
        failure_mode=failure,
        lease_duration=datetime.timedelta(seconds=60),
    )(body)

    async def main() -> list[Run]:
        async with Simulation(app, start=START, **backend) as sim:
            if scenario == "crash":
                await sim.advance(seconds=0.5)  # the second worker ticks half a second later
                await sim.add_worker("w2")
                sim.faults.crash("w1", during=task, after=2)
            elif scenario == "commit_fails":
                sim.faults.fail("commit_task")
            elif scenario == "lost_ack":
                sim.faults.lose_ack("commit_task")
            elif scenario == "outage":
                sim.faults.outage(datetime.timedelta(minutes=2), at=DUE - datetime.timedelta(seconds=30))
            await sim.advance_to(END)
            return [
                ((run.started_at - DUE).total_seconds(), run.worker, run.outcome.name, run.settlement.name)
                for run in sim.executions()
            ]

    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


CELLS = [(mode, failure, scenario) for mode, failure in PAIRS for scenario in SCENARIOS]


def _id(cell: tuple[ExecutionMode, FailureMode, str]) -> str:
    mode, failure, scenario = cell
    return f"{mode.name}-{failure.name}-{scenario}"


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("pyncette_backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("cell", CELLS, ids=_id)
def test_delivery_guarantee(cell: tuple[ExecutionMode, FailureMode, str], pyncette_backend: str) -> None:
    expected, _ = EXPECTED[cell]
    assert simulate_cell(*cell, {"backend": pyncette_backend}) == expected


# -- the README's table, generated from the simulation ------------------------------------------------

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BEGIN, FINISH = "<!-- guarantees:begin (generated by python -m tests.test_matrix) -->", "<!-- guarantees:end -->"


def _describe(runs: list[Run]) -> str:
    """A journal in a few words: offsets, workers, outcomes, settlements."""
    workers = {worker for _, worker, _, _ in runs}
    parts = []
    index = 0
    while index < len(runs):
        offset, worker, outcome, settlement = runs[index]
        same = index
        while same + 1 < len(runs) and runs[same + 1][2:] == (outcome, settlement):
            same += 1
        label = outcome.lower() + ("" if settlement == "NONE" else f", {settlement.lower().replace('_', ' ')}")
        who = f" on {worker}" if len(workers) > 1 else ""
        if same - index >= 2:
            step = runs[index + 1][0] - offset
            parts.append(f"{same - index + 1} runs every {step:g} s from +{offset:g} s: {label}")
        else:
            parts.extend(f"+{run[0]:g} s{who}: {label}" for run in runs[index : same + 1])
        index = same + 1
    return "; ".join(parts)


def generate_table() -> str:
    lines = [
        "| execution mode + failure mode | scenario | what the simulation shows | meaning |",
        "|---|---|---|---|",
    ]
    for mode, failure, scenario in CELLS:
        runs = simulate_cell(mode, failure, scenario, {})
        _, meaning = EXPECTED[mode, failure, scenario]
        lines.append(f"| {mode.name} + {failure.name} | {SCENARIOS[scenario]} | {_describe(runs)} | {meaning} |")
    return "\n".join(lines)


def _readme_table() -> str:
    text = README.read_text()
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(FINISH), text, flags=re.DOTALL)
    assert match, f"README.md has no {BEGIN} ... {FINISH} block"
    return match.group(1)


@pytest.mark.filterwarnings("ignore")
def test_readme_table_matches_the_simulation() -> None:
    assert _readme_table() == generate_table(), "README's guarantees table is stale: run python -m tests.test_matrix"


def _write_readme() -> None:
    import logging

    logging.disable(logging.CRITICAL)
    text = README.read_text()
    table = generate_table()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(FINISH)
    README.write_text(text[:start] + "\n" + table + "\n" + text[end:])
    sys.stdout.write(table + "\n")


if __name__ == "__main__":
    _write_readme()
