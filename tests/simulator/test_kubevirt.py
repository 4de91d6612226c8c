"""KubeVirt's behaviour in the simulated cluster, driven over HTTP with the real kubernetes-asyncio client and the
real kubectl, asserted on the cluster's objects and the simulator's ground truth."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from simulator import scenarios
from simulator.cluster import RunningCluster, running_cluster
from simulator.resources import EVENTS, NODES, PODS, VMIMS, VMIS

KUBECTL = "/usr/bin/kubectl"
G, V, VMIM_PLURAL, VMI_PLURAL = "kubevirt.io", "v1", "virtualmachineinstancemigrations", "virtualmachineinstances"
Obj = dict[str, Any]


@dataclasses.dataclass
class Sim:
    rc: RunningCluster
    api: client.ApiClient
    kubeconfig: Path

    @property
    def co(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def cluster(self) -> Any:
        return self.rc.cluster

    async def stats(self) -> Obj:
        """The ground truth, over HTTP with the admin token."""
        async with self.rc.admin() as admin:
            return await admin.stats()

    async def faults(self, body: Obj) -> Obj:
        async with self.rc.admin() as admin:
            return await admin.faults(body)

    async def migrate(self, ns: str, vmi: str, *, name: str | None = None, target: str | None = None,
                      annotations: dict[str, str] | None = None) -> Obj:
        body: Obj = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
                     "metadata": {"name": name or f"mig-{vmi}-{secrets.token_hex(2)}", "namespace": ns,
                                  "annotations": annotations or {}},
                     "spec": {"vmiName": vmi}}
        if target:
            body["spec"]["addedNodeSelector"] = {"kubernetes.io/hostname": target}
        result: Obj = await self.co.create_namespaced_custom_object(G, V, ns, VMIM_PLURAL, body)
        return result

    async def vmim(self, ns: str, name: str) -> Obj:
        result: Obj = await self.co.get_namespaced_custom_object(G, V, ns, VMIM_PLURAL, name)
        return result

    async def vmi(self, ns: str, name: str) -> Obj:
        result: Obj = await self.co.get_namespaced_custom_object(G, V, ns, VMI_PLURAL, name)
        return result

    async def wait(self, pred: Callable[[], Any], *, within_s: float = 60.0, what: str = "") -> Any:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            value = pred()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def final(self, ns: str, name: str, *, within_s: float = 60.0) -> Obj:
        async def done() -> Obj | None:
            obj = await self.vmim(ns, name)
            return obj if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed") else None

        result: Obj = await self.wait(done, within_s=within_s, what=f"VMIM {name} final")
        return result


@pytest.fixture
async def sim_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    stack: list[Any] = []

    async def make(scenario: str | scenarios.Scenario = "small", *, time_scale: float = 50.0) -> Sim:
        sc = scenarios.builtin(scenario) if isinstance(scenario, str) else scenario
        kubeconfig = tmp_path / f"kubeconfig-{len(stack)}.yaml"
        cm = running_cluster(sc, time_scale=time_scale, token=secrets.token_hex(8), kubeconfig_out=kubeconfig)
        rc = await cm.__aenter__()
        api = await config.new_client_from_config(config_file=str(kubeconfig))
        stack.append((cm, api))
        return Sim(rc, api, kubeconfig)

    yield make
    for cm, api in reversed(stack):
        await api.close()
        await cm.__aexit__(None, None, None)


def vms_on(sim: Sim, node: str) -> list[Obj]:
    return list(sim.cluster.store.on_node(VMIS, node))


def phase_of(sim: Sim, ns: str, name: str) -> str | None:
    obj = sim.cluster.store.get(VMIMS, ns, name)
    return None if obj is None else (obj.get("status") or {}).get("phase")


def first_vm(sim: Sim, node: str | None = None) -> tuple[str, str, str]:
    node = node or sim.cluster.scenario.drain_hint[0]
    vmi = vms_on(sim, node)[0]
    return vmi["metadata"]["namespace"], vmi["metadata"]["name"], node


async def test_migration_walks_kubevirts_phases_and_moves_the_vmi(sim_factory: Any) -> None:
    sim: Sim = await sim_factory()
    ns, name, source = first_vm(sim)
    created = await sim.migrate(ns, name)
    assert created["metadata"]["labels"]["kubevirt.io/vmi-name"] == name
    assert "kubevirt.io/migrationJobFinalize" in created["metadata"]["finalizers"]
    done = await sim.final(ns, created["metadata"]["name"])
    assert done["status"]["phase"] == "Succeeded"
    phases = [p["phase"] for p in done["status"]["phaseTransitionTimestamps"]]
    assert phases == ["Pending", "Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running",
                      "Succeeded"]
    assert "finalizers" not in done["metadata"]
    vmi = await sim.vmi(ns, name)
    state = vmi["status"]["migrationState"]
    target = state["targetNode"]
    assert target != source and state["sourceNode"] == source
    assert state["completed"] is True and not state.get("failed")
    assert state["migrationUid"] == done["metadata"]["uid"]
    assert state["startTimestamp"] <= state["endTimestamp"]
    assert vmi["status"]["nodeName"] == target == vmi["metadata"]["labels"]["kubevirt.io/nodeName"]
    # The final VMIM carries the VMI's migration state (KubeVirt copies it when final).
    assert done["status"]["migrationState"]["targetNode"] == target
    # The source launcher pod completed; the target pod runs the VM.
    pods = {p["metadata"]["name"]: p for p in sim.cluster.store.list(PODS, ns)
            if p["metadata"]["annotations"].get("kubevirt.io/domain") == name}
    assert sorted(p["status"]["phase"] for p in pods.values()) == ["Running", "Succeeded"]
    assert pods[state["targetPod"]]["spec"]["nodeName"] == target
    record = next(m for m in (await sim.stats())["migrations"] if m["name"] == created["metadata"]["name"])
    assert record["bytes_sent"] >= sim.cluster.kubevirt.vm_info(f"{ns}/{name}").physics.resident_bytes
    assert record["started_s"] is not None and record["finished_s"] >= record["started_s"]


def status_of(err: ApiException) -> Obj:
    body: Obj = json.loads(err.body)
    return body


async def test_admission_answers_like_kubevirts_migration_webhook(sim_factory: Any) -> None:
    """migration-create-admitter.go: spec problems 422 Invalid with causes; every other refusal 400 with no
    reason, in KubeVirt's words, wrapped by the API server."""
    base = scenarios.builtin("small")
    vms = list(base.vms)
    vms[0] = dataclasses.replace(vms[0], not_migratable_reason="DisksNotLiveMigratable",
                                 not_migratable_message="PVC x is not shared, live migration requires that all "
                                                        "PVCs must be shared (using ReadWriteMany access mode)")
    sim: Sim = await sim_factory(dataclasses.replace(base, vms=tuple(vms)), time_scale=1.0)
    webhook = 'admission webhook "migration-create-validator.kubevirt.io" denied the request: '
    with pytest.raises(ApiException) as info:
        await sim.migrate(vms[0].namespace, vms[0].name)
    status = status_of(info.value)
    assert (info.value.status, status["code"], "reason" in status) == (400, 400, False)
    assert status["message"] == (f"{webhook}Cannot migrate VMI, Reason: DisksNotLiveMigratable, Message: PVC x is "
                                 "not shared, live migration requires that all PVCs must be shared (using "
                                 "ReadWriteMany access mode)")
    ns, name = vms[1].namespace, vms[1].name
    first = await sim.migrate(ns, name)
    with pytest.raises(ApiException) as info:
        await sim.migrate(ns, name)
    assert info.value.status == 400
    assert status_of(info.value)["message"] == (
        f"{webhook}in-flight migration detected. Active migration job ({first['metadata']['uid']}) is currently "
        f"already in progress for VMI {name}.")
    with pytest.raises(ApiException) as info:
        await sim.migrate(ns, "no-such-vmi")
    assert info.value.status == 400
    assert status_of(info.value)["message"] == f'{webhook}the VMI "{ns}/no-such-vmi" does not exist'
    with pytest.raises(ApiException) as info:
        await sim.co.create_namespaced_custom_object(G, V, ns, VMIM_PLURAL, {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "m-prio"}, "spec": {"vmiName": vms[2].name, "priority": "system-critical"}})
    status = status_of(info.value)
    assert (info.value.status, status["reason"]) == (422, "Invalid")
    assert status["message"] == (f"{webhook}Migration priority queue, only virt-controller is allowed to set "
                                 "priority field")
    assert status["details"]["causes"][0]["field"] == "spec.migrationPriority"
    with pytest.raises(ApiException) as info:
        await sim.co.create_namespaced_custom_object(G, V, ns, VMIM_PLURAL, {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "m-empty"}, "spec": {}})
    status = status_of(info.value)
    assert (info.value.status, status["reason"]) == (422, "Invalid")
    assert status["message"] == f"{webhook}vmiName is missing"
    # The update webhook: the spec is immutable.
    with pytest.raises(ApiException) as info:
        await sim.co.patch_namespaced_custom_object(G, V, ns, VMIM_PLURAL, first["metadata"]["name"],
                                                    {"spec": {"vmiName": vms[2].name}},
                                                    _content_type="application/merge-patch+json")
    status = status_of(info.value)
    assert (info.value.status, status["reason"]) == (422, "Invalid")
    assert status["message"].endswith("denied the request: update of Migration object's spec is restricted")


async def test_a_vmi_without_a_live_migratable_condition_is_not_migratable(sim_factory: Any) -> None:
    """IsMigratable wants LiveMigratable=True: without the condition the eviction webhook refuses a LiveMigrate
    VMI (429, the drain would wait forever) and starts no evacuation, while the migration webhook, which only
    refuses False, lets a VMIM through."""
    sim: Sim = await sim_factory(time_scale=20.0)
    ns, name, node = first_vm(sim)

    def drop(o: Obj) -> None:
        o["status"]["conditions"] = [c for c in o["status"]["conditions"] if c["type"] != "LiveMigratable"]

    sim.cluster.store.mutate(VMIS, ns, name, drop)
    pod = next(p for p in sim.cluster.store.on_node(PODS, node)
               if p["metadata"]["annotations"].get("kubevirt.io/domain") == name)
    with pytest.raises(ApiException) as info:
        await sim.core.create_namespaced_pod_eviction(pod["metadata"]["name"], ns, client.V1Eviction(
            metadata=client.V1ObjectMeta(name=pod["metadata"]["name"], namespace=ns)))
    assert info.value.status == 429
    assert status_of(info.value)["message"] == (
        'admission webhook "virt-launcher-eviction-interceptor.kubevirt.io" denied the request: '
        f"VMI {name} is configured with an eviction strategy but is not live-migratable")
    assert not (await sim.vmi(ns, name))["status"].get("evacuationNodeName")
    created = await sim.migrate(ns, name)
    assert (await sim.final(ns, created["metadata"]["name"]))["status"]["phase"] == "Succeeded"


async def test_limits_hold_and_over_limit_migrations_wait_in_pending(sim_factory: Any) -> None:
    sim: Sim = await sim_factory(time_scale=20.0)
    names = []
    for node in sorted({vm.node for vm in sim.cluster.scenario.vms})[:4]:
        for vmi in vms_on(sim, node)[:4]:
            created = await sim.migrate(vmi["metadata"]["namespace"], vmi["metadata"]["name"])
            names.append((created["metadata"]["namespace"], created["metadata"]["name"]))
    def phases() -> list[str]:
        return [(sim.cluster.store.get(VMIMS, *n).get("status") or {}).get("phase", "") for n in names]

    await sim.wait(lambda: len(sim.cluster.kubevirt.active) == 5 and all(phases()), within_s=10, what="5 active")
    pending = [p for p in phases() if p == "Pending"]
    assert len(pending) == len(names) - 5
    for ns, name in names:
        await sim.final(ns, name, within_s=120)
    stats = await sim.stats()
    assert stats["max_in_flight_cluster"] == 5
    assert max(stats["max_in_flight_per_node"].values()) == 2
    assert all(m["phase"] == "Succeeded" for m in stats["migrations"])


async def test_a_drain_taint_creates_every_evacuation_vmim_at_once_and_admits_them_one_pod_at_a_time(
        sim_factory: Any) -> None:
    sim: Sim = await sim_factory(time_scale=100.0)
    node = sim.cluster.scenario.drain_hint[0]
    count = len(vms_on(sim, node))
    await sim.core.patch_node(node, {"spec": {"taints": [{"key": "kubevirt.io/drain", "effect": "NoSchedule"}]}})

    async def evacuations() -> list[Obj]:
        return [m for m in (await sim.stats())["migrations"] if m["origin"] == "evacuation"]

    async def all_moved() -> bool:
        found = await evacuations()
        return len(found) == count and all(m["phase"] == "Succeeded" for m in found)

    await sim.wait(all_moved, within_s=120, what="the node evacuated")
    found = await evacuations()
    assert len({m["created_s"] for m in found}) == 1  # all at once: throttling is the migration controller's
    admitted = sorted(m["admitted_s"] for m in found)
    assert admitted[1] - admitted[0] == pytest.approx(1.0, abs=0.002)  # the second waited for the first's pod
    stats = await sim.stats()
    assert stats["max_in_flight_per_node"][node] == 2 and stats["max_in_flight_cluster"] <= 5


async def test_added_node_selector_pins_the_target_and_unschedulable_fails_after_the_timeout(
        sim_factory: Any) -> None:
    sim: Sim = await sim_factory(time_scale=50.0)
    ns, name, source = first_vm(sim)
    target = next(n.name for n in sim.cluster.scenario.nodes if n.name != source)
    pinned = await sim.final(ns, (await sim.migrate(ns, name, target=target))["metadata"]["name"])
    assert pinned["status"]["migrationState"]["targetNode"] == target
    ns2, name2, _ = first_vm(sim)
    stuck = await sim.migrate(ns2, name2, target="no-such-node",
                              annotations={"kubevirt.io/migrationUnschedulablePodTimeoutSeconds": "60"})
    done = await sim.final(ns2, stuck["metadata"]["name"])
    assert done["status"]["phase"] == "Failed"
    assert done["status"]["migrationState"]["failureReason"] == \
        "Migration target pod was removed during active migration."
    times = {p["phase"]: p["phaseTransitionTimestamp"] for p in done["status"]["phaseTransitionTimestamps"]}
    assert "Running" not in times
    reasons = [e["reason"] for e in sim.cluster.store.list(EVENTS, ns)
               if e["involvedObject"]["name"] == stuck["metadata"]["name"]]
    assert "migrationTargetPodUnschedulable" in reasons


async def test_deleting_a_running_migration_aborts_it(sim_factory: Any) -> None:
    base = scenarios.builtin("small")
    sc = dataclasses.replace(base, migrations={**dict(base.migrations), "bandwidthPerMigration": "64Mi"})
    sim: Sim = await sim_factory(sc, time_scale=20.0)
    ns, name, source = first_vm(sim)
    created = await sim.migrate(ns, name)
    mig = created["metadata"]["name"]
    await sim.wait(lambda: phase_of(sim, ns, mig) == "Running", within_s=30, what="Running")
    await sim.co.delete_namespaced_custom_object(G, V, ns, VMIM_PLURAL, mig)
    await sim.wait(lambda: sim.cluster.store.get(VMIMS, ns, mig) is None, within_s=30, what="VMIM gone")
    vmi = await sim.vmi(ns, name)
    state = vmi["status"]["migrationState"]
    assert state["abortRequested"] is True and state["abortStatus"] == "Succeeded"
    assert state["failed"] is True and state["failureReason"] == "Live migration has been aborted"
    assert vmi["status"]["nodeName"] == source
    record = next(m for m in (await sim.stats())["migrations"] if m["name"] == mig)
    assert record["phase"] == "Failed"
    assert sim.cluster.kubevirt.active == {}


async def test_a_vm_that_cannot_converge_is_aborted_at_the_completion_timeout(sim_factory: Any) -> None:
    # It keeps sending, so each 400 ms sample may be lower than the previous one (virt-launcher's notion of
    # progress): the progress timeout does not fire; the completion timeout (150 s x 5 GB for 4 GiB) does.
    base = scenarios.builtin("small")
    vms = list(base.vms)
    hot = dataclasses.replace(vms[0], memory_bytes=4 * 1024**3, resident_bytes=4 * 1024**3,
                              wws_bytes=4 * 1024**3, dirty_bytes_per_s=50e9)
    vms[0] = hot
    sim: Sim = await sim_factory(dataclasses.replace(base, vms=tuple(vms)), time_scale=100.0)
    created = await sim.migrate(hot.namespace, hot.name)
    done = await sim.final(hot.namespace, created["metadata"]["name"], within_s=60)
    assert done["status"]["phase"] == "Failed"
    # v1.9+: every successful abort, the launcher's timeouts included, reads the same; the cause is in its log.
    state = done["status"]["migrationState"]
    assert (state["failureReason"], state["abortStatus"]) == ("Live migration has been aborted", "Succeeded")
    record = next(m for m in (await sim.stats())["migrations"] if m["name"] == created["metadata"]["name"])
    assert record["abort_cause"] == "Live migration is not completed after 750 seconds and has been aborted"
    assert record["finished_s"] - record["started_s"] == pytest.approx(750, abs=2)
    assert record["bytes_sent"] > hot.resident_bytes  # it kept sending, never converged
    vmi = await sim.vmi(hot.namespace, hot.name)
    assert vmi["status"]["nodeName"] == hot.node


async def test_max_downtime_in_the_kubevirt_cr_does_not_make_a_vm_converge(sim_factory: Any) -> None:
    """On the default path virt-launcher never sets max downtime (live-migration-source.go): a VM whose
    working set fits a 2 s downtime but not QEMU's 300 ms still cannot converge, whatever maxDowntimeMs says."""
    base = scenarios.builtin("small")
    vms = list(base.vms)
    bandwidth = base.migration_bandwidth(vms[0].node)
    # Dirtying faster than the link moves pages; the writable working set fits 1 s of transfer, not 0.3 s.
    hot = dataclasses.replace(vms[0], memory_bytes=2 * 1024**3, resident_bytes=2 * 1024**3,
                              wws_bytes=int(bandwidth * 1.0), dirty_bytes_per_s=bandwidth * 3)
    vms[0] = hot
    sc = dataclasses.replace(base, vms=tuple(vms), migrations={**dict(base.migrations), "maxDowntimeMs": 2000,
                                                               "completionTimeoutPerGiB": 10})
    sim: Sim = await sim_factory(sc, time_scale=100.0)
    kv = await sim.co.get_namespaced_custom_object(G, V, "kubevirt", "kubevirts", "kubevirt")
    assert kv["spec"]["configuration"]["migrations"]["maxDowntimeMs"] == 2000
    created = await sim.migrate(hot.namespace, hot.name)
    done = await sim.final(hot.namespace, created["metadata"]["name"], within_s=60)
    assert done["status"]["phase"] == "Failed"
    record = next(m for m in (await sim.stats())["migrations"] if m["name"] == created["metadata"]["name"])
    assert "not completed after" in record["abort_cause"]
    async with sim.rc.admin() as admin:
        assert (await admin.scenario())["downtime_s"] == 0.3


async def test_post_copy_completes_a_vm_that_cannot_converge(sim_factory: Any) -> None:
    base = scenarios.builtin("small")
    vms = list(base.vms)
    hot = dataclasses.replace(vms[0], memory_bytes=4 * 1024**3, resident_bytes=4 * 1024**3,
                              wws_bytes=4 * 1024**3, dirty_bytes_per_s=50e9)
    vms[0] = hot
    sc = dataclasses.replace(base, vms=tuple(vms), migrations={
        **dict(base.migrations), "allowPostCopy": True, "completionTimeoutPerGiB": 5, "progressTimeout": 600})
    sim: Sim = await sim_factory(sc, time_scale=50.0)
    created = await sim.migrate(hot.namespace, hot.name)
    done = await sim.final(hot.namespace, created["metadata"]["name"], within_s=60)
    assert done["status"]["phase"] == "Succeeded"
    record = next(m for m in (await sim.stats())["migrations"] if m["name"] == created["metadata"]["name"])
    assert record["mode"] == "PostCopy"


async def test_only_five_finished_migrations_per_vmi_are_kept(sim_factory: Any) -> None:
    sim: Sim = await sim_factory(time_scale=100.0)
    ns, name, _ = first_vm(sim)
    for _ in range(7):
        created = await sim.migrate(ns, name)
        await sim.final(ns, created["metadata"]["name"])
    kept = sim.cluster.store.list(VMIMS, ns, label_selector=f"kubevirt.io/vmi-name={name}")
    assert len(kept) == 5


async def test_eviction_of_a_launcher_starts_an_evacuation(sim_factory: Any) -> None:
    sim: Sim = await sim_factory(time_scale=50.0)
    ns, name, source = first_vm(sim)
    pod = next(p for p in sim.cluster.store.on_node(PODS, source)
               if p["metadata"]["annotations"].get("kubevirt.io/domain") == name)
    body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod["metadata"]["name"], namespace=ns))
    with pytest.raises(ApiException) as info:
        await sim.core.create_namespaced_pod_eviction(pod["metadata"]["name"], ns, body)
    assert info.value.status == 429
    assert f'Eviction triggered evacuation of VMI \\"{ns}/{name}\\"' in info.value.body
    with pytest.raises(ApiException) as info:
        await sim.core.create_namespaced_pod_eviction(pod["metadata"]["name"], ns, body)
    assert "Evacuation in progress" in info.value.body

    async def moved() -> bool:
        vmi = await sim.vmi(ns, name)
        return bool(vmi["status"]["nodeName"] != source and not vmi["status"].get("evacuationNodeName"))

    await sim.wait(moved, within_s=60, what="evacuated")
    evacuations = [m for m in (await sim.stats())["migrations"] if m["origin"] == "evacuation"]
    assert len(evacuations) == 1 and evacuations[0]["name"].startswith("kubevirt-evacuation-")
    # The completed source pod now evicts like any finished pod.
    await sim.core.create_namespaced_pod_eviction(pod["metadata"]["name"], ns, body)
    await sim.wait(lambda: sim.cluster.store.get(PODS, ns, pod["metadata"]["name"]) is None, what="pod gone")


async def test_evacuation_retries_with_kubevirts_backoff_and_no_memory_of_failed_targets(
        sim_factory: Any) -> None:
    sim: Sim = await sim_factory(time_scale=100.0)
    ns, name, source = first_vm(sim)
    others = [n.name for n in sim.cluster.scenario.nodes if n.name != source]
    await sim.faults({"fail_migrations_to": others})
    pod = next(p for p in sim.cluster.store.on_node(PODS, source)
               if p["metadata"]["annotations"].get("kubevirt.io/domain") == name)
    with pytest.raises(ApiException):
        await sim.core.create_namespaced_pod_eviction(
            pod["metadata"]["name"], ns, client.V1Eviction(metadata=client.V1ObjectMeta(
                name=pod["metadata"]["name"], namespace=ns)))

    async def attempts() -> list[dict[str, Any]]:
        return sorted((m for m in (await sim.stats())["migrations"] if m["vmi"] == f"{ns}/{name}"),
                      key=lambda m: m["created_s"])

    async def three_failed() -> bool:
        return len([m for m in await attempts() if m["phase"] == "Failed"]) >= 3

    await sim.wait(three_failed, within_s=60, what="three failed evacuation attempts")
    failed = [m for m in await attempts() if m["phase"] == "Failed"][:3]
    # KubeVirt keeps no memory of failed targets: the scheduler picks the same (most free) node again.
    assert len({m["target"] for m in failed}) == 1
    # The evacuation controller creates the next VMIM at once; the migration controller keeps it Pending through
    # the 20 s doubling backoff, measured from the previous failure (handleMigrationBackoff).
    later = await attempts()
    for k, before in enumerate(failed, start=1):
        after = later[later.index(before) + 1]
        assert after["origin"] == "evacuation"
        assert after["created_s"] == pytest.approx(before["finished_s"], abs=0.01)
        if after["admitted_s"] is not None:
            assert after["admitted_s"] - before["finished_s"] >= 20 * 2 ** (k - 1) - 0.01
    # So there is always a VMIM in flight for the VMI: an orchestrator's own one is refused.
    with pytest.raises(ApiException) as info:
        await sim.migrate(ns, name)
    assert info.value.status == 400 and "in-flight migration detected" in info.value.body
    await sim.faults({"clear": True})

    async def moved() -> bool:
        return bool((await sim.vmi(ns, name))["status"]["nodeName"] != source)

    await sim.wait(moved, within_s=60, what="evacuated once the fault is gone")
    assert (await attempts())[-1]["phase"] == "Succeeded"


async def test_kubectl_drain_completes_through_kubevirt_evacuation(sim_factory: Any, tmp_path: Path) -> None:
    sim: Sim = await sim_factory(time_scale=50.0)
    node = sim.cluster.scenario.drain_hint[0]
    before = {f"{v['metadata']['namespace']}/{v['metadata']['name']}" for v in vms_on(sim, node)}
    cmd = [KUBECTL, "--kubeconfig", str(sim.kubeconfig), "--cache-dir", str(tmp_path / "cache"), "drain", node,
           "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=240s"]
    proc = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"node/{node} drained" in proc.stdout
    assert vms_on(sim, node) == []
    stats = await sim.stats()
    assert stats["max_in_flight_cluster"] <= 5
    assert all(v <= 2 for v in stats["max_in_flight_per_node"].values())
    moved = {m["vmi"] for m in stats["migrations"] if m["phase"] == "Succeeded" and m["origin"] == "evacuation"}
    assert moved == before
    assert sim.cluster.store.get(NODES, None, node)["spec"]["unschedulable"] is True
    assert stats["vm_restarts"] == []
    print(f"\nkubectl drain: {len(moved)} VMs, {stats['sim_time_s']:.0f} cluster s, "
          f"{stats['api_requests_total']} API requests")


async def _evict_strategy_none_vm(sim_factory: Any, **changes: Any) -> tuple[Sim, Any, Obj, Obj]:
    """Evict the launcher pod of a drain-hint VM with evictionStrategy None (and `changes`); wait until the VM
    runs again on another node. Returns the VM spec and its VMI as read over HTTP before and after."""
    base = scenarios.builtin("small")
    vms = list(base.vms)
    node = base.drain_hint[0]
    index = next(i for i, vm in enumerate(vms) if vm.node == node)
    vms[index] = dataclasses.replace(vms[index], eviction_strategy="None", **changes)
    sim: Sim = await sim_factory(dataclasses.replace(base, vms=tuple(vms)), time_scale=50.0)
    vm = vms[index]
    before = await sim.vmi(vm.namespace, vm.name)
    pod = next(p for p in sim.cluster.store.on_node(PODS, node)
               if p["metadata"]["annotations"].get("kubevirt.io/domain") == vm.name)
    await sim.core.create_namespaced_pod_eviction(pod["metadata"]["name"], vm.namespace, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=pod["metadata"]["name"], namespace=vm.namespace)))

    async def restarted() -> bool:
        try:
            vmi = await sim.vmi(vm.namespace, vm.name)
        except ApiException:
            return False
        return bool(vmi["status"].get("phase") == "Running" and vmi["status"].get("nodeName") not in (None, node))

    # The drained node is not cordoned here, so cordon it like a drain would.
    await sim.core.patch_node(node, {"spec": {"unschedulable": True}})
    await sim.wait(restarted, within_s=60, what="VM restarted elsewhere")
    return sim, vm, before, await sim.vmi(vm.namespace, vm.name)


def live_migratable(vmi: Obj) -> dict[str, Any]:
    """The VMI's LiveMigratable condition: status, reason and message (its times left out)."""
    conds = [c for c in vmi["status"].get("conditions") or [] if c.get("type") == "LiveMigratable"]
    assert len(conds) == 1, vmi["status"].get("conditions")
    return {k: conds[0].get(k) for k in ("status", "reason", "message")}


async def test_eviction_of_a_vm_with_strategy_none_restarts_it_elsewhere(sim_factory: Any) -> None:
    sim, vm, before, after = await _evict_strategy_none_vm(sim_factory)
    assert after["metadata"]["uid"] != before["metadata"]["uid"]
    assert [r["vmi"] for r in (await sim.stats())["vm_restarts"]] == [f"{vm.namespace}/{vm.name}"]
    assert json.dumps((await sim.stats())["migrations"]) == "[]"
    # The new VMI is live-migratable, as the old one was.
    assert live_migratable(after) == live_migratable(before) == {"status": "True", "reason": None, "message": None}


async def test_a_restarted_vm_that_cannot_migrate_keeps_its_live_migratable_reason(sim_factory: Any) -> None:
    _, _, before, after = await _evict_strategy_none_vm(
        sim_factory, not_migratable_reason="HostDeviceNotLiveMigratable",
        not_migratable_message="VMI uses a PCI host devices")
    expected = {"status": "False", "reason": "HostDeviceNotLiveMigratable", "message": "VMI uses a PCI host devices"}
    assert live_migratable(after) == live_migratable(before) == expected


async def test_typed_models_parse_every_object_before_and_after_migrations(sim_factory: Any) -> None:
    sim: Sim = await sim_factory(time_scale=100.0)
    ns, name, _ = first_vm(sim)
    await sim.final(ns, (await sim.migrate(ns, name))["metadata"]["name"])
    core = sim.core
    nodes = await core.list_node()
    assert len(nodes.items) == len(sim.cluster.scenario.nodes)
    assert all(n.status.node_info.kubelet_version.startswith("v1.32") for n in nodes.items)
    pods = await core.list_pod_for_all_namespaces()
    assert {p.status.phase for p in pods.items} >= {"Running", "Succeeded"}
    events = await core.list_event_for_all_namespaces()
    assert {"SuccessfulMigration", "SuccessfulHandOver"} <= {e.reason for e in events.items}
    daemonsets = await client.AppsV1Api(sim.api).list_daemon_set_for_all_namespaces()
    assert [d.metadata.name for d in daemonsets.items] == ["virt-handler"]
    namespaces = await core.list_namespace()
    assert "kubevirt" in {n.metadata.name for n in namespaces.items}
