"""The progress bar and log lines on one terminal: a line logged while the bar is live lands on
its own line (not glued to the bar's last frame); without a terminal, plain log lines."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator

import pytest
from rich.console import Console

from stages.core.progress import progress

MESSAGE = "imagepipe.train: pretrain epoch 11/40"
# Cursor moves, erases, colours: what a terminal interprets and never shows.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def terminal_logging() -> Iterator[io.StringIO]:
    """A fake terminal and the root logger writing to it, as configure_process sets it up."""
    screen = io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(screen)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield screen
    root.removeHandler(handler)
    root.setLevel(saved)


def shown_lines(raw: str) -> list[str]:
    """The lines a person sees: control sequences removed, split at newlines and returns."""
    return [ln.strip() for ln in re.split(r"[\r\n]", _CONTROL.sub("", raw)) if ln.strip()]


def test_a_log_line_during_a_live_bar_lands_on_its_own_line(
        terminal_logging: io.StringIO) -> None:
    console = Console(force_terminal=True, file=terminal_logging, width=100)
    with progress("pretrain (40 epochs)", 40, console=console) as advance:
        advance(10)
        logging.getLogger("imagepipe.train").info("pretrain epoch 11/40")
        advance(30)
    lines = shown_lines(terminal_logging.getvalue())
    assert MESSAGE in lines, lines  # the whole line, nothing before or after it
    assert not any(MESSAGE in ln and ln != MESSAGE for ln in lines), lines
    handlers = logging.getLogger().handlers  # the stream handler is back after the bar
    assert any(isinstance(h, logging.StreamHandler) and h.stream is terminal_logging
               for h in handlers)


def test_a_log_line_wider_than_the_terminal_is_not_broken_up(
        terminal_logging: io.StringIO) -> None:
    """rich's FileProxy prints with word wrap: a long path split at its words across lines."""
    console = Console(force_terminal=True, file=terminal_logging, width=40)
    path = "data/source/" + "/".join(["folder with spaces"] * 6) + "/photo.jpg"
    with progress("ingest source", 4, console=console) as advance:
        logging.getLogger("imagepipe.data").info("skipped %s: unreadable", path)
        advance(4)
    assert f"imagepipe.data: skipped {path}: unreadable" in shown_lines(terminal_logging.getvalue())
    assert not console.soft_wrap  # the console as it was


def test_without_a_terminal_progress_is_plain_log_lines(terminal_logging: io.StringIO) -> None:
    console = Console(force_terminal=False, file=io.StringIO())
    with progress("augment", 10, console=console) as advance:
        for _ in range(10):
            advance(1)
    lines = terminal_logging.getvalue().splitlines()
    assert lines[0].startswith("imagepipe: augment: 1/10 (10%")
    assert lines[-1].startswith("imagepipe: augment: 10/10 (100%")
    assert "\x1b" not in terminal_logging.getvalue()


def test_logs_show_the_time_left_from_the_first_seconds(terminal_logging: io.StringIO,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a terminal: a first line after FIRST_REPORT_S though 10% is far off, each line
    with the time left at the rate so far; then every 10% or REPORT_EVERY_S, whichever first."""
    import types

    from stages.core import progress as module

    now = [100.0]
    monkeypatch.setattr(module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    console = Console(force_terminal=False, file=io.StringIO())
    with progress("pretrain (12 epochs)", 10_000, console=console) as advance:
        now[0] += 1.0
        advance(20)  # 1 s in, 0.2%: too early for a rate worth printing
        assert terminal_logging.getvalue() == ""
        now[0] += module.FIRST_REPORT_S
        advance(100)  # 6 s in, 1.2%: 120 images at 20/s, 9,880 left = 494 s
        now[0] += module.REPORT_EVERY_S
        advance(100)  # a minute later, 2.2%: the time-based line again
        now[0] += 1.0
        advance(9_780)  # done
    lines = terminal_logging.getvalue().splitlines()
    assert lines[0] == "imagepipe: pretrain (12 epochs): 120/10000 (1%, 20 img/s, 0:08:14 left)"
    assert lines[1].startswith("imagepipe: pretrain (12 epochs): 220/10000 (2%, ")
    assert lines[1].endswith(" left)")
    assert lines[-1] == "imagepipe: pretrain (12 epochs): 10000/10000 (100%, 149 img/s, " \
                        "done in 0:01:07)"
    assert len(lines) == 3

