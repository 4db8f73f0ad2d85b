"""What MLflow tracking adds to one stage: a tiny stage body (a metrics file, a plots table, a
small output folder) run through the stage door in a fresh child process, as DVC runs every
stage, with tracking off (IMAGEPIPE_TRACKING=0) and on (the SQLite default), N rounds each,
interleaved so the shared machine's load hits both alike; and the same for a tiny `export`
whose body returns a model to register (PyTorch and ONNX models logged, a version made).

"on" is the default: the run kept by the tracking agent (stages/core/tracking/remote.py, the
stage never imports mlflow; the agent is started once and reused, as a pipeline's stages reuse
it); "inproc" is tracking in the stage's own process (IMAGEPIPE_TRACKING_AGENT=0, the fallback).
Reports the median wall time of each, the median overhead per stage, and the first tracked
run on a new project (it creates mlflow.db's tables and starts the agent) separately: that is
paid once per clone.
`python -m benchmarks tracking`; N from BENCH_TRACKING_N (default 5).
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

DVC_YAML = """
stages:
  evaluate:
    cmd: python stage.py
    deps: [inputs]
    params: [seed, evaluate]
    outs: [out]
    metrics: [{metrics/evaluate.json: {cache: false}}]
    plots: [{plots/history.csv: {x: epoch}}]
  export:
    cmd: python stage_export.py
    deps: [models/finetuned.pt, data/target]
    params: [export, registry]
    outs: [models/model.onnx]
    metrics: [{metrics/export.json: {cache: false}}]
"""

STAGE = """
import json, sys
from pathlib import Path
from stages.core.door import run_stage

def body() -> None:
    Path("out").mkdir(exist_ok=True)
    for i in range(20):
        Path(f"out/part{i}.txt").write_text(str(i) * 1000)
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/evaluate.json").write_text(json.dumps(
        {"accuracy": 0.9, "scratch_accuracy": 0.8, "transfer_gain": 0.1, "ece": 0.02}))
    Path("plots").mkdir(exist_ok=True)
    Path("plots/history.csv").write_text(
        "epoch,train_loss,val_acc\\n" + "".join(f"{e},{1 / e},{e / 10}\\n" for e in range(1, 11)))

sys.exit(run_stage("evaluate", body))
"""

# export: the body hands over a tiny model (tests/integration/tracking_kit.py's) to register,
# so the figure includes logging the PyTorch and ONNX models and the registry calls.
STAGE_EXPORT = """
import json, sys
from pathlib import Path
from stages.core.door import run_stage
from stages.core.tracking import Parity, Registration
from tests.integration.tracking_kit import registration, save_tiny, tiny_model

def body() -> Registration:
    save_tiny(tiny_model("good"), Path("models/finetuned.pt"), Path("models/model.onnx"))
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/export.json").write_text(json.dumps({"gate_passed": True, "max_abs_diff": 0}))
    return registration(Path("models/model.onnx"), Path("models/finetuned.pt"),
                        Parity(True, 0.0, 1.0, 1e-4, 64, 1e-3), "bench-model", Path("data/target"))

sys.exit(run_stage("export", body))
"""


def make_project(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "stage.py").write_text(STAGE)
    (root / "stage_export.py").write_text(STAGE_EXPORT)
    _write_target(root / "data" / "target")
    (root / "inputs").mkdir(exist_ok=True)
    for i in range(20):
        (root / "inputs" / f"in{i}.txt").write_text(str(i) * 1000)
    git = ["git", "-c", "user.name=b", "-c", "user.email=b@b"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "add", "."], cwd=root, check=True)
    subprocess.run([*git, "commit", "-qm", "bench"], cwd=root, check=True)


def _write_target(folder: Path) -> None:
    sys.path.insert(0, str(REPO))
    from tests.integration.tracking_kit import labels_of, tiny_images, tiny_model, write_target

    images = tiny_images(64)
    write_target(folder, labels_of(tiny_model("good"), images), images)


def run_once(root: Path, mode: str, script: str = "stage.py") -> float:
    """Seconds of one `python SCRIPT` in a fresh process (imports and all); mode off, on (the
    agent) or inproc."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "IMAGEPIPE_TRACKING": "0" if mode == "off" else "1",
           "IMAGEPIPE_TRACKING_AGENT": "0" if mode == "inproc" else "1"}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(var, None)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"stage exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> dict:
    n = int(os.environ.get("BENCH_TRACKING_N", "5"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "project"
        make_project(root)
        first = run_once(root, "on")  # creates mlflow.db, starts the agent: once per clone
        times: dict[str, list[float]] = {f"{k}_{m}": [] for k in ("stage", "export")
                                          for m in ("off", "on", "inproc")}
        for _ in range(n):
            for key in times:
                kind, mode = key.split("_")
                times[key].append(run_once(root, mode, f"{kind}.py" if kind == "stage"
                                           else "stage_export.py"))
    load = os.getloadavg()[0]
    result: dict = {"rounds": n, "load_1min": round(load, 2),
                    "first_tracked_run_s": round(first, 3)}
    for kind in ("stage", "export"):
        off, on, inproc = (times[f"{kind}_{m}"] for m in ("off", "on", "inproc"))
        result[kind] = {
            "off_median_s": round(statistics.median(off), 3),
            "on_median_s": round(statistics.median(on), 3),
            "inproc_median_s": round(statistics.median(inproc), 3),
            "overhead_median_s": round(statistics.median(
                b - a for a, b in zip(off, on, strict=True)), 3),
            "inproc_overhead_median_s": round(statistics.median(
                b - a for a, b in zip(off, inproc, strict=True)), 3),
            "off_s": [round(x, 3) for x in off], "on_s": [round(x, 3) for x in on],
            "inproc_s": [round(x, 3) for x in inproc]}
        r = result[kind]
        print(f"tracking, {kind}: off {r['off_median_s']} s, on (agent) {r['on_median_s']} s, "
              f"overhead {r['overhead_median_s']} s; in-process {r['inproc_median_s']} s, "
              f"overhead {r['inproc_overhead_median_s']} s (median of {n}, load {load:.2f})")
    print(f"tracking: first tracked run of a new project {result['first_tracked_run_s']} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tracking.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
