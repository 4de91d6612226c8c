"""The run-time target chooser: a rollout's nodes still waiting for maintenance are targets of last resort."""

from __future__ import annotations

from orchestrator.placement import choose_target
from orchestrator.snapshot import parse_node, parse_vmi
from tests.orchestrator import factories as f

GIB = 1024**3


def _choose(free: dict[str, int], last_resort: set[str]) -> tuple[str | None, tuple[str, ...]]:
    nodes = [parse_node(f.node(n), i) for i, n in enumerate(["src", *free])]
    vmi = parse_vmi(f.vmi("vm", "src"), 0)
    choice = choose_target(vmi, source=nodes[0], nodes=nodes, free=free, inbound={}, exclude=(),
                           need_bytes=4 * GIB, max_inbound=None, last_resort=last_resort)
    return choice.target, choice.ranked


def test_waiting_nodes_are_left_out_while_another_node_has_room() -> None:
    # "waiting" has the most free memory, and would be chosen first without the rollout.
    target, ranked = _choose({"waiting": 60 * GIB, "maintained": 8 * GIB, "outside": 6 * GIB}, {"waiting"})
    assert target == "maintained" and ranked == ("maintained", "outside")


def test_a_waiting_node_is_taken_when_nothing_else_has_room() -> None:
    target, ranked = _choose({"waiting": 60 * GIB, "later": 50 * GIB, "full": 1 * GIB}, {"waiting", "later"})
    assert target == "waiting" and ranked == ("waiting", "later")


def test_without_a_rollout_the_most_free_memory_wins() -> None:
    assert _choose({"a": 8 * GIB, "b": 60 * GIB}, set())[0] == "b"
