"""ONNX Runtime vs PyTorch eager on the CPU: batch-64 images/s and batch-1 latency.

The default model of params.yaml (architecture, width, input size, channels), with the weights
of models/finetuned.pt when it exists (speed does not depend on them otherwise). Contenders,
each at 1 thread and at every usable core: torch eager (inference_mode), ORT with default
session options, ORT with imagepipe's options (stages.core.onnxio.session_options), and the
int8 variant the export stage writes. All run interleaved round by round, so a shared machine's
load hits each alike; medians are reported. Writes benchmarks/results/export.json.
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

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
ROUNDS = 9
MIN_SECONDS = 0.25


def _model() -> tuple[Any, Any, str]:
    import torch

    from stages.core.models import ModelFile, ModelSpec, build_model, load_model_file
    from stages.params import load_params

    trained = REPO / "models" / "finetuned.pt"
    if trained.exists():
        model, mf = load_model_file(trained)
        return model, mf, str(trained.relative_to(REPO))
    params = load_params(REPO / "params.yaml")
    d, p = params.data, params.pretrain
    n_classes = len(d.target.classes) if d.target.classes else 10
    spec = ModelSpec(p.model, n_classes, d.channels, d.image_size, p.width)
    torch.manual_seed(0)
    mf = ModelFile(spec, [str(i) for i in range(spec.num_classes)], [0.5] * d.channels,
                   [0.25] * d.channels, {})
    return build_model(spec).eval(), mf, f"{spec.arch} width {spec.width}, random weights"


def _contenders(model: Any, mf: Any, threads: int, onnx_path: Path, int8_path: Path,
                x64: np.ndarray) -> dict[str, Callable[[np.ndarray], object]]:
    from stages.core import onnxio
    from stages.export import torch_logits

    plain = ort.SessionOptions()
    plain.intra_op_num_threads = threads
    sessions = {
        "ort_default_options": ort.InferenceSession(str(onnx_path), plain,
                                                    providers=[onnxio.CPU]),
        "ort_imagepipe": onnxio.make_session(onnx_path, [onnxio.CPU], threads=threads),
        "ort_int8": onnxio.make_session(int8_path, [onnxio.CPU], threads=threads),
    }
    runs: dict[str, Callable[[np.ndarray], object]] = {
        "torch_eager": lambda x: torch_logits(model, x, len(x))}
    for name, s in sessions.items():
        runs[name] = lambda x, s=s: s.run(None, {"input": x})
    return runs


def _measure(runs: dict[str, Callable[[np.ndarray], object]], threads: int,
             x64: np.ndarray) -> dict[str, dict[str, float]]:
    from stages.export import interleaved

    x1 = np.ascontiguousarray(x64[:1])
    timed: dict[str, tuple[Callable[[], object], int]] = {}
    for name, fn in runs.items():
        timed[f"{name} b64"] = (lambda fn=fn: fn(x64), len(x64))
        timed[f"{name} b1"] = (lambda fn=fn: fn(x1), 1)
    rates, seconds = interleaved(timed, threads, ROUNDS, MIN_SECONDS)
    ips = {name: rates[f"{name} b64"] for name in runs}
    lat = {name: seconds[f"{name} b1"] for name in runs}
    return {name: {"images_per_s_b64": round(statistics.median(ips[name]), 1),
                   "latency_ms_b1": round(1000 * statistics.median(lat[name]), 4),
                   "images_per_s_b64_min": round(min(ips[name]), 1),
                   "images_per_s_b64_max": round(max(ips[name]), 1)} for name in runs}


def main() -> dict[str, Any]:
    from stages import export
    from stages.core import onnxio
    from stages.core.models import preprocess

    model, mf, what = _model()
    size, ch = mf.spec.image_size, mf.spec.in_channels
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (256, size, size, ch), dtype=np.uint8)
    x64 = preprocess(images[:64], mf.mean, mf.std)
    result: dict[str, Any] = {"model": what, "input": [size, size, ch], "rounds": ROUNDS,
                              "onnxruntime": ort.__version__, "by_threads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, int8_path = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
        meta = export.model_metadata(mf, None)
        onnx_path.write_bytes(export.finish_model(export.export_onnx(model, mf, 18), meta))
        export.quantize_int8(onnx_path, int8_path, images, meta)
        for threads in sorted({1, onnxio.usable_cores()}):
            start = time.perf_counter()
            runs = _contenders(model, mf, threads, onnx_path, int8_path, x64)
            result["by_threads"][str(threads)] = _measure(runs, threads, x64)
            took = time.perf_counter() - start
            print(f"bench_export: {threads} thread(s) measured in {took:.0f} s")
    _print(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print(result: dict[str, Any]) -> None:
    print(f"bench_export: {result['model']}, input {result['input']}, medians of "
          f"{result['rounds']} interleaved rounds")
    for threads, rows in result["by_threads"].items():
        torch_row = rows["torch_eager"]
        for name, row in rows.items():
            print(f"  threads {threads}  {name:<20} {row['images_per_s_b64']:>9,.0f} images/s "
                  f"(x{row['images_per_s_b64'] / torch_row['images_per_s_b64']:.2f} torch)  "
                  f"batch-1 {row['latency_ms_b1']:.3f} ms")


if __name__ == "__main__":
    main()
    sys.exit(0)
