"""The HTML report, opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import datetime
import os
import pathlib
import re
import shutil
import subprocess

import pytest
from pyncette import Context, FailureMode, Pyncette

from pyncette_testing import simulate
from pyncette_testing.report import render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _browser() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return CHROMIUM


def test_the_report_renders_a_lane_per_task_in_a_real_browser(tmp_path: pathlib.Path) -> None:
    app = Pyncette(poll_interval=datetime.timedelta(minutes=1))

    @app.task(schedule="0 * * * *")
    async def hourly(context: Context) -> None:
        pass

    @app.task(interval=datetime.timedelta(hours=5), failure_mode=FailureMode.COMMIT)
    async def flaky(context: Context) -> None:
        raise RuntimeError("always")

    report = simulate(app, datetime.timedelta(days=1), start="2024-01-01T00:00:00Z")
    page = tmp_path / "report.html"
    page.write_text(render_html(report, [], title="two tasks"))

    dom = subprocess.run(
        [
            _browser(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert '<p id="lanes-rendered">2 lanes</p>' in dom  # its script ran and counted the lanes
    lanes = re.findall(r'<g class="lane" data-task="([^"]+)">', dom)
    assert lanes == ["flaky", "hourly"]
    assert len(re.findall(r'class="run failed"', dom)) == 4  # at 5, 10, 15 and 20 h
    assert len(re.findall(r'class="run succeeded"', dom)) == 24
