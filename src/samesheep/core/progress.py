"""Progress for every long step: a live bar on a terminal; elsewhere (a log file, CI, nohup)
plain lines saying what started, how far it is now and then, and what finished at what rate."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
LINE_EVERY_S = 60.0
"""Without a terminal, a step that runs long prints its state this often."""


def progress() -> Progress | LineProgress:
    """Progress on stderr: a rich bar (description, count, rate, elapsed, ETA) on a terminal,
    else one line per start and finish (and one a minute in between)."""
    if not console.is_terminal:
        return LineProgress()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


class _Task:
    def __init__(self, description: str, total: float | None, completed: float, rate: str):
        self.description, self.total, self.completed, self.rate = (
            description,
            total,
            completed,
            rate,
        )
        self.start = self.last = time.monotonic()
        self.finished = False


class LineProgress:
    """The part of rich's Progress interface the stages use, writing plain lines."""

    def __init__(self, every_s: float = LINE_EVERY_S):
        self.every_s = every_s
        self.tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            for i, t in enumerate(self.tasks):
                if not t.finished:
                    self._finish(i)

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **fields: Any
    ) -> int:
        self.tasks.append(_Task(description, total, completed, str(fields.get("rate", ""))))
        of = f" ({completed:,.0f} of {total:,.0f} done)" if completed and total else ""
        say(f"{description}: started{of}")
        return len(self.tasks) - 1

    def update(
        self,
        task: int,
        completed: float | None = None,
        advance: float = 0,
        rate: str | None = None,
        **_: Any,
    ) -> None:
        t = self.tasks[task]
        if completed is not None:
            t.completed = completed
        t.completed += advance
        if rate is not None:
            t.rate = rate
        if t.total is not None and t.completed >= t.total and not t.finished:
            self._finish(task)
        elif time.monotonic() - t.last >= self.every_s and not t.finished:
            t.last = time.monotonic()
            say(f"{t.description}: {self._count(t)}" + (f", {t.rate}" if t.rate else ""))

    @staticmethod
    def _count(t: _Task) -> str:
        return f"{t.completed:,.0f}" + (f" of {t.total:,.0f}" if t.total is not None else "")

    def _finish(self, task: int) -> None:
        t = self.tasks[task]
        t.finished = True
        seconds = time.monotonic() - t.start
        say(
            f"{t.description}: finished {self._count(t)} in {seconds:,.1f} s"
            + (f", {t.rate}" if t.rate else "")
        )


@contextmanager
def step(description: str, timings: dict[str, float] | None = None, name: str = "") -> Iterator:
    """A step without a count: a spinner on a terminal, else a line when it starts and one
    when it finishes with its time; its seconds go to timings[name] where both are given."""
    start = time.perf_counter()
    if console.is_terminal:
        with console.status(description):
            yield
    else:
        say(f"{description}: started")
        yield
    seconds = time.perf_counter() - start
    if not console.is_terminal:
        say(f"{description}: finished in {seconds:,.1f} s")
    if timings is not None and name:
        timings[name] = seconds


def say(message: str) -> None:
    """One line of status for the user, on stderr."""
    console.print(message, highlight=False)
