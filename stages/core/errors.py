"""The exception types a stage raises and the exit codes they become: the one definition of both.

| code | meaning | the flow |
|---|---|---|
| 0 | done | — |
| 2 | bad input or configuration (`BadInput`) | never retried: retrying cannot help |
| 70 | a bug: an unexpected exception (EX_SOFTWARE); the traceback is in the log | never retried |
| 75 | transient failure (`Transient`: tracking server unreachable) (EX_TEMPFAIL) | retried |
| 130 | interrupted (Ctrl-C, SIGINT) | — |
| 143 | terminated (SIGTERM); any death by signal counts as transient | retried |

Imports nothing from stages.core: everything may import it. The door that maps exceptions to
these codes is stages/core/door.py. See ARCHITECTURE.md, "Contracts".
"""

from __future__ import annotations

import signal

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_BUG = 70  # EX_SOFTWARE from sysexits.h: "an internal software error has been detected"
EXIT_TRANSIENT = 75  # EX_TEMPFAIL from sysexits.h: "try again later"
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, what a shell reports for Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a SIGTERM-killed process


class BadInput(Exception):
    """Bad data or configuration: the message is the one line the user sees."""


class Transient(Exception):
    """A failure that a retry may cure: a server unreachable."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that `except Exception` in
    a stage does not swallow it while atomic writes and tracking still clean up on the way."""


class DiskFull(Transient):
    """No room for an output (ENOSPC, EDQUOT, or EFBIG from a file-size limit). The message is
    one line naming the folder and the bytes needed; the partial output is already removed.

    Exit 75 like any Transient, and the flow retries it: writers reserve their space before the
    costly work (stages/core/io.py reserve), so a retry that still finds the disk full fails in
    a second, and one after space was freed succeeds. Never a bus error (135) or a traceback.
    """


# What the survivors of a collective see when a peer is gone (killed, its machine lost, the
# network cut, a rendezvous that timed out): torch.distributed's backend, network and store
# errors, torch elastic's rendezvous errors, and gloo's / NCCL's RuntimeErrors. By name, so
# that this module imports nothing (no torch).
_PEER_LOST_TYPES = frozenset({"DistBackendError", "DistNetworkError", "DistStoreError",
                              "RendezvousTimeoutError", "RendezvousClosedError",
                              "RendezvousConnectionError"})
_PEER_LOST_TEXT = ("connection closed by peer", "connection reset by peer", "broken pipe",
                   "timed out", "timeout", "communicator was aborted", "connection refused")


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is a collective or rendezvous failing because a peer went away: exit 75
    (the job is retried as a whole), never 70 (a bug)."""
    if {cls.__name__ for cls in type(err).__mro__} & _PEER_LOST_TYPES:
        return True
    text = str(err).lower()
    return (isinstance(err, RuntimeError) and any(b in text for b in ("gloo", "nccl", "c10d"))
            and any(mark in text for mark in _PEER_LOST_TEXT))
