"""Fault injection for the simulated cluster (`POST /sim/v1/faults`).

Request-level faults (error responses, latency) are applied by the HTTP server before a request reaches
the store; migration faults (nodes that fail every migration they receive) by the migration controller.
The orchestrator never reads this: only tests, demos and benchmarks set it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from simulator.errors import ApiError


class ErrorRule(BaseModel):
    """Answer a share of matching requests with an error status."""

    model_config = ConfigDict(extra="forbid")
    verb: str = Field("*", description="get|list|watch|create|update|patch|delete, or * for any")
    resource: str = Field("*", description="plural, e.g. virtualmachineinstancemigrations, or *")
    rate: float = Field(1.0, ge=0.0, le=1.0, description="share of matching requests that fail")
    code: int = Field(500, ge=400, le=599)
    count: int | None = Field(None, ge=1, description="stop after this many injected errors")


class FaultsBody(BaseModel):
    """The JSON body of POST /sim/v1/faults. Every field is optional; fields given replace the old ones."""

    model_config = ConfigDict(extra="forbid")
    clear: bool = False
    fail_migrations_to: list[str] | None = None
    errors: list[ErrorRule] | None = None
    latency_ms: float | None = Field(None, ge=0)
    drop_watches: bool = False
    drop_watches_every_s: float | None = Field(None, ge=0)


@dataclass
class Faults:
    fail_migrations_to: set[str] = field(default_factory=set)
    errors: list[ErrorRule] = field(default_factory=list)
    latency_ms: float = 0.0
    drop_watches_every_s: float = 0.0
    injected: int = 0
    rand: random.Random = field(default_factory=lambda: random.Random(7))

    def apply(self, body: FaultsBody) -> None:
        if body.clear:
            self.fail_migrations_to.clear()
            self.errors.clear()
            self.latency_ms = 0.0
            self.drop_watches_every_s = 0.0
        if body.fail_migrations_to is not None:
            self.fail_migrations_to = set(body.fail_migrations_to)
        if body.errors is not None:
            self.errors = list(body.errors)
        if body.latency_ms is not None:
            self.latency_ms = body.latency_ms
        if body.drop_watches_every_s is not None:
            self.drop_watches_every_s = body.drop_watches_every_s

    def request_error(self, verb: str, resource: str) -> ApiError | None:
        """The error to answer this request with, if a rule fires."""
        for rule in self.errors:
            if rule.verb not in ("*", verb) or rule.resource not in ("*", resource):
                continue
            if rule.count is not None and rule.count <= 0:
                continue
            if self.rand.random() < rule.rate:
                if rule.count is not None:
                    rule.count -= 1
                self.injected += 1
                return ApiError(rule.code, f"injected fault: {verb} {resource} answered {rule.code}")
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "fail_migrations_to": sorted(self.fail_migrations_to),
            "errors": [r.model_dump() for r in self.errors],
            "latency_ms": self.latency_ms,
            "drop_watches_every_s": self.drop_watches_every_s,
            "injected": self.injected,
        }
