"""export: models/finetuned.pt + models/scratch.pt + data/target/ + params.export ->
models/model.onnx, models/onnx_variants/ (int8, fp16 where CUDA loads), metrics/export.json,
reports/export.json (the details nobody compares across runs).

The model exported is export.model's: the finetuned one, the from-scratch baseline, or (best,
the default) whichever did better on the validation split (stages/core/selection.py); the log,
the metrics (`model`, both validation accuracies) and the registered version say which and why.

The ONNX file takes raw uint8 N x H x W x C pixels and does the training preprocessing in its
graph (stages/core/served.py); its bytes depend on the stage's inputs only (model_metadata). It
is moved into place only after the parity gate (stages/core/parity.py); otherwise the stage
exits 2 with the figures and leaves no model.onnx (a previous one is removed: it no longer
matches finetuned.pt). See README, "Export and serving (ONNX)", for the input contract, the
metadata, the gate's tolerance and the variants. metrics/export.json holds no timings
(benchmarks/bench_export.py measures speed). The stage's body returns the Registration that
tracking registers (model version, alias challenger).
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.core.dataset import file_sha256, load_dataset
from stages.core.door import arguments, exit_process, run_stage
from stages.core.errors import BadInput
from stages.core.host import usable_cores
from stages.core.io import atomic_path, write_json
from stages.core.tracking.registration import Parity, Registration
from stages.params import Params, load_params

if TYPE_CHECKING:
    import numpy as np
    import onnx
    import onnx_ir

    from stages.core.models import Classifier, ModelFile
    from stages.core.selection import Choice

# torch, onnx and onnxruntime (~3 s) are imported by the functions that use them, not at load:
# `--help` and a params file refused start without them.

log = logging.getLogger("imagepipe.export")


# ---------------------------------------------------------------- export


def export_onnx(model: Classifier, mf: ModelFile, opset: int) -> onnx.ModelProto:
    """The eval-mode model behind its preprocessing (Served) as ONNX: input `image` uint8
    N x H x W x C, outputs `probabilities` and `logits`, a dynamic batch axis named "batch".

    The dynamo (torch.export) exporter, torch 2.14's default and the maintained one. The
    TorchScript exporter (dynamo=False) works too and is faster to run (0.1-0.5 s against
    4-15 s here), with the same numbers (a trained resnet_small: 1.7e-6 vs 1.4e-6 max
    |dlogit| against eager; both fold BatchNorm), but it is deprecated, warns on every call
    and is slated for removal, so a pipeline built on it would break on a torch upgrade.
    Checked with dynamo: resnet_small (1 and 3 channels), resnet18, mobilenet_v3_small.
    """
    import torch

    from stages.core import onnxio
    from stages.core.served import Served

    size, channels = mf.spec.image_size, mf.spec.in_channels
    # Batch 2 in the example: torch.export specialises a dimension whose example size is 1.
    example = torch.zeros(2, size, size, channels, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    served = Served(model.eval(), mf.mean, mf.std).eval()
    # The exporter's optimiser logs each pass at INFO; a stage log needs none of it.
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations in its own deps)
        program = torch.onnx.export(
            served, (example,), None, dynamo=True, verbose=False, opset_version=opset,
            input_names=[onnxio.INPUT], output_names=list(onnxio.OUTPUTS),
            dynamic_shapes=({0: batch},),
        )
    drop_machine_props(program.model)
    proto = program.model_proto
    got = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if got != opset:
        raise BadInput(f"the exporter wrote opset {got}, not export.opset={opset}")
    return proto


# Node metadata the dynamo exporter writes that describes the exporting machine, not the model:
# each node's Python stack trace, with absolute paths of the checkout and of torch in the venv.
# Exported from another folder (`dvc exp run --temp` or --queue runs in a fresh copy under
# .dvc/tmp/exps) the same checkpoint gave other bytes. The node's `namespace`, class hierarchy
# and fx node, which say which module and op made it, stay.
MACHINE_NODE_PROPS = frozenset({"pkg.torch.onnx.stack_trace"})


def drop_machine_props(model: onnx_ir.Model) -> None:
    """Remove MACHINE_NODE_PROPS from every node (subgraphs and local functions included)."""
    for nodes in [*model.graphs(), *model.functions.values()]:
        for node in nodes:
            for key in MACHINE_NODE_PROPS:
                node.metadata_props.pop(key, None)


def model_metadata(mf: ModelFile, model_path: Path | None) -> dict[str, Any]:
    """What a server needs, and where the model came from (see onnxio.METADATA_DOC).

    Lineage here is what the bytes are a function of: the source checkpoint's sha256 and the
    export code's digest (stages.core.codeid: the files DVC lists as the stage's code deps).
    The MLflow run id, git commit and dirty flag are per run, not per input: stamped here, each
    `dvc repro -f` or experiment wrote a new file (and a new DVC cache copy) for the same model,
    and a file DVC restored from its cache named a run and commit that did not make it. They
    are on the stage's MLflow run and the registered version (git.commit, git.dirty,
    imagepipe.run_id, onnx.sha256: the file's sha256 finds its versions).
    """
    import torch

    from stages.core import onnxio
    from stages.core.codeid import code_digest

    return {
        "classes": list(mf.classes),
        "num_classes": len(mf.classes),
        "image_size": mf.spec.image_size,
        "channels": mf.spec.in_channels,
        "channel_order": "RGB" if mf.spec.in_channels == 3 else "L",
        # What the graph takes: raw pixels; the normalisation below happens inside it.
        "layout": "NHWC",
        "input_dtype": "uint8",
        "input_name": onnxio.INPUT,
        "outputs": ",".join(onnxio.OUTPUTS),
        "mean": [float(v) for v in mf.mean],
        "std": [float(v) for v in mf.std],
        "arch": mf.spec.arch,
        "source_model_sha256": file_sha256(model_path) if model_path else None,
        "export_code_sha256": code_digest("stages.export"),
        "exporter": f"torch.onnx dynamo, torch {torch.__version__}",
    }


# ---------------------------------------------------------------- the stage


def run(params: Params, model_path: Path, target: Path, out: Path, variants_dir: Path
        ) -> dict[str, Any]:
    """Export and gate; write `out` and the variants only when the gate passes.

    Raises ParityFailed (a BadInput: exit 2) with the figures when it does not.
    """
    from stages.core import onnxio
    from stages.core.models import load_model_file
    from stages.core.onnxvariants import finish_model, variants
    from stages.core.parity import (
        ParityFailed,
        check_gate,
        cuda_parity,
        parity,
        parity_note,
        parity_set,
        torch_threads,
    )

    p = params.export
    model, mf = load_model_file(model_path)
    ds = load_dataset(target, verify=params.verify_data)
    want = (mf.spec.image_size, mf.spec.image_size, mf.spec.in_channels)
    if ds.image_shape != want:
        raise BadInput(f"{target} holds {ds.image_shape} images but {model_path} takes {want}")
    images, used = parity_set(ds, p.parity_images)
    start = time.perf_counter()
    proto = export_onnx(model, mf, p.opset)
    meta = model_metadata(mf, model_path)
    data = finish_model(proto, meta)
    log.info("export: exported and checked in %.1f s", time.perf_counter() - start)
    threads = p.threads or usable_cores()
    metrics: dict[str, Any] = {
        "opset": p.opset, "exporter": "dynamo", "parity_atol": p.parity_atol,
        "parity_rtol": p.parity_rtol,
        "parity_images": int(len(images)), "parity_images_by_split": used,
        "parity_note": parity_note(used, p.parity_images), "onnx_bytes": len(data),
    }
    try:
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
            # The gate runs on the CPU provider (parity.cuda_parity says why); CUDA only reports.
            session = onnxio.make_session(tmp, providers=[onnxio.CPU], threads=threads)
            metrics["providers"] = session.get_providers()
            with torch_threads(threads):
                figures = parity(session, model, images, mf, atol=p.parity_atol,
                                 rtol=p.parity_rtol)
                metrics["cuda_parity"] = cuda_parity(tmp, model, images, mf,
                                                     atol=p.parity_atol, rtol=p.parity_rtol)
            metrics |= figures
            check_gate(figures, p.parity_atol, p.parity_rtol)
            metrics["gate_passed"] = True
            metrics |= variants(p, tmp, variants_dir, ds, meta, session)
    except ParityFailed as err:
        # Artifacts from an earlier finetuned.pt would now be served as this one: remove them.
        out.unlink(missing_ok=True)
        shutil.rmtree(variants_dir, ignore_errors=True)
        err.metrics = {**metrics, "gate_passed": False}
        raise
    _log_summary(metrics, out)
    return metrics


def _log_summary(m: dict[str, Any], out: Path) -> None:
    log.info("export: %s (opset %d) parity max|dlogit| %.2e (max relative %.2e, %.2g of the "
             "tolerance), top-1 agreement %.0f%% on %d images", out, m["opset"],
             m["max_abs_diff"], m["max_rel_diff"], m["tolerance_used"],
             100 * m["top1_agreement"], m["parity_images"])
    if m.get("cuda_parity"):
        log.info("export: CUDA provider (information only): max|dlogit| %.2e, top-1 agreement "
                 "%.0f%%", m["cuda_parity"]["max_abs_diff"],
                 100 * m["cuda_parity"]["top1_agreement"])


def serving_example(onnx_path: Path, target: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """What the registered model is logged with: two target images as the model takes them
    (uint8 N x H x W x C; the test split first) and the model's own outputs for them, from
    which tracking infers the signature (uint8 [-1, H, W, C] in; probabilities and logits out)."""
    from stages.core import onnxio
    from stages.core.parity import parity_set

    # run() checked the target in this process a moment ago.
    images, _ = parity_set(load_dataset(target, verify=None), 2)
    session = onnxio.make_session(onnx_path, providers=[onnxio.CPU], threads=1)
    return images, onnxio.predict_outputs(session, images)


def registration(params: Params, metrics: dict[str, Any], model_path: Path, target: Path,
                 out: Path, choice: Choice) -> Registration:
    """What tracking registers for a model that passed the gate: the files, the verdict with
    its figures, the registered model's name, and the input example with its outputs."""
    example, outputs = serving_example(out, target)
    p = params.export
    return Registration(
        onnx_path=out, torch_path=model_path, dataset=target,
        model_name=params.registry.model_name,
        parity=Parity(passed=bool(metrics["gate_passed"]),
                      max_abs_diff=float(metrics["max_abs_diff"]),
                      top1_agreement=float(metrics["top1_agreement"]),
                      atol=p.parity_atol, images=int(metrics["parity_images"]), rtol=p.parity_rtol),
        input_example=example, output_example=outputs, serving_max_images=p.serving_max_images,
        shipped=choice.model, selection=choice.reason)


# What no one compares across runs (`dvc exp show`, `dvc metrics diff`): per-batch-size parity,
# where the parity images came from, what ran the check. Written beside the metrics, not in them.
DETAILS = ("by_batch_size", "cuda_parity", "parity_images_by_split", "parity_note", "providers",
           "variants", "exporter", "fp16_skipped")


# Words that are compared all the same: which model shipped, by which rule (export.model).
COMPARED_WORDS = ("model", "model_rule")


def _write(metrics: dict[str, Any], metrics_path: Path, details_path: Path) -> None:
    """run()'s metrics: the figures compared across runs to `metrics_path`, the details to
    `details_path`."""
    details = {k: v for k, v in metrics.items() if k not in COMPARED_WORDS and (
        k in DETAILS or isinstance(v, dict | list | str))}
    write_json(metrics_path, {k: v for k, v in metrics.items() if k not in details})
    write_json(details_path, details)


def main(argv: list[str] | None = None) -> int:
    args = arguments("export", __doc__, argv, model="models/finetuned.pt",
                     scratch="models/scratch.pt", target="data/target", out="models/model.onnx",
                     variants="models/onnx_variants", metrics="metrics/export.json",
                     details="reports/export.json")

    def body() -> Registration:
        params = load_params(args.params)
        from stages.core.parity import ParityFailed
        from stages.core.selection import choose

        choice = choose(params.export.model, args.model, args.scratch)
        try:
            metrics = run(params, choice.path, args.target, args.out, args.variants)
        except ParityFailed as err:
            # The figures, for whoever asks why.
            _write({**choice.metrics(), **err.metrics}, args.metrics, args.details)
            raise
        metrics = {**choice.metrics(), **metrics}
        _write(metrics, args.metrics, args.details)
        return registration(params, metrics, choice.path, args.target, args.out, choice)

    return run_stage("export", body)


if __name__ == "__main__":
    exit_process(main())
