"""A daily sales report, sent at 09:00 Ljubljana time, whatever the season."""

from __future__ import annotations

import datetime
from collections.abc import AsyncIterator
from typing import Any

from pyncette import Context, Pyncette

app = Pyncette(poll_interval=datetime.timedelta(minutes=1))


class Mailer:
    """Stands in for a real SMTP client."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, to: str, subject: str) -> None:
        self.sent.append({"to": to, "subject": subject, "at": datetime.datetime.now(datetime.timezone.utc)})


@app.fixture()
async def mailer(app_context: Any) -> AsyncIterator[Mailer]:
    yield Mailer()  # production would open an SMTP connection here


@app.task(schedule="0 9 * * *", timezone="Europe/Ljubljana")
async def daily_report(context: Context) -> None:
    day = context.scheduled_at.date().isoformat()
    await context.mailer.send("sales@example.com", f"Sales report for {day}")


if __name__ == "__main__":
    app.main()
