"""Which of this project's files a module's results depend on, and their digests.

Input: a module name (`stages.pretrain`). Output: the project files it imports, directly or
through other project modules, lazily inside functions too (read from the source with `ast`,
nothing imported); and `{file: sha256}` of them, the code part of every fingerprint that lets
work be skipped (a checkpoint resumed, a staged shard reused) and the code deps that
`stages/deps.py` writes into dvc.yaml. One rule for both, so what makes DVC rerun a stage is
what makes the stage refuse its own stale checkpoint.

Not followed: modules that cannot change what a stage writes (NOT_RESULTS): tracking records
runs and registers models, the door maps exceptions to exit codes, progress draws bars, and
epochlog appends the live curve's rows. A change there reruns nothing.
"""

from __future__ import annotations

import ast
import hashlib
from functools import cache
from pathlib import Path

# The folder the `stages` package is imported from: the project's code root.
CODE_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("stages", "flows", "commands")

NOT_RESULTS = (
    "stages.core.tracking",  # MLflow runs and the registry: never a stage's declared output
    "stages.core.door",      # exit codes, logging, SIGTERM
    "stages.core.progress",  # progress bars and log lines
    "stages.core.epochlog",  # the live curve's rows (a file no stage declares)
)


def _excluded(name: str) -> bool:
    return any(name == x or name.startswith(x + ".") for x in NOT_RESULTS)


def module_file(name: str, root: Path = CODE_ROOT) -> Path | None:
    """The file of project module `name` (a package's __init__.py), None if not ours."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    """Every module name an import statement in `tree` may load (`from a import b`: a, and
    a.b in case b is a module), skipping `if TYPE_CHECKING:` blocks."""
    names: set[str] = set()
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            todo.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against the importing package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        todo.extend(ast.iter_child_nodes(node))
    return names


def _parents(name: str) -> list[str]:
    """The packages Python imports before `name`: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def code_files(module: str, root: Path = CODE_ROOT) -> tuple[Path, ...]:
    """The project files `module` runs, itself first, then sorted by path (NOT_RESULTS and
    what only they import left out)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or _excluded(name):
            continue
        path = module_file(name, root)
        if path is None:
            continue
        seen[name] = path
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for imported in _imported_names(tree, package):
            todo.extend([*_parents(imported), imported])
        todo.extend(_parents(name))
    first = seen.pop(module, None)
    rest = sorted(seen.values())
    return tuple(([first] if first else []) + rest)


def relative(path: Path, root: Path = CODE_ROOT) -> str:
    return path.relative_to(root).as_posix()


def code_fingerprint(module: str, root: Path = CODE_ROOT) -> dict[str, str]:
    """{file relative to the code root: its sha256's first 16 hex digits} for the files
    `module` runs: in a checkpoint's fingerprint, a mismatch names the files that changed."""
    return {relative(path, root): hashlib.sha256(path.read_bytes()).hexdigest()[:16]
            for path in code_files(module, root)}


def code_digest(module: str, root: Path = CODE_ROOT) -> str:
    """One digest over code_fingerprint(module): for names and keys."""
    items = sorted(code_fingerprint(module, root).items())
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in items).encode()).hexdigest()
