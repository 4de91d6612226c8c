"""The API server driven by the real kubectl binary (v1.32 through the installed dispatcher)."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from simulator.resources import NAMESPACES, NODES, PODS, VMIMS, VMIS, Registry
from tests.simulator.conftest import Kubectl, Served

VMIM_YAML = """\
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata:
  name: mig-created
  namespace: default
spec:
  vmiName: vm-a
"""

CRD_YAML = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.example.com
spec:
  group: example.com
  scope: Namespaced
  names:
    plural: widgets
    singular: widget
    kind: Widget
    shortNames: [wd]
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        x-kubernetes-preserve-unknown-fields: true
    subresources:
      status: {}
    selectableFields:
    - jsonPath: .spec.color
    additionalPrinterColumns:
    - name: Color
      type: string
      jsonPath: .spec.color
    - name: Size
      type: integer
      jsonPath: .spec.size
    - name: Age
      type: date
      jsonPath: .metadata.creationTimestamp
"""


def widget_yaml(color: str, size: int) -> str:
    return f"""\
apiVersion: example.com/v1
kind: Widget
metadata:
  name: w1
spec:
  color: {color}
  size: {size}
"""


def table(stdout: str) -> list[list[str]]:
    """kubectl's table output split into cells (columns are separated by 2+ spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.strip().splitlines()]


async def test_get_nodes_prints_the_real_columns(served: Served, kubectl: Kubectl) -> None:
    served.cluster.store.mutate(NODES, None, "node-2", lambda o: o["spec"].update(unschedulable=True))
    result = await kubectl("get", "nodes")
    assert result.rc == 0, result.stderr
    rows = table(result.stdout)
    assert rows[0] == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    by_name = {r[0]: r for r in rows[1:]}
    assert by_name["node-1"][1:3] == ["Ready", "worker"]
    assert by_name["node-2"][1] == "Ready,SchedulingDisabled"
    assert by_name["cp-1"][2] == "control-plane"
    assert all(r[4] == "v1.32.4" for r in rows[1:])
    assert all(r[3].endswith("s") for r in rows[1:])  # ages by the cluster clock: seconds old


async def test_get_vmi_all_namespaces_prints_kubevirt_columns(kubectl: Kubectl) -> None:
    result = await kubectl("get", "vmi", "-A")
    assert result.rc == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAMESPACE", "NAME", "AGE", "PHASE", "IP", "NODENAME", "READY"]
    assert lines[1].split()[:2] == ["default", "vm-a"]
    assert lines[1].split()[3:] == ["Running", "node-1", "True"]  # no interfaces reported: IP is blank
    wide = await kubectl("get", "vmis", "-A", "-o", "wide")
    assert wide.stdout.splitlines()[0].split()[-2:] == ["LIVE-MIGRATABLE", "PAUSED"]


async def test_get_pods_wide_and_other_kinds(kubectl: Kubectl) -> None:
    pods = await kubectl("get", "pods", "-o", "wide")
    assert pods.rc == 0, pods.stderr
    rows = table(pods.stdout)
    assert rows[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "NOMINATED NODE",
                       "READINESS GATES"]
    assert rows[1][:3] == ["virt-launcher-vm-a-abcd0", "1/1", "Running"]
    assert rows[1][5:7] == ["10.128.0.10", "node-1"]
    events = await kubectl("get", "events")
    assert table(events.stdout)[0] == ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    assert table(events.stdout)[1][1:] == ["Normal", "Started", "virtualmachineinstance/vm-a", "VMI started"]
    pdb = await kubectl("get", "pdb")
    assert table(pdb.stdout) == [["NAME", "MIN AVAILABLE", "MAX UNAVAILABLE", "ALLOWED DISRUPTIONS", "AGE"],
                                 ["pdb-a", "1", "N/A", "0", table(pdb.stdout)[1][4]]]
    kv = await kubectl("get", "kv", "-n", "kubevirt")
    assert table(kv.stdout)[1][0::2] == ["kubevirt", "Deployed"]


async def test_get_missing_object_reports_not_found(kubectl: Kubectl) -> None:
    result = await kubectl("get", "vmim", "nope")
    assert result.rc == 1
    assert 'virtualmachineinstancemigrations.kubevirt.io "nope" not found' in result.stderr


async def test_get_vmim_watch_prints_events_as_they_happen(served: Served, kubectl: Kubectl) -> None:
    store = served.cluster.store
    proc = await kubectl.start("get", "vmim", "-A", "-w")
    assert proc.stdout is not None
    try:
        await asyncio.sleep(1.0)  # let kubectl list and open its watch
        store.create(VMIMS, {"metadata": {"name": "mig-w", "namespace": "default"}, "spec": {"vmiName": "vm-a"},
                             "status": {"phase": "Pending"}})
        first = await asyncio.wait_for(proc.stdout.readline(), 15)
        store.mutate(VMIMS, "default", "mig-w", lambda o: o["status"].update(phase="Running"))
        lines = [first]
        while len(lines) < 3:
            lines.append(await asyncio.wait_for(proc.stdout.readline(), 15))
    finally:
        proc.kill()
        await proc.wait()
    for _ in range(50):  # the server notices the client went away and closes its watch
        if store.watcher_count() == 0:
            break
        await asyncio.sleep(0.1)
    assert store.watcher_count() == 0
    rows = [line.decode().split() for line in lines]
    assert rows[0] == ["NAMESPACE", "NAME", "PHASE", "VMI"]
    assert rows[1:] == [["default", "mig-w", "Pending", "vm-a"], ["default", "mig-w", "Running", "vm-a"]]
    assert served.cluster.requests[("watch", "virtualmachineinstancemigrations")] == 1


async def test_cordon_and_uncordon_change_the_node(served: Served, kubectl: Kubectl) -> None:
    store = served.cluster.store
    result = await kubectl("cordon", "node-1")
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == "node/node-1 cordoned"
    assert store.require(NODES, None, "node-1")["spec"]["unschedulable"] is True
    result = await kubectl("uncordon", "node-1")
    assert result.rc == 0, result.stderr
    assert result.stdout.strip() == "node/node-1 uncordoned"
    assert "unschedulable" not in store.require(NODES, None, "node-1")["spec"]
    assert served.cluster.requests[("patch", "nodes")] == 2


async def test_get_pods_json_matches_the_store(served: Served, kubectl: Kubectl) -> None:
    result = await kubectl("get", "pods", "-A", "-o", "json")
    assert result.rc == 0, result.stderr
    listed = json.loads(result.stdout)
    assert listed["kind"] == "List"
    names = sorted(p["metadata"]["name"] for p in listed["items"])
    assert names == sorted(p["metadata"]["name"] for p in served.cluster.store.list(PODS))


async def test_create_patch_and_delete_a_migration(served: Served, kubectl: Kubectl) -> None:
    store = served.cluster.store
    created = await kubectl("create", "--validate=false", "-f", "-", stdin=VMIM_YAML)
    assert created.rc == 0, created.stderr
    assert created.stdout.strip() == "virtualmachineinstancemigration.kubevirt.io/mig-created created"
    assert store.require(VMIMS, "default", "mig-created")["spec"] == {"vmiName": "vm-a"}
    patched = await kubectl("patch", "vmim", "mig-created", "--type=merge", "-p",
                            '{"metadata":{"labels":{"drain":"node-1"}}}')
    assert patched.rc == 0, patched.stderr
    assert store.require(VMIMS, "default", "mig-created")["metadata"]["labels"] == {"drain": "node-1"}
    strategic = await kubectl("patch", "vmim", "mig-created", "-p", '{"metadata":{"labels":{"x":"y"}}}')
    assert strategic.rc != 0
    assert "UnsupportedMediaType" in strategic.stderr or "unknown format" in strategic.stderr
    deleted = await kubectl("delete", "vmim", "mig-created")
    assert deleted.rc == 0, deleted.stderr
    assert 'virtualmachineinstancemigration.kubevirt.io "mig-created" deleted' in deleted.stdout
    assert store.get(VMIMS, "default", "mig-created") is None


async def test_delete_waits_until_the_finalizer_is_gone(served: Served, kubectl: Kubectl) -> None:
    store = served.cluster.store
    store.create(VMIMS, {"metadata": {"name": "mig-f", "namespace": "default",
                                      "finalizers": ["kubevirt.io/migrationJobFinalize"]},
                         "spec": {"vmiName": "vm-b"}})
    proc = await kubectl.start("delete", "vmim", "mig-f", "--timeout=30s")
    try:
        for _ in range(50):
            await asyncio.sleep(0.1)
            if store.require(VMIMS, "default", "mig-f")["metadata"].get("deletionTimestamp"):
                break
        await asyncio.sleep(0.5)
        assert proc.returncode is None  # still waiting for the object to go
        store.mutate(VMIMS, "default", "mig-f", lambda o: o["metadata"].update(finalizers=[]))
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert 'virtualmachineinstancemigration.kubevirt.io "mig-f" deleted' in out.decode()
    assert store.get(VMIMS, "default", "mig-f") is None


async def test_apply_crd_then_custom_resource(served: Served, kubectl: Kubectl) -> None:
    registry: Registry = served.cluster.registry
    applied = await kubectl("apply", "--validate=false", "-f", "-", stdin=CRD_YAML)
    assert applied.rc == 0, applied.stderr
    assert applied.stdout.strip() == "customresourcedefinition.apiextensions.k8s.io/widgets.example.com created"
    widgets = registry.find("example.com", "v1", "widgets")
    assert widgets is not None and widgets.field_selectors[-1] == "spec.color"
    first = await kubectl("apply", "--validate=false", "-f", "-", stdin=widget_yaml("red", 3))
    assert first.rc == 0, first.stderr
    assert first.stdout.strip() == "widget.example.com/w1 created"
    again = await kubectl("apply", "--validate=false", "-f", "-", stdin=widget_yaml("blue", 4))
    assert again.rc == 0, again.stderr
    assert again.stdout.strip() == "widget.example.com/w1 configured"
    stored = served.cluster.store.require(widgets, "default", "w1")
    assert stored["spec"] == {"color": "blue", "size": 4}
    assert "kubectl.kubernetes.io/last-applied-configuration" in stored["metadata"]["annotations"]
    listed = await kubectl("get", "wd")
    assert table(listed.stdout)[0] == ["NAME", "COLOR", "SIZE", "AGE"]
    assert table(listed.stdout)[1][:3] == ["w1", "blue", "4"]
    selected = await kubectl("get", "widgets", "--field-selector=spec.color=red", "-o", "name")
    assert selected.rc == 0, selected.stderr
    assert selected.stdout.strip() == ""
    removed = await kubectl("delete", "crd", "widgets.example.com")
    assert removed.rc == 0, removed.stderr
    assert registry.find("example.com", "v1", "widgets") is None


async def test_api_resources_lists_core_and_kubevirt_kinds(kubectl: Kubectl) -> None:
    result = await kubectl("api-resources")
    assert result.rc == 0, result.stderr
    rows: dict[str, Any] = {r[0]: r for r in table(result.stdout)[1:]}
    assert rows["virtualmachineinstances"] == ["virtualmachineinstances", "vmi,vmis", "kubevirt.io/v1", "true",
                                               "VirtualMachineInstance"]
    assert rows["virtualmachineinstancemigrations"][1] == "vmim,vmims"
    assert rows["nodes"] == ["nodes", "no", "v1", "false", "Node"]
    assert rows["poddisruptionbudgets"][2] == "policy/v1"
    assert "pods/eviction" not in rows  # subresources are not listed by kubectl


async def test_vmi_table_reflects_store_changes(served: Served, kubectl: Kubectl) -> None:
    served.cluster.store.mutate(VMIS, "default", "vm-b", lambda o: o["status"].update(
        phase="Failed", interfaces=[{"name": "default", "ipAddress": "10.0.9.9"}]))
    result = await kubectl("get", "vmi", "vm-b")
    assert result.rc == 0, result.stderr
    assert table(result.stdout)[1][2:5] == ["Failed", "10.0.9.9", "node-2"]


# ------------------------------------------------------------------ kubectl without --validate=false, paging
async def test_create_and_apply_validate_against_the_served_openapi(served: Served, kubectl: Kubectl) -> None:
    """kubectl finds fieldValidation on each kind's PATCH in /openapi/v3 and leaves validation to the server."""
    created = await kubectl("create", "-f", "-", stdin=VMIM_YAML)
    assert created.rc == 0, created.stderr
    assert served.cluster.store.require(VMIMS, "default", "mig-created")["spec"] == {"vmiName": "vm-a"}
    applied = await kubectl("apply", "-f", "-", stdin=CRD_YAML)
    assert applied.rc == 0, applied.stderr
    # A kind served from a CRD created a moment ago is in the documents too.
    first = await kubectl("apply", "-f", "-", stdin=widget_yaml("red", 3))
    assert first.rc == 0, first.stderr
    again = await kubectl("apply", "-f", "-", stdin=widget_yaml("blue", 4))
    assert again.rc == 0 and again.stdout.strip() == "widget.example.com/w1 configured", again.stderr
    registry: Registry = served.cluster.registry
    widgets = registry.find("example.com", "v1", "widgets")
    assert widgets is not None
    assert served.cluster.store.require(widgets, "default", "w1")["spec"] == {"color": "blue", "size": 4}
    explained = await kubectl("get", "--raw", "/openapi/v3")
    assert "apis/kubevirt.io/v1" in json.loads(explained.stdout)["paths"]


async def test_create_namespace_sends_protobuf_and_works(served: Served, kubectl: Kubectl) -> None:
    created = await kubectl("create", "namespace", "team-a")
    assert created.rc == 0, created.stderr
    assert created.stdout.strip() == "namespace/team-a created"
    ns = served.cluster.store.require(NAMESPACES, None, "team-a")
    assert ns["metadata"]["labels"] == {"kubernetes.io/metadata.name": "team-a"}
    assert ns["status"]["phase"] == "Active"
    again = await kubectl("create", "namespace", "team-a")
    assert again.rc != 0 and 'namespaces "team-a" already exists' in again.stderr


async def test_get_pages_through_lists_in_chunks(served: Served, kubectl: Kubectl) -> None:
    chunked = await kubectl("get", "pods", "-A", "--chunk-size=1", "-o", "name")
    assert chunked.rc == 0, chunked.stderr
    assert sorted(chunked.stdout.split()) == sorted(f"pod/{p['metadata']['name']}"
                                                    for p in served.cluster.store.list(PODS))
    assert served.cluster.requests[("list", "pods")] == len(served.cluster.store.list(PODS))
