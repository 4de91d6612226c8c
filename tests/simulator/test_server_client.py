"""The API server driven by the real kubernetes-asyncio client (typed models, client-side validation on)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from simulator import objects
from simulator.resources import LEASES, NAMESPACES, NODES, PODS, VMIMS, VMIS
from tests.simulator.conftest import ADMIN_TOKEN, TOKEN, Served

KV = ("kubevirt.io", "v1")
MERGE = "application/merge-patch+json"


def configuration(served: Served, token: str | None = TOKEN) -> client.Configuration:
    cfg = client.Configuration(host=served.url)
    if token is not None:
        cfg.api_key = {"BearerToken": token}
        cfg.api_key_prefix = {"BearerToken": "Bearer"}
    if served.ca_path is not None:
        cfg.ssl_ca_cert = str(served.ca_path)
    assert cfg.client_side_validation
    return cfg


@pytest.fixture
async def api(served: Served) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(configuration(served)) as api_client:
        yield api_client


async def raw(served: Served, method: str, path: str, *, token: str | None = TOKEN,
              headers: dict[str, str] | None = None, body: Any = None) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers or {})
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    async with aiohttp.ClientSession() as session, session.request(
            method, served.url + path, headers=hdrs, data=data,
            ssl=not served.ca_path) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# ------------------------------------------------------------------------------------------------ auth
async def test_requests_without_or_with_a_wrong_token_are_unauthorized(served: Served) -> None:
    for token in (None, "wrong"):
        status, _, body = await raw(served, "GET", "/api/v1/nodes", token=token)
        assert status == 401
        assert json.loads(body) == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                                    "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
    async with client.ApiClient(configuration(served, token=None)) as anonymous:
        with pytest.raises(ApiException) as err:
            await client.CoreV1Api(anonymous).list_node()
    assert err.value.status == 401


async def test_version_and_health_need_no_token(served: Served) -> None:
    status, _, body = await raw(served, "GET", "/version?timeout=5s", token=None)
    assert status == 200
    version = json.loads(body)
    assert (version["major"], version["minor"]) == ("1", "32")
    assert version["gitVersion"].startswith("v1.32.")
    for path in ("/healthz", "/readyz", "/livez"):
        assert (await raw(served, "GET", path, token=None))[0] == 200


async def test_token_is_accepted_over_plain_http(make_served: Callable[..., Awaitable[Served]]) -> None:
    served = await make_served(tls=False)
    assert served.url.startswith("http://")
    async with client.ApiClient(configuration(served)) as api_client:
        nodes = await client.CoreV1Api(api_client).list_node()
    assert len(nodes.items) == 3


# ----------------------------------------------------------------------------------------------- reads
async def test_typed_lists_parse_every_builtin_kind(served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    store = served.cluster.store
    nodes = await core.list_node(label_selector="kubevirt.io/schedulable=true")
    assert sorted(n.metadata.name for n in nodes.items) == ["node-1", "node-2"]
    assert nodes.metadata.resource_version == str(store.rv)
    pods = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1,status.phase!=Succeeded",
                                                  limit=500)
    assert sorted(p.metadata.name for p in pods.items) == ["virt-handler-node-1", "virt-launcher-vm-a-abcd0"]
    assert all(p.spec.containers[0].name for p in pods.items)
    assert len((await core.list_namespace()).items) == 4
    events = await core.list_namespaced_event("default")
    assert {e.involved_object.name for e in events.items} == {"vm-a", "vm-b"}
    dsets = await client.AppsV1Api(api).list_daemon_set_for_all_namespaces()
    assert [d.status.number_ready for d in dsets.items] == [2]
    pdbs = await client.PolicyV1Api(api).list_namespaced_pod_disruption_budget("default")
    assert pdbs.items[0].spec.min_available == 1
    leases = await client.CoordinationV1Api(api).list_namespaced_lease("kube-node-lease")
    assert [le.spec.holder_identity for le in leases.items] == ["cp-1", "node-1", "node-2"]
    node = await core.read_node("node-1")
    assert next(c.status for c in node.status.conditions if c.type == "Ready") == "True"


async def test_get_missing_object_is_a_404_status(api: client.ApiClient) -> None:
    co = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as err:
        await co.get_namespaced_custom_object(*KV, "default", "virtualmachineinstancemigrations", "nope")
    assert err.value.status == 404
    status = json.loads(err.value.body)
    assert status["reason"] == "NotFound"
    assert status["message"] == 'virtualmachineinstancemigrations.kubevirt.io "nope" not found'


async def test_unsupported_field_selector_is_a_400(api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as err:
        await client.CoreV1Api(api).list_node(field_selector="spec.podCIDR=x")
    assert err.value.status == 400
    assert json.loads(err.value.body)["message"] == "field label not supported: spec.podCIDR"


# ---------------------------------------------------------------------------------------------- writes
async def test_cordon_and_uncordon_with_strategic_merge_patch(served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    node = await core.patch_node("node-1", {"spec": {"unschedulable": True}})
    assert node.spec.unschedulable is True
    assert served.cluster.store.require(NODES, None, "node-1")["spec"]["unschedulable"] is True
    await core.patch_node("node-1", {"spec": {"unschedulable": None}})
    assert "unschedulable" not in served.cluster.store.require(NODES, None, "node-1")["spec"]


async def test_status_patch_merges_conditions_by_type_and_only_changes_status(
        served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    patch = {"metadata": {"labels": {"ignored": "yes"}},
             "status": {"conditions": [{"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}}
    await core.patch_node_status("node-2", patch)
    node = served.cluster.store.require(NODES, None, "node-2")
    conditions = {c["type"]: c for c in node["status"]["conditions"]}
    assert len(conditions) == 4
    assert conditions["Ready"]["status"] == "False"
    assert conditions["Ready"]["message"] == "kubelet is posting ready status"  # merged, not replaced
    assert "ignored" not in node["metadata"]["labels"]


async def test_json_patch_list_applies_and_dict_body_is_rejected(served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    await core.patch_node("node-1", [{"op": "add", "path": "/metadata/labels/zone", "value": "a"}])
    assert served.cluster.store.require(NODES, None, "node-1")["metadata"]["labels"]["zone"] == "a"
    co = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as err:  # the generated client sends a dict as json-patch
        await co.patch_namespaced_custom_object(*KV, "default", "virtualmachineinstances", "vm-a",
                                                {"metadata": {"labels": {"x": "y"}}})
    assert err.value.status == 400
    assert "cannot unmarshal object into Go value of type jsonpatch.Patch" in err.value.body


async def test_strategic_merge_patch_on_a_custom_resource_is_415(served: Served) -> None:
    status, _, body = await raw(served, "PATCH", "/apis/kubevirt.io/v1/namespaces/default/"
                                "virtualmachineinstances/vm-a",
                                headers={"Content-Type": "application/strategic-merge-patch+json"},
                                body={"metadata": {"labels": {"x": "y"}}})
    assert status == 415
    assert json.loads(body)["message"].startswith("the body of the request was in an unknown format - "
                                                  "accepted media types include: application/json-patch+json, "
                                                  "application/merge-patch+json")


async def test_namespace_pod_and_event_lifecycle(served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    ns = await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team-a")))
    assert ns.status.phase == "Active"
    pod = await core.create_namespaced_pod("team-a", client.V1Pod(
        metadata=client.V1ObjectMeta(generate_name="worker-", labels={"app": "w"}),
        spec=client.V1PodSpec(containers=[client.V1Container(name="main", image="busybox")])))
    assert pod.metadata.name.startswith("worker-") and len(pod.metadata.name) == len("worker-") + 5
    assert pod.status.phase == "Pending"
    assert pod.metadata.uid and pod.metadata.creation_timestamp
    event = await core.create_namespaced_event("team-a", client.CoreV1Event(
        metadata=client.V1ObjectMeta(name="worker.1"), reason="Scheduled", message="placed", type="Normal",
        involved_object=client.V1ObjectReference(kind="Pod", name=pod.metadata.name, namespace="team-a")))
    assert event.metadata.resource_version
    deleted = await core.delete_namespaced_pod(pod.metadata.name, "team-a")
    assert deleted.metadata.name == pod.metadata.name  # pods answer with the object
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod(pod.metadata.name, "team-a")
    assert err.value.status == 404
    status = await core.delete_namespace("team-a", propagation_policy="Background")
    assert status.status == "Success"  # an immediate deletion of most built-ins answers a Status


async def test_dry_run_create_stores_nothing(served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    created = await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="dry")),
                                          dry_run="All")
    assert created.metadata.name == "dry"
    assert served.cluster.store.get(NAMESPACES, None, "dry") is None


async def test_put_with_a_stale_resource_version_conflicts(api: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api)
    lease = await leases.read_namespaced_lease("node-1", "kube-node-lease")
    lease.spec.lease_duration_seconds = 41
    updated = await leases.replace_namespaced_lease("node-1", "kube-node-lease", lease)
    assert int(updated.metadata.resource_version) > int(lease.metadata.resource_version)
    lease.spec.lease_duration_seconds = 42
    with pytest.raises(ApiException) as err:
        await leases.replace_namespaced_lease("node-1", "kube-node-lease", lease)
    assert err.value.status == 409
    assert json.loads(err.value.body)["reason"] == "Conflict"


async def test_delete_precondition_mismatch_conflicts(served: Served, api: client.ApiClient) -> None:
    with pytest.raises(ApiException) as err:
        await client.CoordinationV1Api(api).delete_namespaced_lease(
            "node-2", "kube-node-lease", body=client.V1DeleteOptions(
                preconditions=client.V1Preconditions(resource_version="1")))
    assert err.value.status == 409
    assert served.cluster.store.get(LEASES, "kube-node-lease", "node-2") is not None


async def test_custom_objects_crud_with_merge_patch(served: Served, api: client.ApiClient) -> None:
    co = client.CustomObjectsApi(api)
    vmis = await co.list_cluster_custom_object(*KV, "virtualmachineinstances")
    assert [v["metadata"]["name"] for v in vmis["items"]] == ["vm-a", "vm-b"]
    kv = await co.list_namespaced_custom_object(*KV, "kubevirt", "kubevirts")
    assert kv["items"][0]["spec"]["configuration"]["migrations"]["parallelMigrationsPerCluster"] == 5
    body = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "mig-1", "labels": {"drain": "node-1"}},
            "spec": {"vmiName": "vm-a"}, "status": {"phase": "Succeeded"}}
    created = await co.create_namespaced_custom_object(*KV, "default", "virtualmachineinstancemigrations", body)
    assert "status" not in created  # status is ignored on create when the kind has a status subresource
    patched = await co.patch_namespaced_custom_object(
        *KV, "default", "virtualmachineinstancemigrations", "mig-1",
        {"metadata": {"annotations": {"attempt": "1"}}, "status": {"phase": "Failed"}}, _content_type=MERGE)
    assert patched["metadata"]["annotations"] == {"attempt": "1"}
    assert "status" not in patched  # the main resource does not write status
    await co.patch_namespaced_custom_object_status(*KV, "default", "virtualmachineinstancemigrations", "mig-1",
                                                   {"status": {"phase": "Running"}}, _content_type=MERGE)
    got = await co.get_namespaced_custom_object_status(*KV, "default", "virtualmachineinstancemigrations",
                                                       "mig-1")
    assert got["status"] == {"phase": "Running"}
    listed = await co.list_namespaced_custom_object(*KV, "default", "virtualmachineinstancemigrations",
                                                    label_selector="drain=node-1")
    assert [m["metadata"]["name"] for m in listed["items"]] == ["mig-1"]
    deleted = await co.delete_namespaced_custom_object(
        *KV, "default", "virtualmachineinstancemigrations", "mig-1",
        body=client.V1DeleteOptions(propagation_policy="Background"))
    assert deleted["metadata"]["name"] == "mig-1"
    assert served.cluster.store.get(VMIMS, "default", "mig-1") is None


async def test_eviction_is_routed_to_the_cluster(served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)

    def eviction(name: str) -> client.V1Eviction:
        return client.V1Eviction(metadata=client.V1ObjectMeta(name=name, namespace="default"),
                                 delete_options=client.V1DeleteOptions(grace_period_seconds=30))

    with pytest.raises(ApiException) as err:
        await core.create_namespaced_pod_eviction("virt-launcher-vm-a-abcd0", "default",
                                                  eviction("virt-launcher-vm-a-abcd0"))
    assert err.value.status == 429
    status = json.loads(err.value.body)
    assert status["reason"] == "TooManyRequests"
    assert status["details"]["causes"][0]["reason"] == "DisruptionBudget"
    await core.create_namespaced_pod_eviction("virt-launcher-vm-b-abcd1", "default",
                                              eviction("virt-launcher-vm-b-abcd1"))
    assert served.cluster.store.get(PODS, "default", "virt-launcher-vm-b-abcd1") is None
    plural, ns, name, sub, method, body = served.cluster.subresource_calls[-1]
    assert (plural, ns, name, sub, method) == ("pods", "default", "virt-launcher-vm-b-abcd1", "eviction", "POST")
    assert body is not None and body["kind"] == "Eviction" and body["apiVersion"] == "policy/v1"
    assert body["deleteOptions"] == {"gracePeriodSeconds": 30}
    assert served.cluster.requests[("create", "pods/eviction")] == 2


# ----------------------------------------------------------------------------------------------- watch
async def test_watch_that_gets_410_relists_and_resumes(make_served: Callable[..., Awaitable[Served]]) -> None:
    served = await make_served(history=5)
    store = served.cluster.store
    async with client.ApiClient(configuration(served)) as api_client:
        core = client.CoreV1Api(api_client)
        stale_rv = (await core.list_node()).metadata.resource_version
        for i in range(8):  # push the listed version out of the tiny history
            store.mutate(NODES, None, "node-2", lambda o, i=i: o["metadata"]["labels"].update(bump=str(i)))
        w = watch.Watch()
        with pytest.raises(ApiException) as err:
            async for _ in w.stream(core.list_node, resource_version=stale_rv, timeout_seconds=5):
                pass
        assert err.value.status == 410
        relisted = await core.list_node()
        rv = relisted.metadata.resource_version

        async def change_later() -> None:
            await asyncio.sleep(0.2)
            store.mutate(NODES, None, "node-1", lambda o: o["spec"].update(unschedulable=True))

        changer = asyncio.create_task(change_later())
        seen = []
        async with watch.Watch() as w2:
            async for event in w2.stream(core.list_node, resource_version=rv, timeout_seconds=5):
                seen.append((event["type"], event["object"].metadata.name, event["object"].spec.unschedulable))
                break
        await changer
    assert seen == [("MODIFIED", "node-1", True)]


async def test_watch_with_selectors_reports_objects_leaving_and_entering(
        served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    store = served.cluster.store
    listed = await core.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-1",
                                                    label_selector="kubevirt.io=virt-launcher")
    assert [p.metadata.name for p in listed.items] == ["virt-launcher-vm-a-abcd0"]

    def relabel(value: str) -> Callable[[dict[str, Any]], None]:
        return lambda o: o["metadata"]["labels"].update({"kubevirt.io": value})

    async def changes() -> None:
        await asyncio.sleep(0.2)
        store.mutate(PODS, "default", "virt-launcher-vm-b-abcd1", relabel("other"))  # other node: unseen
        store.mutate(PODS, "default", "virt-launcher-vm-a-abcd0", relabel("other"))
        store.mutate(PODS, "default", "virt-launcher-vm-a-abcd0", relabel("virt-launcher"))

    task = asyncio.create_task(changes())
    events = []
    async with watch.Watch() as w:
        async for event in w.stream(core.list_pod_for_all_namespaces, field_selector="spec.nodeName=node-1",
                                    label_selector="kubevirt.io=virt-launcher",
                                    resource_version=listed.metadata.resource_version, timeout_seconds=5):
            events.append((event["type"], event["object"].metadata.name))
            if len(events) == 2:
                break
    await task
    assert events == [("DELETED", "virt-launcher-vm-a-abcd0"), ("ADDED", "virt-launcher-vm-a-abcd0")]


async def test_watch_without_version_replays_added_then_sends_bookmarks(
        served: Served, api: client.ApiClient) -> None:
    co = client.CustomObjectsApi(api)
    types = []
    async with watch.Watch() as w:
        async for event in w.stream(co.list_namespaced_custom_object, *KV, "default", "virtualmachineinstances",
                                    allow_watch_bookmarks=True, timeout_seconds=5):
            types.append(event["type"])
            if event["type"] == "BOOKMARK":
                assert event["raw_object"]["kind"] == "VirtualMachineInstance"
                assert event["raw_object"]["metadata"] == {"resourceVersion": str(served.cluster.store.rv)}
                break
    # The bookmark came before the watch's own timeout, which would have ended the stream without one.
    assert types == ["ADDED", "ADDED", "BOOKMARK"]


async def until(pred: Callable[[], bool]) -> None:
    """Yield to the server (it runs in this event loop) until `pred()` holds."""
    async with asyncio.timeout(30):
        while True:  # a state of the server's, polled: it offers no event to wait on
            if pred():
                return
            await asyncio.sleep(0.001)


def label_node(served: Served, value: str, node: str = "node-1") -> None:
    """A controller write to `node` (label probe=`value`), straight into the store."""
    served.cluster.store.mutate(NODES, None, node, lambda o: o["metadata"].setdefault("labels", {}).update(
        probe=value))


async def watch_events_after_open(served: Served, query: str) -> list[dict[str, Any]]:
    """Open a watch on nodes with `query`; once the server has registered it, change node-1; return the events
    of the stream, which must end on the server's side (nothing here closes it)."""
    store = served.cluster.store
    before = store.watcher_count()
    watching = asyncio.create_task(raw(served, "GET", f"/api/v1/nodes?watch=true&resourceVersion={store.rv}"
                                                      f"{query}"))
    await until(lambda: store.watcher_count() > before or watching.done())
    label_node(served, "after-open")
    async with asyncio.timeout(30):
        status, _, body = await watching
    assert status == 200
    assert store.watcher_count() == before
    return [json.loads(line) for line in body.decode().splitlines()]


async def test_watch_honours_timeout_seconds(served: Served) -> None:
    # Open until the change made after it opened (not ended at once), then ended by the server itself: no other
    # end is asked for.
    events = await watch_events_after_open(served, "&timeoutSeconds=1")
    assert [(e["type"], e["object"]["metadata"]["labels"].get("probe")) for e in events] == \
        [("MODIFIED", "after-open")]


async def test_watch_from_an_expired_version_streams_one_error_event(
        make_served: Callable[..., Awaitable[Served]]) -> None:
    served = await make_served(history=2)
    for i in range(5):
        served.cluster.store.mutate(NODES, None, "node-1", lambda o, i=i: o["metadata"]["labels"].update(n=str(i)))
    status, headers, body = await raw(served, "GET", "/api/v1/nodes?watch=1&resourceVersion=3")
    assert status == 200 and headers["Content-Type"] == "application/json"
    lines = body.decode().splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410 and event["object"]["reason"] == "Expired"


# ---------------------------------------------------------------------------------------- discovery
async def test_legacy_discovery_lists_kinds_and_subresources(served: Served) -> None:
    status, _, body = await raw(served, "GET", "/api/v1", headers={"Accept": "application/json, */*"})
    assert status == 200
    resources = {r["name"]: r for r in json.loads(body)["resources"]}
    assert resources["pods/eviction"]["group"] == "policy" and resources["pods/eviction"]["verbs"] == ["create"]
    assert resources["nodes"]["namespaced"] is False and "nodes/status" in resources
    status, _, body = await raw(served, "GET", "/apis")
    groups = {g["name"] for g in json.loads(body)["groups"]}
    assert {"apps", "policy", "coordination.k8s.io", "kubevirt.io", "apiextensions.k8s.io"} <= groups
    status, _, body = await raw(served, "GET", "/apis/kubevirt.io/v1")
    vmi = next(r for r in json.loads(body)["resources"] if r["name"] == "virtualmachineinstances")
    assert vmi["shortNames"] == ["vmi", "vmis"] and vmi["kind"] == "VirtualMachineInstance"


async def test_aggregated_discovery_when_accept_asks_for_it(served: Served) -> None:
    accept = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
              "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,application/json")
    status, headers, body = await raw(served, "GET", "/api?timeout=32s", headers={"Accept": accept})
    assert status == 200
    assert headers["Content-Type"] == "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    core = json.loads(body)["items"][0]
    assert "name" not in core["metadata"]
    pods = next(r for r in core["versions"][0]["resources"] if r["resource"] == "pods")
    assert {"subresource": "eviction", "responseKind": {"group": "policy", "version": "v1", "kind": "Eviction"},
            "verbs": ["create"]} in pods["subresources"]
    status, _, body = await raw(served, "GET", "/apis", headers={"Accept": accept})
    items = {i["metadata"]["name"]: i for i in json.loads(body)["items"]}
    vmim = next(r for r in items["kubevirt.io"]["versions"][0]["resources"]
                if r["resource"] == "virtualmachineinstancemigrations")
    assert vmim["scope"] == "Namespaced" and vmim["shortNames"] == ["vmim", "vmims"]
    root = await raw(served, "GET", "/openapi/v3")
    assert root[0] == 200 and "api/v1" in json.loads(root[2])["paths"]


async def test_table_output_for_nodes(served: Served) -> None:
    served.cluster.store.mutate(NODES, None, "node-1", lambda o: o["spec"].update(unschedulable=True))
    accept = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
    status, _, body = await raw(served, "GET", "/api/v1/nodes?limit=500", headers={"Accept": accept})
    table = json.loads(body)
    assert status == 200 and table["kind"] == "Table"
    assert [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0] == \
        ["Name", "Status", "Roles", "Age", "Version"]
    row = next(r for r in table["rows"] if r["cells"][0] == "node-1")
    assert row["cells"][1:3] == ["Ready,SchedulingDisabled", "worker"]
    assert row["object"]["kind"] == "PartialObjectMetadata" and row["object"]["metadata"]["name"] == "node-1"


# -------------------------------------------------------------------------------------- /sim and faults
async def test_faults_inject_errors_and_validate_their_body(served: Served, api: client.ApiClient) -> None:
    rule = {"errors": [{"verb": "list", "resource": "nodes", "code": 503, "count": 1}]}
    status, _, body = await raw(served, "POST", "/sim/v1/faults", token=ADMIN_TOKEN, body=rule)
    assert status == 200 and json.loads(body)["errors"][0]["code"] == 503
    core = client.CoreV1Api(api)
    with pytest.raises(ApiException) as err:
        await core.list_node()
    assert err.value.status == 503
    assert len((await core.list_node()).items) == 3  # count=1: only the first request fails
    status, _, body = await raw(served, "POST", "/sim/v1/faults", token=ADMIN_TOKEN, body={"errors": [{"rate": 2}]})
    assert status == 422
    assert "errors.0.rate" in json.loads(body)["message"]
    assert (await raw(served, "POST", "/sim/v1/faults", token=ADMIN_TOKEN, body=b"{not json"))[0] == 400
    status, _, body = await raw(served, "GET", "/sim/v1/faults", token=ADMIN_TOKEN)
    assert json.loads(body)["injected"] == 1
    status, _, body = await raw(served, "GET", "/sim/v1/stats", token=ADMIN_TOKEN)
    assert json.loads(body)["api_requests"]["list nodes"] == 2
    assert (await raw(served, "GET", "/sim/v1/scenario", token=ADMIN_TOKEN))[0] == 200
    assert (await raw(served, "GET", "/sim/v1/faults", token="wrong"))[0] == 401


async def test_ground_truth_answers_the_admin_token_only(served: Served) -> None:
    for method, path in (("GET", "/sim/v1/stats"), ("GET", "/sim/v1/scenario"), ("GET", "/sim/v1/faults"),
                         ("POST", "/sim/v1/faults")):
        for token in (TOKEN, None):
            status, _, body = await raw(served, method, path, token=token,
                                        body={"latency_ms": 1} if method == "POST" else None)
            expected = 403 if token == TOKEN else 401
            assert status == expected, (method, path, token, body)
            assert json.loads(body)["reason"] == ("Forbidden" if expected == 403 else "Unauthorized")
        assert (await raw(served, method, path, token=ADMIN_TOKEN,
                          body={"clear": True} if method == "POST" else None))[0] == 200
    assert served.cluster.faults.latency_ms == 0.0  # the refused POST changed nothing
    # The admin token is a cluster administrator too.
    assert (await raw(served, "GET", "/api/v1/nodes", token=ADMIN_TOKEN))[0] == 200


async def test_latency_fault_delays_requests(served: Served, api: client.ApiClient) -> None:
    assert (await raw(served, "POST", "/sim/v1/faults", token=ADMIN_TOKEN, body={"latency_ms": 300}))[0] == 200
    counted = served.cluster.requests[("get", "nodes")]
    reading = asyncio.create_task(client.CoreV1Api(api).read_node("node-1"))
    await until(lambda: served.cluster.requests[("get", "nodes")] > counted or reading.done())
    # The server counted the request and holds it before reading the store (without the delay both happen in
    # one step): a change made now is in its answer.
    label_node(served, "while-held")
    node = await reading
    assert node.metadata.labels["probe"] == "while-held"


async def test_dropping_watches_ends_open_streams(served: Served, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    rv = (await core.list_node()).metadata.resource_version

    async def drop_later() -> None:
        await asyncio.sleep(0.3)
        await raw(served, "POST", "/sim/v1/faults", token=ADMIN_TOKEN, body={"drop_watches": True})

    task = asyncio.create_task(drop_later())
    # Without the drop this watch would outlive the test's timeout: ending at all is the proof.
    async with watch.Watch() as w:
        events = [e async for e in w.stream(core.list_node, resource_version=rv, timeout_seconds=3600)]
    await task
    assert events == []


# --------------------------------------------------------------------------------------------- scale
async def test_listing_thirty_thousand_vmis(make_served: Callable[..., Awaitable[Served]]) -> None:
    # How long it takes is measured by `python -m bench.speed`, not asserted here.
    served = await make_served(tls=False)
    store = served.cluster.store
    template = objects.vmi("default", "x", node_name="node-1", memory_bytes=4 * objects.GiB, cpus=2,
                           cpu_model="Skylake", eviction_strategy="LiveMigrate", not_migratable_reason=None,
                           not_migratable_message=None, rwx=True, node_selector={}, labels={}, vm_uid=None,
                           now=time.time())
    for i in range(30_000):
        template["metadata"]["name"] = f"vm-{i:05d}"
        store.create(VMIS, template)
    for label, accept in (("list", "application/json"),
                          ("table", "application/json;as=Table;v=v1;g=meta.k8s.io,application/json")):
        # Pages of 500, as kubectl and informers ask for, all from the first page's snapshot.
        seen, pages, token = 0, 0, ""
        while True:
            status, _, body = await raw(served, "GET", "/apis/kubevirt.io/v1/virtualmachineinstances?limit=500"
                                        + (f"&continue={token}" if token else ""), headers={"Accept": accept})
            assert status == 200
            document = json.loads(body)
            got = len(document["items" if label == "list" else "rows"])
            assert got <= 500
            seen, pages = seen + got, pages + 1
            token = document["metadata"].get("continue")
            if not token:
                break
        assert (seen, pages) == (30_002, 61)


# ------------------------------------------------------------------------------------------ edge paths
async def test_unknown_paths_are_404_statuses(served: Served) -> None:
    for path in ("/apis/nope.example.com/v1/things", "/api/v1/things", "/api/v1/pods/no-namespace-given",
                 "/openapi/v2", "/nothing"):
        status, headers, body = await raw(served, "GET", path)
        assert status == 404, path
        assert headers["Content-Type"] == "application/json"
        assert json.loads(body)["reason"] == "NotFound"


async def test_unexpected_exception_is_a_500_status(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("stats exploded")

    monkeypatch.setattr(served.cluster, "stats", broken)
    status, _, body = await raw(served, "GET", "/sim/v1/stats", token=ADMIN_TOKEN)
    assert status == 500
    assert json.loads(body)["message"] == "Internal error occurred: stats exploded"
    assert b"\n" not in body


async def test_kubevirt_subresource_api_is_routed_to_the_cluster(served: Served) -> None:
    status, _, _ = await raw(served, "PUT", "/apis/subresources.kubevirt.io/v1/namespaces/default/"
                                "virtualmachineinstances/vm-a/evacuate/cancel", body={"dryRun": []})
    assert status == 404  # the fake cluster serves no such subresource; the real facade does
    assert served.cluster.subresource_calls[-1] == ("virtualmachineinstances", "default", "vm-a",
                                                    "evacuate/cancel", "PUT", {"dryRun": []})
    assert served.cluster.requests[("update", "virtualmachineinstances/evacuate/cancel")] == 1


async def test_send_initial_events_ends_with_an_annotated_bookmark(served: Served) -> None:
    status, _, body = await raw(served, "GET", "/api/v1/nodes?watch=true&sendInitialEvents=true&"
                                "allowWatchBookmarks=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1")
    assert status == 200
    events = [json.loads(line) for line in body.decode().splitlines()]
    assert [e["type"] for e in events[:4]] == ["ADDED", "ADDED", "ADDED", "BOOKMARK"]
    assert events[3]["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


async def test_watches_are_dropped_periodically_when_faulted(served: Served) -> None:
    faulted = await raw(served, "POST", "/sim/v1/faults", token=ADMIN_TOKEN, body={"drop_watches_every_s": 0.5})
    assert faulted[0] == 200
    # The watch has no timeout of its own: it ended because the fault dropped it, and not at once (it was still
    # open for the change made after it opened).
    events = await watch_events_after_open(served, "")
    assert [(e["type"], e["object"]["metadata"]["labels"].get("probe")) for e in events] == \
        [("MODIFIED", "after-open")]


async def test_custom_resource_update_needs_a_resource_version(api: client.ApiClient) -> None:
    co = client.CustomObjectsApi(api)
    vmi = await co.get_namespaced_custom_object(*KV, "default", "virtualmachineinstances", "vm-a")
    del vmi["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as err:
        await co.replace_namespaced_custom_object(*KV, "default", "virtualmachineinstances", "vm-a", vmi)
    assert err.value.status == 422
    assert "must be specified for an update" in json.loads(err.value.body)["message"]


# -------------------------------------------------------------------------------------------- paging
async def test_lists_page_with_limit_and_continue_from_one_snapshot(served: Served, api: client.ApiClient) -> None:
    store = served.cluster.store
    for i in range(5):
        store.create(VMIS, objects.vmi("default", f"page-{i}", node_name="node-1", memory_bytes=objects.GiB, cpus=1,
                                       cpu_model="Skylake", eviction_strategy=None, not_migratable_reason=None,
                                       not_migratable_message=None, rwx=True, node_selector={}, labels={},
                                       vm_uid=None, now=time.time()))
    path = "/apis/kubevirt.io/v1/virtualmachineinstances"
    status, _, body = await raw(served, "GET", f"{path}?limit=3")
    first = json.loads(body)
    assert status == 200 and len(first["items"]) == 3
    rv, token = first["metadata"]["resourceVersion"], first["metadata"]["continue"]
    assert first["metadata"]["remainingItemCount"] == 4
    # Changes after the first page do not show up in later pages: they are read at the first page's version.
    store.create(VMIS, objects.vmi("default", "page-late", node_name="node-1", memory_bytes=objects.GiB, cpus=1,
                                   cpu_model="Skylake", eviction_strategy=None, not_migratable_reason=None,
                                   not_migratable_message=None, rwx=True, node_selector={}, labels={}, vm_uid=None,
                                   now=time.time()))
    store.delete(VMIS, "default", "vm-b", grace_seconds=0)
    names = [o["metadata"]["name"] for o in first["items"]]
    while token:
        status, _, body = await raw(served, "GET", f"{path}?limit=3&continue={token}")
        page = json.loads(body)
        assert status == 200 and page["metadata"]["resourceVersion"] == rv
        names += [o["metadata"]["name"] for o in page["items"]]
        token = page["metadata"].get("continue")
    assert names == ["page-0", "page-1", "page-2", "page-3", "page-4", "vm-a", "vm-b"]
    # A selector: no remainingItemCount (the real server cannot count a filtered rest).
    status, _, body = await raw(served, "GET", "/api/v1/pods?limit=1&labelSelector=kubevirt.io%3Dvirt-launcher")
    assert "continue" in json.loads(body)["metadata"] and "remainingItemCount" not in json.loads(body)["metadata"]
    # The typed client pages too.
    core = client.CoreV1Api(api)
    one = await core.list_node(limit=1)
    rest = await core.list_node(limit=5, _continue=one.metadata._continue)
    assert [n.metadata.name for n in [*one.items, *rest.items]] == ["cp-1", "node-1", "node-2"]
    assert rest.metadata._continue is None


async def test_a_bad_or_expired_continue_token_is_refused(make_served: Callable[..., Awaitable[Served]]) -> None:
    served = await make_served(history=20)
    status, _, body = await raw(served, "GET", "/api/v1/nodes?limit=1")
    token = json.loads(body)["metadata"]["continue"]
    assert (await raw(served, "GET", f"/api/v1/nodes?limit=1&continue={token}&resourceVersion=1"))[0] == 400
    status, _, body = await raw(served, "GET", "/api/v1/nodes?limit=1&continue=bm90LWEtdG9rZW4")
    assert status == 400 and "continue key is not valid" in json.loads(body)["message"]
    for i in range(30):  # push the first page's version out of the history (etcd compaction)
        served.cluster.store.create(LEASES, {"metadata": {"name": f"l-{i}", "namespace": "kube-node-lease"},
                                             "spec": {"holderIdentity": "x"}})
    status, _, body = await raw(served, "GET", f"/api/v1/nodes?limit=1&continue={token}")
    assert status == 410
    assert json.loads(body)["reason"] == "Expired"
    assert "too old to display a consistent list result" in json.loads(body)["message"]


async def test_protobuf_bodies_of_other_kinds_are_unsupported_media(served: Served) -> None:
    from simulator.protobuf import encode_for_tests

    body = encode_for_tests("v1", "Pod", name="p1")
    status, _, reply = await raw(served, "POST", "/api/v1/namespaces/default/pods", body=body,
                                 headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
    assert status == 415 and json.loads(reply)["reason"] == "UnsupportedMediaType"
    body = encode_for_tests("v1", "Namespace", name="from-proto", labels={"team": "a"})
    status, _, reply = await raw(served, "POST", "/api/v1/namespaces", body=body,
                                 headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
    assert status == 201, reply
    assert json.loads(reply)["metadata"]["labels"] == {"team": "a", "kubernetes.io/metadata.name": "from-proto"}
    status, _, reply = await raw(served, "POST", "/api/v1/namespaces", body=b"k8s\x00\x0a\xff",
                                 headers={"Content-Type": "application/vnd.kubernetes.protobuf"})
    assert status == 400
