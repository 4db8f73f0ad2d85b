"""imagepipe rollback: `champion` back to `previous-champion` (registry.model_name).

`previous-champion` then steps one further back (the predecessor recorded when that version
was promoted), so rollbacks walk history. The version rolled back from is tagged
`rolled_back=true`, so the next promote does not bring it back without --force. Alias moves
hold the registry's lock, as promote's do. Exit codes: 0 rolled back, 2 nothing to roll back
to or bad input, 75 tracking unreachable.
"""

from __future__ import annotations

import time
from typing import Any

from commands.promote import command_parser, print_result, registry_params, version_text
from stages.core.door import run_stage
from stages.core.errors import BadInput
from stages.params import RegistryParams


def rollback(params: RegistryParams) -> dict[str, Any]:
    """champion <- previous-champion; previous-champion <- that version's own predecessor."""
    from stages.core.tracking import CHAMPION, PREVIOUS, Registry

    name = params.model_name
    reg = Registry.connect()
    with reg.lock(name):
        champion, previous = reg.alias(name, CHAMPION), reg.alias(name, PREVIOUS)
        if previous is None:
            raise BadInput(f"registered model {name!r} has no {PREVIOUS!r} version to roll "
                           "back to")
        reg.set_alias(name, CHAMPION, previous.version)
        older = previous.tags.get("promotion.previous_champion")
        older = older if older and older != previous.version else None
        reg.set_alias(name, PREVIOUS, older)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if champion is not None:  # barred from promote until --force (see promote)
            reg.tag(name, champion.version, {"rollback.replaced_by": previous.version,
                                             "rollback.time": stamp, "rolled_back": "true",
                                             "rolled_back.time": stamp})
        restored = {"rollback.restored_from": str(champion and champion.version),
                    "rollback.time": stamp}
        if previous.tags.get("rolled_back") == "true":  # champion again: no longer barred
            restored["rolled_back"] = "false"
        reg.tag(name, previous.version, restored)
    return {"rolled_back": True, "model_name": name,
            "from_version": champion.version if champion else None,
            "champion_version": previous.version,
            "previous_champion_version": older}


def main(argv: list[str] | None = None) -> int:
    args = command_parser("imagepipe rollback", "move champion back to previous-champion").parse_args(argv)

    def body() -> None:
        r = rollback(registry_params(args))
        print_result(r, args.json, f"{r['model_name']}: champion "
                     f"{version_text(r['from_version'], 'none')} -> v{r['champion_version']} "
                     f"(previous-champion now "
                     f"{version_text(r['previous_champion_version'], 'none')}; "
                     f"{version_text(r['from_version'], 'none')} is not promoted again without "
                     "--force)")

    return run_stage("rollback", body, track=False)
