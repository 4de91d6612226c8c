"""The ground-truth client: `/sim/v1/*` (stats, scenario, faults) with the simulator's admin credentials.

A real cluster never shows per-VM dirty rates, working sets or true bytes sent, so the simulator serves them
only to the admin token (`drainctl sim serve --admin-kubeconfig-out PATH`); the cluster token that kubectl and
the orchestrator use gets 403 there. Tests, benchmarks and the demo read the ground truth through this client;
the orchestrator never has the admin kubeconfig.

It reads the kubeconfig the simulator wrote (one cluster, one token, an optional CA) and speaks plain aiohttp,
so it needs nothing of the orchestrator.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

Obj = dict[str, Any]


class SimAdminError(RuntimeError):
    """A `/sim/v1/*` request answered with an error status."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"/sim/v1 answered {status}: {body[:300]}")
        self.status = status


class SimAdmin:
    """Async client for the simulator's ground truth. Use as `async with SimAdmin.from_kubeconfig(p) as a:`."""

    def __init__(self, url: str, token: str, *, ca_data: bytes | None = None) -> None:
        self.url = url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._ssl: ssl.SSLContext | bool = True
        if ca_data is not None:
            ctx = ssl.create_default_context(cadata=ca_data.decode())
            self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> SimAdmin:
        """The client for the admin kubeconfig written by `running_cluster(admin_kubeconfig_out=...)`."""
        config = yaml.safe_load(Path(path).read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        ca = cluster.get("certificate-authority-data")
        return cls(cluster["server"], str(user.get("token") or ""),
                   ca_data=base64.b64decode(ca) if ca else None)

    async def __aenter__(self) -> SimAdmin:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, body: Obj | None = None) -> Obj:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
        async with self._session.request(method, f"{self.url}{path}", json=body, headers=self._headers,
                                         ssl=self._ssl) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise SimAdminError(resp.status, text)
            data: Obj = await resp.json(content_type=None)
            return data

    async def stats(self) -> Obj:
        """GET /sim/v1/stats: the ground truth (migrations, limits reached, restarts, API requests)."""
        return await self._request("GET", "/sim/v1/stats")

    async def scenario(self) -> Obj:
        """GET /sim/v1/scenario: the hidden physics."""
        return await self._request("GET", "/sim/v1/scenario")

    async def faults(self, body: Obj | None = None) -> Obj:
        """POST /sim/v1/faults with `body`, or GET the faults in force when `body` is None."""
        if body is None:
            return await self._request("GET", "/sim/v1/faults")
        return await self._request("POST", "/sim/v1/faults", body)
