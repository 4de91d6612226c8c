"""The simulated cluster: a scenario loaded into a store, KubeVirt's controllers running on a scaled clock.

`SimCluster` is what the HTTP server serves (it satisfies `server.ClusterLike`) and what the `/sim/v1/*`
endpoints read: the ground truth (`stats`), the hidden physics (`scenario_json`) and the faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import tempfile
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulator import objects, policies
from simulator.admin import SimAdmin
from simulator.clock import SimClock
from simulator.errors import ApiError
from simulator.faults import Faults, FaultsBody
from simulator.kubevirt import DEFAULT_MIGRATIONS, KubeVirtSim, NetworkModel, VMInfo, vmi_key
from simulator.physics import QEMU_DEFAULT_DOWNTIME_S, VMPhysics
from simulator.policies import MIGRATION_POLICIES
from simulator.prometheus import MigrationMetrics, serve_prometheus
from simulator.resources import (
    DAEMONSETS,
    KUBEVIRTS,
    NAMESPACES,
    NODES,
    PODS,
    VMIS,
    VMS,
    Registry,
    ResourceType,
)
from simulator.scenarios import Scenario
from simulator.store import Obj, Store


class SimCluster:
    """A whole simulated cluster. Call `run()` (or use `running_cluster`) to let time pass."""

    def __init__(self, scenario: Scenario, *, time_scale: float = 1.0, token: str | None = None,
                 admin_token: str | None = None, history: int = 100_000, tick_s: float = 0.02,
                 clock: SimClock | None = None) -> None:
        self.scenario = scenario
        self.clock = clock or SimClock(time_scale)
        self.registry = Registry()
        self.registry.add(MIGRATION_POLICIES)
        self.store = Store(self.registry, now=self.clock.now, history=history, seed=scenario.seed)
        self.store.add_admission(functools.partial(policies.admit, self.store))
        self.faults = Faults()
        self.token = token
        # /sim/v1/* (ground truth, physics, faults) answers this token only; never the cluster token.
        self.admin_token = admin_token or secrets.token_hex(16)
        if self.admin_token == token:
            raise ValueError("the admin token must differ from the cluster token")
        self.tick_s = tick_s
        self.api_requests: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.forbidden: list[dict[str, Any]] = []  # requests RBAC refused (ServiceAccount tokens only)
        self.ips = objects.IpAllocator()
        infos = self._populate()
        self.kubevirt = KubeVirtSim(
            self.store, self.clock, self.faults, vms=infos, seed=scenario.seed, ips=self.ips,
            network=NetworkModel(
                nic_bytes_per_s={n.name: n.nic_bytes_per_s for n in scenario.nodes},
                efficiency=scenario.nic_efficiency,
                pod_network_share=scenario.pod_network_share,
                single_stream_bytes_per_s=scenario.single_stream_bytes_per_s,
                cleanup_s=scenario.cleanup_s,
            ),
        )
        self.metrics = MigrationMetrics(self.kubevirt, self.store, start=self.clock.now())
        self.kubevirt.probes.append(self.metrics)
        self._wake: asyncio.Event | None = None
        self._last = self.clock.now()

    # --------------------------------------------------------------------------------------- populate
    def _populate(self) -> dict[str, VMInfo]:
        sc = self.scenario
        now = self.clock.now()
        create = self.store.create
        namespaces = ["default", "kube-system", "kubevirt", *sorted({vm.namespace for vm in sc.vms})]
        for ns in dict.fromkeys(namespaces):
            create(NAMESPACES, {"metadata": {"name": ns, "labels": {"kubernetes.io/metadata.name": ns}},
                                "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}},
                   admit=False)
        for i, node in enumerate(sc.nodes):
            create(NODES, objects.node(node.name, memory_bytes=node.memory_bytes, cpus=node.cpus,
                                       cpu_model=node.cpu_model, cpu_vendor=node.cpu_vendor,
                                       labels=node.node_labels(), control_plane=node.control_plane, now=now,
                                       index=i), admit=False)
        migrations = {**DEFAULT_MIGRATIONS, **dict(sc.migrations)}
        create(KUBEVIRTS, objects.kubevirt_cr(migrations, eviction_strategy="LiveMigrate"), admit=False)
        ds = create(DAEMONSETS, objects.daemonset("kubevirt", "virt-handler",
                                                  labels={"kubevirt.io": "virt-handler"},
                                                  desired=sum(1 for n in sc.nodes if not n.control_plane)),
                    admit=False)
        for node in sc.nodes:
            if not node.control_plane:
                create(PODS, objects.daemon_pod(ds, node_name=node.name, pod_ip=self.ips.next(), now=now),
                       admit=False)
        infos: dict[str, VMInfo] = {}
        for vm in sc.vms:
            infos[vmi_key(vm.namespace, vm.name)] = VMInfo(
                VMPhysics(memory_bytes=vm.memory_bytes, resident_bytes=vm.resident_bytes,
                          dirty_bytes_per_s=vm.dirty_bytes_per_s, wws_bytes=vm.wws_bytes),
                setup_s=vm.setup_s, multifd=vm.multifd, not_migratable_reason=vm.not_migratable_reason,
                not_migratable_message=vm.not_migratable_message, rwx=vm.rwx_storage)
            vmi = objects.vmi(vm.namespace, vm.name, node_name=vm.node, memory_bytes=vm.memory_bytes,
                              cpus=vm.cpus, cpu_model=vm.cpu_model, eviction_strategy=vm.eviction_strategy,
                              not_migratable_reason=vm.not_migratable_reason,
                              not_migratable_message=vm.not_migratable_message, rwx=vm.rwx_storage,
                              node_selector=dict(vm.node_selector), labels=dict(vm.labels), vm_uid=None, now=now)
            vm_obj = create(VMS, objects.vm(vm.namespace, vm.name, template_spec=vmi["spec"],
                                            labels=dict(vm.labels)), admit=False)
            vmi["metadata"]["ownerReferences"] = [{
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "name": vm.name,
                "uid": vm_obj["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}]
            vmi_obj = create(VMIS, vmi, admit=False)
            memory = vm.memory_bytes + objects.launcher_overhead(vm.memory_bytes, vm.cpus)
            ip = self.ips.next()
            pod = create(PODS, objects.launcher_pod(vmi_obj, node_name=vm.node, memory_request=memory,
                                                    cpus=vm.cpus, node_selector=dict(vm.node_selector),
                                                    target_of=None, pod_ip=ip, now=now,
                                                    name_suffix=_suffix(vm.name)), admit=False)
            uid = pod["metadata"]["uid"]

            def link(o: Obj, uid: str = uid, node: str = vm.node, ip: str = ip) -> None:
                o["status"]["activePods"] = {uid: node}
                o["status"]["interfaces"] = [{"name": "default", "ipAddress": ip, "ipAddresses": [ip]}]

            self.store.mutate(VMIS, vm.namespace, vm.name, link)
        return infos

    # ------------------------------------------------------------------------------ server interface
    def record_request(self, verb: str, resource: str) -> None:
        self.api_requests[verb][resource] += 1

    def record_forbidden(self, user: str, verb: str, resource: str, namespace: str | None) -> None:
        if len(self.forbidden) < 1000:
            self.forbidden.append({"user": user, "verb": verb, "resource": resource, "namespace": namespace,
                                   "at_s": round(self.clock.elapsed(), 3)})

    def stats(self) -> dict[str, Any]:
        requests = {verb: dict(sorted(res.items())) for verb, res in sorted(self.api_requests.items())}
        return {
            "scenario": self.scenario.name,
            "seed": self.scenario.seed,
            "time_scale": self.clock.time_scale,
            "sim_time_s": round(self.clock.elapsed(), 3),
            **self.kubevirt.stats(),
            "api_requests": requests,
            "api_requests_total": sum(sum(r.values()) for r in requests.values()),
            "forbidden_requests": list(self.forbidden),
            "store_writes": self.store.writes,
            "open_watches": self.store.watcher_count(),
        }

    def scenario_json(self) -> dict[str, Any]:
        """The hidden physics (`Scenario.hidden_physics`) with the migration configuration in force now."""
        cfg = self.kubevirt.config()
        body = self.scenario.hidden_physics()
        share = 1.0 if cfg.get("network") else self.scenario.pod_network_share
        for node in body["nodes"]:
            node["migration_bytes_per_s"] = node["nic_bytes_per_s"] * self.scenario.nic_efficiency * share
        body.update(setup_s=self.scenario.setup_s_min(), cleanup_s=self.scenario.cleanup_s,
                    downtime_s=QEMU_DEFAULT_DOWNTIME_S, migration_config=cfg,
                    nic_efficiency=self.scenario.nic_efficiency, pod_network_share=self.scenario.pod_network_share,
                    single_stream_bytes_per_s=self.scenario.single_stream_bytes_per_s,
                    drain_hint=list(self.scenario.drain_hint), parallel_hint=self.scenario.parallel_hint)
        return body

    def apply_faults(self, body: FaultsBody) -> dict[str, Any]:
        self.faults.apply(body)
        if body.drop_watches:
            self.store.close_watches()
        return self.faults.to_json()

    async def subresource(self, rt: ResourceType, namespace: str | None, name: str, sub: str, method: str,
                          body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        if rt is PODS and sub == "eviction" and method == "POST":
            return self.kubevirt.evict(namespace or "default", name, body)
        if rt is VMIS and sub in ("evacuate/cancel", "evacuate-cancel") and method == "PUT":
            return self.kubevirt.evacuate_cancel(namespace or "default", name, body)
        raise ApiError(404, f"the server could not find the requested resource ({method} {rt.plural}/{sub})",
                       reason="NotFound")

    # ---------------------------------------------------------------------------------------- running
    def step(self) -> None:
        """Let the controllers catch up with the clock."""
        now = self.clock.now()
        self.kubevirt.advance(self._last, now)
        self._last = now

    async def run(self) -> None:
        """Run the controllers until cancelled: on every change, and at least every tick."""
        self._wake = wake = asyncio.Event()
        self.kubevirt.on_change = wake.set
        next_drop = 0.0
        loop = asyncio.get_running_loop()
        while True:
            self.step()
            if self.faults.drop_watches_every_s and loop.time() >= next_drop:
                if next_drop:
                    self.store.close_watches()
                next_drop = loop.time() + self.faults.drop_watches_every_s
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), self.tick_s)


def _suffix(name: str) -> str:
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    h = 0
    for ch in name:
        h = (h * 131 + ord(ch)) & 0xFFFFFFFF
    return "".join(alphabet[(h >> (i * 5)) % len(alphabet)] for i in range(5))


@dataclass
class RunningCluster:
    cluster: SimCluster
    url: str
    port: int
    kubeconfig: Path | None
    prometheus_url: str | None = None
    """The Prometheus HTTP API with KubeVirt's migration metrics, when asked for (plain HTTP, same token)."""
    admin_kubeconfig: Path | None = None
    ca_data: bytes | None = None

    def admin(self) -> SimAdmin:
        """A client for `/sim/v1/*` with the admin token (close it, or use it with `async with`)."""
        return SimAdmin(self.url, self.cluster.admin_token, ca_data=self.ca_data)

    async def stats(self) -> dict[str, Any]:
        """GET /sim/v1/stats over HTTP with the admin token."""
        async with self.admin() as admin:
            return await admin.stats()


@contextlib.asynccontextmanager
async def running_cluster(scenario: Scenario, *, time_scale: float = 1.0, token: str | None = None,
                          host: str = "127.0.0.1", port: int = 0, kubeconfig_out: Path | None = None,
                          admin_kubeconfig_out: Path | None = None, admin_token: str | None = None,
                          tls: bool | None = None, prometheus_port: int | None = None
                          ) -> AsyncIterator[RunningCluster]:
    """Serve `scenario` and run its controllers for the duration of the block.

    With a token the server speaks HTTPS with a self-signed certificate (written into the kubeconfig):
    kubectl never sends a bearer token over plain HTTP. `admin_kubeconfig_out` gets a second kubeconfig whose
    token alone may read the ground truth (`/sim/v1/*`); `RunningCluster.admin()` is its client."""
    from simulator import server  # the server sees this module's types only through its Protocol

    use_tls = token is not None if tls is None else tls
    cluster = SimCluster(scenario, time_scale=time_scale, token=token, admin_token=admin_token)
    with tempfile.TemporaryDirectory(prefix="drainctl-sim-") as tmp:
        files = server.self_signed_tls(tmp, hosts=(host, "localhost")) if use_tls else None
        runner, bound = await server.serve(cluster, host=host, port=port,
                                           ssl_context=files.ssl_context() if files else None)
        url = f"{'https' if files else 'http'}://{host}:{bound}"
        ca_data = files.ca_data() if files else None
        if kubeconfig_out is not None:
            server.write_kubeconfig(kubeconfig_out, server_url=url, token=token, ca_data=ca_data)
        if admin_kubeconfig_out is not None:
            server.write_kubeconfig(admin_kubeconfig_out, server_url=url, token=cluster.admin_token,
                                    ca_data=ca_data, name="drainctl-sim-admin")
        prom_runner = None
        prom_url = None
        if prometheus_port is not None:
            prom_runner, prom_bound = await serve_prometheus(
                cluster.metrics.series, now=cluster.clock.now, host=host, port=prometheus_port,
                tokens=lambda: (cluster.token, cluster.admin_token))
            prom_url = f"http://{host}:{prom_bound}"
        task = asyncio.create_task(cluster.run(), name="sim-controllers")
        try:
            yield RunningCluster(cluster, url, bound, kubeconfig_out, prom_url, admin_kubeconfig_out, ca_data)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            cluster.store.close_watches()
            if prom_runner is not None:
                await prom_runner.cleanup()
            await runner.cleanup()
