"""A command's verb run by the tracking agent (`imagepipe promote`), where mlflow is imported
and the store open already; in the caller's process when no agent can be used.

Input: "module:function" (one of CALLABLE), its arguments. Output: what it returned, or the
BadInput / Transient it raised (anything else: a RuntimeError naming it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from stages.core.errors import BadInput, Transient
from stages.core.host import env_seconds
from stages.core.tracking.channel import AgentStalled, AgentUnavailable, request
from stages.core.tracking.remote import (
    DEFAULT_FINISH_S,
    FINISH_ENV,
    absolute,
    agent_enabled,
    connect_agent,
    relay,
)

log = logging.getLogger("imagepipe.tracking")

# What `call` may ask the agent to run ("module:function" under the code folder it serves).
CALLABLE = frozenset({"commands.promote:promote"})


def call(target: str, local: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """local(*args, **kwargs), run by this code's tracking agent when tracking is on and one can
    be reached, else here: `imagepipe promote` right after a pipeline run is ~0.5 s there
    instead of ~5 s in a new process (most of that the mlflow import). Arguments and result
    cross a pickle. BadInput and Transient come back as themselves; anything else raised there
    is a RuntimeError here, its traceback relayed."""
    from stages.core.tracking.store import tracking_enabled

    if not (agent_enabled() and tracking_enabled()) or target not in CALLABLE:
        return local(*args, **kwargs)
    try:
        conn = connect_agent()
    except (AgentUnavailable, OSError) as err:
        log.info("%s; running %s in this process", err, target)
        return local(*args, **kwargs)
    assert conn is not None
    # The agent runs in its own folder: a relative path means the caller's.
    args = tuple(absolute(a) for a in args)
    kwargs = {k: absolute(v) for k, v in kwargs.items()}
    with conn:
        try:
            reply = request(conn, {"op": "call", "target": target, "args": args,
                                   "kwargs": kwargs}, env_seconds(FINISH_ENV, DEFAULT_FINISH_S))
        except AgentStalled as err:  # it may still be at work: running it here too could race
            raise Transient(f"{target}: {err}") from None
    if reply is None:  # the agent died (or was exiting as we connected): do it here
        return local(*args, **kwargs)
    relay(reply)
    raised = reply.get("raised")
    if raised:
        kind, text = raised
        raise {"BadInput": BadInput, "Transient": Transient}.get(kind, RuntimeError)(text)
    return reply.get("result")
