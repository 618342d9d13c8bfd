"""A delay queue: webhooks delivered at an exact future instant, retried with backoff on failure.

Each delivery is a dynamic task instance with ``execute_at``: it runs once and disappears. A failed
attempt schedules the next one (``attempt + 1``) after an exponential backoff, up to ``MAX_ATTEMPTS``.
"""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from typing import Any

from pyncette import Context, Pyncette

MAX_ATTEMPTS = 4
BASE_BACKOFF = datetime.timedelta(seconds=30)

app = Pyncette(poll_interval=datetime.timedelta(seconds=1))


class DeliveryError(Exception):
    pass


class WebhookClient:
    """Stands in for an HTTP client; ``failures`` says how many times each URL fails first."""

    def __init__(self, failures: dict[str, int] | None = None) -> None:
        self.failures = dict(failures or {})
        self.delivered: list[tuple[str, dict[str, Any], datetime.datetime]] = []
        self.gave_up: list[str] = []

    async def post(self, url: str, payload: dict[str, Any]) -> None:
        if self.failures.get(url, 0) > 0:
            self.failures[url] -= 1
            raise DeliveryError(f"{url} answered 503")
        self.delivered.append((url, payload, datetime.datetime.now(datetime.timezone.utc)))


@app.fixture()
async def webhooks(app_context: Any) -> AsyncIterator[WebhookClient]:
    yield WebhookClient()


@app.dynamic_task()
async def deliver(context: Context) -> None:
    url, payload, attempt = context.args["url"], context.args["payload"], context.args["attempt"]
    try:
        await context.webhooks.post(url, payload)
    except DeliveryError:
        if attempt >= MAX_ATTEMPTS:
            context.webhooks.gave_up.append(context.task.name)
            return
        retry_at = datetime.datetime.now(datetime.timezone.utc) + BASE_BACKOFF * 2 ** (attempt - 1)
        await enqueue(context.app_context, context.args["message_id"], url, payload, at=retry_at, attempt=attempt + 1)


async def enqueue(
    app_context: Any,
    message_id: str,
    url: str,
    payload: dict[str, Any],
    *,
    at: datetime.datetime,
    attempt: int = 1,
) -> None:
    """Deliver ``payload`` to ``url`` at ``at``."""
    await app_context.schedule_task(
        deliver,
        f"{message_id}-attempt-{attempt}",
        execute_at=at,
        message_id=message_id,
        url=url,
        payload=payload,
        attempt=attempt,
    )
