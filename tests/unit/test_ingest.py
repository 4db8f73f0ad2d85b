"""ingest on data the tests write: every image mode, every kind of bad file, every URI kind."""

from __future__ import annotations

import io
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import ingest
from stages.core import sources
from stages.core.dataset import load_dataset
from stages.core.errors import BadInput
from stages.core.imageform import canonical
from stages.params import parse_params
from tests.helpers import default_params, run_stage, write_params

RNG = np.random.default_rng(0)


def _img(mode: str, size: tuple[int, int] = (20, 12), value: int | None = None) -> Image.Image:
    arr = RNG.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    if value is not None:
        arr[:] = value
    return Image.fromarray(arr, "RGB").convert(mode)


def _save(img: Image.Image, path: Path, fmt: str, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _every_mode(folder: Path) -> list[Path]:
    """One file per mode ingest must accept, plus a large and a tiny one."""
    paths = [
        _save(_img("RGB"), folder / "rgb.jpg", "JPEG"),
        _save(_img("L"), folder / "grey.png", "PNG"),
        _save(_img("RGBA"), folder / "rgba.png", "PNG"),
        _save(_img("P"), folder / "palette.gif", "GIF"),
        _save(_img("CMYK"), folder / "cmyk.jpg", "JPEG"),
        _save(Image.fromarray(RNG.integers(0, 65535, (12, 20), dtype=np.uint16)), folder / "deep.png", "PNG"),
        _save(_img("RGB", (640, 480)), folder / "large.jpg", "JPEG"),
        _save(_img("RGB", (3, 2)), folder / "tiny.png", "PNG"),
    ]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers rotate 90 degrees
    paths.append(_save(_img("RGB"), folder / "rotated.jpg", "JPEG", exif=exif.tobytes()))
    return paths


def _params(tmp_path: Path, uri: str, **data: object) -> dict:
    raw = default_params()
    raw["data"]["source"] = {"uri": uri}
    raw["data"]["target"] = {"uri": uri}
    raw["data"]["image_size"] = 8
    raw["data"]["channels"] = 3
    raw["data"].update(data)
    return raw


def test_every_mode_becomes_uint8_rgb(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        _every_mode(root / cls)
    params = parse_params(_params(tmp_path, f"imagefolder:{root}", test_fraction=0.2, val_fraction=0.1))
    report = ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert report["bad"] == []
    assert ds.images.dtype == np.uint8 and ds.images.shape == (18, 8, 8, 3)
    assert ds.classes == ["a", "b"]
    assert sum(ds.manifest["counts"]["test"].values()) == 4  # round(9 * 0.2) per class


def test_canonical_applies_exif_rotation_and_alpha() -> None:
    wide = Image.new("RGB", (20, 10), "white")
    wide.paste((0, 0, 0), (0, 0, 10, 10))  # left half black
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    wide.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    out = canonical(Image.open(io.BytesIO(buf.getvalue())), 10, 1)[:, :, 0]
    # Rotated upright the image is tall; centre-cropped, black lands on top, white below.
    assert out[:3].mean() < 60 and out[-3:].mean() > 200
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert canonical(clear, 4, 3).min() == 255  # transparent over white


def test_sixteen_bit_uses_the_full_range() -> None:
    deep = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert canonical(deep, 4, 1).min() == 255


def _with_bad_files(root: Path) -> dict[str, str]:
    for cls in ("cat", "dog"):
        for i in range(30):
            _save(_img("RGB"), root / cls / f"{i}.png", "PNG")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "cat" / "zero.jpg").write_bytes(b"")
    (root / "cat" / "text.jpg").write_text("this is not a picture\n")
    (root / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.bytes(200))
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog" / "README.txt").write_text("not an image name: ignored, listed")
    return {"zero.jpg": "empty", "text.jpg": "not an image", "corrupt.png": "", "truncated.png": ""}


def test_bad_files_are_skipped_and_listed(tmp_path: Path) -> None:
    expected = _with_bad_files(tmp_path / "imgs")
    raw = _params(tmp_path, f"imagefolder:{tmp_path / 'imgs'}", max_bad_fraction=0.1)
    params = parse_params(raw)
    report = ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    bad = {Path(b["path"]).name: b["reason"] for b in report["bad"]}
    assert set(bad) == set(expected)
    for name, reason in expected.items():
        assert reason in bad[name]
    assert load_dataset(tmp_path / "out").images.shape[0] == 60
    assert json.loads((tmp_path / "out" / "report.json").read_text())["bad"] == report["bad"]
    assert any(p.endswith("README.txt") for p in report["ignored_files"])


def test_a_file_over_the_size_limit_is_skipped_by_its_reader_not_bad(tmp_path: Path) -> None:
    """Ingest lists by file type (no stat); the worker's fstat refuses the file unread, and
    report.json says so under "skipped", as the listing does: not a bad image."""
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(10):
            _save(_img("RGB"), root / cls / f"{i}.png", "PNG")
    with open(root / "b" / "huge.png", "wb") as f:
        f.truncate(3 * 2**20)  # sparse: costs no disk
    listing = sources.open_source(f"imagefolder:{root}", root="", download=False,
                                  max_file_bytes=2**20)
    assert listing.skipped == []
    assert str(root / "b" / "huge.png") in listing.refs
    params = parse_params(_params(tmp_path, f"imagefolder:{root}", max_file_mb=1,
                                  max_bad_fraction=0.0))
    report = ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert report["bad"] == [] and report["candidates"] == 20
    assert [(Path(s["path"]).name, "too large" in s["reason"]) for s in report["skipped"]] == [
        ("huge.png", True)]
    assert load_dataset(tmp_path / "out").images.shape[0] == 20


def test_too_many_bad_files_is_exit_2_naming_count_and_paths(tmp_path: Path) -> None:
    _with_bad_files(tmp_path / "imgs")
    params = write_params(tmp_path / "p.yaml", _params(tmp_path, f"imagefolder:{tmp_path / 'imgs'}"))
    proc = run_stage("ingest", "--params", params, "--out", tmp_path / "out")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    # 48 of the 64: the source's test split (16 files) is not decoded, nothing reads it.
    assert re.search(r"[1-4] of 48 files are bad", last), last
    assert "data.max_bad_fraction" in last
    assert not (tmp_path / "out" / "source").exists()


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "MAX_PIXELS", 50 * 50)
    _save(_img("RGB", (100, 100)), tmp_path / "bomb.png", "PNG")
    with pytest.raises(sources.BadFile, match="decompression bomb"):
        sources.read_image_file(str(tmp_path / "bomb.png"))


def _split_tree(root: Path, leak: bool) -> None:
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                _save(_img("RGB"), root / split / cls / f"{i}.png", "PNG")
    if leak:
        (root / "test" / "a" / "leak.png").write_bytes((root / "train" / "a" / "0.png").read_bytes())


def test_shipped_splits_are_kept(tmp_path: Path) -> None:
    _split_tree(tmp_path / "imgs", leak=False)
    params = parse_params(_params(tmp_path, f"imagefolder:{tmp_path / 'imgs'}", val_fraction=0.0))
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    counts = load_dataset(tmp_path / "out").manifest["counts"]
    assert counts["train"] == {"a": 6, "b": 6} and counts["test"] == {"a": 2, "b": 2}


def test_duplicate_leaking_into_test_fails_unless_allowed(tmp_path: Path) -> None:
    _split_tree(tmp_path / "imgs", leak=True)
    raw = _params(tmp_path, f"imagefolder:{tmp_path / 'imgs'}")
    with pytest.raises(BadInput, match="test split also stand in train"):
        params = parse_params(raw)
        ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    raw["data"]["allow_leakage"] = True
    params = parse_params(raw)
    report = ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert report["leaks_into_test"] == 1
    assert {i["split"] for i in report["duplicates"][0]["items"]} == {"train", "test"}


def test_class_without_training_image_is_exit_2(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for i in range(4):
        _save(_img("RGB"), root / "train" / "a" / f"{i}.png", "PNG")
    (root / "train" / "b").mkdir(parents=True)
    (root / "train" / "b" / "broken.png").write_bytes(b"")
    for cls in ("a", "b"):
        _save(_img("RGB"), root / "test" / cls / "t.png", "PNG")
    params = parse_params(_params(tmp_path, f"imagefolder:{root}", max_bad_fraction=1.0))
    with pytest.raises(BadInput, match=r"\['b'\] have no usable training image"):
        ingest.ingest_role("source", params.data.source, params, tmp_path / "out")


def test_digits_default_filters_classes_and_caps(tmp_path: Path) -> None:
    params = parse_params(default_params())
    ingest.run(params, tmp_path)
    source, target = load_dataset(tmp_path / "source"), load_dataset(tmp_path / "target")
    assert source.classes == ["0", "1", "2", "3", "4"] and target.classes == ["5", "6", "7", "8", "9"]
    assert set(target.manifest["counts"]["train"].values()) == {20}
    assert target.images.shape[1:] == (16, 16, 1)
    # Stratified: every class in every split a stage reads. The source's test split is carved
    # (train and val are what they were with it) but not decoded: no stage reads it.
    for split in ("train", "val"):
        assert min(source.manifest["counts"][split].values()) > 0
    assert sum(source.manifest["counts"]["test"].values()) == 0
    assert min(target.manifest["counts"]["test"].values()) > 0
    again = tmp_path / "again"
    ingest.run(params, again)
    assert load_dataset(again / "source").manifest["sha256"] == source.manifest["sha256"]


def test_unknown_class_lists_the_valid_ones(tmp_path: Path) -> None:
    raw = default_params()
    raw["data"]["target"]["classes"] = ["5", "eleven"]
    with pytest.raises(BadInput, match=r"\['eleven'\] are not in sklearn:digits; it has \['0'"):
        ingest.run(parse_params(raw), tmp_path)


def _tree_with_an_excluded_class(root: Path) -> None:
    """train/ and test/ of classes a and b (kept) and c (excluded): c holds a README, a nested
    folder, and a FIFO that no walk may touch."""
    for split, n in (("train", 4), ("test", 1)):
        for cls in ("a", "b", "c"):
            for i in range(n):
                _save(_img("RGB"), root / split / cls / f"{i}.png", "PNG")
    (root / "train" / "c" / "README.txt").write_text("not an image")
    _save(_img("RGB"), root / "train" / "c" / "more" / "deep.png", "PNG")
    os.mkfifo(root / "train" / "c" / "pipe.png")


def test_a_class_filter_walks_only_the_kept_class_folders(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    _tree_with_an_excluded_class(root)
    opened: list[str] = []
    real = os.scandir

    def counted(path):
        opened.append(str(path))
        return real(path)

    monkeypatch.setattr(sources.os, "scandir", counted)
    listing = sources.open_source(f"imagefolder:{root}", root="", download=False,
                                  classes=["a", "b"])
    assert listing.classes == ["a", "b", "c"]  # every name, for the "not in" message
    assert sorted(Path(p).parent.name for p in opened) == ["test", "test", "train", "train"]
    assert {Path(r).parent.name for r in listing.refs} == {"a", "b"} and len(listing.refs) == 10
    assert listing.ignored == [] and listing.skipped == []  # c's README and FIFO never seen
    whole = sources.open_source(f"imagefolder:{root}", root="", download=False)
    assert len(whole.refs) == 16 and len(whole.ignored) == 1 and len(whole.skipped) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder of mode 000")
def test_an_unreadable_excluded_class_does_not_stop_ingest(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    _tree_with_an_excluded_class(root)
    (root / "train" / "c").chmod(0)
    try:
        raw = _params(tmp_path, f"imagefolder:{root}")
        raw["data"]["source"]["classes"] = ["a", "b"]
        params = parse_params(raw)
        ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    finally:
        (root / "train" / "c").chmod(0o755)
    assert load_dataset(tmp_path / "out").classes == ["a", "b"]


def _write_cifar_root(root: Path, n: int = 6) -> None:
    """CIFAR-10's python on-disk format (cifar-10-batches-py), tiny."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(k + i) % 10 for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                     "frog", "horse", "ship", "truck"]}, f)


def test_torchvision_cifar10_from_an_existing_root(tmp_path: Path) -> None:
    _write_cifar_root(tmp_path / "raw")
    raw = _params(tmp_path, "torchvision:CIFAR10", image_size=32)
    raw["data"]["source"] = {"uri": "torchvision:CIFAR10", "root": str(tmp_path / "raw"),
                             "download": False, "classes": ["cat", "dog"]}
    params = parse_params(raw)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.classes == ["cat", "dog"]
    # The shipped test batch stays the test split.
    assert sum(ds.manifest["counts"]["test"].values()) == 1
    assert ds.images.shape[1:] == (32, 32, 3)


def test_torchvision_offline_without_files_says_what_to_download(tmp_path: Path) -> None:
    raw = _params(tmp_path, "torchvision:MNIST")
    raw["data"]["source"] = {"uri": "torchvision:MNIST", "root": str(tmp_path / "raw"), "download": False}
    params = write_params(tmp_path / "p.yaml", raw)
    proc = run_stage("ingest", "--params", params, "--out", tmp_path / "out")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "torchvision:MNIST" in line and str(tmp_path / "raw") in line and "download" in line
