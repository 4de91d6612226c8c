"""Whether a submitted plan may be carried out or must be made again (orchestrator.replan): a table of cases."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.model import DrainRequest, Node, NodeName
from orchestrator.planner import plan_drain
from orchestrator.replan import planned_vmis, replan_reason
from orchestrator.settings import Settings
from tests.orchestrator import factories as f

NOW = 1767225700.0


def _cluster() -> f.Cluster:
    c = f.Cluster().node("a").node("b").node("c")
    return c.vm("vm-1", "a").vm("vm-2", "a").vm("vm-3", "b")


def _now_nodes(cluster: f.Cluster) -> dict[str, Node]:
    return {str(n.name): n for n in cluster.snapshot().nodes}


PLAN = plan_drain(_cluster().snapshot(), DrainRequest(nodes=(NodeName("a"),)), Settings(), now=NOW)
ON_A = {"a": {"default/vm-1", "default/vm-2"}}
NODES = _now_nodes(_cluster())
TARGET = str(PLAN.node_plan("a").jobs[0].proposed_target)


def _cordoned(name: str) -> dict[str, Node]:
    return {**NODES, name: dataclasses.replace(NODES[name], unschedulable=True)}


@pytest.mark.parametrize(("case", "kwargs", "expected"), [
    ("young and unchanged: carried out", {}, None),
    ("too old", {"age_s": 61.0}, "61 s old"),
    ("nothing warm to compare with", {"vmis_on": None}, "no warm view"),
    ("a VM appeared on the drained node", {"vmis_on": {"a": ON_A["a"] | {"default/vm-9"}}}, "new default/vm-9"),
    ("a VM left the drained node", {"vmis_on": {"a": {"default/vm-1"}}}, "gone default/vm-2"),
    ("the drained node is gone", {"nodes": {k: v for k, v in NODES.items() if k != "a"}}, "node a is gone"),
    ("a proposed target was cordoned", {"nodes": _cordoned(TARGET)}, f"proposed target {TARGET}"),
])
def test_replan_reason(case: str, kwargs: dict[str, object], expected: str | None) -> None:
    args: dict[str, object] = {"age_s": 5.0, "max_age_s": 60.0, "vmis_on": ON_A, "nodes": NODES, **kwargs}
    reason = replan_reason(PLAN, **args)  # type: ignore[arg-type]
    if expected is None:
        assert reason is None, case
    else:
        assert reason is not None and expected in reason, (case, reason)


def test_no_submitted_plan_is_made_again() -> None:
    assert replan_reason(None, age_s=0.0, max_age_s=60.0, vmis_on=ON_A, nodes=NODES) is not None


def test_planned_vmis_names_every_decision_of_each_node() -> None:
    assert planned_vmis(PLAN) == ON_A
