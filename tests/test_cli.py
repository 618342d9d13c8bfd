"""``pyncette-sim``: every option through the real console script, in a subprocess."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import pty
import select
import shutil
import signal
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
APP = "tests.cli.shop:app"
START = "--start=2024-03-29T00:00:00Z"
SCRIPT = shutil.which("pyncette-sim", path=str(pathlib.Path(sys.executable).parent)) or "pyncette-sim"


def sim(*args: str, env: dict[str, str] | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SCRIPT, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )


def ok(*args: str) -> str:
    result = sim(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def rows(*args: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in ok(*args, "--format=json").splitlines()]


def test_the_table_matches_the_golden_output_and_is_stable() -> None:
    args = (APP, START, "--for=3d", "--workers=2", "--crash=w1@12h0m20s", "--schedule", "reminder", "r1", "interval=8h")
    first = ok(*args)
    assert first == ok(*args)
    golden = GOLDEN / "shop_3d.txt"
    if os.environ.get("PYNCETTE_UPDATE_GOLDEN"):
        golden.write_text(first)
    assert first == golden.read_text()


def test_python_dash_m_is_the_same_command() -> None:
    via_module = subprocess.run(
        [sys.executable, "-m", "pyncette_testing", APP, START, "--for=1d"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=True,
    )
    assert via_module.stdout == ok(APP, START, "--for=1d")


@pytest.mark.parametrize("target", ["tests.cli.shop:app", "tests/cli/shop.py:app", "tests/cli/shop.py"])
def test_target_forms(target: str) -> None:
    assert {row["task"] for row in rows(target, START, "--for=1d")} == {"morning_digest", "sync_inventory"}


def test_for_until_and_start() -> None:
    assert len(rows(APP, START, "--for=1d12h")) == len(rows(APP, START, "--until=2024-03-30T12:00:00Z"))
    digest = [row for row in rows(APP, START, "--for=2w") if row["task"] == "morning_digest"]
    assert len(digest) == 14
    assert digest[0]["started_at"] == "2024-03-29T07:00:00+00:00"  # 08:00 CET
    assert digest[2]["started_at"] == "2024-03-31T06:00:00+00:00"  # 08:00 CEST
    # the default start is now (to the second): a day always has 4 inventory syncs
    assert len([row for row in rows(APP, "--for=1d") if row["task"] == "sync_inventory"]) == 4


def test_workers_crash_fail_outage() -> None:
    crashed = rows(APP, START, "--for=1d", "--workers=2", "--crash=w1@6h0m10s")
    assert [
        (row["worker"], row["outcome"]) for row in crashed if row["scheduled_at"] == "2024-03-29T06:00:00+00:00"
    ] == [
        ("w1", "crashed"),
        ("w2", "succeeded"),
    ]
    failed = rows(APP, START, "--for=1d", "--fail=commit_task:sync_inventory x2")
    assert [row["settlement"] for row in failed if row["task"] == "sync_inventory"][:3] == [
        "commit failed",
        "commit failed",
        "committed",
    ]
    late = rows(APP, START, "--for=1d", "--outage=5h59m+30m")
    assert [row["lateness_seconds"] for row in late if row["scheduled_at"] == "2024-03-29T06:00:00+00:00"] == [29 * 60]


def test_chaos_and_seed_replay() -> None:
    first = ok(APP, START, "--for=2h", "--chaos=0.3", "--seed=7", "--format=json")
    assert first == ok(APP, START, "--for=2h", "--chaos=0.3", "--seed=7", "--format=json")
    assert "chaos" in ok(APP, START, "--for=10m", "--chaos=0.3", "--seed=7")


def test_schedule_and_setup() -> None:
    scheduled = rows(APP, START, "--for=1d", "--schedule", "reminder", "ping", "interval=6h", 'channel="ops"')
    pings = [row for row in scheduled if row["task"] == "reminder:ping"]
    assert len(pings) == 4
    at_once = rows(APP, START, "--for=1d", "--schedule", "reminder", "once", "execute_at=2024-03-29T10:30:00Z")
    assert [row["started_at"] for row in at_once if row["task"] == "reminder:once"] == ["2024-03-29T10:30:00+00:00"]
    from_setup = rows(APP, START, "--for=1d", "--setup=tests.cli.shop:setup")
    assert len([row for row in from_setup if row["task"] == "reminder:from-setup"]) == 2


def test_formats_json_csv_html_and_quiet(tmp_path: pathlib.Path) -> None:
    as_json = rows(APP, START, "--for=1d")
    as_csv = list(csv.DictReader(io.StringIO(ok(APP, START, "--for=1d", "--format=csv"))))
    assert len(as_csv) == len(as_json)
    assert [row["started_at"] for row in as_csv] == [row["started_at"] for row in as_json]
    report = tmp_path / "report.html"
    ok(APP, START, "--for=1d", "-q", f"--html={report}")
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert 'class="lane"' in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")  # self-contained
    assert "Note:" in ok(APP, START, "--for=3d")  # the DST change is noted...
    assert "Note:" not in ok(APP, START, "--for=3d", "-q")  # ...unless quiet


def test_limit_and_no_elide_give_the_same_journal() -> None:
    assert ok(APP, START, "--for=1d", "--format=json") == ok(APP, START, "--for=1d", "--format=json", "--no-elide")
    assert "first 3 of" in ok(APP, START, "--for=2d", "--limit=3")


def test_fail_on_error_exit_status() -> None:
    assert sim(APP, START, "--for=6h").returncode == 0
    result = sim(APP, START, "--for=1d", "--fail-on-error")
    assert result.returncode == 1  # the noon sync raises


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch.module:app"], "no module named 'nosuch'"),
        (["tests.cli.shop:missing"], "has no attribute 'missing'"),
        (["tests.cli.shop:not_an_app"], "not a Pyncette app"),
        ([APP, "--for=7x"], "bad duration '7x'"),
        ([APP, "--start=2024-03-29T00:00:00"], "naive"),
        ([APP, "--until=2020-01-01T00:00:00Z", START], "is before the start"),
        ([APP, "--schedule", "nosuch", "x", "interval=1h"], "unknown dynamic task 'nosuch'"),
        ([APP, "--fail=commit_task:nosuch"], "unknown task 'nosuch'"),
        ([APP, "--fail=commit"], "unknown operation 'commit'"),
        ([APP, "--crash=w3@1h"], "unknown worker 'w3'"),
        ([APP, "--crash=w1"], "expected WORKER@OFFSET"),
        ([APP, "--outage=1h"], "expected OFFSET+DURATION"),
        ([APP, "--chaos=2"], "probability in [0, 1]"),
        ([APP, "--setup=tests.cli.shop:not_a_coroutine"], "not a coroutine function"),
        ([APP, "--schedule", "reminder", "x", "interval"], "expected KEY=VALUE"),
    ],
)
def test_usage_errors_are_one_clear_line_and_status_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyncette_testing.cli import main

    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert message in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nosuch.module:app"], "no module named"),
        ([APP, "--for=7x"], "bad duration"),
        ([APP, "--crash=w3@1h"], "unknown worker"),
    ],
)
def test_the_console_script_reports_usage_errors_the_same_way(args: list[str], message: str) -> None:
    result = sim(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_progress_bar_only_on_a_terminal() -> None:
    assert sim(APP, START, "--for=30d").stderr == ""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [SCRIPT, APP, START, "--for=2d", "--no-elide", "--format=json"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=terminal,
            env={**os.environ, "COLUMNS": "100"},
        )
        os.close(terminal)
        seen = b""
        while True:
            ready, _, _ = select.select([controller], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(controller, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert process.wait(timeout=60) == 0
    finally:
        os.close(controller)
    assert b"simulating" in seen


def test_ctrl_c_stops_and_prints_what_ran_so_far() -> None:
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [SCRIPT, APP, START, "--for=3650d", "--no-elide", "--setup=tests.cli.shop:setup"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        pass_fds=(write_end,),
        env={**os.environ, "COLUMNS": "200", "PYNCETTE_TEST_READY_FD": str(write_end)},
    )
    os.close(write_end)
    with os.fdopen(read_end) as ready:
        assert ready.readline() == "ready\n"  # the simulation has started
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "Interrupted" in stdout
    assert "Simulated" in stdout
