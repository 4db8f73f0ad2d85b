"""augment: seeded copies (same params, same bytes), per-image draws, the preview."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from stages import augment, ingest
from stages.core import augpolicy, engine
from stages.core.dataset import load_dataset
from stages.params import Params, parse_params
from tests.helpers import default_params


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    ingest.run(_params(), out)
    return out / "source"


def _params(**augment_params: object) -> Params:
    raw = default_params()
    raw["augment"].update(augment_params)
    return parse_params(raw)


def test_same_params_same_bytes(source: Path, tmp_path: Path) -> None:
    first = augment.run(_params(copies=2), source, tmp_path / "a")
    second = augment.run(_params(copies=2), source, tmp_path / "b")
    a, b = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    assert a.manifest["sha256"] == b.manifest["sha256"]
    assert first["n_augmented"] == 2 * first["n_train_original"] > 0
    assert first == second  # same metrics too: no timing for `dvc metrics diff` to flag
    other = parse_params({**default_params(), "seed": 1})
    augment.run(other, source, tmp_path / "c")
    assert load_dataset(tmp_path / "c").manifest["sha256"]["images.npy"] != a.manifest["sha256"]["images.npy"]


def test_layout_originals_then_copies_then_val_and_test(source: Path, tmp_path: Path) -> None:
    augment.run(_params(copies=1), source, tmp_path / "aug")
    src, aug = load_dataset(source), load_dataset(tmp_path / "aug")
    n_train = len(src.indices("train"))
    assert len(aug.indices("train")) == 2 * n_train
    np.testing.assert_array_equal(aug.images[:n_train], src.images[src.indices("train")])
    assert not np.array_equal(aug.images[n_train:2 * n_train], aug.images[:n_train])
    np.testing.assert_array_equal(aug.labels[n_train:2 * n_train], aug.labels[:n_train])
    for split in ("val", "test"):
        np.testing.assert_array_equal(aug.part(split)[0], src.part(split)[0])


def test_zero_copies_keeps_the_originals_only(source: Path, tmp_path: Path) -> None:
    metrics = augment.run(_params(copies=0), source, tmp_path / "aug")
    assert metrics["n_augmented"] == 0
    assert load_dataset(tmp_path / "aug").manifest["counts"] == load_dataset(source).manifest["counts"]


def test_zero_copies_links_the_source_shards_instead_of_writing_them(
        source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="imagepipe"):
        metrics = augment.run(_params(copies=0), source, tmp_path / "aug")
    src, aug = load_dataset(source), load_dataset(tmp_path / "aug")
    theirs = [source / e["file"] for e in src.manifest["shards"]]
    ours = [tmp_path / "aug" / e["file"] for e in aug.manifest["shards"]]
    assert len(ours) == len(theirs) and all(map(os.path.samefile, ours, theirs))
    # The same dataset as a written copy would be: rows, labels and splits, one row order.
    np.testing.assert_array_equal(aug.images[:], src.images[:])
    np.testing.assert_array_equal(aug.labels, src.labels)
    np.testing.assert_array_equal(aug.split, src.split)
    assert aug.manifest["sha256"]["images.npy"] == src.manifest["sha256"]["images.npy"]
    assert aug.manifest["params"]["augment"]["copies"] == 0
    assert metrics == {"n_train_original": len(src.indices("train")), "copies": 0,
                       "n_augmented": 0, "n_total": len(src.labels)}
    assert "linked, not copied" in caplog.text


def test_each_image_in_a_batch_gets_its_own_draw() -> None:
    params = _params(rotation=30)
    same = np.repeat(np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1), 8, axis=0)
    out = augpolicy.augment(params.augment, same, augpolicy.image_keys(0, 0, np.arange(8)))
    assert out.dtype == np.uint8 and out.shape == same.shape
    assert len({o.tobytes() for o in out}) == 8


def test_every_policy_step_runs_on_rgb() -> None:
    raw = default_params()
    raw["augment"].update(hflip=True, erasing=0.5, noise_std=0.1, color_jitter=0.4)
    flat = np.full((4, 12, 12, 3), 128, dtype=np.uint8)
    out = augpolicy.augment(parse_params(raw).augment, flat, augpolicy.image_keys(0, 0, range(4)))
    assert out.shape == (4, 12, 12, 3) and out.dtype == np.uint8
    assert not np.array_equal(out, flat)


def _batched(p: Params, images: np.ndarray, keys: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([augpolicy.augment(p.augment, images[lo:lo + batch], keys[lo:lo + batch])
                           for lo in range(0, len(images), batch)])


@pytest.mark.parametrize("channels", [1, 3])
def test_the_bytes_do_not_depend_on_the_batch_size(channels: int) -> None:
    """Image n is drawn from its key alone: batches of 1, 7 and 64 give identical bytes."""
    p = _params(hflip=True, rotation=20, color_jitter=0.3, noise_std=0.05, erasing=0.5)
    images = np.random.default_rng(2).integers(0, 256, (130, 16, 16, channels), dtype=np.uint8)
    keys = augpolicy.image_keys(7, 1, np.arange(130))
    one = _batched(p, images, keys, 1)
    assert np.array_equal(one, _batched(p, images, keys, 7))
    assert np.array_equal(one, _batched(p, images, keys, 64))
    # ... nor on its neighbours: the rows a task holds, or where they start.
    assert np.array_equal(one[40:], _batched(p, images[40:], keys[40:], 64))


def test_an_image_key_names_seed_copy_and_row() -> None:
    keys = {int(augpolicy.image_keys(s, c, [r])[0]) for s in (0, 1) for c in (0, 1) for r in (0, 1)}
    assert len(keys) == 8


def test_the_stage_bytes_do_not_depend_on_augment_batch_size(source: Path, tmp_path: Path) -> None:
    made = {b: augment.run(_params(copies=1, batch_size=b), source, tmp_path / str(b))
            for b in (7, 64)}
    a, b = load_dataset(tmp_path / "7"), load_dataset(tmp_path / "64")
    assert made[7] == made[64] and a.manifest["sha256"] == b.manifest["sha256"]


def test_preview_is_a_png(source: Path, tmp_path: Path) -> None:
    path = tmp_path / "plots" / "preview.png"
    augment.preview(_params(), source, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000



def test_the_preview_of_a_hashed_set_does_not_say_it_skipped_the_hash(
        source: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The preview reopened the set with verify "size", which logged "shard sha256 not checked"
    # under the default verify_data: sha256, a false line in every augment log.
    with caplog.at_level(logging.INFO, logger="imagepipe"):
        augment.preview(_params(), source, tmp_path / "preview.png")
    assert "not checked" not in caplog.text


def test_a_process_pool_gives_the_same_bytes_as_inline(source: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each copy of each shard is its own seeded task: where it runs changes no byte."""
    pools: list[int] = []
    real_pool_map = engine._pool_map
    monkeypatch.setattr(engine, "_pool_map", lambda fn, items, n: pools.append(n) or
                        real_pool_map(fn, items, n))
    monkeypatch.setattr(engine, "usable_cores", lambda: 2)
    augment.run(_params(copies=2), source, tmp_path / "inline")
    assert pools == []  # a few hundred copies: below engine.AUGMENT_POOL_FROM
    monkeypatch.setattr(engine, "AUGMENT_POOL_FROM", 0)
    augment.run(_params(copies=2), source, tmp_path / "pool")
    assert pools == [2]
    a, b = load_dataset(tmp_path / "inline"), load_dataset(tmp_path / "pool")
    assert a.manifest["sha256"] == b.manifest["sha256"]
    assert [s["sha256"] for s in a.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]


def test_a_set_without_shards_is_refused_naming_its_manifest(tmp_path: Path) -> None:
    """A one-array set (one images.npy: nothing writes it any more) is no dataset: one line
    naming manifest.json, exit 2, not a traceback."""
    import json

    from stages.core.errors import BadInput
    from stages.core.integrity import file_sha256

    old = tmp_path / "old"
    old.mkdir()
    np.save(old / "images.npy", np.zeros((4, 8, 8, 1), dtype=np.uint8))
    np.save(old / "labels.npy", np.arange(4) % 2)
    np.save(old / "split.npy", np.zeros(4, np.uint8))
    (old / "manifest.json").write_text(json.dumps(
        {"classes": ["a", "b"], "n": 4, "uri": "test:old",
         "sha256": {f.name: file_sha256(f) for f in old.glob("*.npy")}}))
    with pytest.raises(BadInput, match=r"manifest\.json: not a dataset manifest"):
        augment.run(_params(copies=1), old, tmp_path / "aug")
