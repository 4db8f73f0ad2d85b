"""`imagepipe` console script: run the pipeline and the operations around it.

Each subcommand lives in its own module as `main(argv) -> exit code`; this file only routes,
so `imagepipe --help` stays fast (nothing heavy is imported until a command runs).
"""

from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "run": ("commands.run", "run the whole pipeline (stages that changed, then promote)"),
    "predict": ("commands.predict", "classify images with an exported ONNX model"),
    "promote": ("commands.promote", "promote the challenger if it beats the champion"),
    "rollback": ("commands.rollback", "move champion back to previous-champion"),
    "lineage": ("commands.lineage", "walk a model version back to its data, code, params"),
    "tune": ("commands.tune", "pick the best DVC experiment by validation accuracy, apply it"),
}


def _usage() -> str:
    lines = ["usage: imagepipe [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines + ["", "imagepipe COMMAND --help shows a command's options."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"imagepipe {version('imagepipe')}")
        except PackageNotFoundError:  # run from a checkout that was never installed
            print("imagepipe (not installed: pip install -e .)")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        print(f"imagepipe: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from stages.core.host import TELEMETRY_OFF  # here: --help and --version need none of it

    os.environ.update({**TELEMETRY_OFF, **os.environ})
    return int(importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
