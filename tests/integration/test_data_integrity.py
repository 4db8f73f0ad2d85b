"""Data that is not what its manifest says: finetune and evaluate refuse it (exit 2, the file and
the fix named) before training or scoring on it, instead of exit 0 on flipped bytes or a
traceback (70) on missing or truncated files.

The faults are real: the shards are written by the real ingest (digits), the models by tiny
real pretrain and finetune runs, and each case damages a copy of the target set on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from stages import ingest
from stages.core.dataset import HEADER, load_dataset
from stages.params import parse_params
from tests.helpers import default_params, run_stage, write_params

pytestmark = pytest.mark.slow


def _params(folder: Path, **top: object) -> Path:
    raw = default_params()
    common = {"device": "cpu", "batch_size": 16, "width": 8}
    raw["pretrain"] = {**raw["pretrain"], **common, "epochs": 1}
    raw["finetune"] = {**raw["finetune"], **common, "head_epochs": 1, "full_epochs": 1,
                       "baseline": False}
    raw["finetune"].pop("width")
    raw["evaluate"] = {"device": "cpu", "batch_size": 64}
    raw.update(top)
    return write_params(folder / f"params-{'-'.join(map(str, top.values())) or 'default'}.yaml", raw)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/source and data/target by the real ingest, then a tiny pretrained and finetuned
    model on them (evaluate's and finetune's inputs)."""
    root = tmp_path_factory.mktemp("integrity")
    params = _params(root)
    ingest.run(parse_params(default_params()), root / "data")
    models = root / "models"
    pre = run_stage("pretrain", "--params", params, "--data", root / "data" / "source",
                    "--model", models / "pretrained.pt", "--checkpoints", root / "ck" / "pre",
                    "--metrics", root / "pre.json", "--plot", root / "pre.csv")
    assert pre.returncode == 0, pre.stderr[-3000:]
    fine = finetune(root, params, root / "data" / "target")
    assert fine.returncode == 0, fine.stderr[-3000:]
    base = scratch(root, params, root / "data" / "target")
    assert base.returncode == 0, base.stderr[-3000:]
    return root


def finetune(root: Path, params: Path, data: Path) -> object:
    m = root / "models"
    return run_stage("finetune", "--params", params, "--data", data, "--pretrained",
                     m / "pretrained.pt", "--model", m / "finetuned.pt", "--probe", m / "probe.pt",
                     "--checkpoints", root / "ck" / "fine", "--metrics", root / "fine.json",
                     "--plot", root / "fine.csv")


def scratch(root: Path, params: Path, data: Path) -> object:
    m = root / "models"
    return run_stage("scratch", "--params", params, "--data", data, "--pretrained",
                     m / "pretrained.pt", "--model", m / "scratch.pt", "--checkpoints",
                     root / "ck" / "scratch", "--metrics", root / "scratch.json", "--plot",
                     root / "scratch.csv")


def evaluate(root: Path, params: Path, data: Path) -> object:
    m, out = root / "models", data.parent / "eval"
    return run_stage("evaluate", "--params", params, "--data", data, "--model",
                     m / "finetuned.pt", "--scratch", m / "scratch.pt", "--probe", m / "probe.pt",
                     "--metrics", out / "m.json", "--per-class", out / "pc.json",
                     "--confusion", out / "c.png", "--confusion-data", out / "c.csv")


def damaged(built: Path, tmp_path: Path) -> Path:
    """A byte-for-byte copy of the target set (never links: the damage stays in the copy)."""
    return Path(shutil.copytree(built / "data" / "target", tmp_path / "data" / "target"))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def assert_refused(proc: object, names: str, *fix: str) -> str:
    err = proc.stderr  # type: ignore[attr-defined]
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert proc.returncode == 2, err[-3000:]  # type: ignore[attr-defined]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert names in lines[0] and all(f in lines[0] for f in fix), lines[0]
    return lines[0]


def test_intact_set_is_read(built: Path, tmp_path: Path) -> None:
    data = damaged(built, tmp_path)
    proc = evaluate(built, _params(tmp_path), data)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("stage", ["finetune", "evaluate"])
def test_flipped_byte_in_a_shard_is_exit_2(built: Path, tmp_path: Path, stage: str) -> None:
    data = damaged(built, tmp_path)
    shard = data / "shards" / "00000.npy"
    flip_byte(shard, HEADER + 1000)  # one pixel's lowest bit: the image still "looks" fine
    run = finetune if stage == "finetune" else evaluate
    line = assert_refused(run(built, _params(tmp_path), data), str(shard),
                          "sha256 does not match manifest.json", f"dvc checkout {data}",
                          "dvc repro -f ingest")
    assert line.startswith(f"{stage}: error: ")


CASES = {
    "deleted shard": (lambda d: (d / "shards" / "00000.npy").unlink(), "shards/00000.npy",
                      "missing"),
    "empty manifest": (lambda d: (d / "manifest.json").write_bytes(b""), "manifest.json",
                       "not valid JSON"),
    "truncated manifest": (lambda d: (d / "manifest.json").write_bytes(
        (d / "manifest.json").read_bytes()[:200]), "manifest.json", "not valid JSON"),
    "truncated labels": (lambda d: _truncate(d / "labels.npy"), "labels.npy",
                         "sha256 does not match"),
}


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_missing_or_truncated_file_is_exit_2(built: Path, tmp_path: Path, case: str) -> None:
    damage, names, says = CASES[case]
    data = damaged(built, tmp_path)
    damage(data)
    assert_refused(evaluate(built, _params(tmp_path), data), f"{data}/{names}", says,
                   "dvc checkout")


def test_size_mode_says_it_does_not_hash_and_still_refuses_truncation(built: Path,
                                                                      tmp_path: Path) -> None:
    data = damaged(built, tmp_path)
    params = _params(tmp_path, verify_data="size")
    flip_byte(data / "shards" / "00000.npy", HEADER + 1000)
    proc = evaluate(built, params, data)  # a flipped byte passes unseen in this mode, but not silently
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard sha256 not checked (verify_data: size)" in proc.stderr
    _truncate(data / "labels.npy")
    assert_refused(evaluate(built, params, data), f"{data}/labels.npy", "truncated or padded")


def test_a_set_is_hashed_once_per_process(built: Path, tmp_path: Path) -> None:
    # export opens the target set twice (gate, serving example): the second open re-hashes
    # nothing, yet a file changed in between is hashed again and refused.
    data = damaged(built, tmp_path)
    load_dataset(data)
    load_dataset(data)
    flip_byte(data / "labels.npy", 200)
    with pytest.raises(Exception, match="labels.npy: its sha256 does not match"):
        load_dataset(data)
