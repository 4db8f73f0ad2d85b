"""A cold `dvc repro` of the embedded default, stage by stage: where a new user's first minute
goes (issue 27).

Each repeat copies this working tree (tracked and untracked files git does not ignore: no data,
no models, no DVC cache, no MLflow store) to a temporary folder, commits it to a new git
repository (lineage records a commit, as in a clone) and runs one `dvc repro` there, as
`make run`'s stages would, tracking on (MLflow's embedded SQLite store and its agent).
Rounds alternate with a repeat whose stages run with IMAGEPIPE_TRACKING=0, so each stage's
tracking cost is measured under the same load as the rest. Per stage:

  process    the stage's `python` process, start to exit (a `python` shim first on PATH logs it)
  start-up   interpreter start and the imports before the stage door (`python -X importtime`
             tells which); torch is imported later, by the body, and counted in `work`
  work       the stage's body (stages/core/door.py logs it to $IMAGEPIPE_STAGE_TIMES)
  tracking   the door's MLflow run: start before the body, finish after it
  exit       from the door's end to the process's (interpreter teardown, atexit)
  dvc        from the process's exit to the next stage's start: DVC hashing and caching the
             stage's outputs and checking the next stage's deps (the first row: DVC's start-up)

Medians over the rounds. Writes benchmarks/results/pipeline.json and prints the table the
README shows. `python -m benchmarks pipeline` (3-4 minutes a round on 2 cores).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ROUNDS = int(os.environ.get("BENCH_PIPELINE_ROUNDS", "1"))  # each: one tracked, one not
SHIM = """#!/bin/bash
start=$(date +%s.%N)
"{python}" "$@"
rc=$?
echo "$start $(date +%s.%N) $rc $*" >> "{log}"
exit $rc
"""


def copy_tree(dest: Path) -> None:
    """This working tree as a fresh clone would hold it, plus uncommitted edits."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench_pipeline"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)


def one_repro(tracked: bool) -> dict[str, Any]:
    """A cold `dvc repro` in a fresh copy; the per-stage account of it."""
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as name:
        tmp = Path(name)
        project, shim = tmp / "project", tmp / "bin"
        project.mkdir()
        shim.mkdir()
        copy_tree(project)
        procs, times = tmp / "procs.log", tmp / "times.jsonl"
        (shim / "python").write_text(SHIM.format(python=sys.executable, log=procs))
        (shim / "python").chmod(0o755)
        env = {**os.environ, "PATH": f"{shim}{os.pathsep}{Path(sys.executable).parent}"
               f"{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
               "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1",
               "IMAGEPIPE_STAGE_TIMES": str(times),
               "IMAGEPIPE_TRACKING": "1" if tracked else "0"}
        env.pop("PYTHONPATH", None)
        start = time.time()
        proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=project,
                              env=env, capture_output=True, text=True)
        end = time.time()
        if proc.returncode != 0:
            raise SystemExit(f"bench_pipeline: dvc repro failed:\n{proc.stderr[-3000:]}")
        return account(start, end, procs.read_text().splitlines(),
                       [json.loads(line) for line in times.read_text().splitlines()])


def account(start: float, end: float, procs: list[str], doors: list[dict[str, Any]]
            ) -> dict[str, Any]:
    """Per stage: process, start-up, work, tracking, exit and DVC seconds (see the doc)."""
    spans = []
    for line in procs:
        began, ended, _, *args = line.split()
        if "-m" in args and args[args.index("-m") + 1].startswith("stages."):
            spans.append((float(began), float(ended), args[args.index("-m") + 1][7:]))
    spans.sort()
    by_stage = {d["stage"]: d["clock"] for d in doors}
    rows: dict[str, dict[str, float]] = {"dvc start-up": {"dvc": spans[0][0] - start}}
    for k, (began, ended, stage) in enumerate(spans):
        entered, body, done, tracked = by_stage[stage]
        after = spans[k + 1][0] if k + 1 < len(spans) else end
        rows[stage] = {"process": ended - began, "start-up": entered - began,
                       "work": done - body, "tracking": (body - entered) + (tracked - done),
                       "exit": ended - tracked, "dvc": after - ended}
    for row in rows.values():
        row["wall"] = sum(v for k, v in row.items() if k != "process")
    return {"wall": end - start, "stages": rows}


COLUMNS = ("wall", "start-up", "work", "tracking", "exit", "dvc")


def table(tracked: list[dict[str, Any]], untracked: list[dict[str, Any]]) -> str:
    """Markdown: medians of the tracked rounds, and the tracked - untracked process time."""
    stages = list(tracked[0]["stages"])
    lines = ["| stage | " + " | ".join(COLUMNS) + " | process, tracking off |",
             "|---|" + "---:|" * (len(COLUMNS) + 1)]

    def med(runs: list[dict[str, Any]], stage: str, col: str) -> float:
        return statistics.median(r["stages"].get(stage, {}).get(col, 0.0) for r in runs)

    for stage in stages:
        cells = [f"{med(tracked, stage, c):.1f}" for c in COLUMNS]
        off = med(untracked, stage, "process") if stage in untracked[0]["stages"] else 0.0
        lines.append(f"| {stage} | " + " | ".join(cells) + f" | {off:.1f} |")
    total = statistics.median(r["wall"] for r in tracked)
    sums = [f"{sum(med(tracked, s, c) for s in stages):.1f}" for c in COLUMNS[1:]]
    off_total = statistics.median(r["wall"] for r in untracked)
    lines.append(f"| **cold `dvc repro`** | **{total:.1f}** | " + " | ".join(sums)
                 + f" | {off_total:.1f} (whole repro) |")
    return "\n".join(lines)


def main() -> dict[str, Any]:
    tracked: list[dict[str, Any]] = []
    untracked: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    for i in range(ROUNDS):
        for on in ((True, False) if i % 2 == 0 else (False, True)):
            (tracked if on else untracked).append(one_repro(on))
            load.append(os.getloadavg()[0])
            print(f"  round {i + 1}, tracking {'on' if on else 'off'}: cold dvc repro "
                  f"{(tracked if on else untracked)[-1]['wall']:.1f} s (load {load[-1]:.1f})",
                  flush=True)
    text = table(tracked, untracked)
    print(text)
    result = {"rounds": ROUNDS, "load_1min": load, "cpu_cores": os.cpu_count(),
              "tracked": tracked, "untracked": untracked, "table": text}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
