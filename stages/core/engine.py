"""Map a function over independent tasks (shards, pieces of shards) on a data engine.

  inline   in this process, one task after another (tiny sets; sources held in memory)
  local    a process pool over every usable core (stages.core.host.usable_cores)
  ray      one Ray task per item on a cluster: RAY_ADDRESS, else data.ray_address, else a
           Ray started here (stages/core/raycluster.py connects, bounded). Tasks read and
           write files on the storage the workspace is on, so every node must see the
           workspace at the same path (a shared file system).

Results come back as tasks finish, in any order: callers key them by the task they ran. A task
is a module-level function and picklable arguments; it returns small metadata, never images.
The same function on the same items gives the same files on every engine: where a task writes
depends on the item alone.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from stages.core import raycluster
from stages.core.host import usable_cores

log = logging.getLogger("imagepipe.engine")
T = TypeVar("T")
R = TypeVar("R")

# Is the work big enough to pay for starting a process pool? Below these, a stage runs its tasks
# in this process however many cores there are. Two crossovers, not one: the same rule (a pool
# pays once the work it shares out takes a few times its own start-up: on 2 free cores S + W/2
# against W) over two different start-ups S and per-image costs, measured apart on different
# images; each holds only for work weighed the way it was measured.
#
# Files to decode (ingest; shards.decode_engine), weighed by their bytes, not counted: a file
# costs a fixed part (open, fstat, hash, PIL's open) plus a part that grows with its pixels, and
# so roughly with its bytes. read_image_file + canonical to 32 px, CPU per file (load 2.9-3.4):
# a 32-px CIFAR JPEG (921 B, their mean) 62 us; a 640 x 480 quality-90 JPEG (73 KB) 2.8 ms; a
# 4000 x 3000 one (2.9 MB) 108 ms: 37-38 ns a byte above a few KB, so the fixed part is about
# 62 us - 921 B x 37 ns = 28 us, the cost of 750 bytes (FILE_COST_BYTES). A file weighs its size
# + 750 B; counting files (the rule before) put 20,000 camera photos, 35 minutes of decoding,
# in one process while the other cores idled.
# S: the fork server, workers importing numpy and PIL, pieces joined: most of a second of two
# cores. benchmarks/ingest_pool.py --crossover, 2 cores at load 4-4.7, against a plain PIL
# loop in a 2-process pool: inline 0.63x / 1.05x / 0.92x / 1.20x at 1k / 6k / 20k / 60k CIFAR
# JPEGs, the pool 0.33x / 0.71x / 0.71x / 1.25x: the crossover lies between 20k and 60k (lower
# on a quiet machine, where the second core is free), taken at 30,000 CIFAR JPEGs' weight,
# 50 MB: some 17 12-MP photos, 35 of 6 MP. benchmarks/ingest_pool.py --photos 300 (6-MP
# synthetic JPEGs, 1.45 MB each): the rule takes the pool after 35 files. With the second core
# mostly free (load 1.1-1.4) inline took 14.3 s on 1.0 core, the pool 9.0 s on 1.8 (1.6x; the
# rule, the pool again, 11.0 s on 1.4), 16.2 CPU s against 14.5. On 2 cores others kept full
# (load 2.5-6.4, no idle, 6 rounds) the two were even (medians 22.4 / 22.6 s): the kernel
# shares a busy CPU by session (sched_autogroup), so a session's two workers get what its one
# process did, and the pool costs only its start-up.
FILE_COST_BYTES = 750
CIFAR_JPEG_BYTES = 921  # the mean of CIFAR-10's 60,000 JPEGs (../shared/data/cifar10-jpg.tar.gz)
DECODE_POOL_FROM = 30_000 * (CIFAR_JPEG_BYTES + FILE_COST_BYTES)  # bytes' weight, 50,130,000
# Augmented images, train images x copies (augment). S: each worker imports torch (~2.5 s).
# W: batched on one core, ~4,700 32-px RGB and ~47,000 16-px grey images/s
# (benchmarks/bench_augment.py, load 5): a second worker wins its start-up back only past some
# 30,000 CIFAR-sized copies (2 x 2.5 s x 4,700 = 23,500 on two free cores), ten times as many
# 16-px grey ones.
AUGMENT_POOL_FROM = 50_000


def workers(engine: str) -> int:
    """Parallel tasks the engine runs at once (for sizing pieces)."""
    if engine == "ray":
        import ray

        if ray.is_initialized():  # the cluster's CPUs, not this driver's cores
            return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return usable_cores()


def run_map(fn: Callable[[T], R], items: Sequence[T], *, engine: str = "local",
            ray_address: str | None = None) -> Iterator[tuple[int, R]]:
    """(index into items, fn(item)) for every item, as they finish.

    `local` with one usable core (or one item) runs inline: a pool would only add start-up."""
    n_workers = usable_cores()
    if engine == "inline" or (engine == "local" and (n_workers < 2 or len(items) < 2)):
        for i, item in enumerate(items):
            yield i, fn(item)
    elif engine == "local":
        yield from _pool_map(fn, items, n_workers)
    else:
        yield from _ray_map(fn, items, ray_address)


def prestart(module: str) -> multiprocessing.context.BaseContext:
    """Start this process's fork server now, importing `module` (a task's: numpy, PIL) once;
    the pool's workers then fork from it ready, rather than each importing after its start.
    Returns its context.

    forkserver, not fork: a forked child of a threaded parent (the progress bar, torch's
    pools in augment) can inherit a held lock and hang. A server already running keeps what
    it loaded first; the workers import the rest themselves."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    # Not "__main__" (the default) unless the task is there: the stage's own entry module
    # imports pydantic, rich and the rest, which no task needs (0.27 s of CPU).
    ctx.set_forkserver_preload([module])
    forkserver.ensure_running()
    return ctx


def _pool_map(fn: Callable[[T], R], items: Sequence[T], n_workers: int
              ) -> Iterator[tuple[int, R]]:
    ctx = prestart(fn.__module__)
    pool = ProcessPoolExecutor(max_workers=min(n_workers, len(items)), mp_context=ctx)
    try:
        futures = {pool.submit(fn, item): i for i, item in enumerate(items)}
        for future in as_completed(futures):
            yield futures[future], future.result()
    except BaseException:
        # A failed task, Ctrl-C or SIGTERM: stop the workers now rather than let them finish
        # their shards (minutes on photos); what they leave are temporaries the rerun sweeps.
        workers_alive = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in workers_alive:
            proc.terminate()
        raise
    pool.shutdown(wait=True)


def node_slots(nodes: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where Ray tasks go, from `ray.nodes()`: each alive node with CPUs once per CPU,
    interleaved (A, B, A, B, A for 3 and 2 CPUs), nodes in id order. Empty: none has a CPU now
    (an autoscaling cluster at zero), and Ray's default placement decides."""
    cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in nodes if n["Alive"]}
    ids = sorted(node for node, c in cpus.items() if c > 0)
    return [node for r in range(max(cpus.values(), default=0)) for node in ids if cpus[node] > r]


def _ray_map(fn: Callable[[T], R], items: Sequence[T], configured: str | None
             ) -> Iterator[tuple[int, R]]:
    # Connected already when the stage holds its one connection (ingest: raycluster.connected
    # around both roles); otherwise for this map only.
    with raycluster.connected(configured):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(num_cpus=1, max_retries=2)(fn)
        # Each task is placed on a node chosen here, not by Ray: its default packs short tasks
        # onto the driver's node while it has a free CPU, and SPREAD is best effort (on a busy
        # 2-core machine it put every decode task of a 2-node cluster on one node). soft: the
        # tasks (and retries) of a node that dies or leaves run on another. Nodes that join
        # during the map get none of its tasks.
        slots = node_slots(ray.nodes())
        refs: dict[Any, tuple[int, str | None]] = {}

        def submit(i: int, node: str | None) -> None:
            where = {} if node is None else {
                "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}
            refs[task.options(**where).remote(items[i])] = (i, node)

        # Two tasks in flight per CPU, a bounded window (the queue of refs stays small on 10^5
        # shards); a finished task's node gets the next, so a node slowed by others' work takes
        # fewer tasks rather than holding the last ones up.
        first = 2 * slots or [None] * (2 * workers("ray"))
        for i, node in enumerate(first[:len(items)]):
            submit(i, node)
        queue = iter(range(len(first), len(items)))
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                i, node = refs.pop(ref)
                nxt = next(queue, None)
                if nxt is not None:
                    submit(nxt, node)
                yield i, ray.get(ref)
