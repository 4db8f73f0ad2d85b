"""export stage and onnxio: raw uint8 pixels in (the preprocessing inside the graph),
probabilities and logits out, parity at several batch sizes at a relative + absolute tolerance,
metadata round trip, dynamic batch, the gate failing (and leaving no file) on a perturbed
model, quiet CPU-only providers, no timings in the metrics, the Registration (with its input
example) the stage's body hands to tracking, format-1 (float input) models still scored."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml

from stages import export
from stages.core import models, onnxio, onnxvariants
from stages.core import parity as parity_check
from stages.core.dataset import SPLIT_CODE, preprocess
from stages.core.models import ModelFile, ModelSpec, build_model, load_model_file
from stages.core.tracking.registration import Registration
from stages.params import parse_params
from tests.helpers import save_dataset

CLASSES = ["a", "b", "c", "d", "e"]
MEAN, STD = [0.25], [0.5]
RUN_ID = "0123456789abcdef0123456789abcdef"
# 30 test images, fewer than parity_images=40: the gate must top up from val.
SPLITS = {"train": 20, "val": 10, "test": 30}


def _images(n: int, size: int, channels: int,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Class k is brighter in band k: learnable in a few steps, so logits are not all alike."""
    labels = np.arange(n) % len(CLASSES)
    imgs = rng.integers(0, 80, (n, size, size, channels), dtype=np.uint8)
    band = size // len(CLASSES)
    for i, k in enumerate(labels):
        imgs[i, k * band:(k + 1) * band] += 150
    return imgs, labels


def make_model(path: Path, spec: ModelSpec, mean: list[float], std: list[float]) -> None:
    torch.manual_seed(0)
    model = build_model(spec)
    x, y = _images(40, spec.image_size, spec.in_channels, np.random.default_rng(1))
    xt, yt = torch.from_numpy(preprocess(x, mean, std)), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    models.save_model_file(path, model.eval(), ModelFile(spec, CLASSES, mean, std))


def make_target(folder: Path, size: int, channels: int) -> None:
    n = sum(SPLITS.values())
    imgs, labels = _images(n, size, channels, np.random.default_rng(2))
    split = np.concatenate([np.full(k, SPLIT_CODE[s], np.uint8) for s, k in SPLITS.items()])
    save_dataset(folder, imgs, labels, split, CLASSES, {"role": "target"})


def make_params(**export_overrides: object) -> dict:
    return {
        "data": {"source": {"uri": "sklearn:digits"}, "target": {"uri": "sklearn:digits"}},
        # One thread: torch's two OpenMP threads on a loaded 2-core machine crawl (44 ms a
        # batch-1 call, against 4 ms on one).
        "export": {"parity_images": 40, "calibration_images": 20, "threads": 1,
                   **export_overrides},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One export shared by the module (the dynamo exporter costs seconds per model)."""
    root = tmp_path_factory.mktemp("export")
    make_model(root / "finetuned.pt", ModelSpec("resnet_small", 5, 1, 16, width=8), MEAN, STD)
    make_target(root / "target", 16, 1)
    with pytest.MonkeyPatch.context() as mp:  # the id the flow's MLflow run would set
        mp.setenv("MLFLOW_RUN_ID", RUN_ID)
        metrics = export.run(parse_params(make_params()), root / "finetuned.pt", root / "target",
                             root / "model.onnx", root / "variants")
    yield {"root": root, "metrics": metrics, "onnx": root / "model.onnx"}


def test_gate_passes_and_metrics_hold_the_figures(project: dict) -> None:
    m = project["metrics"]
    assert m["gate_passed"] is True
    assert m["max_abs_diff"] <= 1e-4 and m["top1_agreement"] == 1.0
    assert m["tolerance_used"] <= 1.0 and m["prob_max_abs_diff"] <= 1e-4
    assert (m["parity_atol"], m["parity_rtol"]) == (1e-4, 1e-3)
    assert m["cuda_parity"] is None or "max_abs_diff" in m["cuda_parity"]
    assert set(m["by_batch_size"]) == {"1", "7", "64"}
    assert m["opset"] == 18 and m["providers"] == ["CPUExecutionProvider"]
    assert m["parity_images"] == 40 and m["parity_images_by_split"] == {"test": 30, "val": 10}
    assert "topped up from val" in m["parity_note"]
    # Timings change on every run: in the metrics, `dvc metrics diff` would always show them.
    assert not [k for k in m if k.endswith(("_per_s", "_ms_b1", "_seconds", "speedup_b64"))]
    assert m["onnx_bytes"] > 0 and m["int8_bytes"] > 0
    assert (project["root"] / "variants" / onnxvariants.INT8_NAME).is_file()
    assert m["variants"] == [onnxvariants.INT8_NAME]
    # The int8 delta, recomputed here from the two files on the test split by hand (argmax of
    # each session's logits against the labels), must be what the metrics say.
    from stages.core.dataset import load_dataset

    x, y = load_dataset(project["root"] / "target").part("test")
    acc = {name: float(np.mean(onnxio.predict_outputs(onnxio.make_session(path), x)["logits"]
                               .argmax(1) == y))
           for name, path in (("fp32", project["onnx"]),
                              ("int8", project["root"] / "variants" / onnxvariants.INT8_NAME))}
    assert m["test_accuracy_fp32"] == pytest.approx(acc["fp32"])
    assert m["int8_accuracy_delta"] == pytest.approx(acc["int8"] - acc["fp32"], abs=1e-6)
    # Band-brightness classes after 4 training steps: well above chance, so the delta compares
    # real predictions, not noise.
    assert acc["fp32"] >= 0.4, acc  # 5 classes: chance 0.2 (it scores 0.53)
    # No GPU on the test machines: fp16 is skipped and says why.
    if onnxio.CUDA not in onnxio.available_providers():
        assert "fp16_skipped" in m


def test_valid_model_with_dynamic_batch(project: dict) -> None:
    proto = onnx.load(project["onnx"])
    onnx.checker.check_model(proto, full_check=True)
    assert next(o.version for o in proto.opset_import if o.domain == "") == 18
    (inp,) = proto.graph.input
    assert inp.name == "image" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [16, 16, 1]
    assert [o.name for o in proto.graph.output] == ["probabilities", "logits"]
    session = onnxio.make_session(project["onnx"])
    model, mf = load_model_file(project["root"] / "finetuned.pt")
    images, _ = _images(11, 16, 1, np.random.default_rng(3))
    with torch.inference_mode():
        ref = model(torch.from_numpy(preprocess(images, mf.mean, mf.std))).numpy()
    for batch in (1, 3, 5, 11, 64):
        got = onnxio.predict_outputs(session, images, batch_size=batch)["logits"]
        assert got.shape == (11, 5)
        assert np.abs(got - ref).max() <= 1e-4, batch


def test_raw_pixels_in_probabilities_out_match_torch(project: dict) -> None:
    """What any ONNX consumer does (a bare ORT session, no imagepipe code): feed uint8 pixels,
    read probabilities; the class must be the torch path's and the numbers its softmax."""
    import onnxruntime as ort

    model, mf = load_model_file(project["root"] / "finetuned.pt")
    images, labels = _images(25, 16, 1, np.random.default_rng(6))
    bare = ort.InferenceSession(str(project["onnx"]), providers=["CPUExecutionProvider"])
    probs, logits = bare.run(["probabilities", "logits"], {"image": images})
    with torch.inference_mode():
        ref = model(torch.from_numpy(preprocess(images, mf.mean, mf.std)))
    ref_p = torch.softmax(ref, 1).numpy()
    assert np.array_equal(probs.argmax(1), ref_p.argmax(1))
    np.testing.assert_allclose(probs, ref_p, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(logits, ref.numpy(), rtol=1e-3, atol=1e-4)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.mean(probs.argmax(1) == labels) >= 0.4  # trained: the classes mean something
    # The old contract's input, pixels / 255 as floats, is refused, not silently misread.
    with pytest.raises(Exception, match=r"expected: \(tensor\(uint8\)\)"):
        bare.run(None, {"image": images.astype(np.float32) / 255})


def test_format1_float_models_are_still_scored(project: dict, tmp_path: Path) -> None:
    """A model exported before the preprocessing moved into the graph (float32 NCHW `input`,
    one `logits` output, preprocessed outside): predict_outputs still gives its logits, and
    their softmax as the probabilities (what predict shows)."""
    model, mf = load_model_file(project["root"] / "finetuned.pt")
    old = tmp_path / "old.onnx"
    torch.onnx.export(model.eval(), (torch.zeros(1, 1, 16, 16),), str(old), dynamo=False,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    proto = onnx.load(old)
    meta = {"classes": CLASSES, "image_size": 16, "channels": 1, "channel_order": "L",
            "mean": MEAN, "std": STD}
    onnx.helper.set_model_props(proto, onnxio.metadata_props(meta))
    onnx.save(proto, old)
    images, _ = _images(9, 16, 1, np.random.default_rng(7))
    new = onnxio.predict_outputs(onnxio.make_session(project["onnx"]), images)["logits"]
    session = onnxio.make_session(old)
    assert session.get_inputs()[0].type == "tensor(float)"  # format 1: preprocessed outside
    out = onnxio.predict_outputs(session, images, batch_size=4)
    assert np.abs(out["logits"] - new).max() <= 1e-4
    ref = torch.softmax(torch.from_numpy(out["logits"]).double(), 1).numpy()
    assert out["probabilities"].dtype == np.float32 and np.abs(out["probabilities"] - ref).max() < 1e-6


def test_parity_at_several_batch_sizes(project: dict) -> None:
    model, mf = load_model_file(project["root"] / "finetuned.pt")
    images, _ = _images(70, 16, 1, np.random.default_rng(4))
    with parity_check.torch_threads(1):
        session = onnxio.make_session(project["onnx"], threads=1)
        figures = parity_check.parity(session, model, images, mf, (1, 2, 13, 64), atol=1e-4,
                                      rtol=1e-3)
    assert set(figures["by_batch_size"]) == {"1", "2", "13", "64"}
    assert figures["max_abs_diff"] <= 1e-4 and figures["top1_agreement"] == 1.0
    assert figures["tolerance_used"] <= 1.0 and figures["prob_max_abs_diff"] <= 1e-5
    assert figures["max_abs_logit"] > 0.1  # the model is not degenerate: the check means something


def test_metadata_round_trip(project: dict) -> None:
    path = project["onnx"]
    session = onnxio.make_session(path)
    forms = [onnx.load(path), session]
    metas = [onnxio.read_metadata(form) for form in forms]
    assert all(meta == metas[0] for meta in metas)
    meta = metas[0]
    assert meta["classes"] == CLASSES and meta["num_classes"] == 5
    assert meta["image_size"] == 16 and meta["channels"] == 1 and meta["channel_order"] == "L"
    assert meta["mean"] == MEAN and meta["std"] == STD and meta["layout"] == "NHWC"
    assert meta["input_dtype"] == "uint8" and meta["input_name"] == "image"
    assert meta["outputs"] == "probabilities,logits" and meta["imagepipe_format"] == "2"
    # The run's id (set while it exported) is the run's, not the file's: test_export_bytes.py.
    assert "mlflow_run_id" not in meta and "git_commit" not in meta
    assert meta["arch"] == "resnet_small" and len(meta["source_model_sha256"]) == 64
    int8 = onnxio.read_metadata(onnx.load(project["root"] / "variants" / onnxvariants.INT8_NAME))
    assert int8["classes"] == CLASSES and int8["variant"] == "int8"


def test_read_metadata_refuses_a_foreign_model() -> None:
    foreign = onnx.load_from_string(onnxio._probe_model())
    with pytest.raises(onnxio.BadInput, match="not an imagepipe model"):
        onnxio.read_metadata(foreign)


def _perturbed(onnx_path: Path, delta: float):  # stands in for export_onnx
    """export_onnx replaced by: the good model with its head bias moved by `delta`."""
    def fake_export(model, mf, opset):
        proto = onnx.load(onnx_path)
        bias = next(t for t in proto.graph.initializer if list(t.dims) == [len(CLASSES)])
        values = onnx.numpy_helper.to_array(bias) + np.float32(delta)
        bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
        return proto
    return fake_export


def test_gate_fails_and_leaves_no_model(project: dict, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(export, "export_onnx", _perturbed(project["onnx"], 1e-2))
    monkeypatch.setenv("IMAGEPIPE_TRACKING", "0")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(make_params(model="finetuned")))
    out, variants = tmp_path / "models" / "model.onnx", tmp_path / "models" / "onnx_variants"
    out.parent.mkdir()
    out.write_bytes(b"stale model from an earlier finetuned.pt")
    variants.mkdir()
    code = export.main(["--params", str(tmp_path / "params.yaml"),
                        "--model", str(project["root"] / "finetuned.pt"),
                        "--target", str(project["root"] / "target"), "--out", str(out),
                        "--variants", str(variants), "--metrics", str(tmp_path / "export.json"),
                        "--details", str(tmp_path / "details.json")])
    assert code == 2
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "batch 7: max|dlogit| " in err
    assert "0.0001 + 0.001 * |torch|" in err
    assert list(out.parent.iterdir()) == []  # no model, no variants, no temporary file
    metrics = json.loads((tmp_path / "export.json").read_text())
    assert metrics["gate_passed"] is False and abs(metrics["max_abs_diff"] - 1e-2) < 1e-5
    assert metrics["tolerance_used"] > 1.0
    # Per-batch figures beside the metrics, not among them (dvc exp show stays readable).
    assert "by_batch_size" not in metrics and "parity_note" not in metrics
    details = json.loads((tmp_path / "details.json").read_text())
    assert set(details["by_batch_size"]) == {"1", "7", "64"}


def test_gate_needs_every_top1_to_agree() -> None:
    figures = {"max_abs_diff": 1e-6, "prob_max_abs_diff": 1e-7, "tolerance_used": 0.01,
               "top1_agreement": 0.99, "max_abs_logit": 3.0,
               "by_batch_size": {"1": {"max_abs_diff": 1e-6, "prob_max_abs_diff": 1e-7,
                                       "top1_agreement": 0.99}}}
    with pytest.raises(parity_check.ParityFailed, match="top-1 agreement 99.00%"):
        parity_check.check_gate(figures, 1e-4, 1e-3)
    parity_check.check_gate({**figures, "top1_agreement": 1.0}, 1e-4, 1e-3)


def test_tolerance_is_relative_plus_absolute() -> None:
    """np.allclose's rule: a logit of 50 may differ by 1e-4 + 1e-3 * 50 = 0.0501, one of 0.01
    only by 1.1e-4 (the old absolute 1e-4 refused the first and let the second pass barely)."""
    ref = np.array([[50.0, 0.01]], dtype=np.float32)
    ok = parity_check.compare(ref + np.float32([[0.05, 1e-4]]), ref, atol=1e-4, rtol=1e-3)
    assert ok["tolerance_used"] <= 1.0 and ok["max_abs_diff"] == pytest.approx(0.05, rel=1e-3)
    assert np.allclose(ref + np.float32([[0.05, 1e-4]]), ref, rtol=1e-3, atol=1e-4)
    bad = parity_check.compare(ref + np.float32([[0.0, 2e-4]]), ref, atol=1e-4, rtol=1e-3)
    assert bad["tolerance_used"] > 1.0 and bad["max_rel_diff"] == pytest.approx(0.02, rel=1e-2)
    assert parse_params(make_params(parity_rtol=0.0)).export.parity_rtol == 0.0
    with pytest.raises(Exception, match="parity_rtol"):
        parse_params(make_params(parity_rtol=-1e-3))


def test_providers_cpu_only_and_quiet(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this checks the machine without one")
    onnxio.available_providers.cache_clear()
    assert onnxio.available_providers() == ["CPUExecutionProvider"]
    probe = tmp_path / "probe.onnx"
    probe.write_bytes(onnxio._probe_model())
    session = onnxio.make_session(probe)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert capfd.readouterr().err == ""


def test_fp16_variant_converts(project: dict, tmp_path: Path) -> None:
    # The stage makes fp16 only where CUDA loads (none here); ORT's CPU provider still runs it,
    # which checks the conversion's numbers on this machine.
    meta = onnxio.read_metadata(onnx.load(project["onnx"]))
    data = onnxvariants.to_fp16(onnx.load(project["onnx"]), meta)
    half = onnx.load_from_string(data)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.graph.initializer)
    assert onnxio.read_metadata(half)["variant"] == "fp16"
    images, _ = _images(20, 16, 1, np.random.default_rng(5))
    fp32 = onnxio.predict_outputs(onnxio.make_session(project["onnx"]), images)["logits"]
    (tmp_path / "half.onnx").write_bytes(data)
    fp16 = onnxio.predict_outputs(onnxio.make_session(tmp_path / "half.onnx"), images)["logits"]
    assert np.abs(fp16 - fp32).max() < 2e-2 * max(1.0, np.abs(fp32).max())


@pytest.mark.parametrize("spec", [
    ModelSpec("resnet_small", 5, in_channels=3, image_size=32, width=8),
    pytest.param(ModelSpec("mobilenet_v3_small", 5, in_channels=3, image_size=32),
                 marks=pytest.mark.slow),
], ids=lambda s: f"{s.arch}-{s.in_channels}ch-{s.image_size}px")
def test_other_models_pass_the_gate(spec: ModelSpec, tmp_path: Path) -> None:
    make_model(tmp_path / "m.pt", spec, [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    make_target(tmp_path / "target", spec.image_size, spec.in_channels)
    params = parse_params(make_params(quantize_int8=False, fp16=False))
    m = export.run(params, tmp_path / "m.pt", tmp_path / "target", tmp_path / "m.onnx",
                   tmp_path / "variants")
    assert m["gate_passed"] and m["max_abs_diff"] <= 1e-4 and m["tolerance_used"] <= 1.0
    assert onnxio.read_metadata(onnx.load(tmp_path / "m.onnx"))["channel_order"] == "RGB"


def test_main_body_returns_the_registration(project: dict, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """What the door passes to tracking: the files the stage was given, the verdict, the
    registered model's name from params.registry, the input example and its outputs (no
    export again: run() is stubbed)."""
    bodies: list[object] = []
    monkeypatch.setattr(export, "run", lambda *args: project["metrics"])
    monkeypatch.setattr(export, "run_stage", lambda name, body: bodies.append(body()) or 0)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {**make_params(model="finetuned"), "registry": {"model_name": "digits-net"}}))
    # The files the relative paths name, as under DVC (the example is read from them).
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model.onnx").write_bytes(project["onnx"].read_bytes())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "target").symlink_to(project["root"] / "target")
    monkeypatch.chdir(tmp_path)
    args = {"--params": str(tmp_path / "params.yaml"), "--model": "models/finetuned.pt",
            "--target": "data/target", "--out": "models/model.onnx",
            "--metrics": str(tmp_path / "export.json")}
    assert export.main([x for kv in args.items() for x in kv]) == 0
    reg = bodies[0]
    assert isinstance(reg, Registration)
    assert (reg.onnx_path, reg.torch_path, reg.dataset) == (
        Path("models/model.onnx"), Path("models/finetuned.pt"), Path("data/target"))
    assert reg.model_name == "digits-net"
    assert reg.parity.passed and reg.parity.max_abs_diff == project["metrics"]["max_abs_diff"]
    p = parse_params(make_params()).export
    assert reg.parity.images == 40 and (reg.parity.atol, reg.parity.rtol) == (p.parity_atol,
                                                                              p.parity_rtol)
    assert reg.parity.tags()["parity_rtol"] == "0.001"
    x, y = reg.input_example, reg.output_example
    assert x.dtype == np.uint8 and x.shape == (2, 16, 16, 1)
    assert set(y) == {"probabilities", "logits"} and y["probabilities"].shape == (2, 5)
    np.testing.assert_allclose(y["probabilities"].sum(1), 1.0, atol=1e-5)
    assert json.loads((tmp_path / "export.json").read_text())["gate_passed"] is True
