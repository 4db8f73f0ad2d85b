"""Training over several processes of one machine (CPU, gloo, 2 processes launched as the
stages launch them): DDP equals one process with the whole batch; a failing rank's exit code is
the stage's; a run killed mid-epoch resumes bit-identical; a rank killed mid-collective is 75.
Several machines train with Ray Train (test_ray_train.py). The `gpu` tests run only where CUDA
is (benchmarks/gpu_check.sh runs them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stages.core import distributed
from stages.core.checkpoint import Position
from stages.core.devicedata import DeviceBatches
from stages.core.door import run_stage as door
from stages.core.errors import BadInput, Transient
from stages.core.train import Runtime, make_trainer, param_groups, train_one_epoch
from stages.params import TrainParams
from tests.helpers import REPO, default_params, run_stage, write_params
from tests.unit.test_train import write_dataset

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ------------------------------------------------------------ what the launched ranks run


def tiny_net(batchnorm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm: list[nn.Module] = [nn.BatchNorm2d(8)] if batchnorm else []
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), *norm, nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


class OutOfMemoryOnRank1(nn.Module):
    """A stand-in for a GPU out of memory (there is none here): on rank 1 only, a forward of more
    than 8 images raises torch.OutOfMemoryError, as CUDA's caching allocator does. Inside what
    DDP wraps, so DDP's forward (its buffer broadcast) has run when it raises."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if distributed.current().rank == 1 and len(x) > 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, on rank 1 only)")
        return self.net(x)


def train_tiny(argv: list[str]) -> int:
    """20 SGD steps of a global batch of 32 over 640 images; weights and micro-batches per step
    saved per rank. argv: folder, bn|plain, then "oom" to run rank 1 out of memory and a number
    of micro-batches. Behind the stage door, as a stage's ranks run."""
    return door("pretrain", lambda: _train_tiny(argv), track=False)


def _train_tiny(argv: list[str]) -> int:
    out, batchnorm = Path(argv[0]), argv[1] == "bn"
    comm = distributed.current()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(640, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 3, size=640)
    batches = DeviceBatches(images, labels, np.arange(640), device=CPU, mean=[0.5], std=[0.25],
                            batch_size=32, train=True, crop_padding=1, hflip=True, seed=0,
                            rank=comm.rank, world=comm.world)
    inner = tiny_net(batchnorm)
    model = OutOfMemoryOnRank1(inner) if argv[2:3] == ["oom"] else inner
    rt = Runtime(CPU, bf16=False, channels_last=False, compile=False, comm=comm)
    p = TrainParams(lr=0.05, device="cpu", micro_batches=int((argv[3:] or ["1"])[0]))
    tr = make_trainer(model, param_groups(model, p.lr, p.weight_decay), p, rt, 1, len(batches))
    train_one_epoch(tr, batches, 0, Position())
    torch.save(inner.state_dict(), out / f"rank{comm.rank}.pt")
    (out / f"parts{comm.rank}").write_text(str(tr.parts))
    return 0


def fail_on_rank(argv: list[str]) -> int:
    """Rank `argv[0]` raises `argv[1]`; the other waits for it in a collective, as in a step."""
    rank, kind = int(argv[0]), argv[1]
    errors = {"bad": BadInput("simulated bad input"), "transient": Transient("simulated"),
              "bug": RuntimeError("simulated bug")}

    def body() -> None:
        if distributed.current().rank == rank and kind in errors:
            raise errors[kind]
        torch.distributed.barrier()

    return door("pretrain", body, track=False)


def meet_then_wait_for_rank_1(argv: list[str]) -> int:
    """Both ranks meet and say so (pid in argv[0]/rank<r>), then rank 0 waits for rank 1 in a
    collective while rank 1 sleeps: the test kills it, or leaves rank 0 to its timeout."""
    folder = Path(argv[0])

    def body() -> None:
        rank = distributed.current().rank
        torch.distributed.barrier()
        (folder / f"rank{rank}").write_text(str(os.getpid()))
        if rank == 1:
            time.sleep(600)
        torch.distributed.barrier()

    return door("pretrain", body, track=False)


def two_processes() -> distributed.Plan:
    pl = distributed.plan(TrainParams(device="cpu", devices=2))
    assert pl is not None and (pl.nproc, pl.backend) == (2, "gloo")
    return pl


# ------------------------------------------------------------ the library, launched


@pytest.mark.slow
def test_ddp_two_by_16_equals_one_process_by_32(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    train_tiny([str(single), "plain"])
    code = distributed.launch(two_processes(), f"{__name__}:train_tiny", [str(tmp_path), "plain"])
    assert code == 0
    assert_ranks_equal_one_process(single, tmp_path)


def assert_ranks_equal_one_process(single: Path, ranks: Path) -> None:
    """train_tiny's weights on ranks 0 and 1 (in `ranks`) within 1e-5 of one process's, and
    trained (not the initial weights)."""
    want = torch.load(single / "rank0.pt", weights_only=True)
    for rank in (0, 1):
        got = torch.load(ranks / f"rank{rank}.pt", weights_only=True)
        diff = max(float((want[k] - got[k]).abs().max()) for k in want)
        print(f"rank {rank}: max |weight difference| vs one process = {diff:.3g}")
        assert diff <= 1e-5
        assert not torch.equal(want["0.weight"], tiny_net(False).state_dict()["0.weight"])


@pytest.mark.slow
def test_ddp_with_batchnorm_keeps_the_ranks_weights_identical(tmp_path: Path) -> None:
    assert distributed.launch(two_processes(), f"{__name__}:train_tiny", [str(tmp_path), "bn"]) == 0
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    params = {name for name, _ in tiny_net(True).named_parameters()}
    assert [k for k in params if not torch.equal(r0[k], r1[k])] == []


@pytest.mark.slow
@pytest.mark.timeout(240)  # a desynchronised DDP waits in a collective: fail, do not hang
def test_out_of_memory_under_ddp_is_exit_2_with_the_hint_and_micro_batches_fit(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Rank 1 runs out of memory above 8 images a pass, rank 0 does not. The ranks cannot redo
    a step together (SyncBatchNorm's collectives in the forward, on a GPU), so: exit 2 naming
    micro_batches, not 75 retried at the same batch. With micro_batches 2 (passes of 8) both
    train, with the weights of one process taking the whole batch in one pass."""
    code = distributed.launch(two_processes(), f"{__name__}:train_tiny",
                              [str(tmp_path), "plain", "oom", "1"])
    assert code == 2
    assert "raise micro_batches (now 1: try 2)" in capfd.readouterr().err
    code = distributed.launch(two_processes(), f"{__name__}:train_tiny",
                              [str(tmp_path), "plain", "oom", "2"])
    assert code == 0
    assert [(tmp_path / f"parts{r}").read_text() for r in (0, 1)] == ["2", "2"]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = tmp_path / "single"
    single.mkdir()
    train_tiny([str(single), "plain"])
    want = torch.load(single / "rank0.pt", weights_only=True)
    for got in (r0, r1):
        diff = max(float((want[k] - got[k]).abs().max()) for k in want)
        print(f"max |weight difference| vs one process in one pass = {diff:.3g}")
        assert diff <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "code"), [("none", 0), ("bad", 2), ("transient", 75),
                                            ("bug", 70)])
def test_a_failing_rank_sets_the_stage_exit_code(kind: str, code: int) -> None:
    # Rank 1 fails while rank 0 waits for it: the cause's code, not the waiting rank's.
    assert distributed.launch(two_processes(), f"{__name__}:fail_on_rank", ["1", kind]) == code


def test_codes_combine_cause_before_consequence() -> None:
    assert distributed.combine({0: 0, 1: 0}, {}) == 0
    assert distributed.combine({0: 70, 1: 2}, {0: 70, 1: 2}) == 2
    assert distributed.combine({0: 143, 1: 75}, {0: 143, 1: 75}) == 75
    assert distributed.combine({1: 2}, {0: -9, 1: 2}) == 2
    assert distributed.combine({}, {0: -9}) == 75  # killed by a signal: transient
    assert distributed.combine({}, {0: 1}) == 70  # died before its door: a bug
    # A rank's bug makes its peer see a lost peer (75): the bug is the cause.
    assert distributed.combine({0: 75, 1: 70}, {0: 75, 1: 70}) == 70
    # A rank killed by a signal is the cause, whatever its peers said after it.
    assert distributed.combine({0: 70}, {0: 70, 1: -9}) == 75


@pytest.mark.slow
def test_a_peer_stalled_past_the_timeout_is_75_not_a_hang(tmp_path: Path) -> None:
    """Rank 1 stays away from a collective: rank 0 gives up after dist_timeout_min (here 3 s;
    gloo's own default is 30 minutes) and the stage exits 75, to be retried."""
    pl = distributed.plan(TrainParams(device="cpu", devices=2, dist_timeout_min=0.05))
    assert pl is not None
    assert distributed.launch(pl, f"{__name__}:meet_then_wait_for_rank_1",
                              [str(tmp_path)]) == 75


LAUNCH_TWO = """
import sys
from stages.core import distributed
from stages.params import TrainParams

pl = distributed.plan(TrainParams(device="cpu", devices=2))
sys.exit(distributed.launch(pl, "tests.integration.test_distributed:meet_then_wait_for_rank_1",
                            sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_peer_killed_mid_collective_is_75(tmp_path: Path) -> None:
    """Two processes meet; rank 1 is killed (-9) while rank 0 waits for it in a collective: the
    stage exits 75, retried, not 70 (a bug) nor 143 (rank 0 stopped by the agent after it)."""
    env = {**os.environ, "IMAGEPIPE_TRACKING": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH_TWO, str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "rank1").exists() or not (tmp_path / "rank0").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the two processes never met"
            time.sleep(0.1)
        os.kill(int((tmp_path / "rank1").read_text()), signal.SIGKILL)
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, err = proc.communicate()
    assert code == 75, err


@pytest.mark.parametrize("code", [0, 2, 75, 70, 130, 143])
def test_the_launching_process_exits_with_the_code_of_its_ranks(code: int) -> None:
    assert door("pretrain", lambda: distributed.raise_for(code, "pretrain"), track=False) == code


# ------------------------------------------------------------ the stage, as dvc runs it


def stage_args(params: Path, data: Path, out: Path) -> list[str]:
    return [str(a) for a in ("--params", params, "--data", data, "--model", out / "m.pt",
                             "--checkpoints", out / "ck", "--metrics", out / "m.json",
                             "--plot", out / "p.csv")]


def tiny_params(folder: Path, **changes: object) -> Path:
    raw = default_params()
    raw["pretrain"] = {"epochs": 2, "width": 8, "batch_size": 32, "lr": 0.05, "dropout": 0.2,
                       "crop_padding": 1, "hflip": True, "checkpoint_every_steps": 2,
                       "device": "cpu", "devices": 2, **changes}
    return write_params(folder / f"params{len(changes)}.yaml", raw)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset and one uninterrupted two-process pretrain of it."""
    root = tmp_path_factory.mktemp("ddp")
    write_dataset(root / "data", ["a", "b", "c"], {"train": 160, "val": 8}, size=8)
    done = run_stage("pretrain", *stage_args(tiny_params(root), root / "data", root / "ref"))
    assert done.returncode == 0, done.stderr
    return root, root / "ref"


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "m.pt", weights_only=True)["state_dict"]


def assert_same_weights(a: Path, b: Path) -> None:
    want, got = weights(a), weights(b)
    assert [k for k in want if not torch.equal(want[k], got[k])] == []


@pytest.mark.slow
def test_two_process_stage_writes_once_with_the_world_size(reference: tuple[Path, Path]) -> None:
    import json

    _, ref = reference
    assert json.loads((ref / "m.json").read_text())["world_size"] == 2
    fp = torch.load(ref / "ck" / "pretrain.pt", weights_only=True)
    assert '"world_size": 2' in fp["fingerprint"] and '"rank_batch": 16' in fp["fingerprint"]
    assert len(fp["ranks"]) == 1  # rank 1's RNG and totals, beside rank 0's


@pytest.mark.slow
def test_a_batch_the_processes_cannot_share_exits_2(reference: tuple[Path, Path]) -> None:
    root, _ = reference
    done = run_stage("pretrain", *stage_args(tiny_params(root, batch_size=31), root / "data",
                                             root / "odd"))
    assert done.returncode == 2, done.stderr
    assert "pretrain.batch_size: 31 is not divisible by the 2 training processes" in done.stderr
    assert not (root / "odd" / "m.pt").exists()


@pytest.mark.slow
def test_one_mlflow_run_per_stage_with_the_world_size(project: Path,
                                                      reference: tuple[Path, Path]) -> None:
    import mlflow
    import yaml

    from stages import pretrain
    from tests.integration.tracking_kit import write_dvc_yaml

    root, _ = reference
    raw = yaml.safe_load(tiny_params(root, epochs=1).read_text())
    write_params(project / "params.yaml", raw)
    write_dvc_yaml(project, {"pretrain": {
        "cmd": "python -m stages.pretrain", "params": ["pretrain"], "outs": ["models/m.pt"],
        "metrics": [{"metrics/m.json": {"cache": False}}]}})
    args = ["--params", "params.yaml", "--data", str(root / "data"), "--model", "models/m.pt",
            "--checkpoints", "ck", "--metrics", "metrics/m.json", "--plot", "plots/p.csv"]
    assert pretrain.main(args) == 0
    client = mlflow.MlflowClient(f"sqlite:///{(project / 'mlflow.db').as_posix()}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()],
                               "attributes.run_name = 'pretrain'")
    assert len(found) == 1, [r.info.run_name for r in found]
    run = found[0].data
    assert [v for k, v in run.metrics.items() if k.endswith("world_size")] == [2.0], run.metrics
    assert run.params.get("pretrain.devices") == "2", run.params


@pytest.mark.slow
def test_finetune_on_two_processes_keeps_phase_one_frozen(reference: tuple[Path, Path]) -> None:
    root, ref = reference
    write_dataset(root / "target", ["x", "y"], {"train": 40, "val": 6, "test": 6}, size=8, seed=1)
    raw = default_params()
    raw["finetune"] = {"head_epochs": 1, "full_epochs": 1, "batch_size": 8, "device": "cpu",
                       "devices": 2, "checkpoint_every_steps": 2, "baseline": False}
    params, out = write_params(root / "finetune.yaml", raw), root / "ft"
    done = run_stage("finetune", "--params", params, "--data", root / "target", "--pretrained",
                     ref / "m.pt", "--model", out / "f.pt",
                     "--probe", out / "p.pt", "--checkpoints", out / "ck",
                     "--metrics", out / "m.json", "--plot", out / "f.csv")
    assert done.returncode == 0, done.stderr
    pre, probe = weights(ref), torch.load(out / "p.pt", weights_only=True)["state_dict"]
    assert [k for k in pre if k.startswith("backbone.") and not torch.equal(pre[k], probe[k])] == []
    assert (out / "f.csv").read_text().count("\n") == 3  # header, head 1, full 2


@pytest.mark.slow
def test_two_processes_killed_mid_epoch_resume_bit_identical(reference: tuple[Path, Path]) -> None:
    root, ref = reference
    run = root / "killed"
    env = {**os.environ, "IMAGEPIPE_TRACKING": "0"}
    args = stage_args(tiny_params(root), root / "data", run)
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    checkpoint = run / "ck" / "pretrain.pt"
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the machine dies: launcher and ranks at once
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    pos = torch.load(checkpoint, weights_only=True)["position"]
    assert pos["epoch"] == 0 and pos["step"] > 0, f"not killed mid-epoch: {pos}"
    again = run_stage("pretrain", *args)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    assert_same_weights(ref, run)
    assert (run / "p.csv").read_text().count("\n") == (ref / "p.csv").read_text().count("\n")


@pytest.mark.slow
def test_sigterm_to_the_stage_stops_every_process_with_143(reference: tuple[Path, Path]) -> None:
    root, _ = reference
    out = root / "terminated"
    env = {**os.environ, "IMAGEPIPE_TRACKING": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain",
                             *stage_args(tiny_params(root, epochs=50), root / "data", out)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "ck" / "pretrain.pt").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # what Prefect's cancellation sends: to the stage only
    assert proc.wait(timeout=60) == 143, proc.stderr.read() if proc.stderr else ""
    deadline, left = time.monotonic() + 20, "?"
    while left and time.monotonic() < deadline:  # the ranks and multiprocessing's tracker
        time.sleep(0.2)
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True,
                              text=True).stdout.strip()
    assert left == "", f"processes left behind: {left}"


# ------------------------------------------------------------ on a GPU only


@pytest.mark.gpu
@cuda
def test_gpu_bf16_channels_last_step_learns() -> None:
    from stages.core.device import make_runtime

    rt = make_runtime(TrainParams(device="cuda", precision="auto"))
    assert rt.channels_last and (rt.bf16 or rt.fp16)
    assert rt.bf16 == torch.cuda.is_bf16_supported()
    model = tiny_net(True)
    tr = make_trainer(model, param_groups(model, 0.05, 0.0), TrainParams(), rt, 1, 20)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert tr.scaler.is_enabled() == rt.fp16  # loss scaling for fp16 only
    x = torch.randn(32, 1, 8, 8, device=rt.device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (32,), device=rt.device)
    from stages.core.train import _step

    first = float(_step(tr, x, y)[1])
    for _ in range(10):
        last = float(_step(tr, x, y)[1])
    assert last < first


@pytest.mark.gpu
@cuda
def test_gpu_compile_deterministic_and_oom_fallback() -> None:
    from stages.core.device import make_runtime
    from stages.core.train import _step

    rt = make_runtime(TrainParams(device="cuda", compile=True, deterministic=True))
    try:
        assert torch.are_deterministic_algorithms_enabled()
        model = tiny_net(False)
        tr = make_trainer(model, param_groups(model, 0.05, 0.0), TrainParams(), rt, 1, 4)
        x = torch.randn(64, 1, 8, 8, device=rt.device)
        y = torch.randint(0, 3, (64,), device=rt.device)
        _step(tr, x, y)
        compiled = tr.net

        class Fussy(nn.Module):  # a real GPU, but the OOM is simulated: above 16 images
            def forward(self, inp: torch.Tensor) -> torch.Tensor:
                if len(inp) > 16:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                return compiled(inp)

        tr.net = Fussy()
        _step(tr, x, y)
        assert tr.parts == 4
    finally:
        torch.use_deterministic_algorithms(False)
