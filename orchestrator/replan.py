"""Whether the plan a drain was submitted with may still be carried out, or must be made again: pure, no I/O.

A drain is planned once: the submitter's dry run (a worker's warm view, or targeted reads) is stored with the
drain record, and the plan job carries it out instead of listing and planning a second time. It may do so only
while the plan still describes the cluster, judged cheaply from what a worker's warm, watch-fed view already
holds (no request to the API server):

- the plan is young (made less than `max_age_s` cluster seconds ago: free memory drifts, other drains start);
- every drained node still runs exactly the VMIs the plan decided on (a VM created, deleted or moved meanwhile
  would be forgotten or migrated twice);
- every drained node still exists, and every proposed target still exists, is Ready and schedulable (a node
  cordoned meanwhile is no target; the migrate job re-ranks targets anyway, so free memory is not re-checked).

`replan_reason` returns None when the plan may be used, else why it must be made again (logged and recorded
in the drain's events). It does not decide anything else: the plan job re-plans from a fresh snapshot.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from orchestrator.model import DrainPlan, Node


def planned_vmis(plan: DrainPlan) -> dict[str, set[str]]:
    """Every VMI the plan decided on (migrate, skip or block), per drained node."""
    return {str(p.node): {str(j.vmi) for j in p.jobs} | {str(d.vmi) for d in (*p.skipped, *p.blocked)}
            for p in plan.nodes}


def replan_reason(plan: DrainPlan | None, *, age_s: float, max_age_s: float,
                  vmis_on: Mapping[str, Set[str]] | None, nodes: Mapping[str, Node] | None) -> str | None:
    """None when `plan` may be carried out as it is; else why it must be made again.

    `age_s`: cluster seconds since the plan was made; `vmis_on`: the VMIs running on each drained node now
    (None: nothing warm to compare with); `nodes`: the cluster's nodes by name now (None: likewise)."""
    if plan is None:
        return "no plan was submitted with the drain"
    if age_s > max_age_s:
        return f"the submitted plan is {age_s:.0f} s old (used up to {max_age_s:.0f} s)"
    if vmis_on is None or nodes is None:
        return "no warm view of the cluster to check the submitted plan against"
    for node, planned in planned_vmis(plan).items():
        if node not in nodes:
            return f"node {node} is gone"
        now = set(vmis_on.get(node, ()))
        if now != planned:
            added, gone = sorted(now - planned), sorted(planned - now)
            parts = ([f"new {', '.join(added[:3])}"] if added else []) + \
                    ([f"gone {', '.join(gone[:3])}"] if gone else [])
            return f"the VMIs on {node} changed since the plan ({'; '.join(parts)})"
    for job in plan.jobs():
        target = nodes.get(str(job.proposed_target))
        if target is None or not target.ready or target.unschedulable:
            return f"proposed target {job.proposed_target} of {job.vmi} is no longer schedulable"
    return None
