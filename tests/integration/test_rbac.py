"""drainctl with exactly the access `k8s/` grants it: a ServiceAccount token bound to k8s/rbac.yaml's ClusterRole
(and leader-election Role) by the simulator's RBAC, which follows kube-apiserver's authorizer.

Enough: a drain by worker processes and the CLI holding only that token completes, and the simulator refused
none of their requests. No more: requests the role does not name are refused with 403.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from simulator.resources import VMIS
from simulator.server import write_kubeconfig
from tests.integration.conftest import EnvFactory, requires_redis

pytestmark = [pytest.mark.integration, requires_redis, pytest.mark.timeout(300)]

K8S = Path(__file__).resolve().parents[2] / "k8s"
KUBECTL = "/usr/bin/kubectl"
ACCOUNT = "system:serviceaccount:drainctl:drainctl"


async def kubectl(kubeconfig: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [KUBECTL, f"--kubeconfig={kubeconfig}", f"--cache-dir={cache}", "--request-timeout=20s", *args]
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60, check=False)


async def test_drainctl_needs_exactly_the_manifests_role(cluster_env: EnvFactory, tmp_path: Path) -> None:
    async with cluster_env("small") as env:
        cache = tmp_path / "kube-cache"
        installed = await kubectl(env.kubeconfig, cache, "apply", "-f", str(K8S / "namespace.yaml"),
                                  "-f", str(K8S / "serviceaccount.yaml"), "-f", str(K8S / "rbac.yaml"),
                                  "-f", str(K8S / "crd-drainrequest.yaml"))
        assert installed.returncode == 0, installed.stderr
        issued = await kubectl(env.kubeconfig, cache, "create", "token", "drainctl", "-n", "drainctl")
        assert issued.returncode == 0, issued.stderr
        account = tmp_path / "serviceaccount.kubeconfig"
        write_kubeconfig(account, server_url=env.rc.url, token=issued.stdout.strip(), ca_data=env.rc.ca_data)
        env.env["KUBECONFIG"] = str(account)  # the workers and the CLI get the ServiceAccount's token only

        env.start_workers(2)
        node = env.cluster.scenario.drain_hint[0]
        result = await env.adrainctl("drain", node, "--wait", "-o", "json", timeout_s=240)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + env.worker_logs()
        view = json.loads(result.stdout)
        assert env.cluster.store.on_node(VMIS, node) == []
        stats = await env.stats()
        ours = [m for m in stats["migrations"] if m["labels"].get("drainctl.io/drain-id") == view["id"]]
        assert ours and all(m["phase"] == "Succeeded" for m in ours)
        assert stats["forbidden_requests"] == [], "the role lacks what drainctl asked for"

        # No more: what the role does not name is refused, reads included.
        other = next(n.name for n in env.cluster.scenario.nodes if n.name != node)
        vmi = env.cluster.store.list(VMIS)[0]["metadata"]
        refused = [
            ("delete", "node", other),
            ("get", "pod", "-n", vmi["namespace"], "--all-namespaces=false", "virt-handler-x"),
            ("delete", "vmi", vmi["name"], "-n", vmi["namespace"]),
            ("patch", "kubevirt", "kubevirt", "-n", "kubevirt", "--type=merge", "-p",
             '{"spec":{"configuration":{"migrations":{"parallelMigrationsPerCluster":50}}}}'),
            ("create", "namespace", "not-ours"),
            ("get", "leases", "-n", "default"),
            ("label", "pod", "-n", vmi["namespace"], "--all", "x=y"),
        ]
        for args in refused:
            denied = await kubectl(account, cache, *args)
            assert denied.returncode != 0, args
            assert "Forbidden" in denied.stderr and ACCOUNT in denied.stderr, (args, denied.stderr)
        can = await kubectl(account, cache, "auth", "can-i", "create", "virtualmachineinstancemigrations.kubevirt.io",
                            "-n", vmi["namespace"])
        assert can.stdout.strip() == "yes"
        cannot = await kubectl(account, cache, "auth", "can-i", "update", "kubevirts.kubevirt.io", "-n", "kubevirt")
        assert cannot.stdout.strip() == "no"
        forbidden = (await env.stats())["forbidden_requests"]
        assert forbidden and {f["user"] for f in forbidden} == {ACCOUNT}
