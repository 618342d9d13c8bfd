"""Monthly subscription charges, AT_LEAST_ONCE: the buggy version and the fixed one.

``buggy_app`` charges a card and *then* lets Pyncette commit. If the worker dies between the two
(after the charge, before the commit), the lease expires, another worker runs the slot again, and
the customer is charged twice. ``fixed_app`` sends an idempotency key (the customer and the slot),
so the payment provider ignores the repeat.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import AsyncIterator
from typing import Any

from pyncette import Context, ExecutionMode, Pyncette

CUSTOMERS = ("alice", "bob")
OPTIONS: dict[str, Any] = {
    "interval": datetime.timedelta(hours=1),  # hourly here, so that a test sees many slots
    "execution_mode": ExecutionMode.AT_LEAST_ONCE,
    "lease_duration": datetime.timedelta(seconds=30),
}


class PaymentProvider:
    """Stands in for the real one; it remembers idempotency keys, like Stripe does."""

    def __init__(self) -> None:
        self.charges: list[tuple[str, str]] = []  # (customer, billing slot)
        self._keys: set[str] = set()

    async def charge(self, customer: str, slot: str, idempotency_key: str | None = None) -> None:
        if idempotency_key is not None:
            if idempotency_key in self._keys:
                return
            self._keys.add(idempotency_key)
        self.charges.append((customer, slot))


PROVIDER = PaymentProvider()  # shared by every worker, as the real provider would be


async def provider(app_context: Any) -> AsyncIterator[PaymentProvider]:
    yield PROVIDER


def _make(idempotent: bool) -> Pyncette:
    app = Pyncette(poll_interval=datetime.timedelta(seconds=1))
    app.use_fixture("payments", provider)

    @app.task(name="charge_subscriptions", **OPTIONS)
    async def charge_subscriptions(context: Context) -> None:
        slot = context.scheduled_at.isoformat()
        for customer in CUSTOMERS:
            key = f"{customer}@{slot}" if idempotent else None
            await context.payments.charge(customer, slot, idempotency_key=key)
            await asyncio.sleep(5)  # talking to the provider takes a while

    return app


buggy_app = _make(idempotent=False)
fixed_app = _make(idempotent=True)
