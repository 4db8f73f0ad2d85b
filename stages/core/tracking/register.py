"""Registering one model version: the PyTorch model, the ONNX file (onnx flavour, uint8 tensor
signature: for ONNX consumers) and the serving wrapper around the same file (serving.py: what
`mlflow models serve` runs, refusing float pixels) logged into the stage's run; the wrapper is
registered under the model name.

Which versions become `challenger` (the sweep policy): a version made under `dvc exp run` is
tagged `dvc.exp_name` with its experiment's name. `challenger` moves to the new version when
the run happened in the workspace (`dvc repro`, `imagepipe run`, a workspace `dvc exp run`):
its models/model.onnx is then the workspace's, which promote insists on. A queued or --temp
experiment runs in DVC's temporary copy and leaves the alias alone, so a sweep does not hand
`challenger` to whichever experiment finished last; `imagepipe tune pick --apply` moves it to
the version of the experiment it applied (commands/tune.py).

Input: a Registration (registration.py), the run it belongs to, the environment DVC gives a
stage (DVC_EXP_NAME, DVC_ROOT). Output: the new version, or an error with nothing
half-registered.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.core.errors import BadInput
from stages.core.tracking.describe import version_description
from stages.core.tracking.parentrun import EXP_NAME_ENV
from stages.core.tracking.registration import (
    CHALLENGER,
    DVC_MD5_TAG,
    DVC_OUT_TAG,
    DVC_STAGE_TAG,
    Registration,
)
from stages.core.tracking.store import Store, TrackingDown

EXP_TAG = "dvc.exp_name"  # the DVC experiment a version was made in (tune pick finds it by it)


def experiment_run(cwd: Path | None = None) -> tuple[str | None, bool]:
    """(the DVC experiment this stage runs in, or None; whether it runs in DVC's temporary copy
    of the project: a queued or --temp experiment). DVC sets DVC_EXP_NAME for every stage of
    an experiment and DVC_ROOT to the project it belongs to, which is not the stage's own
    folder when DVC runs it in a temporary copy (dvc/repo/experiments/queue/base.py)."""
    name = os.environ.get(EXP_NAME_ENV) or None
    root = os.environ.get("DVC_ROOT")
    here = (cwd or Path.cwd()).resolve()
    return name, bool(name and root and Path(root).resolve() != here)


def register_model_version(store: Store, run_id: str, reg: Registration, workspace: Path,
                           tags: dict[str, str]) -> str:
    """Log the PyTorch model, the ONNX model and the serving wrapper into run `run_id`, register
    the wrapper under `reg.model_name` and, unless it runs in a queued or --temp experiment,
    give it the alias `challenger` (see the module doc); return the new version. A version
    whose alias or description could not be set is deleted again, so a failure never leaves a
    half-registered version. `workspace`: where the stage ran (its metrics describe the
    version; a queued experiment's own, not the project's)."""
    import mlflow
    import onnx

    from stages.core.integrity import file_sha256
    from stages.core.onnxio import read_metadata
    from stages.core.tracking.serving import log_serving_model

    missing = [str(p) for p in (reg.onnx_path, reg.torch_path) if not Path(p).is_file()]
    if missing:
        raise BadInput(f"the registration names {' and '.join(missing)}, which do not exist")
    # stdout to stderr: ending the fluent run prints "View run ..." (see Store.terminate).
    with store.fluent(), contextlib.redirect_stdout(sys.stderr), _known_packages(), \
            store.call("open run for models", mlflow.start_run, run_id=run_id):
        torch_uri = _log_torch(store, Path(reg.torch_path), reg.input_example)
        proto = onnx.load(reg.onnx_path)
        onnx_info = store.call("log onnx model", mlflow.onnx.log_model, proto,
                               name="onnx", pip_requirements=_onnx_requirements(),
                               onnx_execution_providers=["CPUExecutionProvider"],
                               save_as_external_data=False,
                               # uint8 pixels in, probabilities and logits out (export's example)
                               signature=mlflow.models.infer_signature(reg.input_example,
                                                                       reg.output_example),
                               input_example=reg.input_example)
        # The same file again, byte for byte, inside the wrapper that serving runs: it runs the
        # ONNX file, decodes posted image files (pillow), is unpickled by cloudpickle; MLflow
        # adds itself.
        extra = [f"{n}=={v}" for n, v in _versions("pillow", "cloudpickle").items()]
        serving_info = store.call("log serving model", log_serving_model, Path(reg.onnx_path),
                                  reg.input_example, read_metadata(proto),
                                  _onnx_requirements() + extra, reg.serving_max_images)
    experiment, temporary = experiment_run(workspace)
    kept = _dvc_tags(reg, workspace)
    version_tags = {**{k: v for k, v in tags.items() if not k.startswith("mlflow.")},
                    **reg.parity.tags(), "imagepipe.run_id": run_id,
                    "onnx.sha256": file_sha256(Path(reg.onnx_path)),
                    "pytorch_model_uri": torch_uri, "onnx_model_uri": str(onnx_info.model_uri),
                    **({EXP_TAG: experiment} if experiment else {}), **kept}
    with store.fluent():
        mv = store.call("register model", mlflow.register_model, serving_info.model_uri,
                        reg.model_name, tags=version_tags)
    try:
        # A paragraph on the registry page: what the many tags say, in words.
        store.call("describe version", store.client.update_model_version, reg.model_name,
                   mv.version, description=version_description(workspace, run_id, reg, tags))
        if not temporary:
            store.call("set alias", store.client.set_registered_model_alias, reg.model_name,
                       CHALLENGER, mv.version)
    except TrackingDown:
        with contextlib.suppress(Exception):
            store.client.delete_model_version(reg.model_name, mv.version)
        raise
    if temporary:
        print(f"export: version {mv.version} is experiment {experiment}'s ({EXP_TAG} tag); "
              f"{CHALLENGER!r} stays where it was (a queued or --temp experiment never moves "
              "it: `imagepipe tune pick --apply` moves it to the experiment it applies)",
              file=sys.stderr)
    else:
        print(f"export: version {mv.version} is now {CHALLENGER!r}", file=sys.stderr)
    return str(mv.version)


def _dvc_tags(reg: Registration, workspace: Path) -> dict[str, str]:
    """Under DVC: the stage, the model's path in the project and its md5 as DVC hashes it, for
    promote to check against dvc.lock (commands/promote.py `refusal`)."""
    from stages.core.lineage import path_hashes

    onnx_path = Path(reg.onnx_path).resolve()
    if reg.dvc_stage is None or not onnx_path.is_relative_to(workspace.resolve()):
        return {}
    rel = onnx_path.relative_to(workspace.resolve()).as_posix()
    md5 = path_hashes(workspace, [rel]).get(rel)
    return {DVC_STAGE_TAG: reg.dvc_stage, DVC_OUT_TAG: rel, DVC_MD5_TAG: md5} if md5 else {}


def _log_torch(store: Store, path: Path, pixels: Any) -> str:
    """Log the finetuned model (pytorch flavour) with a signature and an input example: the
    ONNX model's example `pixels` as the PyTorch model takes them."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    import stages
    from stages.core.dataset import preprocess
    from stages.core.models import load_model_file

    model, mf = load_model_file(path)
    x = preprocess(pixels, mf.mean, mf.std)
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    info = store.call("log pytorch model", mlflow.pytorch.log_model, model, name="pytorch",
                      signature=infer_signature(x, y), input_example=x,
                      # Explicit: inferring them costs ~15 s per log_model (MLflow imports
                      # the model in a subprocess to see what it touches).
                      pip_requirements=[f"{n}=={v}" for n, v in
                                        _versions("torch", "torchvision", "numpy").items()],
                      # Pickle, as the model file itself: MLflow 3's default (pt2) runs
                      # torch.export on every registration, 2.6 s of the 4.3 s this call took
                      # (cProfile of a tiny resnet_small's registration; the export case of
                      # benchmarks/bench_tracking.py times the whole stage).
                      serialization_format="pickle",
                      # The pickled model refers to stages.core.models: ship the package.
                      code_paths=[str(Path(stages.__file__).parent)])
    return str(info.model_uri)


@contextlib.contextmanager
def _known_packages() -> Iterator[None]:
    """MLflow checks the pinned requirements against the environment after each log_model by
    mapping every installed module to its distribution: importlib_metadata's
    packages_distributions() reads the file list of every installed package, 2.7 s of export's
    registration here (cProfile of a tiny model's registration). The requirements given
    are this environment's own versions (_versions), so the check cannot fail: the map is
    seeded with those packages for the duration, and the full map comes back after. A private
    MLflow name: when it is gone, nothing is seeded and only the time is lost."""
    try:
        from mlflow.utils import requirements_utils as ru
    except ImportError:
        yield
        return
    if getattr(ru, "_MODULES_TO_PACKAGES", "absent") is not None:
        yield
        return
    names = ("torch", "torchvision", "numpy", "onnx", "onnxruntime", "mlflow", "cloudpickle")
    ru._MODULES_TO_PACKAGES = {n: [n] for n in names} | {"PIL": ["pillow"]}
    try:
        yield
    finally:
        ru._MODULES_TO_PACKAGES = None
        ru._PACKAGES_TO_MODULES = None


def _versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in names:
        try:
            out[name] = version(name).split("+")[0]  # '+cu128': a local build tag pip cannot find
        except PackageNotFoundError:
            continue
    return out


def _onnx_requirements() -> list[str]:
    found = _versions("onnx", "numpy", "onnxruntime", "onnxruntime-gpu")
    ort = found.get("onnxruntime") or found.get("onnxruntime-gpu")
    # The CPU wheel: it runs anywhere, and the version that passed parity here is the floor.
    return [f"{n}=={found[n]}" for n in ("onnx", "numpy") if n in found] + [
        f"onnxruntime>={ort}" if ort else "onnxruntime"]
