"""Progress for long work: a live bar on a terminal, log lines elsewhere (DVC, Prefect, CI).
Both show the time left from the first seconds: the bar's own estimate, and in logs a first
line after FIRST_REPORT_S, then one at every 10% and at least every REPORT_EVERY_S, each with
the rate and the time left at that rate (a 10-minute stage used to say nothing for a minute,
and its log lines never said how long was left).

While the bar is live, the log handlers that write to the same terminal write through the bar's
console instead (rich's FileProxy: each line printed above the bar): a handler writing to the
stream directly would land behind the bar's last frame (`...0:00:37imagepipe.train: epoch 11/40`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

from rich.console import Console
from rich.file_proxy import FileProxy
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

log = logging.getLogger("imagepipe")

# Seconds before the first log line (unless 10% comes sooner): long enough for a rate that
# means something, short enough that a person watching sees the stage's pace at once.
FIRST_REPORT_S = 5.0
# At most this long between log lines: an epoch of a large set is more than 10% of nothing.
REPORT_EVERY_S = 60.0


def _writes_to(handler: logging.Handler, console: Console) -> bool:
    """Whether a handler writes to the terminal the bar is drawn on."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = handler.stream
    if stream is console.file:
        return True
    try:
        return bool(stream.isatty()) and console.is_terminal
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


@contextmanager
def logs_through(console: Console) -> Iterator[None]:
    """Point the root logger's handlers that write to the console's terminal at the console
    (which clears the bar, prints the line, and draws the bar again), and back after."""
    handlers = [h for h in logging.getLogger().handlers if _writes_to(h, console)]
    streams = [h.setStream(FileProxy(console, h.stream)) for h in handlers]
    # Soft wrap: a long line (a path, a traceback) keeps its own line breaks, as without a bar.
    wrap, console.soft_wrap = console.soft_wrap, True
    try:
        yield
    finally:
        console.soft_wrap = wrap
        for handler, stream in zip(handlers, streams, strict=True):
            handler.setStream(stream)


@contextmanager
def progress(description: str, total: int, *,
             console: Console | None = None) -> Iterator[Callable[[int], None]]:
    """Yield advance(n) of n images; the rate is shown in img/s. `console`: where the bar goes
    (stderr)."""
    console = console or Console(stderr=True)
    if console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as bar, logs_through(console):
            task = bar.add_task(description, total=total, rate="")
            start = time.perf_counter()

            def advance(n: int) -> None:
                bar.advance(task, n)
                done = bar.tasks[0].completed
                bar.update(task, rate=f"{done / max(time.perf_counter() - start, 1e-9):,.0f} img/s")

            yield advance
        return
    yield _log_lines(description, total)


def _log_lines(description: str, total: int) -> Callable[[int], None]:
    """advance(n) that logs progress lines with the time left (see the module doc)."""
    start = time.perf_counter()
    done, tenth, next_time = 0, 1, start + FIRST_REPORT_S  # next line at tenth/10 of total

    def advance_log(n: int) -> None:
        nonlocal done, tenth, next_time
        done += n
        now = time.perf_counter()
        if not total or not done or (done * 10 < tenth * total and now < next_time):
            return
        rate = done / max(now - start, 1e-9)
        left = (f"{timedelta(seconds=round((total - done) / rate))} left" if done < total
                else f"done in {timedelta(seconds=round(now - start))}")  # 0:07:05
        log.info(f"{description}: {done}/{total} ({done / total:.0%}, {rate:,.0f} img/s, "
                 f"{left})")
        tenth = done * 10 // total + 1
        next_time = now + REPORT_EVERY_S

    return advance_log
