"""Rendering a simulation for people: the terminal table, time-zone notes and the HTML report."""

from __future__ import annotations

import collections
import datetime
import html
from collections.abc import Iterable, Sequence
from typing import Any

import dateutil.tz
from pyncette import Pyncette

from .journal import Event, Execution, Outcome, _delta, _instant
from .simulation import SimulationReport
from .target import templates

__all__ = ["dst_notes", "render_html", "render_table"]

_COLOURS = {
    Outcome.SUCCEEDED: "#2e9e44",
    Outcome.FAILED: "#d7263d",
    Outcome.CRASHED: "#7b2cbf",
    Outcome.CANCELLED: "#8d99ae",
    Outcome.RUNNING: "#f4a261",
}


def _counts(executions: Iterable[Execution]) -> dict[str, collections.Counter[Outcome]]:
    counts: dict[str, collections.Counter[Outcome]] = collections.defaultdict(collections.Counter)
    for execution in executions:
        counts[execution.task][execution.outcome] += 1
    return counts


def _interesting(events: Iterable[Event]) -> list[Event]:
    """Faults and crashes; routine lease traffic left out."""
    return [event for event in events if not event.kind.startswith("lease ")]


def render_table(
    console: Any,
    report: SimulationReport,
    events: Sequence[Event],
    *,
    notes: Sequence[str] = (),
    limit: int = 20,
    interrupted: bool = False,
) -> None:
    """Per-task summary, the first ``limit`` executions, faults and notes, with rich."""
    from rich.table import Table

    span = f"{_instant(report.start)} to {_instant(report.end)} UTC ({_delta(report.end - report.start).lstrip('+')})"
    console.print(f"[bold]Simulated {span}[/bold]: {len(report.executions)} execution(s)")
    summary = Table(show_edge=False, header_style="bold")
    for column in ("task", "runs", "succeeded", "failed", "crashed", "first run", "last run", "worst lateness"):
        summary.add_column(column, justify="right" if column in ("runs", "succeeded", "failed", "crashed") else "left")
    counts = _counts(report.executions)
    for name, task in report.summary.items():
        summary.add_row(
            name,
            str(task.runs),
            str(task.succeeded),
            str(task.failed),
            str(counts[name][Outcome.CRASHED]),
            _instant(task.first_start) if task.first_start else "-",
            _instant(task.last_start) if task.last_start else "-",
            _delta(task.worst_lateness),
        )
    if report.summary:
        console.print(summary)
    else:
        console.print("No task ran in this window.")
    if report.executions:
        shown = report.executions[:limit]
        timeline = Table(
            title=f"Timeline: first {len(shown)} of {len(report.executions)} execution(s)",
            show_edge=False,
            header_style="bold",
            title_justify="left",
        )
        for column in ("#", "task", "scheduled (UTC)", "started", "late", "worker", "outcome", "settlement"):
            timeline.add_column(column)
        for index, execution in enumerate(shown, 1):
            error = f" ({type(execution.error).__name__})" if execution.error is not None else ""
            timeline.add_row(
                str(index),
                execution.task,
                _instant(execution.scheduled_at),
                _instant(execution.started_at),
                _delta(execution.lateness),
                execution.worker,
                execution.outcome.value + error,
                execution.settlement.value,
            )
        console.print(timeline)
    faults = _interesting(events)
    if faults:
        console.print("[bold]Faults and events[/bold]")
        for event in faults:
            console.print(f"  {event}", markup=False)
    for note in notes:
        console.print(f"[bold]Note:[/bold] {note}")
    if interrupted:
        console.print("[bold]Interrupted[/bold]: showing what ran until then.")


# -- daylight saving time ------------------------------------------------------------------------------


def _transitions(
    zone: str, start: datetime.datetime, end: datetime.datetime
) -> list[tuple[datetime.datetime, datetime.timedelta, datetime.timedelta]]:
    """UTC instants in [start, end) where ``zone``'s offset changes: (instant, before, after)."""
    tz = dateutil.tz.gettz(zone)
    if tz is None:
        return []
    found = []
    step = datetime.timedelta(hours=1)
    here = start.replace(minute=0, second=0, microsecond=0)
    offset = here.astimezone(tz).utcoffset()
    while here < end:
        later = here + step
        after = later.astimezone(tz).utcoffset()
        if after != offset and offset is not None and after is not None:
            low, high = here, later  # the change is in (low, high]: narrow it to the minute
            while high - low > datetime.timedelta(minutes=1):
                middle = low + (high - low) / 2
                if middle.astimezone(tz).utcoffset() == offset:
                    low = middle
                else:
                    high = middle
            if start <= high < end:
                found.append((high, offset, after))
            offset = after
        here = later
    return found


def dst_notes(app: Pyncette, report: SimulationReport) -> list[str]:
    """For cron tasks with a timezone: each DST change in the window, and what Pyncette did then."""
    notes = []
    for owner in templates(app).values():
        zone = owner.timezone
        if not zone or not owner.schedule:
            continue
        tz = dateutil.tz.gettz(zone)
        for instant, before, after in _transitions(zone, report.start, report.end):
            local = instant.astimezone(tz)
            shift = after - before
            if shift > datetime.timedelta(0):
                change = (
                    f"clocks went forward {shift} at {(local - shift).strftime('%Y-%m-%d %H:%M')} local time: "
                    f"local times from {(local - shift).strftime('%H:%M')} to {local.strftime('%H:%M')} did not exist"
                )
            else:
                change = (
                    f"clocks went back {-shift} at {(local - shift).strftime('%Y-%m-%d %H:%M')} local time: "
                    f"local times from {local.strftime('%H:%M')} to {(local - shift).strftime('%H:%M')} happened twice"
                )
            runs = [
                run
                for run in report.executions
                if (run.template or run.task) == owner.name
                and instant - datetime.timedelta(days=1) <= run.started_at <= instant + datetime.timedelta(days=1)
            ]
            did = (
                "; ".join(
                    f"{run.task} ran at {run.started_at.astimezone(tz).strftime('%Y-%m-%d %H:%M %Z')} ({_instant(run.started_at)} UTC)"
                    for run in runs
                )
                or f"{owner.name} did not run within a day of it"
            )
            notes.append(f"{zone}: {change}. Schedule '{owner.schedule}' of {owner.name}: {did}.")
    return notes


# -- HTML ----------------------------------------------------------------------------------------------

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; }
table { border-collapse: collapse; } th, td { padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: left; }
.lane-label { font-size: 12px; fill: #333; } .axis { font-size: 11px; fill: #666; }
.legend span { display: inline-block; margin-right: 1.2em; } .legend i { display: inline-block; width: .9em; height: .9em; margin-right: .3em; vertical-align: -2px; }
"""


def render_html(report: SimulationReport, events: Sequence[Event], *, title: str = "pyncette-sim") -> str:
    """A self-contained HTML page: a swimlane per task, the summary table and the fault events."""
    tasks = list(report.summary)
    width, lane_height, left = 1000, 28, 220
    span = max((report.end - report.start).total_seconds(), 1.0)

    def x(instant: datetime.datetime) -> float:
        return left + (instant - report.start).total_seconds() / span * (width - left - 10)

    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" width="{width}" height="{lane_height * len(tasks) + 40}">'
    ]
    for index, name in enumerate(tasks):
        y = 20 + index * lane_height
        svg.append(f'<g class="lane" data-task="{html.escape(name)}">')
        svg.append(
            f'<rect x="{left}" y="{y}" width="{width - left - 10}" height="{lane_height - 6}" fill="{"#f6f6f6" if index % 2 else "#fbfbfb"}"/>'
        )
        svg.append(f'<text class="lane-label" x="4" y="{y + lane_height / 2}">{html.escape(name)}</text>')
        for run in report.executions:
            if run.task != name:
                continue
            tip = f"{run.task} on {run.worker}: scheduled {_instant(run.scheduled_at)}, started {_instant(run.started_at)}, {run.outcome.value}, {run.settlement.value}"
            svg.append(
                f'<rect class="run {run.outcome.value}" data-worker="{html.escape(run.worker)}" x="{x(run.started_at):.1f}" y="{y + 2}" '
                f'width="3" height="{lane_height - 10}" fill="{_COLOURS[run.outcome]}"><title>{html.escape(tip)}</title></rect>'
            )
        svg.append("</g>")
    bottom = 20 + len(tasks) * lane_height + 12
    svg.append(f'<text class="axis" x="{left}" y="{bottom}">{_instant(report.start)} UTC</text>')
    svg.append(f'<text class="axis" x="{width - 10}" y="{bottom}" text-anchor="end">{_instant(report.end)} UTC</text>')
    svg.append("</svg>")

    counts = _counts(report.executions)
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{task.runs}</td><td>{task.succeeded}</td><td>{task.failed}</td>"
        f"<td>{counts[name][Outcome.CRASHED]}</td><td>{_instant(task.first_start) if task.first_start else '-'}</td>"
        f"<td>{_instant(task.last_start) if task.last_start else '-'}</td><td>{_delta(task.worst_lateness)}</td></tr>"
        for name, task in report.summary.items()
    )
    faults = "".join(f"<li>{html.escape(str(event))}</li>" for event in _interesting(events)) or "<li>none</li>"
    legend = "".join(
        f'<span><i style="background:{colour}"></i>{outcome.value}</span>' for outcome, colour in _COLOURS.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{_instant(report.start)} to {_instant(report.end)} UTC: {len(report.executions)} execution(s) of {len(tasks)} task(s).
Hover a mark for its worker and times.</p>
<p class="legend">{legend}</p>
{"".join(svg)}
<h2>Summary</h2>
<table><tr><th>task</th><th>runs</th><th>succeeded</th><th>failed</th><th>crashed</th><th>first run</th><th>last run</th><th>worst lateness</th></tr>{rows}</table>
<h2>Faults and events</h2>
<ul id="events">{faults}</ul>
<p id="lanes-rendered"></p>
<script>document.getElementById("lanes-rendered").textContent = document.querySelectorAll("#timeline .lane").length + " lanes";</script>
</body></html>
"""
