"""Nightly billing on a two-worker cluster: one run per night, kept alive by heartbeats."""

from __future__ import annotations

import collections
import datetime

import pytest

from examples.billing import app as billing
from pyncette_testing import Outcome, Simulation

UTC = datetime.timezone.utc


@pytest.mark.pyncette(app="examples.billing.app:app", start="2024-06-01T00:00:00Z")
async def test_each_night_bills_every_customer_exactly_once_on_a_two_worker_cluster(pyncette_app: Simulation) -> None:
    ledger = billing.Ledger(customers=100)
    pyncette_app.override_fixture("ledger", ledger)
    await pyncette_app.add_worker("w2")

    await pyncette_app.advance(days=3)

    runs = pyncette_app.assert_executed(billing.nightly_billing, times=3, outcome=Outcome.SUCCEEDED)
    # 100 invoices at 1.5 s: each run takes 150 s, far beyond its 60 s lease
    assert {run.duration for run in runs} == {datetime.timedelta(seconds=150)}
    assert [run.started_at.date().isoformat() for run in runs] == ["2024-06-01", "2024-06-02", "2024-06-03"]
    per_day = collections.Counter(day for day, _ in ledger.invoices)
    assert per_day == {"2024-06-01": 100, "2024-06-02": 100, "2024-06-03": 100}
    assert len(set(ledger.invoices)) == len(ledger.invoices)  # nobody billed twice


@pytest.mark.pyncette(app="examples.billing.app:app", start="2024-06-01T01:59:00Z")
async def test_the_lease_is_held_while_the_job_runs_and_released_after(pyncette_app: Simulation) -> None:
    pyncette_app.override_fixture("ledger", billing.Ledger(customers=100))

    await pyncette_app.advance(minutes=1, seconds=30)
    during = await pyncette_app.get_task(billing.nightly_billing)
    assert during is not None
    assert during.locked_until is not None
    assert during.locked_until > pyncette_app.now  # heartbeats kept pushing it forward

    await pyncette_app.advance(minutes=5)
    after = await pyncette_app.get_task(billing.nightly_billing)
    assert after is not None
    assert after.locked_until is None
    assert after.scheduled_at == datetime.datetime(2024, 6, 2, 2, tzinfo=UTC)
