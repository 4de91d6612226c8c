"""OpenAPI v3 documents for the kinds the simulator serves, enough for kubectl's validation.

kubectl (v1.32, `--validate=strict` by default) asks `/openapi/v3` for the group-version of each object it
creates or applies and looks, in that document, for a PATCH operation tagged with the object's
`x-kubernetes-group-version-kind` that takes the `fieldValidation` query parameter (client-go
`resource.QueryParamVerifierV3`). When it finds one it leaves validation to the server and sends
`fieldValidation=Strict`; without any document it refuses to go on unless given `--validate=false`.

So the documents describe every served path and verb with the query parameters the real server documents for
them (dryRun, fieldManager, fieldValidation; the list parameters), tagged with their kind, as kube-apiserver's
do, and nothing more: no schemas (`components.schemas` is empty), and no strategic-merge-patch request body, so
`kubectl apply` computes its patch from the built-in types or a JSON merge patch, as for a CRD without a
schema. They are built from the registry on each request, so kinds served from a CRD appear as soon as the CRD
is created.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from simulator.resources import Registry, ResourceType

Obj = dict[str, Any]
_KUBE_VERSION = "v1.32.4"


def group_version_path(group: str, version: str) -> str:
    """The root document's key for a group-version: `api/v1`, `apis/kubevirt.io/v1`."""
    return f"api/{version}" if not group else f"apis/{group}/{version}"


def _param(name: str, description: str, kind: str = "string") -> Obj:
    return {"name": name, "in": "query", "description": description, "schema": {"type": kind, "uniqueItems": True}}


_DRY_RUN = _param("dryRun", "When present, indicates that modifications should not be persisted.")
_FIELD_MANAGER = _param("fieldManager", "a name associated with the actor or entity that is making these changes.")
_FIELD_VALIDATION = _param("fieldValidation", "instructs the server on how to handle objects in the request "
                                              "(POST/PUT/PATCH) containing unknown or duplicate fields: Ignore, "
                                              "Warn or Strict.")
_LIST = [_param("labelSelector", "A selector to restrict the list of returned objects by their labels."),
         _param("fieldSelector", "A selector to restrict the list of returned objects by their fields."),
         _param("limit", "limit is a maximum number of responses to return for a list call.", "integer"),
         _param("continue", "The continue option should be set when retrieving more results from the server."),
         _param("resourceVersion", "resourceVersion sets a constraint on what resource versions a request may be "
                                   "served from."),
         _param("watch", "Watch for changes to the described resources.", "boolean")]
_PATH_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "uniqueItems": True}}
_PATH_NAMESPACE = {"name": "namespace", "in": "path", "required": True,
                   "schema": {"type": "string", "uniqueItems": True}}
_WRITE = [_DRY_RUN, _FIELD_MANAGER, _FIELD_VALIDATION]
_RESPONSES = {"200": {"description": "OK"}, "401": {"description": "Unauthorized"}}


def _operation(rt: ResourceType, action: str, verb: str, params: list[Obj]) -> Obj:
    gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
    op_id = f"{verb}{rt.kind}"
    op: Obj = {"operationId": op_id, "parameters": params, "responses": _RESPONSES,
               "x-kubernetes-action": action, "x-kubernetes-group-version-kind": gvk}
    if action in ("post", "put", "patch"):
        types = ["application/json-patch+json", "application/merge-patch+json", "application/apply-patch+yaml"] \
            if action == "patch" else ["application/json", "application/yaml"]
        op["requestBody"] = {"content": {t: {"schema": {"type": "object"}} for t in types}, "required": True}
    return op


def _paths(rt: ResourceType) -> dict[str, Obj]:
    base = "/api/" + rt.version if not rt.group else f"/apis/{rt.group}/{rt.version}"
    scope = [_PATH_NAMESPACE] if rt.namespaced else []
    collection = f"{base}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{base}/{rt.plural}"
    item = f"{collection}/{{name}}"
    verbs = set(rt.verbs)
    paths: dict[str, Obj] = {}
    coll: Obj = {"parameters": scope}
    if "list" in verbs:
        coll["get"] = _operation(rt, "list", "list", _LIST)
    if "create" in verbs:
        coll["post"] = _operation(rt, "post", "create", _WRITE)
    if "deletecollection" in verbs:
        coll["delete"] = _operation(rt, "deletecollection", "deleteCollection", [_DRY_RUN, *_LIST])
    paths[collection] = coll
    one: Obj = {"parameters": [_PATH_NAME, *scope]}
    if "get" in verbs:
        one["get"] = _operation(rt, "get", "read", [])
    if "update" in verbs:
        one["put"] = _operation(rt, "put", "replace", _WRITE)
    if "patch" in verbs:
        one["patch"] = _operation(rt, "patch", "patch", [*_WRITE, _param("force", "Force is going to 'force' "
                                                                                  "Apply requests.", "boolean")])
    if "delete" in verbs:
        one["delete"] = _operation(rt, "delete", "delete", [_DRY_RUN])
    paths[item] = one
    if "status" in rt.subresources:
        paths[f"{item}/status"] = {
            "parameters": [_PATH_NAME, *scope],
            "get": _operation(rt, "get", "read", []),
            "put": _operation(rt, "put", "replace", _WRITE),
            "patch": _operation(rt, "patch", "patch", _WRITE),
        }
    return paths


def group_version_document(registry: Registry, group: str, version: str) -> Obj | None:
    """The OpenAPI 3.0 document of one group-version (None when nothing is served there)."""
    types = [rt for rt in registry.all() if rt.group == group and rt.version == version]
    if not types:
        return None
    paths: dict[str, Obj] = {}
    for rt in sorted(types, key=lambda t: t.plural):
        paths.update(_paths(rt))
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": _KUBE_VERSION}, "paths": paths,
            "components": {"schemas": {}}}


def _digest(doc: Obj) -> str:
    return hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:64].upper()


def root_document(registry: Registry) -> Obj:
    """`/openapi/v3`: every served group-version and where its document is (with a content hash, as kube-apiserver
    gives, so clients cache per version of the document)."""
    paths: dict[str, Obj] = {}
    for group, versions in sorted(registry.groups().items()):
        for version in versions:
            doc = group_version_document(registry, group, version)
            if doc is None:
                continue
            key = group_version_path(group, version)
            paths[key] = {"serverRelativeURL": f"/openapi/v3/{key}?hash={_digest(doc)}"}
    return {"paths": paths}
