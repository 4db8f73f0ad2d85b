"""The door of a training stage (pretrain, finetune, scratch): `python -m stages.NAME` runs the
stage's work in this process, or launches the processes its params section's `devices` ask
for (stages/core/distributed.py) as `rank_main`, or hands them to another engine (pretrain's
Ray Train workers run `rank_body`). Each process runs the same work on the same argv, found by
the stage's name (its module's `arguments` and `work`); the first process (rank 0) writes the
metrics; tracking stays with the launching process.
"""

from __future__ import annotations

import argparse
import importlib
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

        plan = distributed.plan(getattr(params, section))
        if plan is not None:  # the processes write everything; this one keeps the exit code
            code = distributed.launch(plan, "stages.trainingdoor:rank_main", [stage, *argv])
            distributed.raise_for(code, stage)
            return
        write_json(args.metrics, work(params, args))

    return run_stage(stage, body)


def rank_body(argv: list[str]) -> None:
    """One training process's work (argv: the stage's name, then its own argv), in-stage
    launch or Ray Train worker alike."""
    from stages.core import distributed

    module = importlib.import_module(f"stages.{argv[0]}")
    args = module.arguments(argv[1:])
    metrics = module.work(load_params(args.params), args)
    if distributed.current().is_main:
        write_json(args.metrics, metrics)


def rank_main(argv: list[str]) -> int:
    """One training process of a launched run (tracking stays with the launching process)."""
    return run_stage(argv[0], lambda: rank_body(argv), track=False)
