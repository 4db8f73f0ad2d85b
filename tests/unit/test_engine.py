"""Where the Ray engine places its tasks, from the node table `ray.nodes()` returns (no Ray
needed: the table is an argument; tests/integration/test_ray_cluster.py runs it on two nodes)."""

from __future__ import annotations

from typing import Any

from stages.core.engine import node_slots


def node(node_id: str, cpus: float | None, alive: bool = True) -> dict[str, Any]:
    """One row of ray.nodes() as Ray 2.60 gives it (the keys placement reads, and others)."""
    resources: dict[str, float] = {f"node:{node_id}": 1.0, "memory": 2.0**33}
    if cpus is not None:
        resources["CPU"] = cpus
    return {"NodeID": node_id, "Alive": alive, "alive": alive, "Resources": resources,
            "NodeManagerAddress": "127.0.0.1"}


def test_every_node_with_cpus_is_in_the_first_slots_then_once_per_cpu() -> None:
    slots = node_slots([node("b", 2.0), node("a", 3.0)])
    assert slots == ["a", "b", "a", "b", "a"]  # the first tasks reach both nodes


def test_dead_and_cpu_less_nodes_get_no_tasks() -> None:
    table = [node("head", 0.0), node("gpu-only", None), node("gone", 8.0, alive=False),
             node("half", 0.5), node("w1", 2.0), node("w2", 1.0)]
    assert node_slots(table) == ["w1", "w2", "w1"]  # a task takes 1 CPU: half a CPU is none


def test_no_node_with_a_cpu_leaves_placement_to_ray() -> None:
    assert node_slots([node("head", 0.0), node("gone", 4.0, alive=False)]) == []
    assert node_slots([]) == []
