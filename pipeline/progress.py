"""The progress bar every long stage shows: what it does, how far, how fast, and how long is left; and the console
every command prints through."""

import os
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.rule import Rule
from rich.text import Text


class _Rate(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        # rich estimates a speed only from two updates within its window (a one-batch eval has one), and stops
        # at the end: until then, and after it, the mean over the elapsed time.
        speed = task.finished_speed or task.speed
        if speed is None and task.completed and task.elapsed:
            speed = task.completed / task.elapsed
        if speed is None:
            return Text(f"- {self.unit}/s")
        return Text(f"{speed:,.0f} {self.unit}/s" if speed >= 10 else f"{speed:.1f} {self.unit}/s")


NO_WRAP = 10_000  # the width of a console() that writes whole lines


def console(*, stderr: bool = False, highlight: bool = True) -> Console:
    """A rich console on stdout (results) or stderr (progress, notes). Written to a file or a pipe, rich would wrap
    lines at 80 columns, mid-path: there each line is written whole (unless COLUMNS asks for a width)."""
    stream = sys.stderr if stderr else sys.stdout
    # The stream itself, not rich's is_terminal, which FORCE_COLOR (colours in a CI log) makes True.
    if not (hasattr(stream, "isatty") and stream.isatty()) and "COLUMNS" not in os.environ:
        return Console(stderr=stderr, highlight=highlight, soft_wrap=True, width=NO_WRAP)
    return Console(stderr=stderr, highlight=highlight)


def rule(out: Console, title: str) -> None:
    """A section header across the terminal, or 80 columns wide in a file or pipe (where `console()` has no width)."""
    if out.width < NO_WRAP:  # a terminal's width, or COLUMNS
        out.rule(title)
    else:
        out.print(Rule(title), width=80)


def rate_bar(label: str, unit: str, *, enabled: bool = True) -> Progress:
    """label, bar, done/total, `unit`/s, elapsed, ETA; on stderr, so stdout keeps only results."""
    return Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), _Rate(unit), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console(stderr=True), disable=not enabled)
