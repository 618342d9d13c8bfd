"""The daily report across the spring DST change (2024-03-31, CET -> CEST) and the autumn one."""

from __future__ import annotations

import datetime
import zoneinfo

import pytest

from examples.daily_report.app import Mailer, daily_report
from pyncette_testing import Outcome, Simulation

LJUBLJANA = zoneinfo.ZoneInfo("Europe/Ljubljana")
UTC = datetime.timezone.utc


@pytest.mark.pyncette(app="examples.daily_report.app:app", start="2024-03-29T00:00:00Z")
async def test_the_report_goes_out_at_nine_local_time_every_day_across_the_spring_dst_change(
    pyncette_app: Simulation,
) -> None:
    mailer = Mailer()
    pyncette_app.override_fixture("mailer", mailer)

    await pyncette_app.advance(days=4)

    runs = pyncette_app.assert_executed(daily_report, times=4, outcome=Outcome.SUCCEEDED)
    # 09:00 local time is 08:00 UTC in winter and 07:00 UTC in summer.
    assert [run.started_at for run in runs] == [
        datetime.datetime(2024, 3, 29, 8, tzinfo=UTC),
        datetime.datetime(2024, 3, 30, 8, tzinfo=UTC),
        datetime.datetime(2024, 3, 31, 7, tzinfo=UTC),
        datetime.datetime(2024, 4, 1, 7, tzinfo=UTC),
    ]
    assert {run.started_at.astimezone(LJUBLJANA).hour for run in runs} == {9}
    assert [mail["subject"] for mail in mailer.sent] == [
        "Sales report for 2024-03-29",
        "Sales report for 2024-03-30",
        "Sales report for 2024-03-31",
        "Sales report for 2024-04-01",
    ]


@pytest.mark.pyncette(app="examples.daily_report.app:app", start="2024-10-26T00:00:00Z")
async def test_the_repeated_hour_in_autumn_does_not_send_twice(pyncette_app: Simulation) -> None:
    await pyncette_app.advance(days=3)

    runs = pyncette_app.assert_executed(daily_report, times=3)
    assert [run.started_at.astimezone(LJUBLJANA).date().day for run in runs] == [26, 27, 28]
    assert all(run.lateness == datetime.timedelta(0) for run in runs)


@pytest.mark.pyncette(app="examples.daily_report.app:app", start="2024-03-29T09:30:00+01:00")
async def test_a_report_is_never_sent_early_after_a_restart_mid_morning(pyncette_app: Simulation) -> None:
    await pyncette_app.advance(hours=12)
    # Started after today's 09:00: the first report is tomorrow's.
    pyncette_app.assert_executed(daily_report, times=0)
    await pyncette_app.run_until_executed(daily_report)
    assert pyncette_app.now == datetime.datetime(2024, 3, 30, 9, tzinfo=LJUBLJANA)
