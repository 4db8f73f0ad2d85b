"""Progress for long work: a live bar on a terminal, a line every ~10% in logs (DVC, Prefect, CI)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("imagepipe")


@contextmanager
def progress(description: str, total: int, unit: str = "img") -> Iterator[Callable[[int], None]]:
    """Yield advance(n); the rate is shown in `unit`/s."""
    console = Console(stderr=True)
    if console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar:
            task = bar.add_task(description, total=total, rate="")
            start = time.perf_counter()

            def advance(n: int) -> None:
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):,.0f} {unit}/s")

            yield advance
        return
    done, next_report, start = 0, 0.1, time.perf_counter()

    def advance_log(n: int) -> None:
        nonlocal done, next_report
        done += n
        if total and done / total >= next_report:
            rate = done / max(time.perf_counter() - start, 1e-9)
            log.info(f"{description}: {done}/{total} ({done / total:.0%}, {rate:,.0f} {unit}/s)")
            next_report += 0.1

    yield advance_log
