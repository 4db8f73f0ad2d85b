"""The door of a training stage (pretrain, finetune, scratch): `python -m stages.NAME` runs the
stage's work in this process, or launches the processes its params section's `devices`/`nodes`
ask for (stages/core/distributed.py) as `stages.NAME:rank_main`, or hands them to another
engine (pretrain's Ray Train workers run `rank_body`). Each process runs the same work on the
same argv; the first process of node 0 writes the metrics; tracking stays with the launching
process.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from stages.core.door import run_stage
from stages.core.io import write_json
from stages.params import Params, load_params

# The stage's argument parser, and the work of one of its processes from its params and parsed
# arguments: its metrics.
Parse = Callable[[list[str]], argparse.Namespace]
Work = Callable[[Params, argparse.Namespace], dict[str, Any]]
# Runs the stage's processes on an engine of its own when its params choose one (pretrain's
# engine: ray) and says whether it did; the ray imports stay out of the other stages' deps.
Engine = Callable[[Params, argparse.Namespace, list[str]], bool]


def training_main(stage: str, section: str, argv: list[str] | None, parse: Parse,
                  work: Work, engine: Engine | None = None) -> int:
    """The stage's main(): one process, or the processes params.`section` asks for."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)

    def body() -> None:
        params = load_params(args.params)
        if engine is not None and engine(params, args, argv):  # its processes write everything
            return
        # torch is imported here, not at load: --help and a params file refused start without it.
        from stages.core import distributed

        plan = distributed.plan(getattr(params, section), section)
        if plan is not None:  # the processes write everything; this one keeps the exit code
            distributed.raise_for(distributed.launch(plan, f"stages.{stage}:rank_main", argv),
                                  stage)
            return
        write_json(args.metrics, work(params, args))

    return run_stage(stage, body)


def rank_body(argv: list[str], parse: Parse, work: Work) -> None:
    """One training process's work, in-stage launch or Ray Train worker alike."""
    from stages.core import distributed

    args = parse(argv)
    metrics = work(load_params(args.params), args)
    if distributed.current().is_main:
        write_json(args.metrics, metrics)


def training_rank(stage: str, argv: list[str], parse: Parse, work: Work) -> int:
    """One training process of a launched run (tracking stays with the launching process)."""
    return run_stage(stage, lambda: rank_body(argv, parse, work), track=False)
