"""`python -m benchmarks [NAME ...]` (what `make bench` runs): every benchmarks/bench_*.py
module's main(), in name order, or only those named (`datapath` or `bench_datapath`).

Each module writes its own JSON under benchmarks/results/ (ignored by git). A benchmark that
fails is reported and the others still run; the exit code is then 1.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def discover() -> list[str]:
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = discover()
    wanted = [a if a.startswith("bench_") else f"bench_{a}" for a in argv] or names
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"benchmarks: unknown {unknown}; choose from {names}", file=sys.stderr)
        return 2
    # The repo root on the path, so `stages` imports whatever the current directory is.
    sys.path.insert(0, str(HERE.parent))
    failed = []
    for name in wanted:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        try:
            importlib.import_module(f"benchmarks.{name}").main()
        except Exception:  # noqa: BLE001 - report it, run the others
            traceback.print_exc()
            failed.append(name)
        print(f"== {name}: {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        print(f"benchmarks: failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
