"""The delay queue: exact delivery times, backoff between attempts, giving up, nothing left behind."""

from __future__ import annotations

import datetime

import pytest
from pyncette import Pyncette

from examples.delay_queue import app as queue
from pyncette_testing import Outcome, Simulation

UTC = datetime.timezone.utc
START = datetime.datetime(2024, 5, 1, 12, tzinfo=UTC)


@pytest.fixture
def pyncette_target() -> Pyncette:
    return queue.app


@pytest.mark.pyncette(start=START)
async def test_a_message_is_delivered_at_its_instant_and_then_disappears(pyncette_app: Simulation) -> None:
    client = queue.WebhookClient()
    pyncette_app.override_fixture("webhooks", client)

    await queue.enqueue(
        await _context(pyncette_app),
        "m1",
        "https://a.example/hook",
        {"id": 1},
        at=START + datetime.timedelta(minutes=5),
    )
    await pyncette_app.advance(minutes=4, seconds=59)
    assert client.delivered == []

    await pyncette_app.advance(seconds=1)
    assert client.delivered == [("https://a.example/hook", {"id": 1}, START + datetime.timedelta(minutes=5))]
    pyncette_app.assert_executed(queue.deliver, times=1, outcome=Outcome.SUCCEEDED)
    assert (await pyncette_app.list_tasks(queue.deliver)).tasks == []  # once-off instances are deleted after their run


@pytest.mark.pyncette(start=START)
async def test_failed_deliveries_back_off_exponentially(pyncette_app: Simulation) -> None:
    client = queue.WebhookClient(failures={"https://flaky.example/hook": 2})
    pyncette_app.override_fixture("webhooks", client)

    await queue.enqueue(await _context(pyncette_app), "m2", "https://flaky.example/hook", {"id": 2}, at=START)
    await pyncette_app.advance(minutes=10)

    attempts = pyncette_app.executions(queue.deliver)
    assert [run.instance for run in attempts] == ["m2-attempt-1", "m2-attempt-2", "m2-attempt-3"]
    # the first poll finds it due at once; then 30 s, then 60 s of backoff
    assert [run.started_at - START for run in attempts] == [
        datetime.timedelta(0),
        datetime.timedelta(seconds=30),
        datetime.timedelta(seconds=90),
    ]
    assert [url for url, _, _ in client.delivered] == ["https://flaky.example/hook"]


@pytest.mark.pyncette(start=START)
async def test_it_gives_up_after_the_last_attempt(pyncette_app: Simulation) -> None:
    client = queue.WebhookClient(failures={"https://down.example/hook": 100})
    pyncette_app.override_fixture("webhooks", client)

    await queue.enqueue(await _context(pyncette_app), "m3", "https://down.example/hook", {}, at=START)
    await pyncette_app.advance(hours=1)

    pyncette_app.assert_executed(queue.deliver, times=queue.MAX_ATTEMPTS)
    assert client.gave_up == [f"m3-attempt-{queue.MAX_ATTEMPTS}"]
    assert client.delivered == []
    assert (await pyncette_app.list_tasks(queue.deliver)).tasks == []


@pytest.mark.pyncette(start=START)
async def test_many_messages_keep_their_own_instants(pyncette_app: Simulation) -> None:
    client = queue.WebhookClient()
    pyncette_app.override_fixture("webhooks", client)
    context = await _context(pyncette_app)
    for index in range(50):
        at = START + datetime.timedelta(seconds=7 * index)
        await queue.enqueue(context, f"bulk-{index}", "https://a.example/hook", {"n": index}, at=at)

    await pyncette_app.advance(minutes=6)

    assert [payload["n"] for _, payload, _ in client.delivered] == list(range(50))
    assert all(run.lateness == datetime.timedelta(0) for run in pyncette_app.executions(queue.deliver))


async def _context(simulation: Simulation) -> object:
    await simulation.start()
    return simulation.context
