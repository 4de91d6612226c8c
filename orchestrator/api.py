"""The HTTP API: what upgrade hooks and automation call to drain nodes, follow drains and cancel them.

Promises:
- Every ``/v1`` call needs ``Authorization: Bearer <token>``: 401 (with ``WWW-Authenticate: Bearer``) without
  one, 403 with a wrong one; tokens are compared in constant time. ``/healthz``, ``/readyz``, ``/metrics`` and
  ``/openapi.json`` are open, as probes and scrapers expect.
- Every error is JSON ``{"error": {"code", "message", "details"}}``, whatever raised it (405 with ``Allow``,
  413, an unexpected bug as 500): malformed JSON 400, a body not sent as ``application/json`` 415 (with
  ``Accept-Post``), a drain id drainctl could not have issued 400, a body that breaks the schema or an unknown
  query parameter 422 naming each field (``nodes: ...``), unknown nodes 404 naming them, an infeasible drain
  422 with the planner's problems, a node that another drain owns 409 naming the node and the drain, a
  refusal by the cluster's API server 502, an unreachable cluster or Redis 503 (with ``Retry-After``).
  Nothing is written when a request is refused (DESIGN.md rule 7).
- Every number in a request lies in the range ``REQUEST_BOUNDS`` (orchestrator/model.py) gives it; the CLI
  and ``DrainRequest`` enforce the same table, and the document shows it.
- ``POST /v1/drains`` with an ``Idempotency-Key`` header returns the drain that key created (200) instead of
  starting another one (202); reusing a key with a different request is refused (422). Submitting is one
  transaction, so a retry never finds a key claimed by a request still in progress.
- ``GET /v1/drains/{id}/events`` is a server-sent event stream: the drain's events from ``Last-Event-ID``
  (or the start), then live ones until ``drain.finished``; ``event:`` is our event name, ``id:`` the Redis
  stream id, so a client that reconnects resumes exactly where it stopped.
- ``/openapi.json`` is an OpenAPI 3.1 document whose schemas are generated from the pydantic models the
  handlers use, so the document and the wire format cannot drift apart; it lists every status each operation
  answers, and only those (tests/orchestrator/test_api.py, test_api_schema.py with schemathesis).

It holds no drain state of its own: everything goes through :class:`orchestrator.service.DrainService`, so
any number of API replicas may run beside the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import structlog
from aiohttp import web
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from redis.exceptions import RedisError

from orchestrator import keys
from orchestrator import kube as k
from orchestrator.epoch import EpochGuard, check_epoch_forever
from orchestrator.escalation import parse_escalation
from orchestrator.metrics import CONTENT_TYPE, MetricsSource, render
from orchestrator.model import (
    MAX_REQUEST_NODES,
    REQUEST_BOUNDS,
    DrainPlan,
    DrainRequest,
    NodeOrder,
    NonMigratablePolicy,
    VmPhase,
)
from orchestrator.planner import PlanError
from orchestrator.records import DrainRecord, NodeRecord, VmRecord
from orchestrator.service import DrainService, IdempotencyKeyReused, NodeConflict
from orchestrator.settings import Settings
from orchestrator.store import DrainNotFound, Event
from orchestrator.supervise import Supervisor

Obj = dict[str, Any]
"""A Kubernetes object as the API returns it."""

log = structlog.get_logger("orchestrator.api")

ServiceFactory = Callable[[], AbstractAsyncContextManager[DrainService]]
"""Opens the service (Redis pool, cluster connection) when the app starts and closes it when the app stops."""

TOKEN_ENV = "DRAIN_API_TOKEN"
IDEMPOTENCY_HEADER = "Idempotency-Key"
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_STREAM_ID = re.compile(r"\d{1,20}(-\d{1,20})?")
DRAIN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_DRAIN_ID = re.compile(DRAIN_ID_PATTERN)
NODE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
"""Kubernetes node names are DNS-1123 subdomains: lowercase letters, digits, '-' and '.', at most 253."""
JSON_TYPES = ("application/json",)
MAX_LIST = 1000
FINISHED_GRACE_S = 60.0


# ================================================================================================= models
NodeNameStr = Annotated[str, StringConstraints(min_length=1, max_length=253, pattern=NODE_NAME_PATTERN)]
_RUNG = "(solo|auto-converge|post-copy)"
ESCALATION_PATTERN = rf"^ *(none|{_RUNG}( *, *{_RUNG})*) *$"
"""The escalation as a comma list (the CRD's spec.escalation has the same pattern)."""
EscalationStr = Annotated[str, StringConstraints(max_length=100, pattern=ESCALATION_PATTERN)]
RungName = Literal["solo", "auto-converge", "post-copy"]


def _check_escalation(value: object) -> object:
    """An unknown rung, an empty list or `none` among rungs fails with the ladder's own message; the schema
    then checks the value as given (DrainRequest puts it in ladder order)."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        parse_escalation(value)
    return value


def _integral(value: Any) -> Any:
    """JSON has one number type: 403.0 is the integer 403 (JSON Schema says so too); 403.5 stays a float and is
    refused by the strict integer field."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _range(name: str) -> Any:
    """The bounds of a numeric request field from ``REQUEST_BOUNDS`` (model.py), the ranges the CLI and the
    DrainRequest type enforce too; they show up in the OpenAPI document."""
    bound = REQUEST_BOUNDS[name]
    return Field(ge=bound.low, le=bound.high, allow_inf_nan=False)


def _described(name: str, description: str, *, default: int | None = None) -> Any:
    return Field(default, description=f"{description} Range: {REQUEST_BOUNDS[name]}.")


ParallelNodes = Annotated[int, _range("max_parallel_nodes"), BeforeValidator(_integral)]
CompletionPerGib = Annotated[int, _range("completion_timeout_per_gib"), BeforeValidator(_integral)]
ProgressSeconds = Annotated[float, _range("progress_timeout_s")]
PendingSeconds = Annotated[float, _range("pending_timeout_s")]
Attempts = Annotated[int, _range("max_attempts"), BeforeValidator(_integral)]


class ControllerHealthLike(Protocol):
    """What the readiness probe reads of the DrainRequest controller (`orchestrator.controller.ControllerHealth`)."""

    @property
    def ok(self) -> bool: ...

    def describe(self) -> str: ...


class DrainRequestBody(BaseModel):
    """A drain (or dry-run plan) request. Semantic checks (unknown nodes, capacity) come after the schema."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"examples": [
        {"nodes": ["worker-01"]},
        {"nodes": ["worker-02", "worker-03"], "max_parallel_nodes": 2, "order": "planner", "max_attempts": 5,
         "pending_timeout_s": 300, "progress_timeout_s": 150, "completion_timeout_per_gib": 150}]})

    nodes: list[NodeNameStr] = Field(min_length=1, max_length=MAX_REQUEST_NODES, description="Nodes to drain.",
                                     json_schema_extra={"uniqueItems": True})
    max_parallel_nodes: ParallelNodes = _described("max_parallel_nodes", "Nodes drained at the same time.",
                                       default=1)
    order: NodeOrder = Field(NodeOrder.GIVEN, description="given: as listed; planner: least work first.")
    non_migratable: NonMigratablePolicy = Field(
        NonMigratablePolicy.BLOCK, description="block: refuse the drain if a VM cannot move; skip: leave it.")
    completion_timeout_per_gib: CompletionPerGib | None = _described(
        "completion_timeout_per_gib", "Abort a migration after this many seconds per GiB of migration data.")
    progress_timeout_s: ProgressSeconds | None = _described(
        "progress_timeout_s", "Abort a migration that made no progress for this many seconds.")
    pending_timeout_s: PendingSeconds | None = _described(
        "pending_timeout_s", "Abort a migration still pending (target not scheduled) after this many seconds.")
    max_attempts: Attempts | None = _described("max_attempts", "Attempts per VM, the first included.")
    uncordon_on_cancel: bool = Field(True, description="Uncordon the nodes when the drain is cancelled.")
    tune: bool = Field(False, description="Set KubeVirt's migration limits computed for this drain while it runs "
                                          "(the plan shows them), and restore the previous ones when it ends.")
    last_resort_targets: list[NodeNameStr] = Field(
        [], max_length=MAX_REQUEST_NODES, description="Nodes a VM goes to only when no other node has room "
                                                      "(a rollout's nodes still waiting for maintenance).")
    allow_post_copy: bool = Field(False, description="A VM that cannot converge in pre-copy may try again in "
                                                     "post-copy (not for critical data or unstable networks); "
                                                     "adds post-copy to escalation.")
    escalation: Annotated[EscalationStr | Annotated[list[RungName], Field(max_length=3)] | None,
                          BeforeValidator(_check_escalation)] = Field(
        None, description="The rungs of the escalation ladder a VM that cannot converge may climb, in this "
                          "order: solo (alone on its NICs), auto-converge (CPU throttling), post-copy; a "
                          "comma-separated list or a list of names (empty: none), or none. Default: "
                          "solo,auto-converge. The "
                          "drainctl.io/escalation annotation of a VMI or its namespace narrows it.")

    @field_validator("nodes")
    @classmethod
    def _distinct(cls, nodes: list[str]) -> list[str]:
        counts = Counter(nodes)
        twice = sorted(n for n, c in counts.items() if c > 1)
        if twice:
            raise ValueError(f"listed more than once: {', '.join(twice)}")
        return nodes

    def to_request(self) -> DrainRequest:
        return DrainRequest.from_json(self.model_dump(mode="json", exclude_none=True))


class Links(BaseModel):
    self: str
    events: str


class DrainAccepted(BaseModel):
    """Answer to a submitted drain (202) or to a retried one with the same idempotency key (200)."""

    id: str
    phase: str
    created: bool = Field(description="False when the idempotency key named an earlier drain.")
    links: Links


class _DrainBase(BaseModel):
    """The fields every view of a drain record carries."""

    model_config = ConfigDict(extra="allow")

    id: str
    phase: str
    message: str | None = None
    source: str | None = None
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None


class DrainSummary(_DrainBase):
    nodes: list[str]
    estimate_s: float | None = None
    links: Links


class DrainList(BaseModel):
    items: list[DrainSummary] = Field(description="Newest first.")


class Attempt(BaseModel):
    model_config = ConfigDict(extra="allow")

    attempt: int
    vmim: str | None = None
    target: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    outcome: str | None = None
    reason: str | None = None
    failure_class: str | None = None


class VmState(BaseModel):
    model_config = ConfigDict(extra="allow")

    vmi: str
    node: str
    phase: str
    verdict: str | None = None
    reason: str | None = None
    message: str | None = None
    attempt: int | None = Field(None, description="The current (or last) attempt; 0 when never tried.")
    attempts: list[Attempt] = []
    target: str | None = None
    failure_class: str | None = None


class NodeState(BaseModel):
    model_config = ConfigDict(extra="allow")

    node: str
    phase: str
    message: str | None = None
    wave: int | None = None


class Eta(BaseModel):
    """Cluster seconds (the simulator's time scale applied): the plan's estimate against the time spent."""

    estimate_s: float | None
    elapsed_s: float
    remaining_s: float | None = Field(description="Estimate minus elapsed, never below 0; null once final.")
    time_scale: float


class Progress(BaseModel):
    nodes: int
    nodes_final: int
    vms: int
    vms_final: int
    vms_succeeded: int
    vms_failed: int


class DrainDetail(_DrainBase):
    """One drain with every node and VM record (the same shape as `drainctl status -o json`), plus ETA."""

    estimate_s: float | None = None
    links: Links
    request: dict[str, Any]
    warnings: list[str] = []
    limits: dict[str, Any] | None = None
    cancel: dict[str, Any] | None = None
    nodes: dict[str, NodeState] = Field(description="Per node, by node name.")
    vms: dict[str, VmState] = Field(description="Per VM, by namespace/name.")
    eta: Eta
    progress: Progress
    plan: dict[str, Any] | None = Field(None, description="The stored plan, with ?plan=true.")


class CancelAccepted(BaseModel):
    id: str
    phase: str
    links: Links


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


# ================================================================================================= errors
class ApiError(Exception):
    """An error answer; the middleware renders it as {"error": {...}}."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers or {}


def _error_response(status: int, code: str, message: str, details: Any = None,
                    headers: dict[str, str] | None = None) -> web.Response:
    body = ErrorBody(error=ErrorDetail(code=code, message=message, details=details))
    return web.json_response(body.model_dump(mode="json"), status=status, headers=headers)


def _schema_error(exc: ValidationError) -> ApiError:
    problems = []
    for err in exc.errors(include_url=False, include_context=False, include_input=False):
        field = ".".join(str(part) for part in err["loc"]) or "(body)"
        message = err["msg"].removeprefix("Value error, ")
        problems.append({"field": field, "message": message, "type": err["type"]})
    text = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return ApiError(422, "invalid", text, {"problems": problems})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}


def _drain_id(request: web.Request) -> str:
    """The path's drain id, refused (400) unless it is one we could have issued."""
    drain_id = request.match_info["drain_id"]
    if not _DRAIN_ID.fullmatch(drain_id):
        raise ApiError(400, "bad_drain_id", f"{drain_id!r} is not a drain id (1 to 64 letters, digits, '.', '_' "
                                            "or '-', starting with a letter or digit)", {"drain_id": drain_id})
    return drain_id


def _links(drain_id: str) -> Links:
    return Links(self=f"/v1/drains/{drain_id}", events=f"/v1/drains/{drain_id}/events")


# ================================================================================================== app
class _Api:
    """The handlers, and the service they share once the app has started."""

    def __init__(self, service_factory: ServiceFactory, *, token: str, sse_block_ms: int,
                 readiness_timeout_s: float) -> None:
        if not token:
            raise ValueError("the API token must not be empty")
        self._factory = service_factory
        self._token = token.encode()
        self._block_ms = sse_block_ms
        self._readiness_timeout_s = readiness_timeout_s
        self._service: DrainService | None = None
        self._metrics: MetricsSource | None = None
        self.run_controller = False
        self.controller_health: ControllerHealthLike | None = None
        self._supervisor: Supervisor | None = None
        self._streams: set[asyncio.Task[Any]] = set()
        self.openapi = openapi_document()

    @property
    def service(self) -> DrainService:
        if self._service is None:
            raise ApiError(503, "starting", "the API is not connected yet")
        return self._service

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        async with self._factory() as service:
            self._service = service
            self._metrics = MetricsSource(service.redis, queue_name=service.settings.connection.queue_name)
            stop = asyncio.Event()
            supervisor = Supervisor("api")
            kube = service.kube if service.has_kube else None
            guard = EpochGuard(service.redis, kube, owner="api")
            supervisor.spawn("redis-epoch", lambda: check_epoch_forever(
                guard, report=lambda problem: supervisor.degraded("redis-epoch", problem)))
            if self.run_controller:
                # The DrainRequest controller runs beside the API; with several replicas a Lease picks one.
                from orchestrator.controller import ControllerHealth, default_identity, run_controller

                health = self.controller_health = ControllerHealth()
                supervisor.spawn("drainrequest-controller", lambda: run_controller(
                    service, service.kube, identity=default_identity(), stop=stop, health=health), until=stop)
            self._supervisor = supervisor
            try:
                yield
            finally:
                stop.set()
                await supervisor.join(15)  # the controller stops kopf and releases its Lease
                await supervisor.stop()
                self._service = None
                self._metrics = None
                self._supervisor = None

    async def close_streams(self, app: web.Application) -> None:
        """Event streams run until their drain ends; a stopping server ends them instead of waiting."""
        for task in list(self._streams):
            task.cancel()

    # ---------------------------------------------------------------------------------------- middleware
    @web.middleware
    async def errors(self, request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _HTTP_CODES.get(exc.status, "http_error")
            # Keep what the exception says beyond its text: Allow on a 405 (RFC 9110 15.5.6).
            headers = {name: value for name, value in exc.headers.items()
                       if name.lower() not in ("content-type", "content-length")}
            message = exc.reason
            if isinstance(exc, web.HTTPMethodNotAllowed):
                allowed = ", ".join(sorted(exc.allowed_methods))
                message = f"{exc.method} is not allowed on {request.path}; allowed: {allowed}"
            return _error_response(exc.status, code, message, headers=headers)
        except k.KubeError as exc:
            status = 503 if exc.retryable else 502
            log.warning("api.cluster_error", path=request.path, error=str(exc))
            return _error_response(status, "cluster_unavailable" if exc.retryable else "cluster_error",
                                   f"cluster: {exc.message or exc.reason}", {"status": exc.status})
        except RedisError as exc:
            log.warning("api.redis_error", path=request.path, error=str(exc))
            return _error_response(503, "redis_unavailable", f"Redis: {exc}", headers={"Retry-After": "5"})
        except Exception:
            # A bug, not bad input: say so in the same JSON shape, and keep the traceback in the log.
            log.exception("api.internal_error", method=request.method, path=request.path)
            return _error_response(500, "internal", "internal error; the server log has the details")

    @web.middleware
    async def auth(self, request: web.Request,
                   handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        if not (request.path == "/v1" or request.path.startswith("/v1/")):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "unauthorized", "a bearer token is required (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": 'Bearer realm="drainctl"'})
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise ApiError(403, "forbidden", "the bearer token is not valid for this API")
        return await handler(request)

    @web.middleware
    async def known_query(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """A query parameter the operation does not document is refused (422), not silently ignored: a typo
        such as ``?uncordn=false`` must not cancel with the default."""
        resource = request.match_info.route.resource
        operation = self.openapi["paths"].get(resource.canonical if resource else "", {}).get(request.method.lower())
        if operation is not None:
            known = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
            unknown = sorted(set(request.query) - known)
            if unknown:
                expected = ", ".join(sorted(known)) or "none"
                raise ApiError(422, "invalid",
                               f"unknown query parameter(s): {', '.join(unknown)} (expected: {expected})",
                               {"problems": [{"field": name, "message": "unknown query parameter"}
                                             for name in unknown]})
        return await handler(request)

    # --------------------------------------------------------------------------------------------- body
    async def _body(self, request: web.Request) -> DrainRequestBody:
        if request.content_type not in JSON_TYPES:
            given = request.headers.get("Content-Type", "no Content-Type")
            raise ApiError(415, "unsupported_media_type",
                           f"the body must be JSON (Content-Type: application/json), not {given}",
                           {"content_type": given}, headers={"Accept-Post": ", ".join(JSON_TYPES)})
        raw = await request.read()
        try:
            return DrainRequestBody.model_validate_json(raw or b"")
        except ValidationError as exc:
            if any(err["type"] == "json_invalid" for err in exc.errors()):
                detail = exc.errors()[0]["msg"]
                raise ApiError(400, "bad_json", f"the body is not valid JSON: {detail}") from None
            raise _schema_error(exc) from None

    async def _require_nodes(self, request: DrainRequest) -> list[Obj]:
        """The requested node objects; 404 naming those the cluster does not have (checked before planning)."""
        items, _ = await self.service.kube.list(k.NODES)
        by_name = {(obj.get("metadata") or {}).get("name"): obj for obj in items}
        unknown = [n for n in request.nodes if n not in by_name]
        if unknown:
            raise ApiError(404, "unknown_nodes", f"unknown node(s): {', '.join(unknown)}", {"nodes": unknown})
        return [by_name[n] for n in request.nodes]

    async def _node_events(self, nodes: list[Obj], *, reason: str, message: str) -> None:
        """Tell `kubectl describe node` readers who asked for what; a lost Event is logged, never fatal."""
        kube = self.service.kube
        async with asyncio.TaskGroup() as group:
            for node in nodes:
                # Items of a list response carry no kind or apiVersion; the Event's involvedObject needs both.
                involved = {**node, "kind": "Node", "apiVersion": "v1"}
                group.create_task(kube.event(involved=involved, reason=reason, message=message),
                                  name=f"event:{reason}:{(node.get('metadata') or {}).get('name')}")

    # ------------------------------------------------------------------------------------------ drains
    async def submit(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        drain_request = body.to_request()
        key = request.headers.get(IDEMPOTENCY_HEADER)
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise ApiError(400, "bad_header", f"{IDEMPOTENCY_HEADER}: 1 to 255 printable ASCII characters "
                                              "without spaces")
        service = self.service
        if key is not None:
            # A retried hook must get its drain back even if the cluster changed since (nodes removed).
            earlier = await self._idempotent(key, drain_request)
            if earlier is not None:
                return self._accepted(earlier, created=False)
        node_objs = await self._require_nodes(drain_request)
        try:
            record, created = await service.submit(drain_request, idempotency_key=key, source="api")
        except PlanError as exc:
            raise ApiError(422, "infeasible", "the drain cannot be carried out as asked: " + "; ".join(exc.problems),
                           {"problems": list(exc.problems)}) from None
        except NodeConflict as exc:
            raise ApiError(409, "conflict", str(exc),
                           {"nodes": dict(sorted(exc.taken.items()))}) from None
        except IdempotencyKeyReused as exc:
            # Another request with this key won the race while this one planned, and asked for something else.
            raise ApiError(422, "idempotency_key_reused", str(exc), {"drain": exc.drain_id}) from None
        if not created:
            self._check_same(key, record, drain_request)
        else:
            await self._node_events(node_objs, reason="DrainRequested",
                                    message=f"drainctl drain {record.id} requested through the API")
        log.info("api.drain_submitted", drain_id=record.id, nodes=list(drain_request.nodes), created=created)
        return self._accepted(record, created=created)

    async def _idempotent(self, key: str, request: DrainRequest) -> DrainRecord | None:
        service = self.service
        redis: Any = service.redis
        existing = await redis.get(keys.idempotency_key(key))
        if existing is None:
            return None
        drain_id = existing.decode() if isinstance(existing, bytes) else str(existing)
        record = await service.store.find(drain_id)
        if record is not None:
            self._check_same(key, record, request)
        return record

    @staticmethod
    def _check_same(key: str | None, record: DrainRecord, request: DrainRequest) -> None:
        if record.request != request.to_json():
            raise ApiError(422, "idempotency_key_reused",
                           f"{IDEMPOTENCY_HEADER} {key!r} was used for a different request (drain {record.id})",
                           {"drain": record.id})

    @staticmethod
    def _accepted(record: DrainRecord, *, created: bool) -> web.Response:
        body = DrainAccepted(id=record.id, phase=record.phase.value, created=created, links=_links(record.id))
        return web.json_response(body.model_dump(mode="json"), status=202 if created else 200,
                                 headers={"Location": body.links.self})

    async def list_drains(self, request: web.Request) -> web.Response:
        limit = _int_query(request, "limit", default=200, low=1, high=MAX_LIST)
        drains = await self.service.list(limit=limit)
        items = [_summary(d) for d in drains]
        return web.json_response(DrainList(items=items).model_dump(mode="json"))

    async def get_drain(self, request: web.Request) -> web.Response:
        drain_id = _drain_id(request)
        with_plan = _bool_query(request, "plan", default=False)
        try:
            view = await self.service.get(drain_id)
        except DrainNotFound:
            raise ApiError(404, "not_found", f"drain {drain_id!r} not found") from None
        detail = _detail(view.drain, view.nodes, view.vms, now=time.time(), with_plan=bool(with_plan))
        return web.json_response(detail.model_dump(mode="json"))

    async def cancel(self, request: web.Request) -> web.Response:
        drain_id = _drain_id(request)
        uncordon = _bool_query(request, "uncordon", default=None)
        mode = request.query.get("mode", "abort")
        if mode not in ("abort", "finish"):
            raise ApiError(422, "invalid", f"mode: {mode!r} is not one of abort, finish",
                           {"problems": [{"field": "mode", "message": "expected abort or finish"}]})
        try:
            record = await self.service.cancel(drain_id, uncordon=uncordon, mode=mode)
        except DrainNotFound:
            raise ApiError(404, "not_found", f"drain {drain_id!r} not found") from None
        log.info("api.drain_cancel", drain_id=drain_id, phase=record.phase.value, mode=mode, uncordon=uncordon)
        if not record.phase.is_final:
            try:
                nodes = [obj for obj in [await self.service.kube.find(k.NODES, n) for n in record.nodes]
                         if obj is not None]
            except k.KubeError as exc:
                # The cancel is recorded and the workers act on it; an unreachable cluster only costs the Events.
                log.warning("api.cancel_events_lost", drain_id=drain_id, error=str(exc))
                nodes = []
            await self._node_events(nodes, reason="DrainCancelRequested",
                                    message=f"drainctl drain {drain_id}: cancel requested through the API "
                                            f"(mode {mode})")
        body = CancelAccepted(id=drain_id, phase=record.phase.value, links=_links(drain_id))
        # A drain that had already ended is left as it was: nothing was accepted.
        return web.json_response(body.model_dump(mode="json"), status=200 if record.phase.is_final else 202)

    async def plan(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        drain_request = body.to_request()
        await self._require_nodes(drain_request)
        try:
            result = await self.service.plan(drain_request)
        except PlanError as exc:
            raise ApiError(422, "infeasible", "the drain cannot be carried out as asked: " + "; ".join(exc.problems),
                           {"problems": list(exc.problems)}) from None
        return web.json_response(result.to_json())

    # ------------------------------------------------------------------------------------------ events
    async def events(self, request: web.Request) -> web.StreamResponse:
        drain_id = _drain_id(request)
        service = self.service
        try:
            await service.store.get(drain_id)
        except DrainNotFound:
            raise ApiError(404, "not_found", f"drain {drain_id!r} not found") from None
        after = request.headers.get("Last-Event-ID") or request.query.get("after") or "0"
        if not _STREAM_ID.fullmatch(after):
            raise ApiError(400, "bad_header", f"Last-Event-ID: {after!r} is not an event id")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            await response.prepare(request)
            await response.write(f"retry: {min(self._block_ms, 5000)}\n\n".encode())
            await self._stream(response, drain_id, after)
        except ConnectionResetError:
            log.info("api.events_client_gone", drain_id=drain_id)
        except RedisError as exc:
            # The headers are sent: end the stream; the client reconnects with Last-Event-ID and loses nothing.
            log.warning("api.events_redis_error", drain_id=drain_id, error=str(exc))
        finally:
            self._streams.discard(task)
        return response

    async def _stream(self, response: web.StreamResponse, drain_id: str, after: str) -> None:
        service = self.service
        while True:  # replay what is stored, in pages
            batch = await service.events(drain_id, after=after)
            for event in batch:
                after = await _send(response, event)
                if event.get("event") == "drain.finished":
                    return
            if not batch:
                break
        while True:  # then live
            batch = await service.events(drain_id, after=after, block_ms=self._block_ms)
            if not batch:
                drain = await service.store.find(drain_id)
                # The phase turns final a moment before drain.finished is written (nodes are uncordoned in
                # between); long after, a missing event was trimmed away and nothing more will come.
                if drain is None or (drain.phase.is_final
                                     and time.time() - (drain.finished_at or 0.0) > FINISHED_GRACE_S):
                    return
                await response.write(b": keep-alive\n\n")
                continue
            for event in batch:
                after = await _send(response, event)
                if event.get("event") == "drain.finished":
                    return

    # ------------------------------------------------------------------------------------------- probes
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(Health(status="ok").model_dump(mode="json"))

    async def readyz(self, request: web.Request) -> web.Response:
        service = self.service
        checks: dict[str, str] = {}
        redis: Any = service.redis
        try:
            async with asyncio.timeout(self._readiness_timeout_s):
                await redis.ping()
            checks["redis"] = "ok"
        except (RedisError, OSError, TimeoutError) as exc:
            checks["redis"] = f"unreachable: {exc or type(exc).__name__}"
        try:
            async with asyncio.timeout(self._readiness_timeout_s):
                # Any answer about one small object proves the API server is there and accepts our token.
                await service.kube.find(k.NAMESPACES, "default")
            checks["cluster"] = "ok"
        except (k.KubeError, TimeoutError) as exc:
            checks["cluster"] = f"unreachable: {exc or type(exc).__name__}"
        if self.controller_health is not None:
            health = self.controller_health
            checks["controller"] = "ok" if health.ok else f"not working: {health.describe()}"
        problems = self._supervisor.problems() if self._supervisor is not None else {}
        if "redis-epoch" in problems:
            # Redis may answer a PING while the epoch check fails (or its task is down): a restart that lost
            # our data would go unseen meanwhile.
            checks["redis-epoch"] = problems["redis-epoch"]
        if "drainrequest-controller" in problems:
            checks["controller"] = f"down: {problems['drainrequest-controller']}"
        ready = all(v == "ok" for v in checks.values())
        body = Health(status="ok" if ready else "unavailable", checks=checks)
        return web.json_response(body.model_dump(mode="json"), status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise ApiError(503, "starting", "the API is not connected yet")
        snapshot = await self._metrics.snapshot()
        return web.Response(body=render(snapshot), headers={"Content-Type": CONTENT_TYPE})

    async def openapi_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.openapi)


async def _send(response: web.StreamResponse, event: Event) -> str:
    """Write one event in SSE framing; returns its stream id."""
    event_id = str(event["id"])
    name = str(event.get("event") or "message").replace("\n", " ")
    data = json.dumps(event, separators=(",", ":"), default=str)
    await response.write(f"id: {event_id}\nevent: {name}\ndata: {data}\n\n".encode())
    return event_id


def _int_query(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise ApiError(422, "invalid", f"{name}: {raw!r} is not an integer in {low}..{high}",
                       {"problems": [{"field": name, "message": f"expected an integer in {low}..{high}"}]})
    return value


def _bool_query(request: web.Request, name: str, *, default: bool | None) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    value = {"true": True, "1": True, "false": False, "0": False}.get(raw.lower())
    if value is None:
        raise ApiError(422, "invalid", f"{name}: {raw!r} is not true or false",
                       {"problems": [{"field": name, "message": "expected true or false"}]})
    return value


def _summary(drain: DrainRecord) -> DrainSummary:
    return DrainSummary(id=drain.id, phase=drain.phase.value, nodes=drain.nodes, links=_links(drain.id),
                        message=drain.message, source=drain.source, created_at=drain.created_at,
                        started_at=drain.started_at, finished_at=drain.finished_at, estimate_s=drain.estimate_s)


def _detail(drain: DrainRecord, nodes: dict[str, NodeRecord], vms: dict[str, VmRecord], *, now: float,
            with_plan: bool) -> DrainDetail:
    scale = drain.time_scale or 1.0
    start = drain.started_at or drain.created_at or now
    end = drain.finished_at or now
    elapsed = max(0.0, end - start) * scale
    estimate = drain.estimate_s
    remaining = None if drain.phase.is_final or estimate is None else max(0.0, estimate - elapsed)
    vm_phases = [vm.phase for vm in vms.values()]
    progress = Progress(nodes=len(nodes), nodes_final=sum(1 for n in nodes.values() if n.phase.is_final),
                        vms=len(vms), vms_final=sum(1 for p in vm_phases if p.is_final),
                        vms_succeeded=vm_phases.count(VmPhase.SUCCEEDED), vms_failed=vm_phases.count(VmPhase.FAILED))
    return DrainDetail(
        id=drain.id, phase=drain.phase.value, message=drain.message, source=drain.source,
        created_at=drain.created_at, started_at=drain.started_at,
        finished_at=drain.finished_at, estimate_s=estimate, links=_links(drain.id),
        request=drain.request, warnings=list(drain.warnings),
        limits=None if drain.limits is None else drain.limits.to_json(),
        cancel=None if drain.cancel is None else drain.cancel.to_json(),
        nodes={name: NodeState.model_validate(rec.to_json()) for name, rec in nodes.items()},
        vms={name: VmState.model_validate(rec.to_json()) for name, rec in vms.items()},
        eta=Eta(estimate_s=estimate, elapsed_s=round(elapsed, 3),
                remaining_s=None if remaining is None else round(remaining, 3), time_scale=scale),
        progress=progress, plan=drain.plan if with_plan else None)


def build_app(service_factory: ServiceFactory, *, token: str, sse_block_ms: int = 15_000, controller: bool = False,
              readiness_timeout_s: float = 5.0) -> web.Application:
    """The aiohttp application. ``service_factory`` is entered when the app starts and left when it stops;
    tests pass one that yields a service over their own Redis and simulated cluster."""
    api = _Api(service_factory, token=token, sse_block_ms=sse_block_ms, readiness_timeout_s=readiness_timeout_s)
    api.run_controller = controller
    app = web.Application(middlewares=[api.errors, api.auth, api.known_query])
    app.cleanup_ctx.append(api.lifespan)
    app.on_shutdown.append(api.close_streams)
    app.router.add_post("/v1/drains", api.submit)
    app.router.add_get("/v1/drains", api.list_drains)
    app.router.add_get("/v1/drains/{drain_id}", api.get_drain)
    app.router.add_delete("/v1/drains/{drain_id}", api.cancel)
    app.router.add_get("/v1/drains/{drain_id}/events", api.events)
    app.router.add_post("/v1/plans", api.plan)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/openapi.json", api.openapi_json)
    return app


# ================================================================================================ openapi
def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 (whose schema dialect is JSON Schema 2020-12, what pydantic emits) for every route."""
    ref = "#/components/schemas/{model}"
    inputs: list[tuple[str, Any, TypeAdapter[Any]]] = [
        ("DrainRequestBody", "validation", TypeAdapter(DrainRequestBody)),
        ("DrainAccepted", "serialization", TypeAdapter(DrainAccepted)),
        ("DrainList", "serialization", TypeAdapter(DrainList)),
        ("DrainDetail", "serialization", TypeAdapter(DrainDetail)),
        ("CancelAccepted", "serialization", TypeAdapter(CancelAccepted)),
        ("DrainPlan", "serialization", TypeAdapter(DrainPlan)),
        ("ErrorBody", "serialization", TypeAdapter(ErrorBody)),
        ("Health", "serialization", TypeAdapter(Health)),
    ]
    top, defs = TypeAdapter.json_schemas(inputs, ref_template=ref)
    schemas: dict[str, Any] = dict(defs.get("$defs", {}))
    for (name, _mode), generated in top.items():
        if "$ref" not in generated:  # a model without nested models is inlined at the top, not in $defs
            schemas.setdefault(name, generated)

    def schema(name: str) -> dict[str, Any]:
        return {"$ref": ref.format(model=name)}

    def content(name: str) -> dict[str, Any]:
        return {"application/json": {"schema": schema(name)}}

    def error(description: str) -> dict[str, Any]:
        return {"description": description, "content": content("ErrorBody")}

    auth_errors = {"401": error("No bearer token (see WWW-Authenticate)."), "403": error("Wrong bearer token.")}
    unavailable = {"503": error("Redis cannot be reached or the API is still starting (code redis_unavailable or "
                                "starting; see Retry-After).")}
    cluster_errors = {"502": error("The cluster's API server refused a call (code cluster_error, details.status)."),
                      "503": error("Redis or the cluster cannot be reached, or the API is still starting (codes "
                                   "redis_unavailable, cluster_unavailable, starting; see Retry-After).")}
    bad_id = {"400": error("The path's drain id is not one drainctl issues (code bad_drain_id).")}
    no_drain = {"404": error("No such drain (code not_found).")}
    drain_id = {"name": "drain_id", "in": "path", "required": True,
                "schema": {"type": "string", "pattern": DRAIN_ID_PATTERN}}
    stream_id = {"type": "string", "pattern": f"^{_STREAM_ID.pattern}$"}
    body = {"required": True, "content": content("DrainRequestBody")}
    # One server-sent event (the schema of a text/event-stream applies to each event): data is one drain
    # event as JSON, carrying its own stream id and name.
    sse_event = {"type": "object", "properties": {
        "id": stream_id, "event": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"type": "object", "required": ["id", "event"],
                                   "properties": {"id": stream_id, "event": {"type": "string"}}}}}}
    refusals = {"400": error("The body is not JSON (code bad_json)."),
                "404": error("Unknown nodes (code unknown_nodes, details.nodes)."),
                "413": error("The body is larger than the server accepts (code too_large)."),
                "415": error("The body is not sent as application/json (code unsupported_media_type; see "
                             "Accept-Post)."),
                "422": error("Schema errors or an unknown query parameter (code invalid, details.problems with "
                             "field names) or an infeasible drain (code infeasible, details.problems from the "
                             "planner)."),
                **cluster_errors}
    submit_refusals = {
        **refusals,
        "400": error("The body is not JSON (code bad_json) or the Idempotency-Key header is malformed (code "
                     "bad_header)."),
        "422": error("Schema errors or an unknown query parameter (code invalid, details.problems with field "
                     "names), an infeasible drain (code infeasible, details.problems from the planner), or an "
                     "Idempotency-Key sent before with another request (code idempotency_key_reused, "
                     "details.drain).")}

    def bad_query(names: str) -> dict[str, Any]:
        return {"422": error(f"A bad {names} query parameter or an unknown one (code invalid, details.problems).")}

    unknown_query = {"422": error("An unknown query parameter (code invalid, details.problems).")}

    bearer: list[dict[str, list[str]]] = [{"bearerAuth": []}]
    # Where a drain's id leads (OpenAPI links; not to the event stream, which stays open until the drain ends).
    to_drain = {"links": {"GetDrain": {"operationId": "getDrain", "parameters": {"drain_id": "$response.body#/id"}},
                          "CancelDrain": {"operationId": "cancelDrain",
                                          "parameters": {"drain_id": "$response.body#/id"}}}}
    paths: dict[str, Any] = {
        "/v1/drains": {
            "post": {
                "operationId": "submitDrain", "summary": "Plan, record and queue a drain.", "security": bearer,
                "parameters": [{"name": IDEMPOTENCY_HEADER, "in": "header", "required": False,
                                "schema": {"type": "string", "pattern": f"^{_IDEMPOTENCY_KEY.pattern}$"},
                                "description": "A retried call with the same key returns the first drain (200)."}],
                "requestBody": body,
                "responses": {"202": {"description": "Queued.", "content": content("DrainAccepted"), **to_drain},
                              "200": {"description": "The drain this idempotency key created earlier.",
                                      "content": content("DrainAccepted"), **to_drain},
                              **submit_refusals, **auth_errors,
                              "409": error("A node belongs to another open drain (code conflict, details.nodes: "
                                           "node -> drain).")},
            },
            "get": {
                "operationId": "listDrains", "summary": "Drains, newest first.", "security": bearer,
                "parameters": [{"name": "limit", "in": "query", "required": False,
                                "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIST, "default": 200}}],
                "responses": {"200": {"description": "The drains.", "content": content("DrainList")},
                              **bad_query("limit"), **auth_errors, **unavailable},
            },
        },
        "/v1/drains/{drain_id}": {
            "get": {
                "operationId": "getDrain", "summary": "One drain: nodes, VMs, attempts, reasons, ETA.",
                "security": bearer,
                "parameters": [drain_id, {"name": "plan", "in": "query", "required": False,
                                          "schema": {"type": "boolean", "default": False}}],
                "responses": {"200": {"description": "The drain.", "content": content("DrainDetail"), **to_drain},
                              **bad_id, **no_drain, **bad_query("plan"), **auth_errors, **unavailable},
            },
            "delete": {
                "operationId": "cancelDrain", "summary": "Cancel a drain.", "security": bearer,
                "parameters": [drain_id,
                               {"name": "uncordon", "in": "query", "required": False, "schema": {"type": "boolean"},
                                "description": "Default: the request's uncordon_on_cancel."},
                               {"name": "mode", "in": "query", "required": False,
                                "schema": {"type": "string", "enum": ["abort", "finish"], "default": "abort"},
                                "description": "abort in-flight migrations, or let them finish."}],
                "responses": {"202": {"description": "Cancelling.", "content": content("CancelAccepted")},
                              "200": {"description": "The drain had already ended; nothing changed.",
                                      "content": content("CancelAccepted")},
                              **bad_id, **no_drain, **bad_query("mode or uncordon"), **auth_errors, **unavailable},
            },
        },
        "/v1/drains/{drain_id}/events": {
            "get": {
                "operationId": "drainEvents", "security": bearer,
                "summary": "Server-sent events of one drain: replay, then live, until drain.finished.",
                "parameters": [drain_id,
                               {"name": "Last-Event-ID", "in": "header", "required": False, "schema": stream_id,
                                "description": "Resume after this event id."},
                               {"name": "after", "in": "query", "required": False, "schema": stream_id,
                                "description": "Resume after this event id (for clients that cannot set headers; "
                                               "Last-Event-ID wins)."}],
                "responses": {"200": {"description": "`event:` is the event name, `id:` the stream id, `data:` "
                                                     "the event as JSON.",
                                      "content": {"text/event-stream": {"schema": sse_event}}},
                              "400": error("The drain id is malformed (code bad_drain_id) or Last-Event-ID / "
                                           "after is not an event id (code bad_header)."),
                              **no_drain, **unknown_query, **auth_errors, **unavailable},
            },
        },
        "/v1/plans": {
            "post": {
                "operationId": "planDrain", "summary": "Dry run: the plan, or the planner's problems.",
                "security": bearer, "requestBody": body,
                "responses": {"200": {"description": "The plan.", "content": content("DrainPlan")},
                              **refusals, **auth_errors},
            },
        },
        "/healthz": {"get": {"operationId": "healthz", "summary": "The process is up.",
                             "responses": {"200": {"description": "Up.", "content": content("Health")},
                                           **unknown_query}}},
        "/readyz": {"get": {"operationId": "readyz",
                            "summary": "Redis answers, its epoch check works and the cluster is reachable.",
                            "responses": {"200": {"description": "Ready.", "content": content("Health")},
                                          "503": {"description": "Not ready.", "content": content("Health")},
                                          **unknown_query}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics, read from Redis.",
                             "responses": {"200": {"description": "Prometheus text format.",
                                                   "content": {"text/plain": {"schema": {"type": "string"}}}},
                                           **unknown_query, **unavailable}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                                  "responses": {"200": {"description": "OpenAPI 3.1.",
                                                        "content": {"application/json": {"schema": {}}}},
                                                  **unknown_query}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "drainctl", "version": "1", "description": "Drain orchestrator for KubeVirt clusters."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
    }


# ==================================================================================================== cli
@contextlib.asynccontextmanager
async def connect_service(settings: Settings) -> AsyncIterator[DrainService]:
    """The production service: an arq Redis pool and a cluster connection, from ``settings``."""
    from arq.connections import RedisSettings, create_pool

    redis = await create_pool(RedisSettings.from_dsn(settings.connection.redis_url))
    try:
        kube = await k.Kube.connect(kubeconfig=settings.connection.kubeconfig, context=settings.connection.context)
        try:
            yield DrainService(redis=redis, settings=settings, kube=kube)
        finally:
            await kube.close()
    finally:
        await redis.aclose()


def read_token(token_file: Path | None, env: Mapping[str, str]) -> str:
    """The bearer token: the file's content (trimmed) when given, else ``DRAIN_API_TOKEN``."""
    if token_file is not None:
        token = token_file.read_text().strip()
        if not token:
            raise ValueError(f"--token-file: {token_file} is empty")
        return token
    token = env.get(TOKEN_ENV, "").strip()
    if not token:
        raise ValueError(f"no API token: set {TOKEN_ENV} or pass --token-file")
    return token
