"""ONNX Runtime vs PyTorch eager on the CPU: batch-64 images/s and batch-1 latency.

The default model of params.yaml (architecture, width, input size, channels), with the weights
of models/finetuned.pt when it exists (speed does not depend on them otherwise). Contenders,
each at 1 thread and at every usable core: torch eager (inference_mode) as a user runs it (a
child process without OMP_WAIT_POLICY) and as the stages run it (a child with
OMP_WAIT_POLICY=PASSIVE, what the stage door sets); ORT with default session options, ORT
with imagepipe's options (stages.core.onnxio.session_options), and the int8 variant the export
stage writes. All run interleaved round by round (benchmarks/timing.py), so a shared machine's
load hits each alike; medians are reported, ratios against torch as a user runs it. Writes
benchmarks/results/export.json.

The export stage times nothing: these figures change on every run (see stages/export.py).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from benchmarks.timing import Contender, InProcess, TorchChild, interleaved, user_env

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ROUNDS = 9
MIN_SECONDS = 0.25


# torch eager as a user's program runs it, and as the stages run it (see benchmarks/timing.py).
TORCH_CHILDREN = {"torch_eager": {}, "torch_eager_passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def _model(scratch: Path) -> tuple[Any, Any, str, Path]:
    """The model, its ModelFile, what it is, and a model file the torch children load."""
    import torch

    from stages.core.models import (
        ModelFile,
        ModelSpec,
        build_model,
        load_model_file,
        save_model_file,
    )
    from stages.params import load_params

    trained = REPO / "models" / "finetuned.pt"
    if trained.exists():
        model, mf = load_model_file(trained)
        return model, mf, str(trained.relative_to(REPO)), trained
    params = load_params(REPO / "params.yaml")
    d, p = params.data, params.pretrain
    n_classes = len(d.target.classes) if d.target.classes else 10
    spec = ModelSpec(p.model, n_classes, d.channels, d.image_size, p.width)
    torch.manual_seed(0)
    mf = ModelFile(spec, [str(i) for i in range(spec.num_classes)], [0.5] * d.channels,
                   [0.25] * d.channels)
    model = build_model(spec).eval()
    save_model_file(scratch / "model.pt", model, mf)
    return model, mf, f"{spec.arch} width {spec.width}, random weights", scratch / "model.pt"


def _ort_contenders(threads: int, onnx_path: Path,
                    int8_path: Path) -> dict[str, Callable[[np.ndarray], object]]:
    from stages.core import onnxio

    plain = ort.SessionOptions()
    plain.intra_op_num_threads = threads
    sessions = {
        "ort_default_options": ort.InferenceSession(str(onnx_path), plain,
                                                    providers=[onnxio.CPU]),
        "ort_imagepipe": onnxio.make_session(onnx_path, [onnxio.CPU], threads=threads),
        "ort_int8": onnxio.make_session(int8_path, [onnxio.CPU], threads=threads),
    }
    # The exported graph takes raw uint8 NHWC pixels and does the cast, scaling, normalisation,
    # transpose and softmax itself; the torch children get pre-normalised floats and run the
    # network only, so ORT's figures include work torch's do not (the comparison favours torch).
    return {name: lambda x, s=s: s.run(None, {"image": x}) for name, s in sessions.items()}


def _measure(model_file: Path, threads: int, onnx_path: Path, int8_path: Path,
             u64: np.ndarray) -> dict[str, dict[str, float]]:
    """Every contender at batch 64 and batch 1, interleaved round by round (u64: uint8 NHWC)."""
    u1 = np.ascontiguousarray(u64[:1])
    children = {name: TorchChild(model_file, threads, user_env(**env))
                for name, env in TORCH_CHILDREN.items()}
    try:
        timed: dict[str, Contender] = {}
        for name, child in children.items():
            timed[f"{name} b64"], timed[f"{name} b1"] = child.at(len(u64)), child.at(1)
        for name, fn in _ort_contenders(threads, onnx_path, int8_path).items():
            timed[f"{name} b64"] = InProcess(lambda fn=fn: fn(u64), len(u64))
            timed[f"{name} b1"] = InProcess(lambda fn=fn: fn(u1), 1)
        rates, seconds = interleaved(timed, ROUNDS, MIN_SECONDS)
    finally:
        for child in children.values():
            child.close()
    names = [key.removesuffix(" b64") for key in timed if key.endswith(" b64")]
    return {name: {"images_per_s_b64": round(statistics.median(rates[f"{name} b64"]), 1),
                   "latency_ms_b1": round(1000 * statistics.median(seconds[f"{name} b1"]), 4),
                   "images_per_s_b64_min": round(min(rates[f"{name} b64"]), 1),
                   "images_per_s_b64_max": round(max(rates[f"{name} b64"]), 1)}
            for name in names}


def main() -> dict[str, Any]:
    from stages import export
    from stages.core import onnxvariants
    from stages.core.host import usable_cores

    with tempfile.TemporaryDirectory() as tmp:
        model, mf, what, model_file = _model(Path(tmp))
        size, ch = mf.spec.image_size, mf.spec.in_channels
        # The torch children's input too: the same seed and shape (benchmarks/timing.py).
        images = np.random.default_rng(0).integers(0, 256, (256, size, size, ch), dtype=np.uint8)
        u64 = np.ascontiguousarray(images[:64])
        result: dict[str, Any] = {"model": what, "input": [size, size, ch], "rounds": ROUNDS,
                                  "onnxruntime": ort.__version__, "by_threads": {},
                                  "torch_children": TORCH_CHILDREN}
        onnx_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        meta = export.model_metadata(mf, None)
        onnx_path.write_bytes(onnxvariants.finish_model(export.export_onnx(model, mf, 18), meta))
        onnxvariants.quantize_int8(onnx_path, int8_path, images, meta)
        for threads in sorted({1, usable_cores()}):
            start = time.perf_counter()
            measured = _measure(model_file, threads, onnx_path, int8_path, u64)
            result["by_threads"][str(threads)] = measured
            took = time.perf_counter() - start
            print(f"bench_export: {threads} thread(s) measured in {took:.0f} s")
    _print(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"bench_export: {result['model']}, input {result['input']}, medians of "
          f"{result['rounds']} interleaved rounds; torch_eager: as a user runs it (no "
          f"OMP_WAIT_POLICY), torch_eager_passive: as the stages run it")
    for threads, rows in result["by_threads"].items():
        torch_row = rows["torch_eager"]
        for name, row in rows.items():
            print(f"  threads {threads}  {name:<20} {row['images_per_s_b64']:>9,.0f} images/s "
                  f"(x{row['images_per_s_b64'] / torch_row['images_per_s_b64']:.2f} torch)  "
                  f"batch-1 {row['latency_ms_b1']:.3f} ms")


if __name__ == "__main__":
    main()
    sys.exit(0)
