"""Issue 11, hardening: hostile data folders, full disks, stale temporaries, a busy project.

Each test plants the hostile thing for real (a pickle that runs a command, a FIFO, a link out
of the tree, a 2 GB sparse file, a file-size limit) and checks what the user sees: the exit
code, the one line, and that nothing was run, read, hung or left behind.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from commands import predict
from commands import run as run_cmd
from stages.core import cifar, io, sources
from stages.core.errors import BadInput, DiskFull, Transient
from tests.helpers import REPO, default_params, run_stage, write_params

RNG = np.random.default_rng(11)
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck"]


# -- CIFAR pickles: never run what a batch file asks for ----------------------------------------


class _Payload:
    """Unpickling this runs a shell command (what a crafted data_batch_1 did to torchvision)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _cifar_root(root: Path, protocol: int = 4, n: int = 4) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {"batch_label": name, "data": RNG.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [(k + i) % 10 for i in range(n)],
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (folder / "batches.meta").write_bytes(
        pickle.dumps({"label_names": CIFAR10_NAMES, "num_vis": 3072}, protocol=protocol))
    return folder


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_valid_cifar_batch_we_wrote_still_loads(tmp_path: Path, protocol: int) -> None:
    _cifar_root(tmp_path, protocol)
    listing = sources.open_source("torchvision:CIFAR10", root=str(tmp_path), download=False)
    assert listing.classes == CIFAR10_NAMES
    assert len(listing.refs) == 24
    assert (listing.splits == 2).sum() == 4  # test_batch stays the test split
    _, img = listing.fetch(listing.refs[0])
    assert img.size == (32, 32) and img.mode == "RGB"


def test_a_cifar_batch_that_runs_a_command_is_refused_and_never_runs(tmp_path: Path) -> None:
    folder = _cifar_root(tmp_path / "raw")
    marker = tmp_path / "pwned"
    (folder / "data_batch_1").write_bytes(pickle.dumps(
        {"data": _Payload(marker), "labels": [0]}, protocol=2))
    raw = default_params()
    raw["data"]["source"] = {"uri": "torchvision:CIFAR10", "root": str(tmp_path / "raw"),
                             "download": False}
    raw["data"].update(image_size=32, channels=3)
    proc = run_stage("ingest", "--params", write_params(tmp_path / "p.yaml", raw),
                     "--out", tmp_path / "out")
    assert not marker.exists(), "the payload ran"
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert str(folder / "data_batch_1") in last and "system" in last, last
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "source").exists()


def test_a_pickle_that_writes_a_file_through_builtins_is_refused(tmp_path: Path) -> None:
    class Writes:
        def __reduce__(self) -> tuple:
            return (eval, (f"open({str(tmp_path / 'written')!r}, 'w').write('x')",))

    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": Writes()}))
    with pytest.raises(BadInput, match=r"builtins\.eval"):
        cifar.load_pickle_safely(path)
    assert not (tmp_path / "written").exists()


def test_a_cifar_batch_of_the_wrong_shape_is_bad_input(tmp_path: Path) -> None:
    folder = _cifar_root(tmp_path)
    (folder / "data_batch_2").write_bytes(pickle.dumps({"data": np.zeros((2, 10), np.uint8),
                                                        "labels": [0, 1]}))
    with pytest.raises(BadInput, match="data_batch_2: not a CIFAR batch"):
        sources.open_source("torchvision:CIFAR10", root=str(tmp_path), download=False)


@pytest.mark.parametrize("name", ["CIFAR10", "MNIST"])
def test_a_missing_torchvision_set_with_download_off_says_where_to_get_it(
        tmp_path: Path, name: str) -> None:
    with pytest.raises(BadInput, match=rf"^torchvision:{name}: no files under .* and download is "
                                       r"off .*; download https?://"):
        sources.open_source(f"torchvision:{name}", root=str(tmp_path), download=False)


# -- the image tree: links, loops, special files, huge files ---------------------------------


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def hostile_tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(3):
            _png(root / cls / f"{i}.png")
    outside = tmp_path / "secret.png"
    _png(outside)
    made = {"root": root, "outside": outside}
    (root / "a" / "out.png").symlink_to(outside)
    (root / "a" / "inside.png").symlink_to(root / "b" / "0.png")
    (root / "a" / "loop1.png").symlink_to(root / "a" / "loop2.png")
    (root / "a" / "loop2.png").symlink_to(root / "a" / "loop1.png")
    (root / "a" / "broken.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(root / "a" / "fifo.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "b" / "sock.png"))
    made["sock"] = sock  # type: ignore[assignment]
    with open(root / "b" / "huge.png", "wb") as f:
        f.truncate(2 * 2**30)  # 2 GB, sparse: costs no disk
    yield made
    sock.close()


def test_links_out_loops_and_special_files_are_skipped_with_reasons(
        hostile_tree: dict[str, Path]) -> None:
    root = hostile_tree["root"]
    start = time.perf_counter()
    listing = sources.open_source(f"imagefolder:{root}", root="", download=False)
    assert time.perf_counter() - start < 5  # nothing is read while listing
    skipped = {Path(s["path"]).name: s["reason"] for s in listing.skipped}
    assert "outside" in skipped["out.png"] and "data.follow_symlinks" in skipped["out.png"]
    assert "loop" in skipped["loop1.png"] and "loop" in skipped["loop2.png"]
    assert "broken symlink" in skipped["broken.png"]
    assert "FIFO" in skipped["fifo.png"]
    assert "socket" in skipped["sock.png"]
    names = sorted(Path(r).name for r in listing.refs)
    # a link inside is fine; huge.png is left to its reader, which refuses it unread (TooLarge)
    assert names == sorted(["0.png", "1.png", "2.png"] * 2 + ["huge.png", "inside.png"])
    assert str(hostile_tree["outside"]) not in listing.refs


def test_follow_symlinks_admits_the_link_out(hostile_tree: dict[str, Path]) -> None:
    listing = sources.open_source(f"imagefolder:{hostile_tree['root']}", root="", download=False,
                                  follow_symlinks=True)
    assert any(Path(r).name == "out.png" for r in listing.refs)
    assert "out.png" not in {Path(s["path"]).name for s in listing.skipped}


def test_a_device_is_skipped(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        _png(root / cls / "0.png")
    try:
        os.mknod(root / "a" / "dev.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null
    except (PermissionError, OSError) as err:
        pytest.skip(f"cannot make a device node here: {err}")
    listing = sources.open_source(f"imagefolder:{root}", root="", download=False)
    assert {Path(s["path"]).name: s["reason"] for s in listing.skipped}["dev.png"].startswith(
        "a device")


def test_one_class_folder_is_refused(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "only" / "0.png")
    with pytest.raises(BadInput, match="data.target.uri: .*at least two"):
        sources.open_source(f"imagefolder:{tmp_path / 'imgs'}", root="", download=False,
                            key="data.target.uri")


def test_a_missing_folder_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=r"^data\.source\.uri: imagefolder:.*no such folder"):
        sources.open_source(f"imagefolder:{tmp_path / 'nope'}", root="", download=False,
                            key="data.source.uri")


def test_a_big_file_is_refused_unread_and_a_read_streams(tmp_path: Path) -> None:
    """Peak memory stays flat: the file is hashed and decoded from disk, never read whole."""
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(160 * 2**20)  # sparse
    with pytest.raises(sources.BadFile, match="too large"):
        sources.read_image_file(str(big), max_bytes=64 * 2**20)
    probe = textwrap.dedent(f"""
        import resource
        from stages.core import sources
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            sources.read_image_file({str(big)!r}, max_bytes=2**30)
        except sources.BadFile as err:
            print(err)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True).stdout.splitlines()
    assert out[0].startswith("not an image")
    assert int(out[1]) < 40, f"peak memory grew by {out[1]} MB reading a 160 MB file"


def test_predict_does_not_hang_on_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            predict.load_image(str(fifo), 16, 3)
            result.append(None)
        except BaseException as err:  # noqa: BLE001 - carried to the test thread
            result.append(err)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        with open(fifo, "wb"):  # unblock the reader so the thread ends
            pass
        pytest.fail("predict blocked opening a FIFO")
    assert isinstance(result[0], BadInput) and "FIFO" in str(result[0])


def test_predict_refuses_a_folder(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="folder"):
        predict.load_image(str(tmp_path), 16, 3)


# -- a full disk ------------------------------------------------------------------------------
# RLIMIT_FSIZE makes the kernel refuse writes (and preallocation) past a size in one child
# process, with EFBIG: the same code path as ENOSPC (stages/core/io.py _NO_ROOM), on the real
# file system, no mocks; the line names the file-size limit, not a disk that is not full. A real
# full disk (a small tmpfs) is in test_torch_write_faults.py.

_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["python -m stages.{module}", *sys.argv[1:]]
from stages import {module}
sys.exit({module}.main())
"""


def _limited_stage(module: str, limit: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "IMAGEPIPE_TRACKING": "0"}
    return subprocess.run([sys.executable, "-c", _LIMITED.format(limit=limit, module=module),
                           *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


def test_ingest_on_a_full_disk_is_one_line_exit_75_and_leaves_nothing(tmp_path: Path) -> None:
    params = write_params(tmp_path / "p.yaml", default_params())
    out = tmp_path / "data"
    proc = _limited_stage("ingest", 100_000, "--params", params, "--out", out)
    assert proc.returncode == 75, proc.stderr
    assert "Traceback" not in proc.stderr and "Bus error" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "file-size limit (RLIMIT_FSIZE" in line and str(out) in line, line
    assert re.search(r"needs [0-9,]{7,} bytes", line), line
    assert not out.exists() or list(out.iterdir()) == []  # no .source.*.tmp left


def test_disk_full_names_folder_and_bytes_and_removes_the_temporary(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        from pathlib import Path
        from stages.core.dataset import RowWriter
        from stages.core.door import run_stage
        from stages.core.io import atomic_dir

        def body():
            with atomic_dir({str(tmp_path / 'ds')!r}) as tmp:
                RowWriter(Path(tmp) / "rows.part", (32, 32, 3), capacity=1000)
                raise AssertionError("the writer should not open")

        sys.exit(run_stage("ingest", body, track=False))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 75, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"file too large: writing into {tmp_path}" in proc.stderr
    assert "3,072,128 bytes" in proc.stderr  # header + rows and "1,000,000 bytes" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_a_transient_error() -> None:
    assert issubclass(DiskFull, Transient) and not issubclass(DiskFull, BadInput)
    err = io.disk_full(Path("/"), 10, OSError(errno.ENOSPC, "No space left on device"))
    assert isinstance(err, DiskFull) and "needs 10 bytes" in str(err) and "\n" not in str(err)


# -- what killed writers leave -----------------------------------------------------------------

DEAD_PID = 99_999_999  # above any pid_max: no process can have it


def test_stale_temporaries_of_dead_writers_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    (tmp_path / f".out.{DEAD_PID}.abcd_123.tmp").mkdir()
    (tmp_path / f".out.json.{DEAD_PID}.zzzzzzzz.tmp").write_text("half")
    live = tmp_path / f".out.{os.getpid()}.livelive.tmp"
    live.mkdir()
    reused = tmp_path / f".out.{os.getpid()}.reused00.tmp"  # our pid, but older than us
    reused.write_text("x")
    os.utime(reused, (time.time() - 86_400, time.time() - 86_400))
    other = tmp_path / ".other.tmp"
    other.write_text("not ours")
    with io.atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["out", live.name, f".out.json.{DEAD_PID}.zzzzzzzz.tmp", other.name])
    io.write_json(tmp_path / "out.json", {})  # its own name only
    assert not (tmp_path / f".out.json.{DEAD_PID}.zzzzzzzz.tmp").exists()
    assert live.exists() and other.exists()


def test_a_temporary_left_by_a_sigkill_is_removed_by_the_next_write(tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import os, signal
        from stages.core.io import atomic_path
        with atomic_path({str(tmp_path / 'model.onnx')!r}) as tmp:
            tmp.write_bytes(b"half a model")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".model.onnx.") and left[0].endswith(".tmp")
    with io.atomic_path(tmp_path / "model.onnx") as tmp:
        tmp.write_bytes(b"whole")
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


# -- one `imagepipe run` per project ------------------------------------------------------------

_HOLDER = """
import sys, time
from pathlib import Path
from commands.run import lock_project
lock_project(Path(sys.argv[1]), False)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(root: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(root), str(seconds)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


def test_a_second_run_names_the_holder_and_exits_75(project: Path) -> None:
    holder = _hold(project, 60)
    try:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "commands.cli", "run"], cwd=project,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        assert time.perf_counter() - start < 20
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 75, proc.stderr
    line = proc.stderr.strip()
    assert f"pid {holder.pid}, since " in line and "--wait" in line, line
    assert "rwlock" not in line and "delete" not in line.lower()


def test_a_killed_run_leaves_no_stale_lock_and_wait_queues(project: Path) -> None:
    holder = _hold(project, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    try:
        run_cmd.lock_project(project, wait=False)  # free at once: the kernel dropped it
    finally:
        _release()
    holder = _hold(project, 1.5)
    start = time.perf_counter()
    try:
        run_cmd.lock_project(project, wait=True)
        waited = time.perf_counter() - start
        info = json.loads((project / run_cmd.LOCK_FILE).read_text())
    finally:
        _release()
        holder.wait()
    assert 0.5 < waited < 30
    assert info["pid"] == os.getpid()


def _release() -> None:
    while run_cmd._HELD:
        run_cmd._HELD.pop().close()


def test_an_atomic_file_write_on_a_full_disk_is_disk_full_with_nothing_left(tmp_path: Path) -> None:
    """What export does (atomic_path, then the bytes): it printed a traceback on a full disk."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
        from stages.core.door import run_stage
        from stages.core.io import atomic_path

        def export():
            with atomic_path({str(tmp_path / 'model.onnx')!r}) as tmp:
                tmp.write_bytes(b"x" * 2_000_000)

        sys.exit(run_stage("export", export, track=False))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 75, proc.stderr
    assert proc.stderr.startswith(
        f"export: transient failure (retry may help): file too large: writing into {tmp_path} ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


# -- the stage's process group under its guard ---------------------------------------------------


def test_the_guard_keeps_the_exit_code_and_the_timeout_still_kills_the_group(tmp_path: Path) -> None:
    from flows import dvcstage

    env = dvcstage.child_env()
    assert dvcstage.run_killable(["sh", "-c", "exit 3"], tmp_path, env, 30, print).code == 3
    assert dvcstage.run_killable(["sh", "-c", "kill -TERM $$"], tmp_path, env, 30, print).code == 143
    pid_file = tmp_path / "grandchild.pid"
    start = time.perf_counter()
    with pytest.raises(TimeoutError):
        dvcstage.run_killable(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], tmp_path,
                              env, 2, print)
    assert time.perf_counter() - start < 15
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{grandchild}").exists():
        if Path(f"/proc/{grandchild}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        assert not Path(f"/proc/{grandchild}").exists(), "the sleep outlived the timeout"


def test_stopping_a_group_kills_a_child_that_ignored_sigterm_once_its_leader_is_gone(
        tmp_path: Path) -> None:
    """`make deploy`'s stop (the server's or worker's group) left such a child running: it
    returned as soon as the leader had exited."""
    from flows.orphans import kill_group

    ready = tmp_path / "child.pid"
    child = (f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(120)")
    leader = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{child}" & wait'],
                              process_group=0)
    deadline = time.monotonic() + 30
    while not (ready.exists() and ready.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int(ready.read_text())
    start = time.perf_counter()
    kill_group(leader, grace_s=30.0)
    assert time.perf_counter() - start < 10  # the leader ends on SIGTERM: no grace to wait out
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
            break
        time.sleep(0.05)
    else:
        assert not Path(f"/proc/{pid}").exists(), "the child that ignored SIGTERM outlived the stop"


def test_stopping_a_group_by_a_recorded_pid_ends_it(tmp_path: Path) -> None:
    """`python -m flows.deploy --stop`: the server's pid from its pid file, not a child of the
    process that stops it."""
    from flows.orphans import kill_group

    pid_file = tmp_path / "leader.pid"
    starter = (f"import subprocess, sys; p = subprocess.Popen(['sleep', '120'], process_group=0); "
               f"open({str(pid_file)!r}, 'w').write(str(p.pid))")
    subprocess.run([sys.executable, "-c", starter], check=True, timeout=60)  # then it exits
    pid = int(pid_file.read_text())
    kill_group(pid, grace_s=2.0)
    stat_file = Path(f"/proc/{pid}/stat")
    assert not stat_file.exists() or stat_file.read_text().rpartition(")")[2].split()[0] == "Z"
