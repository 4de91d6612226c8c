"""RBAC in the simulated API server, over HTTP: ServiceAccount tokens and kube-apiserver's authorizer rules."""

from __future__ import annotations

import json
from typing import Any

from simulator.resources import SERVICEACCOUNTS
from tests.simulator.conftest import TOKEN, Served
from tests.simulator.test_server_client import raw

RBAC = "/apis/rbac.authorization.k8s.io/v1"


async def _create(served: Served, path: str, body: dict[str, Any]) -> None:
    status, _, reply = await raw(served, "POST", path, body=body)
    assert status == 201, reply


async def _token(served: Served, namespace: str, name: str) -> str:
    await _create(served, f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": name}})
    status, _, reply = await raw(served, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
                                 body={"spec": {"expirationSeconds": 3600}})
    assert status == 201, reply
    review = json.loads(reply)
    assert review["kind"] == "TokenRequest" and review["status"]["expirationTimestamp"]
    token: str = review["status"]["token"]
    return token


async def _setup(served: Served) -> str:
    token = await _token(served, "default", "robot")
    await _create(served, f"{RBAC}/clusterroles", {"metadata": {"name": "reader"}, "rules": [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]},
        {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
        {"apiGroups": ["kubevirt.io"], "resources": ["*"], "verbs": ["list"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get"],
         "resourceNames": ["node-1"]}]})
    await _create(served, f"{RBAC}/clusterrolebindings", {
        "metadata": {"name": "robot-reader"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                          "kind": "ClusterRole", "name": "reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": "default"}]})
    await _create(served, f"{RBAC}/namespaces/kube-system/roles", {"metadata": {"name": "events"}, "rules": [
        {"apiGroups": [""], "resources": ["events"], "verbs": ["*"]}]})
    await _create(served, f"{RBAC}/namespaces/kube-system/rolebindings", {
        "metadata": {"name": "robot-events"}, "roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                                          "kind": "Role", "name": "events"},
        "subjects": [{"kind": "Group", "name": "system:serviceaccounts:default"}]})
    return token


async def test_a_service_account_token_is_held_to_its_bindings(served: Served) -> None:
    token = await _setup(served)

    async def status(method: str, path: str, body: Any = None) -> int:
        return (await raw(served, method, path, token=token, body=body))[0]

    assert await status("GET", "/api/v1/nodes") == 200
    assert await status("GET", "/api/v1/nodes/node-1") == 200
    assert await status("GET", "/api/v1/nodes?watch=true&timeoutSeconds=0") == 403  # watch is its own verb
    assert await status("DELETE", "/api/v1/nodes/node-1") == 403
    assert await status("GET", "/apis/kubevirt.io/v1/virtualmachineinstances") == 200  # resources: ["*"]
    assert await status("GET", "/apis/kubevirt.io/v1/namespaces/default/virtualmachineinstances/vm-a") == 403
    # A subresource is granted by its own name; the parent grants nothing.
    assert await status("GET", "/api/v1/namespaces/default/pods") == 403
    assert await status("POST", "/api/v1/namespaces/default/pods/virt-launcher-vm-b-abcd1/eviction",
                        {"metadata": {"name": "virt-launcher-vm-b-abcd1"}}) == 201
    # resourceNames restrict to the named objects.
    assert await status("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-1") == 200
    assert await status("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/node-2") == 403
    # A RoleBinding grants in its namespace only; a Group subject matches the account's groups.
    assert await status("GET", "/api/v1/namespaces/kube-system/events") == 200
    assert await status("GET", "/api/v1/namespaces/default/events") == 403
    assert await status("GET", "/api/v1/events") == 403
    # Discovery and the OpenAPI documents are open to every authenticated user; the ground truth is not.
    assert await status("GET", "/apis") == 200 and await status("GET", "/openapi/v3") == 200
    assert await status("GET", "/sim/v1/stats") == 403
    # kube-apiserver's words.
    code, _, reply = await raw(served, "DELETE", "/api/v1/nodes/node-2", token=token)
    assert code == 403 and json.loads(reply) == {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 403,
        "reason": "Forbidden", "details": {"kind": "nodes", "name": "node-2"},
        "message": 'nodes "node-2" is forbidden: User "system:serviceaccount:default:robot" cannot delete resource '
                   '"nodes" in API group "" at the cluster scope'}
    code, _, reply = await raw(served, "GET", "/api/v1/namespaces/default/events", token=token)
    assert code == 403
    assert json.loads(reply)["message"] == ('events is forbidden: User "system:serviceaccount:default:robot" cannot '
                                            'list resource "events" in API group "" in the namespace "default"')
    assert ("system:serviceaccount:default:robot", "delete", "nodes", None) in served.cluster.forbidden
    # The cluster token stays an administrator.
    assert (await raw(served, "DELETE", "/api/v1/namespaces/default/events/nothing", token=TOKEN))[0] == 404


async def test_self_subject_access_review_answers_for_the_caller(served: Served) -> None:
    token = await _setup(served)

    async def can(verb: str, resource: str, namespace: str = "", group: str = "") -> bool:
        status, _, reply = await raw(served, "POST", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                                     token=token, body={"spec": {"resourceAttributes": {
                                         "verb": verb, "resource": resource, "namespace": namespace,
                                         "group": group}}})
        assert status == 201, reply
        allowed: bool = json.loads(reply)["status"]["allowed"]
        return allowed

    assert await can("list", "nodes") and not await can("patch", "nodes")
    assert await can("delete", "events", "kube-system") and not await can("delete", "events", "default")


async def test_a_token_dies_with_its_service_account(served: Served) -> None:
    token = await _setup(served)
    assert (await raw(served, "GET", "/api/v1/nodes", token=token))[0] == 200
    served.cluster.store.delete(SERVICEACCOUNTS, "default", "robot", grace_seconds=0)
    assert (await raw(served, "GET", "/api/v1/nodes", token=token))[0] == 401
    status, _, reply = await raw(served, "POST", "/api/v1/namespaces/default/serviceaccounts/nobody/token",
                                 body={"spec": {}})
    assert status == 404
    await _create(served, "/api/v1/namespaces/default/serviceaccounts", {"metadata": {"name": "short"}})
    status, _, reply = await raw(served, "POST", "/api/v1/namespaces/default/serviceaccounts/short/token",
                                 body={"spec": {"expirationSeconds": 60}})
    assert status == 422 and "less than 10 minutes" in json.loads(reply)["message"]
