"""Exit codes of every stage, and the door that maps exceptions to them.

0 done; 2 bad input or configuration (never retried: retrying cannot help);
75 transient failure (retried by the flow). See ARCHITECTURE.md, "Contracts".
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75  # EX_TEMPFAIL from sysexits.h: "try again later"

log = logging.getLogger("imagepipe")


class BadInput(Exception):
    """Bad data or configuration: the message is the one line the user sees."""


class Transient(Exception):
    """A failure that a retry may cure: a server unreachable, a device out of memory."""


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)


def run_stage(name: str, body: Callable[[], object]) -> int:
    """Run a stage body and return its exit code; one line on stderr for a known failure."""
    configure_logging()
    try:
        body()
    except BadInput as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Transient as err:
        print(f"{name}: transient failure (retry may help): {err}", file=sys.stderr)
        return EXIT_TRANSIENT
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return EXIT_OK
