"""Each stage's code deps in dvc.yaml, generated from what its command imports.

dvc.yaml -> the project files each stage's `python -m stages.NAME` runs (stages/core/codeid.py:
imports followed through this project's modules, its NOT_RESULTS left out) compared with, or
written into, the stage's `deps`. Its other deps (data, models) are kept as they are.

    python -m stages.deps --check   # exit 1 and the differences when dvc.yaml disagrees
    python -m stages.deps --write   # rewrite the code deps (comments and order kept)

A test runs --check, so a new import without its dep (a stale stage) or a dep nobody imports
(a needless rerun) fails the suite.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from stages.core.codeid import CODE_ROOT, PACKAGES, code_files, relative

_MODULE = re.compile(r"\bpython3?\s+-m\s+(?P<module>[\w.]+)")


def is_code_dep(path: str) -> bool:
    """A dep that names this project's code (a file or folder under its packages)."""
    top = path.split("/")[0]
    return top in PACKAGES and (path.endswith(".py") or "." not in path.rsplit("/", 1)[-1])


def stage_module(cmd: str | list[str]) -> str | None:
    text = " ".join(cmd) if isinstance(cmd, list) else str(cmd)
    match = _MODULE.search(text)
    return match["module"] if match and match["module"].split(".")[0] in PACKAGES else None


def wanted_deps(stage: dict[str, Any], root: Path) -> list[str] | None:
    """The stage's deps with its code deps as the imports say, others kept in their order;
    None for a stage whose command runs no module of this project."""
    module = stage_module(stage.get("cmd", ""))
    if module is None:
        return None
    code = [relative(p, root) for p in code_files(module, root)]
    others = [d for d in (stage.get("deps") or []) if not is_code_dep(_dep_path(d))]
    return code + others


def _dep_path(dep: Any) -> str:
    return next(iter(dep)) if isinstance(dep, dict) else str(dep)


def _load(path: Path) -> Any:
    from ruamel.yaml import YAML

    yaml = YAML()  # round-trip: comments, order and folded commands survive --write
    yaml.width = 4096
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # dvc.yaml's own layout
    return yaml, yaml.load(path.read_text())


def differences(dvc_yaml: Path, root: Path = CODE_ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """{stage: (missing code deps, code deps nothing imports)} where dvc.yaml disagrees."""
    _, doc = _load(dvc_yaml)
    out: dict[str, tuple[list[str], list[str]]] = {}
    for name, stage in (doc.get("stages") or {}).items():
        want = wanted_deps(stage, root)
        if want is None:
            continue
        have = [_dep_path(d) for d in stage.get("deps") or [] if is_code_dep(_dep_path(d))]
        code = [d for d in want if is_code_dep(d)]
        if code != have:
            out[name] = ([d for d in code if d not in have], [d for d in have if d not in code])
            if not any(out[name]):
                out[name] = (["(order differs)"], [])
    return out


def write(dvc_yaml: Path, root: Path = CODE_ROOT) -> list[str]:
    """Rewrite the code deps of every stage that disagrees; return their names."""
    yaml, doc = _load(dvc_yaml)
    changed = []
    for name, stage in (doc.get("stages") or {}).items():
        want = wanted_deps(stage, root)
        if want is None:
            continue
        old = stage.get("deps") or []
        if [_dep_path(d) for d in old] == want:
            continue
        by_path = {_dep_path(d): d for d in old}  # a dep with options keeps them
        stage["deps"] = [by_path.get(d, d) for d in want]
        changed.append(name)
    if changed:
        with dvc_yaml.open("w") as f:
            yaml.dump(doc, f)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.deps", description=__doc__.split(
        "\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="exit 1 if dvc.yaml disagrees")
    action.add_argument("--write", action="store_true", help="rewrite the code deps")
    parser.add_argument("--dvc-yaml", type=Path, default=CODE_ROOT / "dvc.yaml",
                        help="the project's dvc.yaml (its folder is where paths start)")
    args = parser.parse_args(argv)
    root = args.dvc_yaml.resolve().parent
    if not args.dvc_yaml.is_file():
        print(f"deps: {args.dvc_yaml} does not exist", file=sys.stderr)
        return 2
    if args.write:
        changed = write(args.dvc_yaml, root)
        print(f"deps: rewrote the code deps of {', '.join(changed)}" if changed
              else "deps: dvc.yaml already matches the imports")
        return 0
    diff = differences(args.dvc_yaml, root)
    for stage, (missing, extra) in diff.items():
        for dep in missing:
            print(f"{stage}: missing code dep {dep} (its command imports it)")
        for dep in extra:
            print(f"{stage}: code dep {dep} is not imported by its command")
    if diff:
        print("deps: dvc.yaml disagrees with the imports: python -m stages.deps --write",
              file=sys.stderr)
        return 1
    print("deps: every stage's code deps match its imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
