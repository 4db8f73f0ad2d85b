"""The timing loop the benchmarks share, and PyTorch timed in a child process of its own.

`time_calls` times repeated calls; `interleaved` runs contenders round by round, each once per
round, so a shared machine's load hits all alike. A contender is anything with
`round(min_seconds) -> (images/s, seconds of each call)`: `InProcess` wraps a call made here,
`TorchChild` a PyTorch model run in a child process with the environment it is given.

Why a child for PyTorch: OpenMP reads OMP_WAIT_POLICY once, when torch loads, so one process
cannot time both policies. The stage door sets OMP_WAIT_POLICY=PASSIVE; a user who loads the
model in their own program does not, and torch's batch-1 latency differs by ~4x between the
two (2.5 vs 0.64 ms, resnet_small at 2 threads). A benchmark should show both.

`python -m benchmarks.timing MODEL_FILE THREADS` is the child: it loads the model file
(stages.core.models format), reads one line per round on stdin ("ROUND BATCH MIN_SECONDS"),
and answers one JSON line {"rate": images/s, "calls": [seconds, ...]}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

REPO = Path(__file__).resolve().parents[1]


def time_calls(fn: Callable[[], object], n_images: int,
               min_seconds: float) -> tuple[float, list[float]]:
    """Images/s of repeated calls lasting at least min_seconds, and each call's seconds."""
    fn()  # warm-up: first-call allocations and kernel choice are not steady state
    calls: list[float] = []
    start = time.perf_counter()
    while not calls or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        calls.append(time.perf_counter() - t)
    return n_images * len(calls) / sum(calls), calls


class Contender(Protocol):
    def round(self, min_seconds: float) -> tuple[float, list[float]]: ...


class InProcess:
    """A call made in this process, `n_images` images per call."""

    def __init__(self, fn: Callable[[], object], n_images: int) -> None:
        self.fn, self.n_images = fn, n_images

    def round(self, min_seconds: float) -> tuple[float, list[float]]:
        return time_calls(self.fn, self.n_images, min_seconds)


def interleaved(runs: Mapping[str, Contender], rounds: int,
                min_seconds: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every contender once per round, `rounds` times. Returns images/s per round and each
    call's seconds, by name."""
    rates: dict[str, list[float]] = {k: [] for k in runs}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for key, contender in runs.items():
            rate, calls = contender.round(min_seconds)
            rates[key].append(rate)
            seconds[key] += calls
    return rates, seconds


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment as a user's program would have it: without the OpenMP wait
    policy the stage door sets (unless `extra` sets one), `stages` importable."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return {**env, **extra}


class TorchChild:
    """A model file run by torch eager in a child process (see the module doc); `at(batch)`
    is the contender that times it at that batch size."""

    def __init__(self, model_file: Path, threads: int, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.timing", str(model_file), str(threads)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def at(self, batch: int) -> Contender:
        child = self

        class AtBatch:
            def round(self, min_seconds: float) -> tuple[float, list[float]]:
                return child.round(batch, min_seconds)

        return AtBatch()

    def round(self, batch: int, min_seconds: float) -> tuple[float, list[float]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"ROUND {batch} {min_seconds}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"torch child exited {self.proc.wait()}")
        answer = json.loads(line)
        return float(answer["rate"]), [float(c) for c in answer["calls"]]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _child(model_file: str, threads: int) -> None:
    import numpy as np
    import torch

    from stages.core.dataset import preprocess
    from stages.core.models import load_model_file

    torch.set_num_threads(threads)
    model, mf = load_model_file(Path(model_file))
    shape = (256, mf.spec.image_size, mf.spec.image_size, mf.spec.in_channels)
    # The images bench_export gives ORT: the same seed, shape and preprocessing.
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    x64 = preprocess(images[:64], mf.mean, mf.std)
    for line in sys.stdin:
        _, batch, min_seconds = line.split()
        x = torch.from_numpy(np.ascontiguousarray(x64[:int(batch)]))

        def call(x: torch.Tensor = x) -> None:
            with torch.inference_mode():
                model(x)

        rate, calls = time_calls(call, len(x), float(min_seconds))
        print(json.dumps({"rate": rate, "calls": calls}), flush=True)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
