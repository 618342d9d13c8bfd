"""Nightly billing: a long job that must not run twice, kept alive by heartbeats.

It runs AT_LEAST_ONCE with a short lease; ``with_heartbeat`` extends the lease while the job
works, so another worker never takes over a run that is still in progress.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

from pyncette import Context, ExecutionMode, FailureMode, Pyncette
from pyncette.utils import with_heartbeat

LEASE = datetime.timedelta(seconds=60)
SECONDS_PER_INVOICE = 1.5

app = Pyncette(poll_interval=datetime.timedelta(seconds=10))


class Ledger:
    """Stands in for the billing database."""

    def __init__(self, customers: int = 100) -> None:
        self.customers = [f"customer-{n:03d}" for n in range(customers)]
        self.invoices: list[tuple[str, str]] = []  # (billing day, customer)


@app.fixture()
async def ledger(app_context: Any) -> AsyncIterator[Ledger]:
    yield Ledger()


@app.task(
    schedule="0 2 * * *",
    execution_mode=ExecutionMode.AT_LEAST_ONCE,
    failure_mode=FailureMode.UNLOCK,
    lease_duration=LEASE,
)
@with_heartbeat()
async def nightly_billing(context: Context) -> None:
    day = context.scheduled_at.date().isoformat()
    for customer in context.ledger.customers:
        await asyncio.sleep(SECONDS_PER_INVOICE)  # talking to the payment provider
        context.ledger.invoices.append((day, customer))
