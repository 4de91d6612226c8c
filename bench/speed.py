"""How fast the planner plans a large drain and the simulator lists a large cluster (figures, not checks).

The tests check what these produce; how long they take depends on the machine, so it is measured here:

- ``plan``: ``plan_drain`` on 1000 nodes x 30 VMs (two CPU generations, three VM sizes), draining 100 nodes
  ten at a time in planner order;
- ``list``: the simulator's HTTP server listing 30 000 VMIs, as a plain list and as a kubectl Table.

    python -m bench.speed [--repeat 3] [--nodes 1000] [--vms-per-node 30] [--vmis 30000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from typing import Any

import aiohttp

from orchestrator.model import (
    GIB,
    ClusterSnapshot,
    DrainRequest,
    EvictionStrategy,
    MigrationConfig,
    Node,
    NodeName,
    NodeOrder,
    Pod,
    Vmi,
)
from orchestrator.planner import plan_drain
from orchestrator.settings import Settings
from simulator import objects, scenarios, server
from simulator.cluster import SimCluster
from simulator.resources import VMIS


def large_snapshot(nodes: int, vms_per_node: int) -> ClusterSnapshot:
    """Model objects built directly (parsing is tested elsewhere): two CPU generations, three VM sizes."""
    node_objs = []
    vmis = []
    pods = []
    for n in range(nodes):
        model = "Skylake" if n % 4 else "Cascadelake"
        name = NodeName(f"node-{n:04d}")
        node_objs.append(
            Node(
                name=name,
                allocatable_memory_bytes=768 * GIB,
                allocatable_cpu_millis=96_000,
                host_model_cpus=frozenset({model}),
                cpu_vendor="Intel",
                labels={
                    f"host-model-cpu.node.kubevirt.io/{model}": "true",
                    "cpu-vendor.node.kubevirt.io/Intel": "true",
                },
            )
        )
        for v in range(vms_per_node):
            memory = (4, 8, 16)[(n + v) % 3] * GIB
            vmis.append(
                Vmi(
                    namespace=f"ns{v % 7}",
                    name=f"vm-{n}-{v}",
                    uid="",
                    node=name,
                    phase="Running",
                    memory_request_bytes=memory,
                    guest_memory_bytes=memory,
                    eviction_strategy=EvictionStrategy.LIVE_MIGRATE,
                    eviction_strategy_source="vmi",
                    live_migratable="True",
                )
            )
            pods.append(
                Pod(
                    namespace=f"ns{v % 7}",
                    name=f"virt-launcher-vm-{n}-{v}",
                    node=name,
                    phase="Running",
                    memory_request_bytes=memory,
                    owner_kind="VirtualMachineInstance",
                    owner_name=f"vm-{n}-{v}",
                    is_virt_launcher=True,
                    vmi_name=f"vm-{n}-{v}",
                )
            )
    return ClusterSnapshot(
        nodes=tuple(node_objs), vmis=tuple(vmis), pods=tuple(pods), migrations=(), migration_config=MigrationConfig()
    )


def bench_plan(*, nodes: int, vms_per_node: int, repeat: int) -> dict[str, Any]:
    snapshot = large_snapshot(nodes, vms_per_node)
    drain = tuple(NodeName(f"node-{n:04d}") for n in range(nodes // 10))
    request = DrainRequest(nodes=drain, max_parallel_nodes=min(10, len(drain)), order=NodeOrder.PLANNER)
    times = []
    placed = 0
    for _ in range(repeat):
        started = time.perf_counter()
        result = plan_drain(snapshot, request, Settings(), now=time.time())
        times.append(time.perf_counter() - started)
        placed = result.capacity.placed_vms
    return {"nodes": nodes, "vms": nodes * vms_per_node, "drained_nodes": len(drain), "placed_vms": placed,
            "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}


async def bench_list(*, vmis: int, repeat: int) -> dict[str, Any]:
    cluster = SimCluster(scenarios.builtin("small"), time_scale=1.0, token=None)
    template = objects.vmi("default", "x", node_name="worker-01", memory_bytes=4 * objects.GiB, cpus=2,
                           cpu_model="Skylake", eviction_strategy="LiveMigrate", not_migratable_reason=None,
                           not_migratable_message=None, rwx=True, node_selector={}, labels={}, vm_uid=None,
                           now=time.time())
    for i in range(vmis):
        template["metadata"]["name"] = f"bench-vm-{i:06d}"
        cluster.store.create(VMIS, template)
    runner, port = await server.serve(cluster)
    figures: dict[str, Any] = {"vmis": len(cluster.store.list(VMIS))}
    try:
        async with aiohttp.ClientSession() as session:
            for label, accept in (("list", "application/json"),
                                  ("table", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")):
                times, size = [], 0
                for _ in range(repeat):
                    started = time.perf_counter()
                    async with session.get(f"http://127.0.0.1:{port}/apis/kubevirt.io/v1/virtualmachineinstances",
                                           headers={"Accept": accept}) as resp:
                        body = await resp.read()
                    times.append(time.perf_counter() - started)
                    size = len(body)
                    if resp.status != 200:
                        raise RuntimeError(f"{label}: HTTP {resp.status}: {body[:200]!r}")
                figures[label] = {"median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3),
                                  "mb": round(size / 1e6, 1)}
    finally:
        await runner.cleanup()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--vms-per-node", type=int, default=30)
    parser.add_argument("--vmis", type=int, default=30_000)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.nodes < 10 or args.vms_per_node < 1 or args.vmis < 1:
        parser.error("--repeat, --vms-per-node and --vmis must be at least 1, --nodes at least 10")
    figures = {"plan": bench_plan(nodes=args.nodes, vms_per_node=args.vms_per_node, repeat=args.repeat),
               "list": asyncio.run(bench_list(vmis=args.vmis, repeat=args.repeat))}
    json.dump(figures, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
