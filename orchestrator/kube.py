"""The cluster adapter: the only module that imports kubernetes_asyncio.

It speaks to a real cluster or to the simulator the same way, returns raw Kubernetes JSON (parsed by
`snapshot`), and maps the client's errors onto our tree, where every error says whether it is retryable:

    KubeError (retryable: bool)
    +-- NotFound            404
    +-- AlreadyExists       409 AlreadyExists
    +-- Conflict            409 Conflict (stale resourceVersion)          retryable
    +-- Rejected            400/422 (admission or validation refused it)
    +-- TooManyRequests     429 (eviction blocked by a PDB or KubeVirt)   retryable
    +-- Gone                410 (watch too old: re-list)                 retryable
    +-- Unauthorized        401/403
    +-- Unavailable         5xx, timeouts, connection errors              retryable
    |   +-- Unreachable     no answer at all (refused, no such host, TLS)  retryable
    +-- BadConfig           the kubeconfig is missing, unreadable or names no usable context
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from orchestrator.model import ClusterSnapshot
from orchestrator.snapshot import build_snapshot

log = structlog.get_logger("orchestrator.kube")

KUBEVIRT = ("kubevirt.io", "v1")
Obj = dict[str, Any]


class KubeError(Exception):
    retryable = False

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    pass


class AlreadyExists(KubeError):
    pass


class Conflict(KubeError):
    retryable = True


class Rejected(KubeError):
    pass


class TooManyRequests(KubeError):
    retryable = True


class Gone(KubeError):
    retryable = True


class Unauthorized(KubeError):
    pass


class Unavailable(KubeError):
    retryable = True


class Unreachable(Unavailable):
    """Nothing answered: the connection was refused, the host name did not resolve, or TLS failed. Retryable
    for the engine (an API server restarts); a command line reports it at once with the fix."""


class BadConfig(KubeError):
    """The kubeconfig named (flag or KUBECONFIG) does not exist or cannot be used: fix the input."""


def _map(exc: ApiException) -> KubeError:
    message = exc.reason or ""
    reason = ""
    raw_body: object = exc.body
    body = raw_body.decode("utf-8", "replace") if isinstance(raw_body, bytes) else raw_body
    if isinstance(body, str) and body:
        with contextlib.suppress(ValueError):
            data = json.loads(body)
            if isinstance(data, dict):
                message = str(data.get("message") or message)
                reason = str(data.get("reason") or "")
    status = int(exc.status or 0)
    cls: type[KubeError]
    if status == 404:
        cls = NotFound
    elif status == 409:
        cls = AlreadyExists if reason == "AlreadyExists" else Conflict
    elif status in (400, 415, 422):
        cls = Rejected
    elif status == 429:
        cls = TooManyRequests
    elif status == 410:
        cls = Gone
    elif status in (401, 403):
        cls = Unauthorized
    else:
        cls = Unavailable
    return cls(status, reason or str(exc.reason or ""), message)


def _from_body(status: int, raw: bytes) -> KubeError:
    exc = ApiException(status=status, reason="")
    exc.body = raw
    return _map(exc)


@dataclass(frozen=True)
class Kind:
    """A resource we read, by API group."""

    plural: str
    group: str = ""
    version: str = "v1"
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
        base = "/api/v1" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace and self.namespaced:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name:
            base += f"/{name}"
        if sub:
            base += f"/{sub}"
        return base


NODES = Kind("nodes", namespaced=False)
PODS = Kind("pods")
NAMESPACES = Kind("namespaces", namespaced=False)
EVENTS = Kind("events")
VMIS = Kind("virtualmachineinstances", *KUBEVIRT)
VMIMS = Kind("virtualmachineinstancemigrations", *KUBEVIRT)
KUBEVIRTS = Kind("kubevirts", *KUBEVIRT)
MIGRATION_POLICIES = Kind("migrationpolicies", "migrations.kubevirt.io", "v1alpha1", namespaced=False)
DRAINREQUESTS = Kind("drainrequests", "drainctl.io", "v1alpha1")
LEASES = Kind("leases", "coordination.k8s.io", "v1")


PAGE_SIZE = 500
"""Objects per list page (client-go's reflectors ask for 500)."""


class Pages:
    """One paged list (`Kube.pages`): iterate once; `resource_version` is the list's once the last page came.

    Every page of one list shares the resourceVersion of its first page (the continue token pins it), so a
    watch from that version misses nothing. When the token expires mid-list (410 Gone) the list restarts
    and `restarted` counts it: a caller that reduces pages must start its reduction over (`on_restart`)."""

    def __init__(self, kube: Kube, kind: Kind, namespace: str | None, *, label_selector: str | None,
                 field_selector: str | None, page_size: int) -> None:
        if page_size < 0:
            raise ValueError(f"page_size: {page_size} is negative")
        self._kube, self._kind, self._namespace = kube, kind, namespace
        self._label_selector, self._field_selector, self._page_size = label_selector, field_selector, page_size
        self.resource_version = ""
        self.restarted = 0
        self.on_restart: Callable[[], None] | None = None

    def __aiter__(self) -> AsyncIterator[builtins.list[Obj]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[builtins.list[Obj]]:
        token: str | None = None
        while True:
            query: builtins.list[tuple[str, str]] = []
            if self._label_selector:
                query.append(("labelSelector", self._label_selector))
            if self._field_selector:
                query.append(("fieldSelector", self._field_selector))
            if self._page_size:
                query.append(("limit", str(self._page_size)))
            if token:
                query.append(("continue", token))
            try:
                data = await self._kube._call("GET", self._kind.path(self._namespace), query=query)
            except Gone:
                if not token:
                    raise
                # The continue token expired: list again from the start (client-go's reflector does the same).
                log.info("list.restart", kind=self._kind.plural, reason="continue token expired")
                token = None
                self.restarted += 1
                if self.on_restart is not None:
                    self.on_restart()
                continue
            meta = data.get("metadata") or {}
            if not token:
                self.resource_version = str(meta.get("resourceVersion") or "")
            yield list(data.get("items") or [])
            token = meta.get("continue") or None
            if not token:
                return


@dataclass(frozen=True)
class Credentials:
    """What another client needs to reach the same API server as a `Kube` (see `Kube.credentials`)."""

    server: str
    token: str | None
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    verify_ssl: bool


class Kube:
    """A connection to one cluster. Create with `connect`, close with `close` (or `async with`)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.requests = 0
        self._server_clock: tuple[float, float] | None = None
        """(the API server's clock from the last Date header, our wall clock when it arrived)."""

    @classmethod
    async def connect(cls, *, kubeconfig: str | Path | None = None, context: str | None = None) -> Kube:
        """From a kubeconfig file (flag, then KUBECONFIG, then ~/.kube/config) or in-cluster config."""
        path = str(kubeconfig) if kubeconfig else os.environ.get("KUBECONFIG")
        if path is None and (Path.home() / ".kube" / "config").exists():
            path = str(Path.home() / ".kube" / "config")
        if path is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            cfg = client.Configuration()
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return cls(client.ApiClient(cfg))
        if path is None:
            raise KubeError(0, "NoConfig", "no kubeconfig: pass --kubeconfig or set KUBECONFIG")
        if not os.path.isfile(path):  # noqa: ASYNC240 - one stat before any I/O, like the client's own read
            raise BadConfig(0, "NoConfig", f"kubeconfig {path}: no such file (pass --kubeconfig or set KUBECONFIG)")
        try:
            api = await config.new_client_from_config(config_file=path, context=context)
        except (config.ConfigException, ValueError, OSError) as exc:
            raise BadConfig(0, "BadConfig", f"kubeconfig {path}: {exc}") from exc
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    def credentials(self) -> Credentials:
        """Where and how this connection reaches the API server, for a client of another library (kopf)."""
        cfg = self.api.configuration
        auth = str((cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken") or "")
        prefix = str((cfg.api_key_prefix or {}).get("authorization") or "")
        token = auth.removeprefix("Bearer ").strip() if auth else None
        if prefix and prefix.lower() != "bearer":
            token = None
        return Credentials(server=str(cfg.host), token=token or None, ca_file=cfg.ssl_ca_cert or None,
                           cert_file=cfg.cert_file or None, key_file=cfg.key_file or None,
                           verify_ssl=bool(cfg.verify_ssl))

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def server_date(self) -> tuple[float, float]:
        """(the API server's clock from the `Date` header of GET /version, our wall clock at the answer)."""
        self._server_clock = None
        await self._call("GET", "/version")
        if self._server_clock is None:
            raise Unavailable(0, "NoDate", "the API server sent no usable Date header")
        return self._server_clock

    # ------------------------------------------------------------------------------------------ raw
    async def _call(self, method: str, path: str, *, query: list[tuple[str, str]] | None = None,
                    body: Any = None, content_type: str = "application/json") -> Obj:
        self.requests += 1
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            resp = await self.api.call_api(
                path, method, query_params=query or [], header_params=headers, body=body,
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
            try:
                raw = await resp.read()
            finally:
                resp.release()
        except ApiException as exc:
            raise _map(exc) from exc
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(0, "Unreachable", f"{method} {path}: {exc}") from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(0, "Unavailable", f"{method} {path}: {exc}") from exc
        self._note_date(resp.headers.get("Date"))
        if not 200 <= resp.status <= 299:
            raise _from_body(resp.status, raw)
        data: Obj = json.loads(raw) if raw else {}
        return data

    def _note_date(self, date: str | None) -> None:
        from email.utils import parsedate_to_datetime

        if date:
            with contextlib.suppress(TypeError, ValueError):
                self._server_clock = (parsedate_to_datetime(date).timestamp(), time.time())

    async def server_now(self, *, max_age_s: float = 0.1) -> float:
        """The API server's clock now (its Date header, one-second resolution). Cluster time, which runs at the
        time scale: Events we write must carry it, not our wall clock, or their ages disagree with the
        cluster's own. Asks GET /version when no answer arrived in the last `max_age_s` wall seconds."""
        if self._server_clock is None or time.time() - self._server_clock[1] > max_age_s:
            await self.server_date()
        assert self._server_clock is not None
        date, seen = self._server_clock
        return date + (time.time() - seen)

    async def get(self, kind: Kind, name: str, namespace: str | None = None) -> Obj:
        return await self._call("GET", kind.path(namespace, name))

    async def find(self, kind: Kind, name: str, namespace: str | None = None) -> Obj | None:
        try:
            return await self.get(kind, name, namespace)
        except NotFound:
            return None

    async def list(self, kind: Kind, namespace: str | None = None, *, label_selector: str | None = None,
                   field_selector: str | None = None,
                   page_size: int = PAGE_SIZE) -> tuple[builtins.list[Obj], str]:
        """Every object of `kind`, read page by page (see `pages`); returns (items, list resourceVersion)."""
        pages = self.pages(kind, namespace, label_selector=label_selector, field_selector=field_selector,
                           page_size=page_size)
        items: builtins.list[Obj] = []
        async for page in pages:
            items.extend(page)
        return items, pages.resource_version

    def pages(self, kind: Kind, namespace: str | None = None, *, label_selector: str | None = None,
              field_selector: str | None = None, page_size: int = PAGE_SIZE) -> Pages:
        """The list of `kind` as pages of at most `page_size` objects (`limit`/`continue`, as client-go's
        reflectors list), so a caller can reduce each page and drop it instead of holding the whole cluster.
        A server that ignores `limit` answers with one page; one whose continue token expired (410) is
        listed again from the start, like client-go falls back to a full list."""
        return Pages(self, kind, namespace, label_selector=label_selector, field_selector=field_selector,
                     page_size=page_size)

    async def create(self, kind: Kind, body: Obj, namespace: str | None = None) -> Obj:
        return await self._call("POST", kind.path(namespace), body=body)

    async def patch(self, kind: Kind, name: str, patch: Obj, namespace: str | None = None) -> Obj:
        return await self._call("PATCH", kind.path(namespace, name), body=patch,
                                content_type="application/merge-patch+json")

    async def delete(self, kind: Kind, name: str, namespace: str | None = None, *,
                     uid: str | None = None) -> None:
        body: Obj = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            await self._call("DELETE", kind.path(namespace, name), body=body)
        except NotFound:
            return

    # ---------------------------------------------------------------------------------------- verbs
    async def snapshot(self) -> ClusterSnapshot:
        nodes, _ = await self.list(NODES)
        vmis, _ = await self.list(VMIS)
        pods, _ = await self.list(PODS)
        vmims, _ = await self.list(VMIMS)
        kubevirts, _ = await self.list(KUBEVIRTS)
        return build_snapshot(nodes=nodes, vmis=vmis, pods=pods, migrations=vmims,
                              kubevirt=kubevirts[0] if kubevirts else None)

    async def cordon(self, node: str, *, unschedulable: bool = True,
                     annotations: dict[str, str | None] | None = None) -> Obj:
        patch: Obj = {"spec": {"unschedulable": True if unschedulable else None}}
        if annotations:
            patch["metadata"] = {"annotations": annotations}
        return await self.patch(NODES, node, patch)

    async def annotate(self, kind: Kind, name: str, annotations: dict[str, str | None],
                       namespace: str | None = None) -> Obj:
        return await self.patch(kind, name, {"metadata": {"annotations": annotations}}, namespace)

    async def evict(self, namespace: str, name: str, *, grace_seconds: int | None = None) -> None:
        body: Obj = {"apiVersion": "policy/v1", "kind": "Eviction",
                     "metadata": {"name": name, "namespace": namespace}}
        if grace_seconds is not None:
            body["deleteOptions"] = {"gracePeriodSeconds": grace_seconds}
        await self._call("POST", PODS.path(namespace, name, "eviction"), body=body)

    async def event(self, *, involved: Obj, reason: str, message: str, warning: bool = False,
                    component: str = "drainctl", now_iso: str | None = None) -> None:
        """Record a Kubernetes Event stamped with the API server's clock (`now_iso` overrides it); losing one is
        never fatal, so errors are logged, not raised."""
        if now_iso is None:
            try:
                stamp = await self.server_now()
            except KubeError:
                stamp = time.time()
            now_iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
        meta = involved.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name', 'drainctl')}.", "namespace": ns},
            "involvedObject": {"kind": involved.get("kind"), "apiVersion": involved.get("apiVersion"),
                               "name": meta.get("name"), "namespace": meta.get("namespace"),
                               "uid": meta.get("uid")},
            "reason": reason, "message": message[:1024], "type": "Warning" if warning else "Normal",
            "source": {"component": component}, "reportingComponent": component, "reportingInstance": "",
            "firstTimestamp": now_iso, "lastTimestamp": now_iso, "count": 1,
        }
        try:
            await self.create(EVENTS, body, ns)
        except KubeError as exc:
            log.warning("event.lost", reason=reason, error=str(exc))

    # ---------------------------------------------------------------------------------------- watch
    async def watch(self, kind: Kind, *, label_selector: str | None = None,
                    on_list: Callable[[builtins.list[Obj]], Awaitable[None]] | None = None,
                    on_pages: Callable[[Pages], Awaitable[None]] | None = None,
                    on_event: Callable[[str, Obj], Awaitable[None]],
                    timeout_s: int = 300) -> None:
        """List (paged), then watch, forever: re-list on 410 Gone, reconnect on errors with backoff.

        After every (re-)list, `on_list` gets the full list so the caller can replace its cache, or `on_pages`
        gets the pages to reduce one by one (a cache of sums need not hold the whole list at once);
        `on_event` gets ADDED/MODIFIED/DELETED. Cancel the task to stop."""
        if (on_list is None) == (on_pages is None):
            raise ValueError("watch: pass exactly one of on_list and on_pages")
        backoff = 0.2
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    if on_pages is not None:
                        pages = self.pages(kind, label_selector=label_selector)
                        await on_pages(pages)
                        rv = pages.resource_version
                    else:
                        assert on_list is not None
                        items, rv = await self.list(kind, label_selector=label_selector)
                        await on_list(items)
                async for etype, obj, new_rv in self._stream(kind, label_selector, rv, timeout_s):
                    rv = new_rv or rv
                    if etype != "BOOKMARK":
                        await on_event(etype, obj)
                backoff = 0.2
            except Gone:
                rv = None
            except (Unavailable, Conflict, TooManyRequests, Unauthorized) as exc:
                log.warning("watch.retry", kind=kind.plural, error=str(exc), backoff_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _stream(self, kind: Kind, label_selector: str | None, rv: str,
                      timeout_s: int) -> AsyncIterator[tuple[str, Obj, str | None]]:
        query = [("watch", "true"), ("allowWatchBookmarks", "true"), ("resourceVersion", rv),
                 ("timeoutSeconds", str(timeout_s))]
        if label_selector:
            query.append(("labelSelector", label_selector))
        self.requests += 1
        try:
            resp = await self.api.call_api(
                kind.path(), "GET", query_params=query, header_params={"Accept": "application/json"},
                auth_settings=["BearerToken"], _preload_content=False, _return_http_data_only=True)
        except ApiException as exc:
            raise _map(exc) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise Unavailable(0, "Unavailable", f"watch {kind.plural}: {exc}") from exc
        if not 200 <= resp.status <= 299:
            raw = await resp.read()
            resp.release()
            raise _from_body(resp.status, raw)
        try:
            while True:
                try:
                    line = await resp.content.readline()
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    raise Unavailable(0, "Unavailable", f"watch {kind.plural}: {exc}") from exc
                if not line:
                    return
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR" or (etype is None and obj.get("kind") == "Status"):
                    status = obj if etype == "ERROR" else event
                    code = int(status.get("code") or 500)
                    raise _map(ApiException(status=code, reason=status.get("reason"))) if code != 410 else \
                        Gone(410, "Expired", str(status.get("message")))
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                yield etype, obj, new_rv
        finally:
            resp.release()


