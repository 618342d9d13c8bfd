"""``pyncette-sim``: preview what a Pyncette app will do over days or years, in seconds."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import dataclasses
import datetime
import importlib
import io
import json
import os
import re
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from pyncette import Pyncette

from .clock import to_utc
from .faults import OPERATIONS
from .journal import Event, Execution, Outcome
from .loop import VirtualTimeLoop
from .report import dst_notes, render_html, render_table
from .simulation import Simulation, SimulationReport, _close_loop
from .target import FORMS, load_app, templates

__all__ = ["main", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
DURATION_FORMS = "a number with a unit (s, m, h, d, w), or several: 90s, 15m, 7d, 1d12h, 2w"


class UsageError(Exception):
    """A bad command line: one line on stderr, exit status 2."""


def parse_duration(text: str) -> datetime.timedelta:
    """``"1d12h"`` -> 1 day 12 hours. Units: s, m, h, d, w."""
    text = text.strip()
    if not text or _DURATION.sub("", text):
        raise UsageError(f"bad duration {text!r}: expected {DURATION_FORMS}")
    return datetime.timedelta(seconds=sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text)))


def _instant(text: str, option: str) -> datetime.datetime:
    try:
        return to_utc(text, what=option)
    except (TypeError, ValueError) as error:
        raise UsageError(f"{error} (expected ISO-8601 with an offset, e.g. 2025-01-01T00:00:00Z)") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyncette-sim",
        description="Simulate a Pyncette app under virtual time and show every execution it would make.",
    )
    parser.add_argument("target", metavar="TARGET", help=f"the app: {FORMS}")
    span = parser.add_mutually_exclusive_group()
    span.add_argument(
        "--for", dest="duration", metavar="DURATION", help=f"how long to simulate (default 1d): {DURATION_FORMS}"
    )
    span.add_argument("--until", metavar="INSTANT", help="simulate up to this instant (ISO-8601 with an offset)")
    parser.add_argument(
        "--start", metavar="INSTANT", help="virtual start (ISO-8601 with an offset; default: now, to the second)"
    )
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="processes sharing the store (default 1)")
    parser.add_argument(
        "--crash", action="append", default=[], metavar="WORKER@OFFSET", help="crash a worker, e.g. w1@2h30m"
    )
    parser.add_argument(
        "--fail",
        action="append",
        default=[],
        metavar="OPERATION[:TASK][xTIMES]",
        help="make repository calls fail, e.g. commit_task:report x3",
    )
    parser.add_argument(
        "--outage", action="append", default=[], metavar="OFFSET+DURATION", help="a storage outage, e.g. 1h+10m"
    )
    parser.add_argument("--chaos", type=float, metavar="P", help="each repository call fails with probability P")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed for chaos (default 0)")
    parser.add_argument(
        "--schedule",
        nargs="+",
        action="append",
        default=[],
        metavar="ARG",
        help="schedule a dynamic instance: TASK NAME KEY=VALUE ...",
    )
    parser.add_argument("--setup", metavar="MODULE:COROUTINE", help="await COROUTINE(context) before the run")
    parser.add_argument(
        "--format", choices=("table", "json", "csv"), default="table", help="output format (default table)"
    )
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained HTML report")
    parser.add_argument(
        "--limit", type=int, default=20, metavar="N", help="executions in the table's timeline (default 20)"
    )
    parser.add_argument("--no-elide", action="store_true", help="run every idle tick (slower; same results)")
    parser.add_argument(
        "--fail-on-error", action="store_true", help="exit with status 1 if an execution failed or crashed"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no notes")
    return parser


@dataclasses.dataclass
class _Plan:
    app: Pyncette
    start: datetime.datetime
    end: datetime.datetime
    workers: int
    crashes: list[tuple[str, datetime.timedelta]]
    fails: list[tuple[str, str | None, int]]
    outages: list[tuple[datetime.timedelta, datetime.timedelta]]
    schedules: list[tuple[str, str, dict[str, Any]]]
    setup: Any


def _plan(args: argparse.Namespace) -> _Plan:
    try:
        app = load_app(args.target)
    except ValueError as error:
        raise UsageError(str(error)) from None
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    start = _instant(args.start, "--start") if args.start else now
    if args.until:
        end = _instant(args.until, "--until")
        if end < start:
            raise UsageError(f"--until {args.until} is before the start {start.isoformat()}")
    else:
        end = start + parse_duration(args.duration or "1d")
    if args.workers < 1:
        raise UsageError(f"--workers must be 1 or more, got {args.workers}")
    names = {f"w{n}" for n in range(1, args.workers + 1)}
    defined = templates(app)

    crashes = []
    for spec in args.crash:
        worker, sep, offset = spec.partition("@")
        if not sep:
            raise UsageError(f"bad --crash {spec!r}: expected WORKER@OFFSET, e.g. w1@2h30m")
        if worker not in names:
            raise UsageError(
                f"unknown worker {worker!r} in --crash: workers are {', '.join(sorted(names))} (see --workers)"
            )
        crashes.append((worker, parse_duration(offset)))

    fails = []
    for spec in args.fail:
        match = re.fullmatch(r"(\w+)(?::(.+?))?(?:\s*x(\d+))?", spec.strip())
        if not match:
            raise UsageError(f"bad --fail {spec!r}: expected OPERATION[:TASK][xTIMES], e.g. commit_task:report x3")
        operation, task, times = match.group(1), match.group(2), int(match.group(3) or 1)
        if operation not in OPERATIONS:
            raise UsageError(f"unknown operation {operation!r} in --fail: choose from {', '.join(OPERATIONS)}")
        if task is not None and task.split(":")[0] not in defined:
            raise UsageError(f"unknown task {task!r} in --fail: the app has {', '.join(sorted(defined))}")
        fails.append((operation, task, times))

    outages = []
    for spec in args.outage:
        offset, sep, duration = spec.partition("+")
        if not sep:
            raise UsageError(f"bad --outage {spec!r}: expected OFFSET+DURATION, e.g. 1h+10m")
        outages.append((parse_duration(offset), parse_duration(duration)))

    if args.chaos is not None and not 0 <= args.chaos <= 1:
        raise UsageError(f"--chaos must be a probability in [0, 1], got {args.chaos}")

    schedules = []
    for spec in args.schedule:
        if len(spec) < 2:
            raise UsageError(f"bad --schedule {' '.join(spec)!r}: expected TASK NAME KEY=VALUE ...")
        task_name, instance, *pairs = spec
        task = defined.get(task_name)
        if task is None or not task.dynamic:
            dynamic = sorted(name for name, t in defined.items() if t.dynamic)
            raise UsageError(
                f"unknown dynamic task {task_name!r} in --schedule: the app's dynamic tasks are {', '.join(dynamic) or 'none'}"
            )
        schedules.append((task_name, instance, dict(_keyword(pair) for pair in pairs)))

    setup = None
    if args.setup:
        module, sep, attribute = args.setup.partition(":")
        if not sep or not attribute:
            raise UsageError(f"bad --setup {args.setup!r}: expected MODULE:COROUTINE")
        try:
            setup = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise UsageError(f"bad --setup {args.setup!r}: {error}") from None
        if not asyncio.iscoroutinefunction(setup):
            raise UsageError(f"bad --setup {args.setup!r}: {attribute} is not a coroutine function (async def)")
    return _Plan(app, start, end, args.workers, crashes, fails, outages, schedules, setup)


def _keyword(pair: str) -> tuple[str, Any]:
    key, sep, value = pair.partition("=")
    if not sep or not key:
        raise UsageError(f"bad --schedule argument {pair!r}: expected KEY=VALUE, e.g. interval=5m")
    if key == "interval":
        return key, parse_duration(value)
    if key == "execute_at":
        return key, _instant(value, "execute_at")
    if key in ("schedule", "timezone"):
        return key, value
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _run(plan: _Plan, args: argparse.Namespace) -> tuple[SimulationReport, list[Event], bool]:

    progress_bar = None
    if not args.quiet and sys.stderr.isatty():
        from rich.progress import Progress

        progress_bar = Progress(transient=True, console=_console(sys.stderr))
    loop = VirtualTimeLoop()
    try:
        if progress_bar is not None:
            with progress_bar:
                job = progress_bar.add_task("simulating", total=1.0)
                result = loop.run_until_complete(
                    _simulate_with_events(plan, args, lambda f: progress_bar.update(job, completed=f))
                )
        else:
            result = loop.run_until_complete(_simulate_with_events(plan, args, None))
    finally:
        _close_loop(loop)
    return result


async def _simulate_with_events(
    plan: _Plan, args: argparse.Namespace, progress: Any
) -> tuple[SimulationReport, list[Event], bool]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    options = {"start": plan.start, "workers": plan.workers, "seed": args.seed, "elide_idle_ticks": not args.no_elide}
    with _sigint(loop, stop.set):  # Ctrl-C: stop between slices and report what ran so far
        async with Simulation(plan.app, **options) as sim:
            for task_name, instance, keywords in plan.schedules:
                try:
                    await sim.schedule_task(templates(plan.app)[task_name], instance, **keywords)
                except (TypeError, ValueError) as error:
                    raise UsageError(f"bad --schedule for {task_name} {instance}: {error}") from None
            if plan.setup is not None:
                await sim.start()
                await plan.setup(sim.context)
            for worker, offset in plan.crashes:
                sim.faults.crash(worker, at=plan.start + offset)
            for operation, task, times in plan.fails:
                sim.faults.fail(operation, task=task, times=times)
            for offset, duration in plan.outages:
                sim.faults.outage(duration, at=plan.start + offset)
            if args.chaos:
                sim.faults.chaos(args.chaos)
            total = (plan.end - plan.start).total_seconds()
            shown = [0.0]

            def interrupted(simulation: Simulation) -> bool:
                # checked whenever the cluster is idle: progress (a few times a second), and Ctrl-C
                if progress is not None and time.monotonic() - shown[0] > 0.1:
                    shown[0] = time.monotonic()
                    progress((simulation.now - plan.start).total_seconds() / total if total else 1.0)
                return stop.is_set()

            with contextlib.suppress(TimeoutError):  # TimeoutError: the whole window ran
                await sim.run_until(interrupted, timeout=plan.end - sim.now)
            events = sim.events()
    return sim.report(), events, stop.is_set()


class _sigint:
    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Any) -> None:
        self._loop = loop
        self._handler = handler
        self._installed = False

    def __enter__(self) -> None:
        try:
            self._loop.add_signal_handler(signal.SIGINT, self._handler)
            self._installed = True
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass

    def __exit__(self, *exc_info: object) -> None:
        if self._installed:
            self._loop.remove_signal_handler(signal.SIGINT)


def _console(file: Any) -> Any:
    from rich.console import Console

    width = None if file.isatty() else int(os.environ.get("COLUMNS", "120"))
    return Console(file=file, highlight=False, soft_wrap=False, width=width)


_FIELDS = [
    "task",
    "template",
    "instance",
    "worker",
    "scheduled_at",
    "started_at",
    "finished_at",
    "lateness_seconds",
    "outcome",
    "settlement",
    "error",
]


def _execution_row(execution: Execution) -> dict[str, Any]:
    return {
        "task": execution.task,
        "template": execution.template,
        "instance": execution.instance,
        "worker": execution.worker,
        "scheduled_at": execution.scheduled_at.isoformat(),
        "started_at": execution.started_at.isoformat(),
        "finished_at": None if execution.finished_at is None else execution.finished_at.isoformat(),
        "lateness_seconds": execution.lateness.total_seconds(),
        "outcome": execution.outcome.value,
        "settlement": execution.settlement.value,
        "error": None if execution.error is None else f"{type(execution.error).__name__}: {execution.error}",
    }


def _write(
    report: SimulationReport, events: list[Event], plan: _Plan, args: argparse.Namespace, interrupted: bool
) -> None:
    out = sys.stdout
    if args.format == "json":
        for execution in report.executions:
            out.write(json.dumps(_execution_row(execution)) + "\n")
    elif args.format == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_FIELDS, lineterminator="\n")
        writer.writeheader()
        for execution in report.executions:
            writer.writerow(_execution_row(execution))
        out.write(buffer.getvalue())
    else:
        notes = [] if args.quiet else dst_notes(plan.app, report)
        render_table(_console(out), report, events, notes=notes, limit=args.limit, interrupted=interrupted)
    if args.html:
        with open(args.html, "w", encoding="utf-8") as file:
            file.write(render_html(report, events, title=f"pyncette-sim {args.target}"))


def _usage_exit(message: str) -> NoReturn:
    sys.stderr.write(f"pyncette-sim: error: {message}\n")
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pyncette-sim`` and ``python -m pyncette_testing``."""
    parser = _parser()
    args = parser.parse_args(argv)
    import logging

    # Task failures go in the report instead of the log; the project's modules import by name, as
    # with `python -m`. Both are undone on the way out, so that main() can be called in-process.
    pyncette_logger = logging.getLogger("pyncette")
    level, path = pyncette_logger.level, list(sys.path)
    pyncette_logger.setLevel(logging.CRITICAL)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        try:
            plan = _plan(args)
            report, events, interrupted = _run(plan, args)
        except UsageError as error:
            _usage_exit(str(error))
        except KeyboardInterrupt:
            return 130
        _write(report, events, plan, args, interrupted)
    finally:
        pyncette_logger.setLevel(level)
        sys.path[:] = path
    if args.fail_on_error and any(run.outcome in (Outcome.FAILED, Outcome.CRASHED) for run in report.executions):
        return 1
    return 0


def main_entry() -> None:
    """Console-script entry point."""
    raise SystemExit(main())
