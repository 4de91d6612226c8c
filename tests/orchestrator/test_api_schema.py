"""schemathesis against /openapi.json: the real API app over a real Redis database and the simulated cluster.

Every operation of the document gets generated requests (valid and invalid, boundary values from the
coverage phase, a bounded number of examples with a fixed seed) and every response is checked against the
document: no server error, every documented status, header and body shape real, every error body the JSON
``{"error": {"code", "message", "details"}}`` (the documented ErrorBody).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from arq.connections import ArqRedis, RedisSettings, create_pool
from hypothesis import HealthCheck, settings

from orchestrator import kube as k
from orchestrator.api import build_app, openapi_document
from orchestrator.service import DrainService
from orchestrator.settings import Settings
from simulator import scenarios
from simulator.cluster import running_cluster
from tests.redis_db import claimed_db

pytestmark = pytest.mark.integration

TOKEN = "schema-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 40
SEED = 20261201
CALLS: Counter[tuple[str, int]] = Counter()
"""Responses per operation and status (reported when the module ends)."""


class ServedApi:
    """The API app, the simulated cluster and a claimed Redis database, served from a thread of their own:
    schemathesis calls the API synchronously over HTTP, as any client would."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self.url = ""
        self._thread = threading.Thread(target=self._run, name="served-api", daemon=True)

    def __enter__(self) -> ServedApi:
        self._thread.start()
        self._ready.wait(60)
        if self._error is not None or not self.url:
            raise RuntimeError(f"the API did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread, which raises it
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        kubeconfig = self._tmp / "kubeconfig"
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(claimed_db())
            await stack.enter_async_context(running_cluster(scenarios.builtin("small"), time_scale=50.0,
                                                            token=TOKEN, kubeconfig_out=kubeconfig))
            settings_ = Settings.from_env({}, redis_url=url, kubeconfig=str(kubeconfig),
                                          queue_name=f"test-schema-{uuid.uuid4().hex[:8]}", time_scale=50.0)
            redis: ArqRedis = await create_pool(RedisSettings.from_dsn(url))
            stack.push_async_callback(redis.aclose)
            kube = await k.Kube.connect(kubeconfig=kubeconfig)
            stack.push_async_callback(kube.close)
            service = DrainService(redis=redis, settings=settings_, kube=kube)

            @contextlib.asynccontextmanager
            async def factory() -> AsyncIterator[DrainService]:
                yield service

            runner = web.AppRunner(build_app(factory, token=TOKEN, sse_block_ms=200), access_log=None)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = next(iter(runner.addresses))[1]
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()
            await self._stop.wait()


@pytest.fixture(scope="module")
def served_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApi]:
    with ServedApi(tmp_path_factory.mktemp("schema")) as served:
        yield served
    by_operation: dict[str, dict[int, int]] = {}
    for (label, status), count in sorted(CALLS.items()):
        by_operation.setdefault(label, {})[status] = count
    print(f"\nschemathesis: {sum(CALLS.values())} requests")
    for label, statuses in by_operation.items():
        print(f"  {label}: {statuses}")


CONFIG = schemathesis.Config.from_dict({
    "auth": {"openapi": {"bearerAuth": {"bearer": TOKEN}}},
    # A schema-valid drain may still be refused (422) as infeasible or for a reused Idempotency-Key; the check
    # below makes sure a schema-valid request is never refused as invalid.
    # DELETE cancels a drain and leaves it readable (Cancelling, then Cancelled): "deleted resource still
    # available" does not apply.
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "422"]},
               "use_after_free": {"enabled": False}},
    "generation": {"deterministic": True, "max-examples": MAX_EXAMPLES, "database": "none"},
    # Follow only the links the document declares: one inferred from the Location header would open the event
    # stream of a drain that never ends here (no worker runs), and wait on it until the call's timeout.
    "phases": {"stateful": {"inference": {"algorithms": []}}},
})
schema = schemathesis.openapi.from_dict(openapi_document(), config=CONFIG)


def error_bodies_are_json(ctx: schemathesis.CheckContext, response: schemathesis.Response,
                          case: schemathesis.Case) -> bool | None:
    """Every 4xx/5xx, documented for the operation or not (405, 413), is {"error": {code, message, details}}."""
    if response.status_code < 400:
        return None
    assert response.headers.get("content-type", [""])[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["message"], body
    return None


def schema_valid_requests_are_not_refused_as_invalid(ctx: schemathesis.CheckContext,
                                                     response: schemathesis.Response,
                                                     case: schemathesis.Case) -> bool | None:
    """Where the document says a request is valid, the server's own schema check agrees: a 422 for a
    positive case is the planner refusing the drain (code infeasible) or an Idempotency-Key used before for
    another request (code idempotency_key_reused, as the IETF idempotency-key draft has it), never a schema
    error (code invalid)."""
    if case.meta is None or not case.meta.generation.mode.is_positive or response.status_code != 422:
        return None
    assert response.json()["error"]["code"] in ("infeasible", "idempotency_key_reused"), response.text
    return None


CHECKS = [error_bodies_are_json, schema_valid_requests_are_not_refused_as_invalid]
HYPOTHESIS = settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_every_response_matches_the_document(case: schemathesis.Case, served_api: ServedApi) -> None:
    response = case.call(base_url=served_api.url, timeout=30)
    CALLS[(case.operation.label, response.status_code)] += 1
    case.validate_response(response, additional_checks=CHECKS)


def test_sequences_that_follow_the_documents_links(tmp_path: Path) -> None:
    """Stateful: submit a drain, then read and cancel it through the links the document declares, so the
    answers about real drains (DrainDetail, CancelAccepted, 409 for a node taken) are checked too. A cluster
    and a database of its own: the nodes the examples name are still free."""
    with ServedApi(tmp_path) as served_api:
        _run_workflow(served_api)


def _run_workflow(served_api: ServedApi) -> None:
    machine = schema.as_state_machine()

    class Workflow(machine):  # type: ignore[misc,valid-type]
        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": served_api.url, "timeout": 30}

        def after_call(self, response: schemathesis.Response, case: schemathesis.Case) -> None:
            super().after_call(response, case)
            CALLS[(f"stateful {case.operation.label}", response.status_code)] += 1

        def validate_response(self, response: schemathesis.Response, case: schemathesis.Case,
                              additional_checks: list[Any] | None = None, **kwargs: Any) -> None:
            super().validate_response(response, case, additional_checks=CHECKS, **kwargs)

    Workflow.run(settings=settings(HYPOTHESIS, max_examples=MAX_EXAMPLES, stateful_step_count=8))
