"""KubeVirt's MigrationPolicy in the simulated cluster: matching and precedence as KubeVirt's matchPolicy, the
CRD served over HTTP to kubernetes-asyncio and kubectl, and a policy's options really driving the physics."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from simulator import scenarios
from simulator.cluster import RunningCluster, running_cluster
from simulator.policies import apply_policy, match_policy, vmim_options

GROUP, VERSION, PLURAL = "migrations.kubevirt.io", "v1alpha1", "migrationpolicies"
KUBECTL = "/usr/bin/kubectl"
MERGE = "application/merge-patch+json"


def policy(name: str, *, vmi: dict[str, str] | None = None, ns: dict[str, str] | None = None,
           selectors: bool = True, **spec: Any) -> dict[str, Any]:
    sel: dict[str, Any] = {}
    if vmi is not None:
        sel["virtualMachineInstanceSelector"] = vmi
    if ns is not None:
        sel["namespaceSelector"] = ns
    body: dict[str, Any] = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "MigrationPolicy",
                            "metadata": {"name": name}, "spec": dict(spec)}
    if selectors:
        body["spec"]["selectors"] = sel
    return body


# --------------------------------------------------------------------------------- matching, as KubeVirt
VMI_LABELS = {"app": "db", "tier": "gold"}
NS_LABELS = {"kubernetes.io/metadata.name": "prod", "env": "prod"}


@pytest.mark.parametrize(("policies", "vmi_labels", "ns_labels", "winner"), [
    ([], VMI_LABELS, NS_LABELS, None),
    ([policy("p", selectors=False)], VMI_LABELS, NS_LABELS, None),  # no selectors: never matches
    ([policy("p", vmi={"app": "db"})], VMI_LABELS, NS_LABELS, "p"),
    ([policy("p", vmi={"app": "web"})], VMI_LABELS, NS_LABELS, None),
    ([policy("p", vmi={"app": "db", "zone": "a"})], VMI_LABELS, NS_LABELS, None),  # every label must match
    ([policy("p", ns={"env": "prod"})], VMI_LABELS, NS_LABELS, "p"),
    ([policy("p", vmi={"app": "db"}, ns={"env": "dev"})], VMI_LABELS, NS_LABELS, None),
    ([policy("p")], VMI_LABELS, NS_LABELS, "p"),  # empty selectors match every VMI
    # the most matching labels win, whichever side they are on
    ([policy("a", vmi={"app": "db"}), policy("b", vmi={"app": "db"}, ns={"env": "prod"})],
     VMI_LABELS, NS_LABELS, "b"),
    ([policy("z", vmi={"app": "db", "tier": "gold"}), policy("a", ns={"env": "prod"})], VMI_LABELS, NS_LABELS, "z"),
    # equal totals: more VMI labels win
    ([policy("a", ns={"env": "prod", "kubernetes.io/metadata.name": "prod"}),
      policy("z", vmi={"app": "db"}, ns={"env": "prod"})], VMI_LABELS, NS_LABELS, "z"),
    # a full tie: the lexicographically first name
    ([policy("beta", vmi={"app": "db"}), policy("alpha", vmi={"tier": "gold"}), policy("gamma", vmi={"app": "db"})],
     VMI_LABELS, NS_LABELS, "alpha"),
    # a specific policy beats the catch-all
    ([policy("all"), policy("db", vmi={"app": "db"})], VMI_LABELS, NS_LABELS, "db"),
    # KubeVirt's quirk: a VMI without labels skips both selectors, so any policy with selectors matches
    ([policy("p", vmi={"app": "db"}, ns={"env": "dev"})], None, NS_LABELS, "p"),
    # a namespace without labels matches no namespace selector
    ([policy("p", ns={"env": "prod"})], VMI_LABELS, None, None),
])
def test_match_policy_follows_kubevirt(policies: list[dict[str, Any]], vmi_labels: dict[str, str] | None,
                                       ns_labels: dict[str, str] | None, winner: str | None) -> None:
    found = match_policy(policies, vmi_labels, ns_labels)
    assert (found["metadata"]["name"] if found else None) == winner
    reverse = match_policy(list(reversed(policies)), vmi_labels, ns_labels)  # order does not matter
    assert (reverse["metadata"]["name"] if reverse else None) == winner


def test_a_policy_overrides_only_what_it_sets() -> None:
    base = vmim_options({"allowPostCopy": False, "allowAutoConverge": False, "completionTimeoutPerGiB": 150,
                         "progressTimeout": 150, "bandwidthPerMigration": "0Mi", "parallelMigrationsPerCluster": 5})
    assert base["allowWorkloadDisruption"] is False  # inherits allowPostCopy
    applied = apply_policy(base, {"allowPostCopy": True, "completionTimeoutPerGiB": 10,
                                  "bandwidthPerMigration": None, "selectors": {}})
    assert applied == {**base, "allowPostCopy": True, "allowWorkloadDisruption": True, "completionTimeoutPerGiB": 10}
    explicit = apply_policy(base, {"allowPostCopy": True, "allowWorkloadDisruption": False})
    assert explicit["allowWorkloadDisruption"] is False
    assert base["allowPostCopy"] is False  # the base is not changed


# ------------------------------------------------------------------------------------------- over HTTP
@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[RunningCluster]:
    async with running_cluster(scenarios.builtin("hostile"), time_scale=100.0, token="policy-token",
                               kubeconfig_out=tmp_path / "kubeconfig", prometheus_port=0) as rc:
        yield rc


@pytest.fixture
async def api(hostile: RunningCluster) -> AsyncIterator[client.ApiClient]:
    assert hostile.kubeconfig is not None
    api_client = await config.new_client_from_config(config_file=str(hostile.kubeconfig))
    async with api_client:
        yield api_client


async def test_policies_are_a_cluster_scoped_kind_with_crud_and_validation(api: client.ApiClient) -> None:
    co = client.CustomObjectsApi(api)
    created = await co.create_cluster_custom_object(GROUP, VERSION, PLURAL, policy(
        "gold", vmi={"tier": "gold"}, allowAutoConverge=True, bandwidthPerMigration="1Gi", unknownField=1))
    assert created["metadata"]["uid"] and created["spec"]["bandwidthPerMigration"] == "1Gi"
    assert "unknownField" not in created["spec"]  # pruned by the structural schema
    listed = await co.list_cluster_custom_object(GROUP, VERSION, PLURAL)
    assert [p["metadata"]["name"] for p in listed["items"]] == ["gold"]
    got = await co.get_cluster_custom_object(GROUP, VERSION, PLURAL, "gold")
    assert got["spec"]["allowAutoConverge"] is True
    patched = await co.patch_cluster_custom_object(GROUP, VERSION, PLURAL, "gold", {"spec": {"allowPostCopy": True}},
                                                   _content_type=MERGE)
    assert patched["spec"]["allowPostCopy"] is True

    cases = [
        (policy("nosel", selectors=False), 'MigrationPolicy.migrations.kubevirt.io "nosel" is invalid: '
                                           "spec.selectors: Required value"),
        (policy("types", vmi={"a": 1}, allowPostCopy="yes"),
         'spec.selectors.virtualMachineInstanceSelector.a: Invalid value: "integer"'),
        (policy("neg", completionTimeoutPerGiB=-1),
         'admission webhook "migration-policy-validator.kubevirt.io" denied the request: must not be negative'),
        (policy("negbw", bandwidthPerMigration="-5Mi"), "must not be negative"),
        (policy("downtime", maxDowntimeMs=500), "maxDowntimeMs cannot be modified without enabling the "
                                                "MigrationStallDetection or MigrationDowntimeTuning feature gate"),
    ]
    for body, message in cases:
        with pytest.raises(ApiException) as info:
            await co.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
        assert info.value.status == 422
        assert message in json.loads(info.value.body)["message"]
    await co.delete_cluster_custom_object(GROUP, VERSION, PLURAL, "gold")
    assert (await co.list_cluster_custom_object(GROUP, VERSION, PLURAL))["items"] == []


async def _kubectl(rc: RunningCluster, tmp: Path, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        KUBECTL, f"--kubeconfig={rc.kubeconfig}", f"--cache-dir={tmp / 'cache'}", "--request-timeout=20s", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "HOME": str(tmp)})
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.skipif(not os.path.exists(KUBECTL), reason="kubectl is not installed")
async def test_kubectl_creates_lists_and_deletes_policies(hostile: RunningCluster, tmp_path: Path) -> None:
    manifest = json.dumps(policy("dbs", ns={"kubernetes.io/metadata.name": "databases"}, allowAutoConverge=True))
    rc, out, err = await _kubectl(hostile, tmp_path, "apply", "--validate=false", "-f", "-", stdin=manifest)
    assert rc == 0, err
    assert "migrationpolicy.migrations.kubevirt.io/dbs created" in out
    rc, out, err = await _kubectl(hostile, tmp_path, "get", "migrationpolicies")
    assert rc == 0, err
    assert out.split()[:4] == ["NAME", "AGE", "dbs", out.split()[3]]
    rc, out, err = await _kubectl(hostile, tmp_path, "get", "migrationpolicy", "dbs", "-o", "json")
    assert rc == 0, err
    assert json.loads(out)["spec"]["allowAutoConverge"] is True
    rc, out, err = await _kubectl(hostile, tmp_path, "delete", "migrationpolicies.migrations.kubevirt.io", "dbs")
    assert rc == 0, err
    assert 'migrationpolicy.migrations.kubevirt.io "dbs" deleted' in out


async def test_a_policy_makes_a_vm_that_cannot_converge_move(hostile: RunningCluster,
                                                             api: client.ApiClient) -> None:
    """On `hostile` three VMs dirty memory faster than the network carries it. A policy with post-copy moves one,
    a policy with auto-converge moves another, the third (matched only by a namespace-wide policy that changes
    nothing) keeps migrating without converging. The VMIs show the policy KubeVirt applied."""
    co = client.CustomObjectsApi(api)
    rung = "drain.example.com/rung"
    for body in (policy("analytics-wide", ns={"kubernetes.io/metadata.name": "analytics"}, completionTimeoutPerGiB=150),
                 policy("post-copy", vmi={rung: "post-copy"}, ns={"kubernetes.io/metadata.name": "analytics"},
                        allowPostCopy=True, completionTimeoutPerGiB=2),
                 policy("auto-converge", vmi={rung: "auto-converge"}, allowAutoConverge=True)):
        await co.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
    plan = {"hot-00007": "post-copy", "hot-00001": "auto-converge", "hot-00009": None}
    for name, value in plan.items():
        if value:
            await co.patch_namespaced_custom_object("kubevirt.io", "v1", "analytics", "virtualmachineinstances", name,
                                                    {"metadata": {"labels": {rung: value}}}, _content_type=MERGE)
        await co.create_namespaced_custom_object("kubevirt.io", "v1", "analytics", "virtualmachineinstancemigrations",
                                                 {"apiVersion": "kubevirt.io/v1",
                                                  "kind": "VirtualMachineInstanceMigration",
                                                  "metadata": {"name": f"mig-{name}"}, "spec": {"vmiName": name}})

    async def records() -> dict[str, dict[str, Any]]:
        return {m["vmi"].split("/")[1]: m for m in (await hostile.stats())["migrations"]}

    loop = asyncio.get_running_loop()
    end = loop.time() + 120
    while True:
        got = await records()
        if all(got.get(n, {}).get("phase") == "Succeeded" for n in ("hot-00007", "hot-00001")):
            break
        assert loop.time() < end, f"the policies did not make the VMs move: {got}"
        await asyncio.sleep(0.2)
    assert got["hot-00007"]["mode"] == "PostCopy"
    assert got["hot-00001"]["mode"] == "PreCopy"  # auto-converge throttled it into converging
    assert got["hot-00009"]["phase"] == "Running"  # no useful policy: still not converging
    assert {n: got[n]["migration_policy"] for n in plan} == {
        "hot-00007": "post-copy", "hot-00001": "auto-converge", "hot-00009": "analytics-wide"}

    vmi = await co.get_namespaced_custom_object("kubevirt.io", "v1", "analytics", "virtualmachineinstances",
                                                "hot-00007")
    state = vmi["status"]["migrationState"]
    assert state["migrationPolicyName"] == "post-copy"
    assert state["migrationConfiguration"]["allowPostCopy"] is True
    assert state["migrationConfiguration"]["allowWorkloadDisruption"] is True
    assert state["migrationConfiguration"]["completionTimeoutPerGiB"] == 2
    assert state["migrationConfiguration"]["parallelMigrationsPerCluster"] == 5  # the rest from the KubeVirt CR
    vmim = await co.get_namespaced_custom_object("kubevirt.io", "v1", "analytics", "virtualmachineinstancemigrations",
                                                 "mig-hot-00001")
    assert vmim["status"]["migrationState"]["migrationPolicyName"] == "auto-converge"  # copied when final
    assert vmim["status"]["migrationState"]["migrationConfiguration"]["allowAutoConverge"] is True
    running = await co.get_namespaced_custom_object("kubevirt.io", "v1", "analytics", "virtualmachineinstances",
                                                    "hot-00009")
    assert running["status"]["migrationState"]["migrationConfiguration"]["allowAutoConverge"] is False


async def test_a_policy_bandwidth_caps_that_migration_only(tmp_path: Path) -> None:
    """bandwidthPerMigration from a policy caps the matched VM's transfer (seen in KubeVirt's transfer-rate metric
    over the Prometheus API); a VM the policy does not match on the same node takes the rest of the NIC."""
    # slow enough that both transfers are seen running together on a busy machine
    async with running_cluster(scenarios.builtin("hostile"), time_scale=10.0, token="policy-token",
                               kubeconfig_out=tmp_path / "kubeconfig", prometheus_port=0) as rc:
        api_client = await config.new_client_from_config(config_file=str(rc.kubeconfig))
        async with api_client:
            await _capped(rc, api_client)


async def _capped(hostile: RunningCluster, api: client.ApiClient) -> None:
    co = client.CustomObjectsApi(api)
    await co.create_cluster_custom_object(GROUP, VERSION, PLURAL, policy("slow", vmi={"slow": "yes"},
                                                                         bandwidthPerMigration="100Mi"))
    await co.patch_namespaced_custom_object("kubevirt.io", "v1", "corp-apps", "virtualmachineinstances", "idle-00002",
                                            {"metadata": {"labels": {"slow": "yes"}}}, _content_type=MERGE)
    for name in ("idle-00002", "idle-00004"):  # both on worker-01
        await co.create_namespaced_custom_object("kubevirt.io", "v1", "corp-apps", "virtualmachineinstancemigrations",
                                                 {"apiVersion": "kubevirt.io/v1",
                                                  "kind": "VirtualMachineInstanceMigration",
                                                  "metadata": {"name": f"mig-{name}"}, "spec": {"vmiName": name}})
    query = 'kubevirt_vmi_migration_memory_transfer_rate_bytes{namespace="corp-apps"}'
    rates: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    end = loop.time() + 60
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer policy-token"}) as session:
        while len(rates) < 2:
            assert loop.time() < end, "both transfers should report a rate"
            async with session.get(f"{hostile.prometheus_url}/api/v1/query", params={"query": query}) as resp:
                body = await resp.json()
            rates = {s["metric"]["name"]: float(s["value"][1]) for s in body["data"]["result"]}
            await asyncio.sleep(0.1)
    nic = next(n["migration_bytes_per_s"] for n in hostile.cluster.scenario_json()["nodes"] if n["name"] == "worker-01")
    assert rates["idle-00002"] == 100 * 2**20
    assert rates["idle-00004"] == pytest.approx(nic - 100 * 2**20)
