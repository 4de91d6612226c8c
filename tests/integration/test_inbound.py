"""The inbound limit (`DRAIN_MAX_INBOUND_PER_NODE`) holds in the cluster, over repeated parallel drains.

Two nodes drain at once into the rest of the cluster, three rounds in a row (the drained nodes are
uncordoned before the next round), with workers racing each other for targets. The simulator's ground truth
(`max_inbound_per_node`: the most migrations it ever saw in flight into one node) must never pass the limit.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from simulator.resources import NODES
from tests.integration.conftest import EnvFactory, requires_redis
from tests.integration.test_drain import assert_limits, semaphore_empty, vmis_on

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(600)]

ROUNDS = (("worker-01", "worker-02"), ("worker-03", "worker-04"), ("worker-05", "worker-06"))


def _uncordon(env: object, node: str) -> None:
    def clear(obj: dict[str, object]) -> None:
        spec = obj.setdefault("spec", {})
        assert isinstance(spec, dict)
        spec.pop("unschedulable", None)

    env.cluster.store.mutate(NODES, None, node, clear)  # type: ignore[attr-defined]


def _overlaps(migrations: list[dict[str, Any]], limit: int) -> list[list[tuple[Any, ...]]]:
    """Groups of migrations into one node that were in flight together, more than `limit` of them."""
    out = []
    for m in migrations:
        start = m.get("started_s") or m["created_s"]
        together = [x for x in migrations if x["target"] == m["target"] and
                    (x.get("started_s") or x["created_s"]) <= start < (x["finished_s"] or float("inf"))]
        if len(together) > limit:
            out.append([(x["vmi"], x["target"], x["created_s"], x.get("started_s"), x["finished_s"], x["phase"],
                         x["labels"].get("drainctl.io/attempt"), x.get("origin")) for x in together])
    return out


@pytest.mark.parametrize("limit", [1, 2])
async def test_inbound_limit_holds_over_repeated_parallel_drains(cluster_env: EnvFactory, limit: int) -> None:
    extra = {"DRAIN_MAX_INBOUND_PER_NODE": str(limit), "DRAIN_MAX_IN_FLIGHT": "5", "DRAIN_MAX_PER_NODE": "3"}
    async with cluster_env("small", time_scale=30, workers=3, extra_env=extra) as env:
        per_round: list[int] = []
        for sources in ROUNDS:
            result = await env.adrainctl("drain", *sources, "--max-parallel-nodes", "2", "--wait", "-o", "json",
                                         timeout_s=280)
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:] + env.worker_logs()
            view = json.loads(result.stdout)
            stats = await env.stats()
            ours = [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == view["id"]]
            assert ours, "nothing migrated: the round proves nothing"
            per_round.append(max(stats["max_inbound_per_node"].values()))
            for node in sources:
                assert vmis_on(env, node) == []
                _uncordon(env, node)
        stats = await env.stats()
        print(f"\ninbound limit {limit}: most migrations into one node per round (cumulative) {per_round}; "
              f"{len(stats['migrations'])} migrations")
        assert all(count <= limit for count in stats["max_inbound_per_node"].values()), \
            (stats["max_inbound_per_node"], _overlaps(stats["migrations"], limit))
        assert_limits(stats, cluster=5, per_node=3, inbound=limit)
        assert await semaphore_empty(env) == {}
