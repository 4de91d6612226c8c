"""Choosing a migration target at run time, from a fresh view of the cluster (pure).

The planner proposes targets for the whole drain; a worker re-decides when it actually starts a migration,
because the cluster has moved on: free memory changed, other migrations are heading somewhere, a node just
failed this VM. The rules are the planner's (`planner.requirement_for` / `planner.node_fits`: node selector,
host-model CPU and vendor labels, taints) plus memory, readiness, the exclusions of this attempt, and a
preference for the node with the fewest migrations arriving, then the most free memory.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from orchestrator.model import Node, Vmi, format_bytes
from orchestrator.planner import node_fits, requirement_for
from orchestrator.rules import is_room


@dataclass(frozen=True)
class Choice:
    target: str | None
    reason: str
    candidates: int
    ranked: tuple[str, ...] = ()
    """Every fitting node, best first (`target` is the first)."""


def choose_target(vmi: Vmi, *, source: Node | None, nodes: Sequence[Node], free: Mapping[str, int],
                  inbound: Mapping[str, int], exclude: Collection[str], need_bytes: int,
                  max_inbound: int | None, last_resort: Collection[str] = ()) -> Choice:
    """The best target and every fitting one, best first. `max_inbound` None leaves the inbound limit to the
    caller (the migrate job takes it as a semaphore scope: this view of inbound migrations may be stale).
    Nodes in `last_resort` (a rollout's nodes still waiting for maintenance) are offered only when no other
    node fits, so a VM is not moved to a node that is drained after it."""
    req = requirement_for(vmi, source)
    fitting: list[Node] = []
    why: dict[str, int] = {}

    def no(reason: str) -> None:
        why[reason] = why.get(reason, 0) + 1

    for node in nodes:
        if source is not None and node.name == source.name:
            continue
        if node.name in exclude:
            no("excluded (failed this VM before, or draining)")
        elif not is_room(node, ()):
            no("cordoned, not ready or control plane")
        elif not node_fits(req, node):
            no("selector, CPU model/vendor or taints do not match")
        elif free.get(node.name, 0) < need_bytes:
            no(f"less than {format_bytes(need_bytes)} free")
        elif max_inbound is not None and inbound.get(node.name, 0) >= max_inbound:
            no(f"already receiving {max_inbound} migrations")
        else:
            fitting.append(node)
    preferred = [n for n in fitting if n.name not in last_resort]
    if preferred:
        fitting = preferred
    if not fitting:
        detail = "; ".join(f"{n} node(s) {r}" for r, n in sorted(why.items()))
        return Choice(None, f"no target fits: {detail or 'no other nodes'}", 0)
    ranked = sorted(fitting, key=lambda n: (inbound.get(n.name, 0), -free.get(n.name, 0), n.name))
    best = ranked[0]
    return Choice(best.name, f"{best.name}: {format_bytes(free.get(best.name, 0))} free, "
                             f"{inbound.get(best.name, 0)} inbound", len(fitting), tuple(n.name for n in ranked))
