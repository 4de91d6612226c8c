"""The simulated Kubernetes API server over HTTP (aiohttp).

Promises, so that the real `kubectl` v1.32 and the real kubernetes-asyncio client work unchanged:
- bearer-token authentication on every path except /healthz, /livez, /readyz and /version (401 Status
  otherwise); /version reports v1.32 (the installed kubectl is a dispatcher that picks its build from it);
- RBAC (`rbac.py`): the cluster and admin tokens are administrators; ServiceAccount tokens issued by
  `serviceaccounts/NAME/token` are held to the stored Roles and bindings (403 Forbidden Status otherwise);
- the simulator's own endpoints (`/sim/v1/*`: ground truth, hidden physics, faults) answer only the admin
  token (`ClusterLike.admin_token`); the cluster token, or none, gets 403 there, as a real cluster shows no
  such thing to anyone;
- discovery from the registry: /api, /apis, /apis/<g>, /api/v1, /apis/<g>/<v> as legacy lists (subresources
  such as pods/eviction and */status included), and aggregated discovery (apidiscovery.k8s.io/v2 or v2beta1)
  when the Accept header asks for it; `/openapi/v3` documents (see `openapi.py`) so that `kubectl create -f` and
  `kubectl apply -f` validate without `--validate=false` (`/openapi/v2` answers 404: kubectl needs only v3);
- list paging with `limit` and `continue` from one snapshot per list, 410 for a compacted token (`paging.py`);
- CRUD, list and watch for every registered kind, at cluster and namespace scope, with label and field
  selectors, dryRun=All, generateName, DeleteOptions, optimistic concurrency (409 on a stale
  resourceVersion), merge / JSON / strategic-merge patches (see `patch.py`), `/status` writes that change
  only status, and every other subresource (pods/eviction, virtualmachineinstances/evacuate/cancel, ...)
  routed to the cluster facade;
- watches stream one JSON event per line, flushed as they happen: ADDED replay for an unset or "0" version,
  replay after a given version, an ERROR event carrying the 410 Expired Status when that version has fallen
  out of the log, BOOKMARKs about every second when allowed, `timeoutSeconds` in wall seconds; otherwise
  streams stay open (kubectl exits when the server closes one);
- Table output (see `tables.py`) for list, get and watch when the Accept header asks for it;
- creating a CustomResourceDefinition serves its kind (discovery, CRUD, printer columns, selectable fields);
  deleting it deletes the instances and stops serving the kind;
- request-level faults (latency, error responses) are applied before a request reaches the store, and every
  resource request is counted by verb and resource with `cluster.record_request`;
- errors are single-line Status JSON with the matching HTTP code; an unexpected exception is logged and
  answered 500 with its message.

kubectl (client-go's clientcmd) sends a kubeconfig's credentials only over TLS: with a token, serve over
HTTPS (`self_signed_tls` + `serve(..., ssl_context=...)` + `write_kubeconfig(..., ca_data=...)`). The
kubernetes-asyncio client sends the token over plain HTTP too.

It keeps no state of its own beyond open watches and the CRD-to-kind bookkeeping: everything else lives in
the cluster facade's store, registry, clock and faults. It never imports `orchestrator` or `workers`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, Protocol

import structlog
import yaml
from aiohttp import web
from multidict import MultiMapping
from pydantic import ValidationError

from simulator import openapi
from simulator.clock import SimClock
from simulator.errors import ApiError
from simulator.faults import Faults, FaultsBody
from simulator.paging import Pager
from simulator.patch import apply_patch, decode_body
from simulator.rbac import Rbac, Request, User, forbidden
from simulator.resources import (
    BUILTIN,
    COMMON_FIELDS,
    CRDS,
    NAMESPACES,
    PODS,
    SELFSUBJECTACCESSREVIEWS,
    SERVICEACCOUNTS,
    Registry,
    ResourceType,
)
from simulator.store import Store, Watcher, WatchEvent
from simulator.tables import PrinterColumn, TableRenderer, columns_from_crd_version, wants_table

Obj = dict[str, Any]
log = structlog.get_logger("simulator.server")

KUBE_VERSION: Obj = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.4",
    "gitCommit": "59526cd4867447956156ae3a602fcbac10a2c335",
    "gitTreeState": "clean",
    "buildDate": "2025-04-22T16:03:51Z",
    "goVersion": "go1.23.6",
    "compiler": "gc",
    "platform": "linux/amd64",
}
ADMIN = User("sim:admin", ("system:masters", "system:authenticated"), superuser=True, sim_admin=True)
CLUSTER_USER = User("sim:cluster-admin", ("system:masters", "system:authenticated"), superuser=True)
ANONYMOUS = User("system:anonymous", ("system:unauthenticated",), superuser=True)  # a server without a token
_USER_KEY = web.RequestKey("sim_user", User)
UNAUTHENTICATED_PATHS = frozenset({"/healthz", "/livez", "/readyz", "/version"})
BOOKMARK_INTERVAL_S = 1.0
_IDLE_TICK_S = 1.0
_MAX_BATCH = 1000
_DISCOVERY_GROUP = "apidiscovery.k8s.io"
_KUBEVIRT_SUBRESOURCE_GROUP = "subresources.kubevirt.io"
_JSON = "application/json"
# Subresources whose response kind lives in another group (legacy discovery names it).
_SUBRESOURCE_KINDS: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "eviction": ("policy", "v1", "Eviction", ("create",)),
    "token": ("authentication.k8s.io", "v1", "TokenRequest", ("create",)),
}
_STATUS_VERBS = ("get", "patch", "update")


class ClusterLike(Protocol):
    """What the server needs from the cluster facade."""

    registry: Registry
    store: Store
    clock: SimClock
    faults: Faults
    token: str | None

    @property
    def admin_token(self) -> str | None:
        """The token that alone may use /sim/v1/* (None: nobody may)."""

    def record_request(self, verb: str, resource: str) -> None:
        """Ground truth: one API request, by verb (get/list/watch/create/update/patch/delete/
        deletecollection) and resource (plural, with "/subresource" appended for subresources)."""

    def record_forbidden(self, user: str, verb: str, resource: str, namespace: str | None) -> None:
        """Ground truth: a request RBAC refused (403)."""

    def stats(self) -> dict[str, Any]:
        """The body of GET /sim/v1/stats."""

    def scenario_json(self) -> dict[str, Any]:
        """The body of GET /sim/v1/scenario."""

    def apply_faults(self, body: FaultsBody) -> dict[str, Any]:
        """Apply a validated POST /sim/v1/faults body; the return value is the response body."""

    async def subresource(self, rt: ResourceType, namespace: str | None, name: str, sub: str,
                          method: str, body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        """Serve a non-status subresource (pods/eviction, ...): HTTP code and body; raises ApiError."""


@dataclass(frozen=True)
class Target:
    """A resource request path, resolved against the registry."""

    rt: ResourceType
    namespace: str | None
    name: str | None
    sub: str | None

    @property
    def resource(self) -> str:
        return self.rt.plural if self.sub is None else f"{self.rt.plural}/{self.sub}"


def dumps(value: Any) -> bytes:
    """Compact single-line JSON, as the API server writes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(body: Any, status: int = 200, *, content_type: str = _JSON) -> web.Response:
    return web.Response(body=dumps(body), status=status, headers={"Content-Type": content_type})


def status_response(error: ApiError) -> web.Response:
    return json_response(error.status(), error.code)


def not_found_path() -> ApiError:
    return ApiError(404, "the server could not find the requested resource", details={})


def method_not_allowed() -> ApiError:
    return ApiError(405, "the server does not allow this method on the requested resource", details={})


_TRUE = frozenset({"1", "t", "true"})
_FALSE = frozenset({"0", "f", "false"})


class Query:
    """Query parameters, parsed like the API server parses them (Go's ParseBool for booleans)."""

    def __init__(self, params: MultiMapping[str]) -> None:
        self._params = params

    def text(self, name: str) -> str | None:
        value = self._params.get(name)
        return value if value else None

    def flag(self, name: str) -> bool:
        value = self._params.get(name)
        if value is None or value == "":
            return False
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ApiError.bad_request(f'invalid value for {name}: strconv.ParseBool: parsing "{value}": '
                                   "invalid syntax")

    def integer(self, name: str) -> int | None:
        value = self._params.get(name)
        if not value:
            return None
        try:
            return int(value)
        except ValueError as exc:
            raise ApiError.bad_request(f'invalid value for {name}: strconv.ParseInt: parsing "{value}": '
                                       "invalid syntax") from exc

    def dry_run(self) -> bool:
        values = self._params.getall("dryRun", [])
        for value in values:
            if value != "All":
                raise ApiError(422, f'dryRun: Unsupported value: "{value}": supported values: "All"')
        return bool(values)


class ApiServer:
    """Maps HTTP requests onto the cluster's store; one instance per served application."""

    def __init__(self, cluster: ClusterLike) -> None:
        self.cluster = cluster
        self.tables = TableRenderer()
        self._watchers: set[Watcher] = set()
        self._crd_kinds: dict[str, list[ResourceType]] = {}
        self._pager = Pager()
        self.rbac = Rbac(cluster.store)

    # --------------------------------------------------------------------------------------------- entry
    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        try:
            if path in UNAUTHENTICATED_PATHS:
                if path == "/version":
                    return json_response(KUBE_VERSION)
                return web.Response(text="ok", content_type="text/plain")
            principal = self._authenticate(request)
            request[_USER_KEY] = principal
            if path == "/openapi/v3" or path.startswith("/openapi/v3/"):
                self._only(request, "GET")
                return self._openapi(path)
            if path == "/sim" or path.startswith("/sim/"):
                if not principal.sim_admin:
                    raise ApiError(403, f'forbidden: User "{principal.name}" cannot use the simulator\'s ground '
                                        "truth (/sim/v1/*): it needs the admin kubeconfig", details={})
                return await self._sim(request)
            return await self._api(request)
        except ApiError as exc:
            return status_response(exc)
        except Exception as exc:
            log.exception("server.request_failed", method=request.method, path=path)
            return status_response(ApiError(500, f"Internal error occurred: {exc}"))

    async def shutdown(self) -> None:
        """Close every open watch so their handlers end (the server then stops promptly)."""
        for watcher in list(self._watchers):
            self.cluster.store.unwatch(watcher)

    def _authenticate(self, request: web.Request) -> User:
        """The user a request speaks for: ADMIN, CLUSTER_USER, a ServiceAccount (a token issued by TokenRequest)
        or ANONYMOUS (a server without a cluster token); 401 for an unknown token."""
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        given = given.strip() if scheme.lower() == "bearer" else ""
        admin = self.cluster.admin_token
        if admin is not None and given == admin:
            return ADMIN
        token = self.cluster.token
        if token is not None and given == token:
            return CLUSTER_USER
        account = self.rbac.user_for(given) if given else None
        if account is not None:
            return account
        if token is None:
            return ANONYMOUS
        raise ApiError(401, "Unauthorized")

    # ------------------------------------------------------------------------------------------ /sim/v1
    async def _sim(self, request: web.Request) -> web.Response:
        path = request.path.rstrip("/")
        cluster = self.cluster
        if path == "/sim/v1/stats":
            self._only(request, "GET")
            return json_response(cluster.stats())
        if path == "/sim/v1/scenario":
            self._only(request, "GET")
            return json_response(cluster.scenario_json())
        if path == "/sim/v1/faults":
            if request.method == "GET":
                return json_response(cluster.faults.to_json())
            self._only(request, "POST")
            raw = await request.read()
            try:
                data = json.loads(raw or b"{}")
            except ValueError as exc:
                raise ApiError.bad_request(f"faults body is not JSON: {exc}") from exc
            try:
                body = FaultsBody.model_validate(data)
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in exc.errors())
                raise ApiError(422, f"invalid faults body: {problems}") from exc
            return json_response(cluster.apply_faults(body))
        raise not_found_path()

    def _openapi(self, path: str) -> web.Response:
        registry = self.cluster.registry
        rest = path[len("/openapi/v3"):].strip("/")
        if not rest:
            return json_response(openapi.root_document(registry))
        parts = rest.split("/")
        doc = None
        if parts[0] == "api" and len(parts) == 2:
            doc = openapi.group_version_document(registry, "", parts[1])
        elif parts[0] == "apis" and len(parts) == 3:
            doc = openapi.group_version_document(registry, parts[1], parts[2])
        if doc is None:
            raise not_found_path()
        return json_response(doc)

    @staticmethod
    def _only(request: web.Request, method: str) -> None:
        if request.method != method:
            raise method_not_allowed()

    # --------------------------------------------------------------------------------------------- /api
    async def _api(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if not parts or parts[0] not in ("api", "apis"):
            raise not_found_path()
        accept = request.headers.get("Accept", "")
        if parts[0] == "api":
            if len(parts) == 1:
                self._only(request, "GET")
                return self._discovery_core(request, accept)
            group, version, rest = "", parts[1], parts[2:]
        else:
            if len(parts) == 1:
                self._only(request, "GET")
                return self._discovery_groups(request, accept)
            group = parts[1]
            if len(parts) == 2:
                self._only(request, "GET")
                return self._api_group(group)
            version, rest = parts[2], parts[3:]
        if not rest:
            self._only(request, "GET")
            return self._resource_list(group, version)
        target = self._resolve(group, version, rest)
        return await self._resource(request, target, accept)

    def _resolve(self, group: str, version: str, rest: list[str]) -> Target:
        registry = self.cluster.registry
        lookup_group = "kubevirt.io" if group == _KUBEVIRT_SUBRESOURCE_GROUP else group
        namespace: str | None = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            inner = registry.find(lookup_group, version, rest[2])
            if inner is not None and inner.namespaced:
                namespace, rest = rest[1], rest[2:]
        rt = registry.find(lookup_group, version, rest[0])
        if rt is None:
            raise not_found_path()
        name = rest[1] if len(rest) > 1 else None
        sub = "/".join(rest[2:]) or None
        if rt.namespaced != (namespace is not None) and name is not None:
            raise not_found_path()
        if group == _KUBEVIRT_SUBRESOURCE_GROUP and sub is None:
            raise not_found_path()
        return Target(rt, namespace, name, sub)

    # ----------------------------------------------------------------------------------------- discovery
    def _discovery_core(self, request: web.Request, accept: str) -> web.Response:
        aggregated = _aggregated_version(accept)
        if aggregated is not None:
            item = {"metadata": {"creationTimestamp": None},
                    "versions": [self._discovery_version("", v) for v in self._versions("")]}
            return _aggregated_response([item], aggregated)
        return json_response({
            "kind": "APIVersions",
            "versions": self._versions(""),
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.host}],
        })

    def _discovery_groups(self, request: web.Request, accept: str) -> web.Response:
        groups = [g for g in self.cluster.registry.groups() if g]
        aggregated = _aggregated_version(accept)
        if aggregated is not None:
            items = [{"metadata": {"name": g, "creationTimestamp": None},
                      "versions": [self._discovery_version(g, v) for v in self._versions(g)]} for g in groups]
            return _aggregated_response(items, aggregated)
        return json_response({"kind": "APIGroupList", "apiVersion": "v1",
                              "groups": [self._group_body(g) for g in groups]})

    def _api_group(self, group: str) -> web.Response:
        if not group or group not in self.cluster.registry.groups():
            raise not_found_path()
        return json_response({"kind": "APIGroup", "apiVersion": "v1", **self._group_body(group)})

    def _versions(self, group: str) -> list[str]:
        return list(self.cluster.registry.groups().get(group, []))

    def _group_body(self, group: str) -> Obj:
        versions = [{"groupVersion": f"{group}/{v}", "version": v} for v in self._versions(group)]
        return {"name": group, "versions": versions, "preferredVersion": versions[0]}

    def _types(self, group: str, version: str) -> list[ResourceType]:
        return [rt for rt in self.cluster.registry.all() if rt.group == group and rt.version == version]

    def _resource_list(self, group: str, version: str) -> web.Response:
        types = self._types(group, version)
        if not types:
            raise not_found_path()
        resources: list[Obj] = []
        for rt in types:
            entry: Obj = {"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                          "kind": rt.kind, "verbs": list(rt.verbs)}
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            for sub in rt.subresources:
                sub_entry: Obj = {"name": f"{rt.plural}/{sub}", "singularName": "", "namespaced": rt.namespaced}
                if sub in _SUBRESOURCE_KINDS:
                    sgroup, sversion, skind, sverbs = _SUBRESOURCE_KINDS[sub]
                    sub_entry.update(group=sgroup, version=sversion, kind=skind, verbs=list(sverbs))
                else:
                    sub_entry.update(kind=rt.kind, verbs=list(_STATUS_VERBS))
                resources.append(sub_entry)
        gv = version if not group else f"{group}/{version}"
        return json_response({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                              "resources": resources})

    def _discovery_version(self, group: str, version: str) -> Obj:
        resources = []
        for rt in self._types(group, version):
            entry: Obj = {
                "resource": rt.plural,
                "responseKind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
                "scope": "Namespaced" if rt.namespaced else "Cluster",
                "singularResource": rt.singular,
                "verbs": list(rt.verbs),
            }
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            subs = []
            for sub in rt.subresources:
                if sub in _SUBRESOURCE_KINDS:
                    sgroup, sversion, skind, sverbs = _SUBRESOURCE_KINDS[sub]
                    subs.append({"subresource": sub,
                                 "responseKind": {"group": sgroup, "version": sversion, "kind": skind},
                                 "verbs": list(sverbs)})
                else:
                    subs.append({"subresource": sub,
                                 "responseKind": {"group": rt.group, "version": rt.version, "kind": rt.kind},
                                 "verbs": list(_STATUS_VERBS)})
            if subs:
                entry["subresources"] = subs
            resources.append(entry)
        return {"version": version, "resources": resources, "freshness": "Current"}

    # ------------------------------------------------------------------------------------------ resources
    async def _resource(self, request: web.Request, target: Target, accept: str) -> web.StreamResponse:
        query = Query(request.query)
        verb = _verb(request.method, target, query)
        cluster = self.cluster
        cluster.record_request(verb, target.resource)
        user: User = request.get(_USER_KEY, ANONYMOUS)
        access = Request(verb=verb, group=target.rt.group, resource=target.rt.plural, subresource=target.sub,
                         namespace=target.namespace, name=target.name)
        if not self.rbac.allows(user, access):
            cluster.record_forbidden(user.name, verb, target.resource, target.namespace)
            raise forbidden(user, access)
        if cluster.faults.latency_ms > 0:
            await asyncio.sleep(cluster.faults.latency_ms / 1000.0)
        injected = cluster.faults.request_error(verb, target.resource)
        if injected is not None:
            raise injected
        if target.sub is not None and target.sub != "status":
            return await self._subresource(request, target)
        if target.sub == "status" and "status" not in target.rt.subresources:
            raise not_found_path()
        if verb == "watch":
            return await self._watch(request, target, query, accept)
        if verb == "list":
            return self._list(target, query, accept)
        if verb == "get":
            return self._get(target, query, accept)
        if verb == "create":
            return self._create(target, query, decode_body(await request.read(), request.content_type), user)
        if verb == "update":
            return self._update(target, query, decode_body(await request.read(), request.content_type))
        if verb == "patch":
            return self._patch(target, query, await request.read(), request.headers.get("Content-Type"))
        if verb == "delete":
            return self._delete(target, query, decode_body(await request.read(), request.content_type))
        return self._delete_collection(target, query, decode_body(await request.read(),
                                                                   request.content_type))

    def _now(self) -> float:
        return self.cluster.clock.now()

    def _get(self, target: Target, query: Query, accept: str) -> web.Response:
        assert target.name is not None
        obj = self.cluster.store.require(target.rt, target.namespace, target.name)
        if wants_table(accept):
            return json_response(self.tables.table(
                target.rt, [obj], now=self._now(), resource_version=obj["metadata"].get("resourceVersion", ""),
                include_object=query.text("includeObject") or "Metadata"))
        return json_response(obj)

    def _list(self, target: Target, query: Query, accept: str) -> web.Response:
        store = self.cluster.store
        token = query.text("continue")
        if token is not None and query.text("resourceVersion") is not None:
            raise ApiError.bad_request("specifying resource version is not allowed when using continue")
        self._check_list_version(query)
        labels, fields = query.text("labelSelector"), query.text("fieldSelector")
        limit = query.integer("limit")
        if limit is not None and limit < 0:
            raise ApiError(422, f"limit: Invalid value: {limit}: must be greater than or equal to 0")
        items = None if token is not None else store.list(target.rt, target.namespace, label_selector=labels,
                                                           field_selector=fields)
        page = self._pager.page((target.rt.key, target.namespace, labels, fields), items=items, rv=store.rv,
                                limit=limit, token=token, oldest_rv=store.oldest_rv,
                                filtered=bool(labels or fields))
        meta: Obj = {"resourceVersion": str(page.resource_version)}
        if page.continue_token is not None:
            meta["continue"] = page.continue_token
            if page.remaining is not None:
                meta["remainingItemCount"] = page.remaining
        if wants_table(accept):
            table = self.tables.table(target.rt, page.items, now=self._now(), resource_version=meta["resourceVersion"],
                                      include_object=query.text("includeObject") or "Metadata")
            table["metadata"] = meta
            return json_response(table)
        return json_response({"kind": target.rt.list_kind, "apiVersion": target.rt.api_version,
                              "metadata": meta, "items": page.items})

    def _check_list_version(self, query: Query) -> None:
        store = self.cluster.store
        rv = query.text("resourceVersion")
        match = query.text("resourceVersionMatch")
        if match is not None and match not in ("NotOlderThan", "Exact"):
            raise ApiError(422, f'resourceVersionMatch: Unsupported value: "{match}": supported values: '
                                '"Exact", "NotOlderThan"')
        if match is not None and rv is None:
            raise ApiError(422, "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless "
                                "resourceVersion is provided")
        if rv is None:
            return
        try:
            wanted = int(rv)
        except ValueError as exc:
            raise ApiError.bad_request(f"invalid resource version: {rv}") from exc
        if wanted > store.rv:
            raise ApiError(504, f"Timeout: Too large resource version: {wanted}, current: {store.rv}",
                           reason="Timeout", details={"causes": [{"reason": "ResourceVersionTooLarge",
                                                                  "message": "Too large resource version"}],
                                                      "retryAfterSeconds": 1})
        if match == "Exact" and wanted != store.rv:
            raise ApiError.gone("The resourceVersion for the provided list is too old.")

    # --------------------------------------------------------------------------------------------- writes
    def _checked_body(self, target: Target, body: Any) -> Obj:
        rt = target.rt
        if not isinstance(body, dict):
            raise ApiError.bad_request("the request body must be a JSON object")
        api_version, kind = body.get("apiVersion"), body.get("kind")
        if api_version and api_version != rt.api_version:
            raise ApiError.bad_request(f"the API version in the data ({api_version}) does not match the "
                                       f"expected API version ({rt.api_version})")
        if kind and kind != rt.kind:
            raise ApiError.bad_request(f"the kind in the data ({kind}) does not match the expected kind "
                                       f"({rt.kind})")
        meta = body.get("metadata")
        if meta is None:
            meta = body["metadata"] = {}
        if not isinstance(meta, dict):
            raise ApiError.bad_request("metadata must be a JSON object")
        if rt.namespaced:
            given = meta.get("namespace")
            if given and given != target.namespace:
                raise ApiError.bad_request("the namespace of the provided object does not match the namespace "
                                           "sent on the request")
            meta["namespace"] = target.namespace
        if target.name is not None and meta.get("name") != target.name:
            raise ApiError.bad_request(f"the name of the object ({meta.get('name', '')}) does not match the "
                                       f"name on the URL ({target.name})")
        return body

    def _create(self, target: Target, query: Query, body: Any, user: User) -> web.Response:
        rt = target.rt
        if target.name is not None or (rt.namespaced and target.namespace is None):
            raise method_not_allowed()
        obj = self._checked_body(target, body)
        if rt is SELFSUBJECTACCESSREVIEWS:
            return json_response(self._self_review(obj, user), 201)
        dry_run = query.dry_run()
        self._prepare_create(rt, obj)
        kinds = _crd_kinds(obj) if rt is CRDS else None
        created = self.cluster.store.create(rt, obj, dry_run=dry_run)
        if kinds is not None and not dry_run:
            self._serve_crd(created["metadata"]["name"], kinds)
        return json_response(created, 201)

    @staticmethod
    def _prepare_create(rt: ResourceType, obj: Obj) -> None:
        """What the real registries do to an object before creating it."""
        meta = obj["metadata"]
        if rt is NAMESPACES:
            if meta.get("name"):
                meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            obj["status"] = {"phase": "Active"}
        elif rt is PODS:
            obj["status"] = {"phase": "Pending"}
        elif rt is CRDS:
            spec = obj.get("spec") or {}
            names = dict(spec.get("names") or {})
            if names.get("kind") and not names.get("singular"):
                names["singular"] = str(names["kind"]).lower()
            if names.get("kind") and not names.get("listKind"):
                names["listKind"] = f"{names['kind']}List"
            obj["status"] = {
                "acceptedNames": names,
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": None},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": None},
                ],
                "storedVersions": [v.get("name") for v in spec.get("versions") or [] if v.get("storage")],
            }
        elif not rt.builtin and "status" in rt.subresources:
            # Custom resources with a status subresource ignore status on create.
            obj.pop("status", None)

    def _self_review(self, review: Obj, user: User) -> Obj:
        """SelfSubjectAccessReview (what `kubectl auth can-i` asks): the RBAC decision for the caller."""
        spec = review.get("spec") or {}
        attrs = spec.get("resourceAttributes")
        if attrs is not None:
            access = Request(verb=str(attrs.get("verb") or ""), group=str(attrs.get("group") or ""),
                             resource=str(attrs.get("resource") or ""),
                             subresource=attrs.get("subresource") or None, namespace=attrs.get("namespace") or None,
                             name=attrs.get("name") or None)
            allowed = self.rbac.allows(user, access)
        else:
            allowed = spec.get("nonResourceAttributes") is not None  # discovery is open to every user
        status: Obj = {"allowed": allowed}
        if not allowed:
            status["reason"] = ""
        return {**review, "metadata": {"creationTimestamp": None}, "status": status}

    def _update(self, target: Target, query: Query, body: Any) -> web.Response:
        rt = target.rt
        if target.name is None:
            raise method_not_allowed()
        obj = self._checked_body(target, body)
        if not rt.builtin and not obj["metadata"].get("resourceVersion"):
            # Custom resources have no unconditional update.
            raise ApiError.invalid(rt.kind, target.name, "metadata.resourceVersion: Invalid value: 0x0: must "
                                   "be specified for an update", rt.group)
        dry_run = query.dry_run()
        kinds = _crd_kinds(obj) if rt is CRDS and target.sub is None else None
        updated = self.cluster.store.update(rt, obj, subresource=target.sub, dry_run=dry_run)
        if kinds is not None and not dry_run:
            self._serve_crd(updated["metadata"]["name"], kinds)
        return json_response(updated)

    def _patch(self, target: Target, query: Query, body: bytes, content_type: str | None) -> web.Response:
        rt = target.rt
        if target.name is None:
            raise method_not_allowed()
        store = self.cluster.store
        current = store.require(rt, target.namespace, target.name)
        patched = apply_patch(current, body, content_type, builtin=rt.builtin)
        meta = patched.get("metadata")
        if not isinstance(meta, dict):
            raise ApiError.bad_request("metadata must be a JSON object")
        if meta.get("name") != current["metadata"]["name"] or \
                meta.get("namespace") != current["metadata"].get("namespace"):
            meta = patched["metadata"] = dict(meta, name=current["metadata"]["name"])
            if rt.namespaced:
                meta["namespace"] = current["metadata"]["namespace"]
            else:
                meta.pop("namespace", None)
        dry_run = query.dry_run()
        kinds = _crd_kinds(patched) if rt is CRDS and target.sub is None else None
        updated = store.update(rt, patched, subresource=target.sub, dry_run=dry_run)
        if kinds is not None and not dry_run:
            self._serve_crd(updated["metadata"]["name"], kinds)
        return json_response(updated)

    def _delete(self, target: Target, query: Query, body: Any) -> web.Response:
        rt = target.rt
        if target.name is None or target.sub is not None:
            raise method_not_allowed()
        opts = _delete_options(body, query)
        store = self.cluster.store
        result = store.delete(rt, target.namespace, target.name, grace_seconds=opts.grace_seconds,
                              precondition_uid=opts.precondition_uid, precondition_rv=opts.precondition_rv,
                              dry_run=opts.dry_run)
        if opts.dry_run:
            return json_response(result)
        after = store.get(rt, target.namespace, target.name)
        gone = after is None or after["metadata"].get("uid") != result["metadata"].get("uid")
        if gone and rt is CRDS:
            self._unserve_crd(target.name)
        if gone and rt.builtin and rt is not PODS:
            # Most built-in registries answer an immediate deletion with a Status, not the object.
            return json_response({
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                "details": {"name": target.name, "group": rt.group, "kind": rt.plural,
                            "uid": result["metadata"].get("uid")},
            })
        return json_response(result)

    def _delete_collection(self, target: Target, query: Query, body: Any) -> web.Response:
        rt = target.rt
        if rt.namespaced and target.namespace is None:
            raise method_not_allowed()
        opts = _delete_options(body, query)
        store = self.cluster.store
        deleted: list[Obj] = []
        for obj in store.list(rt, target.namespace, label_selector=query.text("labelSelector"),
                              field_selector=query.text("fieldSelector")):
            meta = obj["metadata"]
            try:
                deleted.append(store.delete(rt, meta.get("namespace"), meta["name"],
                                            grace_seconds=opts.grace_seconds, dry_run=opts.dry_run))
            except ApiError as exc:
                if exc.code != 404:
                    raise
            if rt is CRDS and not opts.dry_run and store.get(rt, None, meta["name"]) is None:
                self._unserve_crd(meta["name"])
        return json_response({"kind": rt.list_kind, "apiVersion": rt.api_version,
                              "metadata": {"resourceVersion": str(store.rv)}, "items": deleted})

    async def _subresource(self, request: web.Request, target: Target) -> web.Response:
        assert target.name is not None and target.sub is not None
        body = decode_body(await request.read(), request.content_type)
        if body is not None and not isinstance(body, dict):
            raise ApiError.bad_request("the request body must be a JSON object")
        if target.rt is SERVICEACCOUNTS and target.sub == "token":
            if request.method != "POST":
                raise method_not_allowed()
            return json_response(self.rbac.issue_token(target.namespace or "default", target.name, body), 201)
        if target.sub == "eviction" and body is not None:
            # The eviction body may come without type meta (kubernetes-asyncio sends none).
            body.setdefault("apiVersion", "policy/v1")
            body.setdefault("kind", "Eviction")
            evict_name = (body.get("metadata") or {}).get("name")
            if evict_name and evict_name != target.name:
                raise ApiError.bad_request("name in URL does not match name in Eviction object")
        code, payload = await self.cluster.subresource(
            rt=target.rt, namespace=target.namespace, name=target.name, sub=target.sub,
            method=request.method, body=body)
        return json_response(payload, code)

    # ------------------------------------------------------------------------------------------------ CRDs
    def _serve_crd(self, crd_name: str, kinds: list[tuple[ResourceType, tuple[PrinterColumn, ...]]]) -> None:
        registry = self.cluster.registry
        previous = self._crd_kinds.pop(crd_name, [])
        for rt in previous:
            registry.remove(rt)
        served: list[ResourceType] = []
        for rt, columns in kinds:
            existing = registry.find(rt.group, rt.version, rt.plural)
            if existing is not None and existing in BUILTIN:
                # A CRD for a kind the simulator already serves natively only changes its printer columns.
                self.tables.set_columns(existing.key, columns)
                continue
            registry.add(rt)
            self.tables.set_columns(rt.key, columns)
            served.append(rt)
        if served:
            self._crd_kinds[crd_name] = served
        log.info("server.crd_served", crd=crd_name, kinds=[rt.api_version for rt in served])

    def _unserve_crd(self, crd_name: str) -> None:
        kinds = self._crd_kinds.pop(crd_name, [])
        if not kinds:
            return
        store = self.cluster.store
        for obj in list(store.iter(kinds[0])):
            meta = obj["metadata"]
            try:
                store.delete(kinds[0], meta.get("namespace"), meta["name"], admit=False)
            except ApiError as exc:
                if exc.code != 404:
                    raise
        store.close_watches(kinds[0])
        for rt in kinds:
            self.cluster.registry.remove(rt)
            self.tables.drop_columns(rt.key)
        log.info("server.crd_unserved", crd=crd_name)

    # ----------------------------------------------------------------------------------------------- watch
    async def _watch(self, request: web.Request, target: Target, query: Query,
                     accept: str) -> web.StreamResponse:
        rt = target.rt
        store = self.cluster.store
        as_table = wants_table(accept)
        include = query.text("includeObject") or "Metadata"
        bookmarks = query.flag("allowWatchBookmarks")
        send_initial = query.flag("sendInitialEvents")
        timeout = query.integer("timeoutSeconds")
        since = None if send_initial else query.text("resourceVersion")
        expired: ApiError | None = None
        watcher: Watcher | None = None
        try:
            watcher = store.watch(rt, target.namespace, since=since, label_selector=query.text("labelSelector"),
                                  field_selector=query.text("fieldSelector"))
        except ApiError as exc:
            if exc.code != 410:
                raise
            expired = exc
        opened_rv = store.rv
        resp = web.StreamResponse(status=200, headers={"Content-Type": _JSON,
                                                       "Cache-Control": "no-cache, private"})
        resp.enable_chunked_encoding()
        try:
            if watcher is not None:
                self._watchers.add(watcher)
            await resp.prepare(request)
            if expired is not None:
                await resp.write(dumps({"type": "ERROR", "object": expired.status()}) + b"\n")
            elif watcher is not None:
                await self._pump(request, resp, watcher, rt, as_table=as_table, include=include,
                                 bookmarks=bookmarks, send_initial=send_initial, timeout_s=timeout,
                                 opened_rv=opened_rv)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing left to tell it
        finally:
            if watcher is not None:
                store.unwatch(watcher)
                self._watchers.discard(watcher)
        return resp

    async def _pump(self, request: web.Request, resp: web.StreamResponse, watcher: Watcher,
                    rt: ResourceType, *, as_table: bool, include: str, bookmarks: bool, send_initial: bool,
                    timeout_s: int | None, opened_rv: int) -> None:
        """Write the watcher's events until it closes, the timeout passes or the client goes away."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + timeout_s if timeout_s and timeout_s > 0 else None
        drop_every = self.cluster.faults.drop_watches_every_s
        if drop_every > 0:
            end = start + drop_every if end is None else min(end, start + drop_every)
        next_bookmark = start + BOOKMARK_INTERVAL_S if bookmarks else None
        initial_left = watcher.queue.qsize() if send_initial else 0
        if send_initial and initial_left == 0 and bookmarks:
            await resp.write(self._bookmark(rt, opened_rv, as_table=as_table, initial_end=True))
        while True:
            now = loop.time()
            if end is not None and now >= end:
                return
            wait = _IDLE_TICK_S
            if end is not None:
                wait = min(wait, end - now)
            if next_bookmark is not None:
                wait = min(wait, max(0.0, next_bookmark - now))
            event: WatchEvent | None
            idle = False
            try:
                async with asyncio.timeout(wait):
                    event = await watcher.queue.get()
            except TimeoutError:
                event, idle = None, True
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            if event is None and not idle:
                return
            chunks: list[bytes] = []
            closed = False
            if event is not None:
                batch = [event]
                while len(batch) < _MAX_BATCH and not watcher.queue.empty():
                    more = watcher.queue.get_nowait()
                    if more is None:
                        closed = True
                        break
                    batch.append(more)
                for ev in batch:
                    chunks.append(self._event_line(rt, ev, as_table=as_table, include=include))
                    if initial_left > 0:
                        initial_left -= 1
                        if initial_left == 0 and bookmarks:
                            chunks.append(self._bookmark(rt, opened_rv, as_table=as_table, initial_end=True))
            if next_bookmark is not None and loop.time() >= next_bookmark and watcher.queue.empty() \
                    and not closed:
                chunks.append(self._bookmark(rt, self.cluster.store.rv, as_table=as_table))
                next_bookmark = loop.time() + BOOKMARK_INTERVAL_S
            if chunks:
                await resp.write(b"".join(chunks))
            if closed:
                return

    def _event_line(self, rt: ResourceType, event: WatchEvent, *, as_table: bool, include: str) -> bytes:
        obj: Obj = event.obj
        if as_table:
            obj = self.tables.table(rt, [obj], now=self._now(),
                                    resource_version=obj["metadata"].get("resourceVersion", ""),
                                    include_object=include)
        return dumps({"type": event.type, "object": obj}) + b"\n"

    def _bookmark(self, rt: ResourceType, rv: int, *, as_table: bool, initial_end: bool = False) -> bytes:
        meta: Obj = {"resourceVersion": str(rv)}
        if initial_end:
            meta["annotations"] = {"k8s.io/initial-events-end": "true"}
        obj: Obj
        if as_table:
            obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
                   "columnDefinitions": self.tables.column_definitions(rt), "rows": []}
        else:
            obj = {"kind": rt.kind, "apiVersion": rt.api_version, "metadata": meta}
        return dumps({"type": "BOOKMARK", "object": obj}) + b"\n"


# ------------------------------------------------------------------------------------------------ helpers
def _verb(method: str, target: Target, query: Query) -> str:
    if method == "GET":
        if target.name is None:
            return "watch" if query.flag("watch") else "list"
        return "get"
    if method == "POST":
        return "create"
    if method == "PUT":
        return "update"
    if method == "PATCH":
        return "patch"
    if method == "DELETE":
        return "delete" if target.name is not None else "deletecollection"
    raise method_not_allowed()


def _aggregated_version(accept: str) -> str | None:
    """The apidiscovery version the Accept header prefers, or None for the legacy documents."""
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        params = {k.strip(): v.strip() for k, _, v in (f.partition("=") for f in fields[1:])}
        media = fields[0].lower()
        if params.get("as") == "APIGroupDiscoveryList" and params.get("g") == _DISCOVERY_GROUP \
                and params.get("v") in ("v2", "v2beta1"):
            return params["v"]
        if media in (_JSON, "*/*", "application/*"):
            return None
    return None


def _aggregated_response(items: list[Obj], version: str) -> web.Response:
    return json_response(
        {"kind": "APIGroupDiscoveryList", "apiVersion": f"{_DISCOVERY_GROUP}/{version}", "metadata": {},
         "items": items},
        content_type=f"application/json;g={_DISCOVERY_GROUP};v={version};as=APIGroupDiscoveryList")


@dataclass(frozen=True)
class DeleteOptions:
    grace_seconds: int | None
    precondition_uid: str | None
    precondition_rv: str | None
    dry_run: bool


_PROPAGATION = ("Orphan", "Background", "Foreground")


def _delete_options(body: Any, query: Query) -> DeleteOptions:
    if body is not None and not isinstance(body, dict):
        raise ApiError.bad_request("DeleteOptions must be a JSON object")
    opts: Obj = body or {}
    grace = opts.get("gracePeriodSeconds")
    if grace is None:
        grace = query.integer("gracePeriodSeconds")
    elif not isinstance(grace, int) or isinstance(grace, bool):
        raise ApiError.bad_request("gracePeriodSeconds must be an integer")
    if grace is not None and grace < 0:
        grace = 1  # the API server turns a negative grace period into 1
    propagation = opts.get("propagationPolicy") or query.text("propagationPolicy")
    if propagation is not None and propagation not in _PROPAGATION:
        raise ApiError(422, f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported value: '
                            f'"{propagation}": supported values: "Foreground", "Background", "Orphan"')
    pre = opts.get("preconditions") or {}
    dry = opts.get("dryRun")
    if dry is not None:
        if not isinstance(dry, list) or any(v != "All" for v in dry):
            raise ApiError(422, f'dryRun: Unsupported value: {json.dumps(dry)}: supported values: "All"')
        dry_run = bool(dry)
    else:
        dry_run = query.dry_run()
    return DeleteOptions(grace_seconds=grace, precondition_uid=pre.get("uid"),
                         precondition_rv=pre.get("resourceVersion"), dry_run=dry_run)


def _crd_kinds(crd: Obj) -> list[tuple[ResourceType, tuple[PrinterColumn, ...]]]:
    """The kinds a CustomResourceDefinition serves (storage version last), or 422 when it is invalid."""
    meta = crd.get("metadata") or {}
    name = str(meta.get("name") or "")
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
    scope = spec.get("scope")
    versions = [v for v in spec.get("versions") or [] if isinstance(v, dict)]
    causes: list[dict[str, str]] = []

    def problem(field: str, reason: str, message: str) -> None:
        causes.append({"reason": reason, "message": f"{field}: {message}", "field": field})

    if not group:
        problem("spec.group", "FieldValueRequired", "Required value")
    if not plural:
        problem("spec.names.plural", "FieldValueRequired", "Required value")
    if not kind:
        problem("spec.names.kind", "FieldValueRequired", "Required value")
    if scope not in ("Namespaced", "Cluster"):
        problem("spec.scope", "FieldValueNotSupported",
                f'Unsupported value: "{scope or ""}": supported values: "Cluster", "Namespaced"')
    if not versions:
        problem("spec.versions", "FieldValueInvalid", "Invalid value: null: must have exactly one version "
                                                      "marked as storage version")
    elif sum(1 for v in versions if v.get("storage") is True) != 1:
        problem("spec.versions", "FieldValueInvalid",
                "Invalid value: must have exactly one version marked as storage version")
    if group and plural and name != f"{plural}.{group}":
        problem("metadata.name", "FieldValueInvalid",
                f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group')
    if causes:
        raise ApiError.invalid("CustomResourceDefinition", name, ", ".join(c["message"] for c in causes),
                               "apiextensions.k8s.io", causes=causes)
    singular = str(names.get("singular") or str(kind).lower())
    short_names = tuple(str(s) for s in names.get("shortNames") or [])
    categories = tuple(str(c) for c in names.get("categories") or [])
    out: list[tuple[ResourceType, tuple[PrinterColumn, ...]]] = []
    for version in sorted(versions, key=lambda v: bool(v.get("storage"))):
        if not version.get("served"):
            continue
        subresources = ("status",) if "status" in (version.get("subresources") or {}) else ()
        selectable = tuple(str(f.get("jsonPath", "")).lstrip(".") for f in version.get("selectableFields") or []
                           if isinstance(f, dict) and f.get("jsonPath"))
        rt = ResourceType(str(group), str(version.get("name")), str(plural), singular, str(kind),
                          scope == "Namespaced", short_names, categories, subresources=subresources,
                          field_selectors=(*COMMON_FIELDS, *selectable), builtin=False)
        out.append((rt, columns_from_crd_version(version)))
    return out


# ----------------------------------------------------------------------------------------------- assembly
_SERVER_KEY = web.AppKey("api_server", ApiServer)


def build_app(cluster: ClusterLike) -> web.Application:
    """The aiohttp application serving `cluster`."""
    server = ApiServer(cluster)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_SERVER_KEY] = server
    app.router.add_route("*", "/{tail:.*}", server.handle)

    async def cluster_date(_request: web.Request, response: web.StreamResponse) -> None:
        # An API server's Date header is its own clock; here that is cluster time (it runs at the time scale),
        # which is how clients can tell the time scale they face. Like kube-apiserver (WithCacheControl in
        # k8s.io/apiserver/pkg/endpoints/filters/cachecontrol.go) every answer says "no-cache, private": with
        # a Date ahead of the client's clock, kubectl's HTTP cache would otherwise keep stale discovery.
        response.headers["Date"] = formatdate(cluster.clock.now(), usegmt=True)
        response.headers.setdefault("Cache-Control", "no-cache, private")

    app.on_response_prepare.append(cluster_date)

    async def close_watches(_app: web.Application) -> None:
        await server.shutdown()

    app.on_shutdown.append(close_watches)
    return app


async def serve(cluster: ClusterLike, *, host: str = "127.0.0.1", port: int = 0,
                ssl_context: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    """Serve `cluster` on host:port (0 picks a free port), over HTTPS when `ssl_context` is given; returns the
    runner (call `cleanup()` to stop) and the bound port."""
    runner = web.AppRunner(build_app(cluster), handler_cancellation=True, access_log=None,
                           shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    addresses: Iterable[Any] = runner.addresses
    bound = next(iter(addresses))[1]
    log.info("server.started", host=host, port=bound, tls=ssl_context is not None)
    return runner, int(bound)


@dataclass(frozen=True)
class TlsFiles:
    """A self-signed serving certificate (it is its own CA) and its key, as PEM files."""

    cert_path: Path
    key_path: Path

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx

    def ca_data(self) -> bytes:
        return self.cert_path.read_bytes()


def self_signed_tls(directory: str | os.PathLike[str], *,
                    hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TlsFiles:
    """Create (with the `openssl` command) a self-signed certificate for `hosts` in `directory`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make a self-signed certificate")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(folder / "sim-apiserver.crt", folder / "sim-apiserver.key")
    san = ",".join(f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts)
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(files.key_path), "-out", str(files.cert_path), "-days", "3650",
         "-subj", "/CN=drainctl-sim", "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True)
    files.key_path.chmod(0o600)
    return files


def write_kubeconfig(path: str | os.PathLike[str], *, server_url: str, token: str | None,
                     namespace: str = "default", ca_data: bytes | None = None, name: str = "drainctl-sim") -> None:
    """Write a kubeconfig that points kubectl and kubernetes-asyncio at `server_url`; `ca_data` (PEM) is
    the certificate authority to trust for an https URL; `name` names its cluster, user and context."""
    cluster: Obj = {"server": server_url}
    if ca_data is not None:
        cluster["certificate-authority-data"] = base64.b64encode(ca_data).decode()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": cluster}],
        "users": [{"name": name, "user": {"token": token} if token else {}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
        "preferences": {},
    }
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
