"""Progress bars with a rate and an ETA for every long step."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, soft_wrap=True)  # whole lines in logs, not 80 columns


def progress() -> Progress:
    """A rich progress display on stderr: description, bar, count, rate, elapsed, ETA."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def say(message: str) -> None:
    """One line of status for the user, on stderr."""
    console.print(message, highlight=False)
