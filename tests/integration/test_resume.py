"""kill -9 of a real `python -m stages.pretrain` (and finetune) mid-epoch, then a rerun: it resumes from the
last checkpoint and ends with the same bits as a run never interrupted (CPU, fixed seed).
A checkpoint made under other params is not resumed: the run starts over and says why."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, default_params, run_stage, write_params
from tests.unit.test_train import write_dataset

pytestmark = pytest.mark.slow
LEARNED = ("train_loss", "train_acc", "val_loss", "val_acc", "lr")


def stage_args(params: Path, data: Path, out: Path) -> list[str | Path]:
    return ["--params", params, "--data", data, "--model", out / "pretrained.pt",
            "--checkpoints", out / "ck", "--metrics", out / "pretrain.json",
            "--plot", out / "pretrain.csv"]


def tiny(tmp_path: Path, **changes: object) -> Path:
    raw = default_params()
    # Dropout, crop and flip make the run depend on every RNG the checkpoint must restore.
    raw["pretrain"] = {"epochs": 2, "width": 8, "batch_size": 16, "lr": 0.05, "dropout": 0.2,
                       "crop_padding": 1, "hflip": True, "checkpoint_every_steps": 3,
                       "device": "cpu", **changes}
    return write_params(tmp_path / f"params{len(changes)}.yaml", raw)


def learned(out: Path) -> tuple[dict[str, torch.Tensor], list[tuple[str, ...]]]:
    state = torch.load(out / "pretrained.pt", weights_only=True)["state_dict"]
    with open(out / "pretrain.csv") as f:
        rows = [tuple(r[k] for k in LEARNED) for r in csv.DictReader(f)]
    return state, rows


def kill_after_first_checkpoint(args: list[str | Path], checkpoint: Path) -> int:
    return kill_after_first_checkpoint_of("stages.pretrain", args, checkpoint)


def kill_after_first_checkpoint_of(module: str, args: list[str | Path], checkpoint: Path) -> int:
    env = {**os.environ, "IMAGEPIPE_TRACKING": "0"}
    proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=30)


def test_sigkill_mid_epoch_then_rerun_is_bit_identical(tmp_path: Path) -> None:
    data = tmp_path / "augmented"
    write_dataset(data, ["a", "b", "c"], {"train": 400, "val": 10}, size=16)
    params = tiny(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert run_stage("pretrain", *stage_args(params, data, ref)).returncode == 0

    code = kill_after_first_checkpoint(stage_args(params, data, run), run / "ck" / "pretrain.pt")
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "pretrained.pt").exists()
    pos = torch.load(run / "ck" / "pretrain.pt", weights_only=True)["position"]
    assert pos["epoch"] == 0 and pos["step"] > 0, f"not killed mid-epoch: {pos}"

    again = run_stage("pretrain", *stage_args(params, data, run))
    assert again.returncode == 0, again.stderr
    said = re.search(r"resuming from \S+: epoch (\d+), step (\d+)", again.stderr)
    assert said and int(said[2]) > 0, again.stderr
    want_state, want_rows = learned(ref)
    got_state, got_rows = learned(run)
    assert got_state.keys() == want_state.keys()
    differ = [k for k in want_state if not torch.equal(want_state[k], got_state[k])]
    assert differ == [], f"resumed weights differ in {differ}"
    assert got_rows == want_rows

    # Other params: the finished checkpoint is not resumed; all epochs train again.
    other = run_stage("pretrain", *stage_args(tiny(tmp_path, lr=0.02), data, run))
    assert other.returncode == 0, other.stderr
    assert "not resuming" in other.stderr and "pretrain.lr: 0.05 -> 0.02" in other.stderr
    assert "pretrain epoch 1/2: train loss" in other.stderr
    assert not torch.equal(learned(run)[0]["head.weight"], want_state["head.weight"])


def finetune_args(params: Path, data: Path, pretrained: Path, out: Path) -> list[str | Path]:
    return ["--params", params, "--data", data, "--pretrained", pretrained,
            "--model", out / "finetuned.pt", "--probe", out / "probe.pt",
            "--checkpoints", out / "ck", "--metrics", out / "finetune.json",
            "--plot", out / "finetune.csv"]


def test_finetune_killed_in_the_full_phase_resumes_bit_identical(tmp_path: Path) -> None:
    source, target = tmp_path / "augmented", tmp_path / "target"
    write_dataset(source, ["a", "b", "c"], {"train": 60, "val": 6}, size=16)
    write_dataset(target, ["x", "y"], {"train": 150, "val": 6, "test": 6}, size=16, seed=1)
    raw = default_params()
    raw["pretrain"] = {"epochs": 1, "width": 8, "batch_size": 16, "device": "cpu"}
    raw["finetune"] = {"head_epochs": 1, "full_epochs": 2, "batch_size": 8,
                       "crop_padding": 1, "hflip": True, "checkpoint_every_steps": 3,
                       "device": "cpu", "baseline": False}
    params = write_params(tmp_path / "params.yaml", raw)
    pre = tmp_path / "pre"
    assert run_stage("pretrain", *stage_args(params, source, pre)).returncode == 0
    ref, run = tmp_path / "ref", tmp_path / "run"
    done = run_stage("finetune", *finetune_args(params, target, pre / "pretrained.pt", ref))
    assert done.returncode == 0, done.stderr

    # The head phase ends before the full phase writes its first checkpoint: killed mid-phase 2.
    code = kill_after_first_checkpoint_of(
        "stages.finetune", finetune_args(params, target, pre / "pretrained.pt", run),
        run / "ck" / "full.pt")
    assert code == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "finetuned.pt").exists()
    again = run_stage("finetune", *finetune_args(params, target, pre / "pretrained.pt", run))
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr, again.stderr
    want = torch.load(ref / "finetuned.pt", weights_only=True)["state_dict"]
    got = torch.load(run / "finetuned.pt", weights_only=True)["state_dict"]
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
