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


def test_without_a_terminal_progress_is_plain_log_lines(terminal_logging: io.StringIO) -> None:
    console = Console(force_terminal=False, file=io.StringIO())
    with progress("augment", 10, console=console) as advance:
        for _ in range(10):
            advance(1)
    lines = terminal_logging.getvalue().splitlines()
    assert lines[0].startswith("imagepipe: augment: 1/10 (10%")
    assert lines[-1].startswith("imagepipe: augment: 10/10 (100%")
    assert "\x1b" not in terminal_logging.getvalue()
