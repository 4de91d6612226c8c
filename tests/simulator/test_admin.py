"""The ground truth behind admin credentials: `drainctl sim serve --admin-kubeconfig-out` over HTTPS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from simulator.admin import SimAdmin, SimAdminError

DRAINCTL = str(Path(sys.executable).with_name("drainctl"))


@contextlib.asynccontextmanager
async def sim_serve(tmp_path: Path) -> AsyncIterator[tuple[Path, Path]]:
    kubeconfig, admin = tmp_path / "cluster.kubeconfig", tmp_path / "admin.kubeconfig"
    proc = await asyncio.create_subprocess_exec(
        DRAINCTL, "sim", "serve", "--scenario", "small", "--port", "0", "--time-scale", "20",
        "--kubeconfig-out", str(kubeconfig), "--admin-kubeconfig-out", str(admin),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(600):
            if (kubeconfig.exists() and admin.exists()) or proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
        assert proc.returncode is None, "sim serve exited"
        assert kubeconfig.exists() and admin.exists(), "sim serve never wrote its kubeconfigs"
        yield kubeconfig, admin
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)


async def test_only_the_admin_kubeconfig_reads_the_ground_truth(tmp_path: Path) -> None:
    async with sim_serve(tmp_path) as (kubeconfig, admin_kubeconfig):
        assert (os.stat(admin_kubeconfig).st_mode & 0o777) == 0o600
        async with SimAdmin.from_kubeconfig(admin_kubeconfig) as admin:
            stats = await admin.stats()
            assert stats["scenario"] == "small" and stats["migrations"] == []
            assert (await admin.scenario())["nodes"]
            assert (await admin.faults({"latency_ms": 1}))["latency_ms"] == 1
        # The cluster kubeconfig (what kubectl and the orchestrator get) is refused on every /sim/v1 path...
        async with SimAdmin.from_kubeconfig(kubeconfig) as cluster_user:
            for call in (cluster_user.stats(), cluster_user.scenario(), cluster_user.faults(),
                         cluster_user.faults({"clear": True})):
                with pytest.raises(SimAdminError) as err:
                    await call
                assert err.value.status == 403
        async with SimAdmin.from_kubeconfig(admin_kubeconfig) as admin:
            assert (await admin.faults())["latency_ms"] == 1  # the refused clear changed nothing
        # ... and works on the Kubernetes API.
        api = await config.new_client_from_config(config_file=str(kubeconfig))
        async with api:
            nodes = await client.CoreV1Api(api).list_node()
        assert len(nodes.items) == 6
