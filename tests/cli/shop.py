"""A small app for the command-line tests: static, cron with a timezone, dynamic, and a failing task."""

from __future__ import annotations

import asyncio
import datetime
import os
import sys
from typing import Any

from pyncette import Context, FailureMode, Pyncette

app = Pyncette(poll_interval=datetime.timedelta(seconds=10))
not_an_app = "just a string"


@app.task(schedule="0 8 * * *", timezone="Europe/Ljubljana")
async def morning_digest(context: Context) -> None:
    pass


@app.task(interval=datetime.timedelta(hours=6), failure_mode=FailureMode.COMMIT)
async def sync_inventory(context: Context) -> None:
    await asyncio.sleep(30)
    if context.scheduled_at.hour == 12:
        raise ConnectionError("supplier API down at noon")


@app.dynamic_task()
async def reminder(context: Context) -> None:
    pass


async def setup(app_context: Any) -> None:
    """For --setup: schedule one reminder, and say so on a pipe when asked to."""
    await app_context.schedule_task(reminder, "from-setup", interval=datetime.timedelta(hours=12))
    ready = os.environ.get("PYNCETTE_TEST_READY_FD")
    if ready:
        os.write(int(ready), b"ready\n")


def not_a_coroutine(app_context: Any) -> None:
    sys.exit("should not be called")
