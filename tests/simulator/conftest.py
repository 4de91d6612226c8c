"""Fixtures for the API server tests: a small cluster behind the real HTTP server, with a bearer token, a
kubeconfig file and a kubectl runner that uses its own discovery cache per test."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from simulator import objects
from simulator.clock import SimClock
from simulator.errors import ApiError
from simulator.faults import Faults, FaultsBody
from simulator.resources import (
    DAEMONSETS,
    EVENTS,
    KUBEVIRTS,
    LEASES,
    NAMESPACES,
    NODES,
    PDBS,
    PODS,
    VMIS,
    Registry,
    ResourceType,
)
from simulator.server import TlsFiles, self_signed_tls, serve, write_kubeconfig
from simulator.store import Store

TOKEN = "sim-token-for-tests"
ADMIN_TOKEN = "sim-admin-token-for-tests"
KUBECTL = "/usr/bin/kubectl"
Obj = dict[str, Any]


@dataclass
class FakeCluster:
    """A ClusterLike with just enough behaviour to test the server: evictions of pods labelled
    `protected=true` are refused with the PDB message; other evictions delete the pod."""

    registry: Registry
    store: Store
    clock: SimClock
    faults: Faults
    token: str | None
    admin_token: str | None
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    subresource_calls: list[tuple[str, str | None, str, str, str, Obj | None]] = field(default_factory=list)
    forbidden: list[tuple[str, str, str, str | None]] = field(default_factory=list)

    def record_request(self, verb: str, resource: str) -> None:
        self.requests[(verb, resource)] += 1

    def record_forbidden(self, user: str, verb: str, resource: str, namespace: str | None) -> None:
        self.forbidden.append((user, verb, resource, namespace))

    def stats(self) -> dict[str, Any]:
        return {"sim_time_s": self.clock.elapsed(),
                "api_requests": {f"{v} {r}": n for (v, r), n in sorted(self.requests.items())}}

    def scenario_json(self) -> dict[str, Any]:
        return {"nodes": [{"name": n["metadata"]["name"]} for n in self.store.list(NODES)], "vms": []}

    def apply_faults(self, body: FaultsBody) -> dict[str, Any]:
        self.faults.apply(body)
        if body.drop_watches:
            self.store.close_watches()
        return self.faults.to_json()

    async def subresource(self, rt: ResourceType, namespace: str | None, name: str, sub: str,
                          method: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        self.subresource_calls.append((rt.plural, namespace, name, sub, method, body))
        if rt is PODS and sub == "eviction" and method == "POST":
            pod = self.store.require(PODS, namespace, name)
            if (pod["metadata"].get("labels") or {}).get("protected") == "true":
                raise ApiError(429, "Cannot evict pod as it would violate the pod's disruption budget.",
                               details={"causes": [{"reason": "DisruptionBudget",
                                                    "message": "The disruption budget pdb-a needs 1 healthy "
                                                               "pods and has 1 currently"}]})
            self.store.delete(PODS, namespace, name, grace_seconds=0)
            return 201, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                         "code": 201}
        raise ApiError(404, f"the server could not find the requested resource ({method} {rt.plural}/{sub})")


def make_cluster(*, history: int = 50_000, token: str | None = TOKEN) -> FakeCluster:
    clock = SimClock(1.0)
    registry = Registry()
    store = Store(registry, now=clock.now, history=history)
    cluster = FakeCluster(registry=registry, store=store, clock=clock, faults=Faults(), token=token,
                          admin_token=ADMIN_TOKEN)
    seed(cluster)
    return cluster


def seed(cluster: FakeCluster) -> None:
    """Namespaces, three nodes, two VMIs with launcher pods, a DaemonSet with its pods, a PDB, a lease,
    an event and the KubeVirt CR: every object schema-valid for kubernetes-asyncio's models."""
    store = cluster.store
    now = cluster.clock.now() - 3725  # about an hour old, so AGE columns are not all "0s"
    for ns in ("default", "kube-system", "kube-node-lease", "kubevirt"):
        store.create(NAMESPACES, {"metadata": {"name": ns}, "status": {"phase": "Active"}})
    for i, name in enumerate(("node-1", "node-2", "cp-1")):
        store.create(NODES, objects.node(name, memory_bytes=64 * objects.GiB, cpus=16, cpu_model="Skylake",
                                         cpu_vendor="Intel", labels={}, control_plane=name.startswith("cp"),
                                         now=now, index=i))
        store.create(LEASES, {"metadata": {"name": name, "namespace": "kube-node-lease"},
                              "spec": {"holderIdentity": name, "leaseDurationSeconds": 40}})
    for i, (vm_name, node) in enumerate((("vm-a", "node-1"), ("vm-b", "node-2"))):
        vmi = store.create(VMIS, objects.vmi(
            "default", vm_name, node_name=node, memory_bytes=4 * objects.GiB, cpus=2, cpu_model="Skylake",
            eviction_strategy="LiveMigrate", not_migratable_reason=None, not_migratable_message=None,
            rwx=True, node_selector={}, labels={"app": vm_name}, vm_uid=None, now=now))
        pod = objects.launcher_pod(vmi, node_name=node, memory_request=5 * objects.GiB, cpus=2,
                                   node_selector={}, target_of=None, pod_ip=f"10.128.0.{10 + i}", now=now,
                                   name_suffix=f"abcd{i}")
        pod["metadata"]["labels"]["protected"] = "true" if vm_name == "vm-a" else "false"
        store.create(PODS, pod)
        store.create(EVENTS, objects.event(involved=vmi, reason="Started", message="VMI started",
                                           etype="Normal", component="virt-handler", now=now,
                                           name_suffix=f"e{i}"))
    ds = store.create(DAEMONSETS, objects.daemonset("kubevirt", "virt-handler",
                                                    labels={"kubevirt.io": "virt-handler"}, desired=2))
    for i, node in enumerate(("node-1", "node-2")):
        store.create(PODS, objects.daemon_pod(ds, node_name=node, pod_ip=f"10.128.1.{i}", now=now))
    store.create(PDBS, {
        "metadata": {"name": "pdb-a", "namespace": "default"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "vm-a"}}},
        "status": {"currentHealthy": 1, "desiredHealthy": 1, "disruptionsAllowed": 0, "expectedPods": 1,
                   "observedGeneration": 1},
    })
    store.create(KUBEVIRTS, objects.kubevirt_cr({"parallelMigrationsPerCluster": 5,
                                                 "parallelOutboundMigrationsPerNode": 2},
                                                eviction_strategy="LiveMigrate"))


@dataclass
class Served:
    cluster: FakeCluster
    port: int
    url: str
    kubeconfig: Path
    ca_path: Path | None  # the CA to trust for an https url


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return self_signed_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
async def make_served(tmp_path: Path, tls_files: TlsFiles) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Factory: serve a freshly seeded cluster (optionally with a tiny watch history) on a free port, over
    HTTPS by default (kubectl sends a kubeconfig's token only over TLS)."""
    runners = []

    async def make(*, history: int = 50_000, token: str | None = TOKEN, tls: bool = True) -> Served:
        cluster = make_cluster(history=history, token=token)
        runner, port = await serve(cluster, ssl_context=tls_files.ssl_context() if tls else None)
        runners.append(runner)
        url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        kubeconfig = tmp_path / f"kubeconfig-{port}"
        write_kubeconfig(kubeconfig, server_url=url, token=token, ca_data=tls_files.ca_data() if tls else None)
        return Served(cluster=cluster, port=port, url=url, kubeconfig=kubeconfig,
                      ca_path=tls_files.cert_path if tls else None)

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def served(make_served: Callable[..., Awaitable[Served]]) -> Served:
    return await make_served()


@dataclass(frozen=True)
class KubectlResult:
    rc: int
    stdout: str
    stderr: str


class Kubectl:
    """Runs the real kubectl against a served cluster, with this test's own discovery cache."""

    def __init__(self, served: Served, cache_dir: Path) -> None:
        self.served = served
        self.cache_dir = cache_dir
        self.env = {**os.environ, "KUBECONFIG": str(served.kubeconfig), "HOME": str(cache_dir.parent)}

    def argv(self, *args: str) -> list[str]:
        return [KUBECTL, f"--kubeconfig={self.served.kubeconfig}", f"--cache-dir={self.cache_dir}",
                "--request-timeout=20s", *args]

    async def __call__(self, *args: str, stdin: str | None = None, wait_s: float = 60) -> KubectlResult:
        proc = await asyncio.create_subprocess_exec(
            *self.argv(*args), stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self.env)
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None),
                                              wait_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return KubectlResult(proc.returncode, out.decode(), err.decode())

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        """Start a long-running kubectl (e.g. `get -w`); the caller kills it."""
        return await asyncio.create_subprocess_exec(*self.argv(*args), stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, env=self.env)


@pytest.fixture
def kubectl(served: Served, tmp_path: Path) -> Kubectl:
    if not os.path.exists(KUBECTL):
        pytest.skip("kubectl is not installed")
    cache = tmp_path / "kube-cache"
    cache.mkdir()
    return Kubectl(served, cache)
