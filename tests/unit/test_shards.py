"""Sharded datasets: the shard file format, the one logical array readers see, class-local
shards, and an interrupted ingest that resumes with only the missing shards."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages import ingest
from stages.core import engine, shards, staging
from stages.core.dataset import ShardedArray, file_sha256, load_dataset
from stages.params import parse_params
from tests.helpers import default_params

RNG = np.random.default_rng(0)


def test_a_streamed_shard_is_a_plain_npy_file(tmp_path: Path) -> None:
    rows = RNG.integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    for name, capacity in (("short.npy", 10), ("full.npy", 7)):  # the hash's bet lost, then won
        w = shards.RowWriter(tmp_path / name, (4, 4, 3), capacity=capacity, hashed=True)
        w.write(rows[:3])
        w.write(rows[3:])
        w.close()
        np.testing.assert_array_equal(np.load(tmp_path / name), rows)
        assert (tmp_path / name).stat().st_size == shards.HEADER + rows.nbytes  # reserve undone
        assert w.digest == file_sha256(tmp_path / name)


@pytest.mark.parametrize("planned", [14, 15])  # every row came; one was a bad file
def test_pieces_join_in_order_whatever_order_they_finish(tmp_path: Path, planned: int) -> None:
    rows = RNG.integers(0, 256, (14, 4, 4, 3), dtype=np.uint8)
    results = {}
    for part, (lo, hi) in enumerate([(0, 5), (5, 9), (9, 14)]):
        w = shards.RowWriter(tmp_path / f"p{part}.tmp", (4, 4, 3))
        w.write(rows[lo:hi])
        w.close()
        results[part] = {"path": str(tmp_path / f"p{part}.tmp"), "digests": [str(part)],
                         "bad": [], "skipped": [], "stamps": None}
    joiner = staging.ShardAssembler(tmp_path, "s.npy", planned, (4, 4, 3))
    for part in (2, 0, 1):
        joiner.add(part, results[part])
    meta = joiner.finish()
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), rows)
    assert meta["n"] == 14 and meta["sha256"] == file_sha256(tmp_path / "s.npy")
    assert meta["digests"] == ["0", "1", "2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy", "s.npy.json"]  # pieces gone


def test_an_abandoned_join_leaves_no_file(tmp_path: Path) -> None:
    """A failed or interrupted map: the shard's temporary and its pieces (joined or not) go."""
    for part in (0, 1):
        w = shards.RowWriter(tmp_path / f"p{part}.tmp", (4, 4, 3))
        w.write(RNG.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8))
        w.close()
    joiner = staging.ShardAssembler(tmp_path, "s.npy", 9, (4, 4, 3))
    joiner.add(0, {"path": str(tmp_path / "p0.tmp")})  # joined
    joiner.add(2, {"path": str(tmp_path / "p1.tmp")})  # waits for part 1, which never comes
    joiner.abandon()
    assert list(tmp_path.iterdir()) == []


def test_sharded_array_indexes_like_one_array() -> None:
    whole = RNG.integers(0, 256, (23, 2, 2, 1), dtype=np.uint8)
    cuts = [0, 5, 5, 14, 23]  # an empty shard too
    arr = ShardedArray([whole[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    assert len(arr) == 23 and arr.shape == whole.shape and arr.dtype == np.uint8
    idx = RNG.permutation(23)[:11]
    mask = RNG.random(23) < 0.5
    for key in (3, -1, 13, slice(None), slice(4, 16), slice(2, 20, 3), slice(20, 2, -2),
                idx, np.sort(idx), [0, 22, 5]):
        np.testing.assert_array_equal(arr[key], whole[key], err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(arr), whole)
    for bad in (23, mask, (7, 1, 1), (idx, 0)):  # no stage indexes so: refused, never misread
        with pytest.raises(IndexError):
            arr[bad]


def test_plan_is_one_shard_when_it_fits_else_per_class() -> None:
    labels = np.repeat([0, 1, 2], [5, 12, 3])
    assert shards.plan(labels, 1000, 1) == [(0, 20)]
    ranges = shards.plan(labels, 2**20 // 4, 1)  # 4 rows a shard
    assert ranges == [(0, 2), (2, 5), (5, 9), (9, 13), (13, 17), (17, 20)]


def _folder(root: Path, counts: dict[str, int], start: int = 0) -> None:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            arr = RNG.integers(0, 256, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


def _params(root: Path, **data: object):
    raw = default_params()
    # 64 x 64 x 3 = 12 KB an image: shard_mb=1 holds 85, so 100+ images make per-class shards.
    raw["data"].update({"image_size": 64, "channels": 3, "shard_mb": 1, **data})
    raw["data"]["source"] = {"uri": f"imagefolder:{root}"}
    raw["data"]["target"] = {"uri": f"imagefolder:{root}"}
    return parse_params(raw)


@pytest.fixture
def inline(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Decode in this process and count the pieces decoded."""
    monkeypatch.setattr(engine, "usable_cores", lambda: 1)
    calls: list[int] = []
    real = shards.decode_piece

    def counted(piece, fetch=None):
        calls.append(len(piece.refs))
        return real(piece, fetch)

    monkeypatch.setattr(shards, "decode_piece", counted)
    return calls


def test_a_change_to_one_class_rewrites_its_shards_only(tmp_path: Path, inline: list[int]) -> None:
    root = tmp_path / "imgs"
    _folder(root, {"a": 60, "b": 60, "c": 60})
    params = _params(root)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    before = load_dataset(tmp_path / "out").manifest
    assert len(before["shards"]) == 3  # 180 images over 85 a shard: one a class
    _folder(root, {"b": 5}, start=60)
    inline.clear()
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    after = load_dataset(tmp_path / "out")
    assert inline == [65]  # only b was decoded again
    old = [s["sha256"] for s in before["shards"]]
    new = [s["sha256"] for s in after.manifest["shards"]]
    assert new[0] == old[0] and new[2] == old[2] and new[1] != old[1]
    assert after.images.shape == (185, 64, 64, 3) and isinstance(after.images, ShardedArray)
    assert after.manifest["counts"]["train"]["a"] == before["counts"]["train"]["a"]  # splits local
    mask = os.umask(0)
    os.umask(mask)
    for entry in after.manifest["shards"]:  # readable by others, as every output
        assert ((tmp_path / "out" / entry["file"]).stat().st_mode & 0o777) == 0o666 & ~mask
    staged = sorted(p.name for p in (tmp_path / ".out.shards").iterdir())
    assert len(staged) == 6  # the old b shard was pruned: 3 shards and their metas


def test_a_killed_ingest_redoes_only_the_missing_shards(tmp_path: Path, inline: list[int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    _folder(root, {"a": 50, "b": 50, "c": 50})
    params = _params(root)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "clean")
    counted = shards.decode_piece

    def dies_on_third(piece, fetch=None):
        if len(inline) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C or SIGTERM mid-ingest
        return counted(piece, fetch)

    monkeypatch.setattr(shards, "decode_piece", dies_on_third)
    inline.clear()
    with pytest.raises(KeyboardInterrupt):
        ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(shards, "decode_piece", counted)
    inline.clear()
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert inline == [50]  # the shard the kill left undone, nothing else
    assert load_dataset(tmp_path / "out").manifest["sha256"] == \
        load_dataset(tmp_path / "clean").manifest["sha256"]


def test_a_process_pool_gives_the_same_bytes_as_one_process(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    _folder(root, {"a": 40, "b": 30})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.bytes(100))
    params = _params(root, shard_mb=256, max_bad_fraction=0.1)
    monkeypatch.setattr(shards, "MIN_PIECE", 8)  # one shard in pieces, as CIFAR is
    monkeypatch.setattr(engine, "DECODE_POOL_FROM", 0)  # the pool, for 70 files
    monkeypatch.setattr(engine, "usable_cores", lambda: 2)
    pooled = ingest.ingest_role("source", params.data.source, params, tmp_path / "pool")
    monkeypatch.setattr(engine, "usable_cores", lambda: 1)
    alone = ingest.ingest_role("source", params.data.source, params, tmp_path / "one" / "pool")
    a, b = load_dataset(tmp_path / "pool"), load_dataset(tmp_path / "one" / "pool")
    assert a.manifest["sha256"] == b.manifest["sha256"] and len(a.manifest["shards"]) == 1
    assert pooled["bad"] == alone["bad"] and len(pooled["bad"]) == 1
    assert a.images.shape == (70, 64, 64, 3)


def test_a_small_folder_decodes_without_starting_the_pool(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Below engine.DECODE_POOL_FROM of work the pool's start-up (about a second of two cores)
    costs more than it saves: the files decode in this process, however many cores there are."""
    root = tmp_path / "imgs"
    _folder(root, {"a": 20, "b": 10})
    monkeypatch.setattr(engine, "usable_cores", lambda: 2)

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process pool was started for 30 files")

    monkeypatch.setattr(engine, "_pool_map", no_pool)
    monkeypatch.setattr(engine, "prestart", no_pool)
    params = _params(root)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert load_dataset(tmp_path / "out").images.shape[0] == 30
    assert shards.decode_engine("local", True, engine.DECODE_POOL_FROM - 1) == "inline"
    assert shards.decode_engine("local", True, engine.DECODE_POOL_FROM) == "local"
    assert shards.decode_engine("ray", True, 1) == "ray"  # a cluster asked for is used


def _photo(path: Path, size: int) -> None:
    """A JPEG of `size` bytes: a small image, then zeros past its end (sparse, so cheap to
    write; phones store further images there), which every reader skips. The rule weighs
    bytes, so to it this is a camera photo; the test stays fast."""
    Image.fromarray(RNG.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path, quality=90)
    with path.open("r+b") as f:
        f.truncate(size)


def test_a_few_camera_photos_take_the_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """28 files, 4 of them 14 MB: past engine.DECODE_POOL_FROM by their bytes (a count of
    files, the rule before, kept them in one process), and the one small shard they make is
    split into pieces for both workers (by count it was one piece, under MIN_PIECE files).
    The bytes are those of one process."""
    root = tmp_path / "imgs"
    _folder(root, {"a": 12, "b": 12})
    for cls in ("a", "b"):
        for i in range(2):
            _photo(root / cls / f"photo{i}.jpg", 14 * 2**20)
    pools: list[int] = []
    real_pool = engine._pool_map

    def spied(fn, items, n_workers):
        pools.append(len(items))
        return real_pool(fn, items, n_workers)

    monkeypatch.setattr(engine, "_pool_map", spied)
    monkeypatch.setattr(engine, "usable_cores", lambda: 2)
    params = _params(root, max_bad_fraction=0.0)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "pool")
    assert len(pools) == 1 and pools[0] >= 4  # the one shard in pieces (eight a worker)
    monkeypatch.setattr(engine, "usable_cores", lambda: 1)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "one" / "pool")
    assert len(pools) == 1
    a, b = load_dataset(tmp_path / "pool"), load_dataset(tmp_path / "one" / "pool")
    assert a.images.shape == (28, 64, 64, 3) and len(a.manifest["shards"]) == 1
    assert a.manifest["sha256"] == b.manifest["sha256"]


def test_the_pool_is_chosen_by_the_files_bytes_not_their_count() -> None:
    """The files' sizes weighed: 40,000 tiny files (200 B, 16-px icons) stay in this process,
    where their count (over 30,000) started the pool; 17 camera photos of 3 MB take it;
    30,000 CIFAR JPEGs of their mean size are the crossover itself."""
    def verdict(n: int, size: int) -> str:
        work, _ = shards.decode_work([size] * n)
        return shards.decode_engine("local", True, work)

    assert verdict(40_000, 200) == "inline"
    assert verdict(17, 3_000_000) == "local"
    assert verdict(16, 3_000_000) == "inline"
    assert verdict(30_000, engine.CIFAR_JPEG_BYTES) == "local"
    assert verdict(29_999, engine.CIFAR_JPEG_BYTES) == "inline"


def test_decode_work_weighs_the_sizes_and_stops_once_the_pool_pays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = [300, 500, 700, 900, 1100]
    work, weighed = shards.decode_work([*sizes, -1])
    assert (work, weighed) == (sum(sizes) + 6 * engine.FILE_COST_BYTES, 6)  # gone: its overhead
    # files over data.max_file_mb are refused unread: their bytes are no work
    assert shards.decode_work(sizes, max_bytes=299) == (5 * engine.FILE_COST_BYTES, 5)
    monkeypatch.setattr(engine, "DECODE_POOL_FROM", 800 + 2 * engine.FILE_COST_BYTES)
    weighed_sizes = iter(sizes)
    assert shards.decode_work(weighed_sizes) == (engine.DECODE_POOL_FROM, 2)
    assert next(weighed_sizes) == 700  # the rest never weighed: build_shards never stats them


def test_new_decoding_code_reuses_no_staged_shard(tmp_path: Path, inline: list[int],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "imgs"
    _folder(root, {"a": 10, "b": 10})
    params = _params(root)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    inline.clear()
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert inline == []  # nothing changed: nothing decoded
    monkeypatch.setattr(shards, "_code_digest", lambda: "an edited canonical()")
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert inline == [20]


def test_a_changed_file_redoes_its_shard_only(tmp_path: Path, inline: list[int]) -> None:
    """Shards are named by refs and params; a file rewritten in place (same name, new size or
    mtime, stamped by its reader's fstat) makes its shard's meta stale, and only that shard."""
    root = tmp_path / "imgs"
    _folder(root, {"a": 60, "b": 60, "c": 60})
    params = _params(root)
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    before = load_dataset(tmp_path / "out").manifest
    staged = sorted(p.name for p in (tmp_path / ".out.shards").iterdir())
    target = root / "c" / "7.png"
    Image.fromarray(RNG.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(target)
    inline.clear()
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    after = load_dataset(tmp_path / "out").manifest
    assert inline == [60]  # c alone
    old = [s["sha256"] for s in before["shards"]]
    new = [s["sha256"] for s in after["shards"]]
    assert new[:2] == old[:2] and new[2] != old[2]
    assert sorted(p.name for p in (tmp_path / ".out.shards").iterdir()) == staged  # same names
    os.utime(target, ns=(1, 1))  # touched only: the bytes are the same, the stamp is not
    inline.clear()
    ingest.ingest_role("source", params.data.source, params, tmp_path / "out")
    assert inline == [60] and [s["sha256"] for s in
                               load_dataset(tmp_path / "out").manifest["shards"]] == new
