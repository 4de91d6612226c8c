"""The kustomize base renders with the real kubectl, and what it renders agrees with the code it deploys:
commands and flags exist, settings parse, the scaler watches the queue the workers use, the CRD matches what
the controller reads and writes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from bench.redis_server import APPENDFSYNC
from orchestrator.cli import app
from orchestrator.controller import FINALIZER, SPEC_FIELDS, request_from_spec
from orchestrator.settings import ENV_VARS, TIME_SCALE_VAR, Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run([KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: found {len(found)}"
    return found[0]


def parse_cli(args: list[str]) -> Any:
    """Parse `drainctl ARGS` the way the binary would, without running anything: unknown flags fail.
    (Typer bundles its own click; only its duck-typed Group/Context interface is used here.)"""
    assert args[0] == "drainctl"
    group: Any = typer.main.get_command(app)
    ctx = group.make_context("drainctl", list(args[1:]), resilient_parsing=False)
    protected = getattr(ctx, "protected_args", None) or getattr(ctx, "_protected_args", [])
    name, sub, rest = group.resolve_command(ctx, [*protected, *ctx.args])
    assert sub is not None, f"no command {name}"
    return sub.make_context(name or "", rest, parent=ctx)


def test_base_renders_every_part(rendered: list[dict[str, Any]]) -> None:
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in rendered)
    assert kinds == sorted([
        "Namespace/drainctl", "CustomResourceDefinition/drainrequests.drainctl.io", "ServiceAccount/drainctl",
        "ClusterRole/drainctl", "ClusterRoleBinding/drainctl", "Role/drainctl-leader-election",
        "RoleBinding/drainctl-leader-election", "ConfigMap/drainctl", "Service/drainctl-redis",
        "StatefulSet/drainctl-redis", "Service/drainctl-api", "Deployment/drainctl-api",
        "PodDisruptionBudget/drainctl-api", "Deployment/drainctl-worker", "ScaledObject/drainctl-worker",
        "NetworkPolicy/drainctl-redis", "NetworkPolicy/drainctl-api", "NetworkPolicy/drainctl-worker",
    ])
    for doc in rendered:
        if doc["kind"] not in ("Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "drainctl", doc["metadata"]["name"]


def test_configmap_holds_valid_drain_settings(rendered: list[dict[str, Any]]) -> None:
    data = one(rendered, "ConfigMap", "drainctl")["data"]
    assert set(data) <= set(ENV_VARS) | {TIME_SCALE_VAR}
    settings = Settings.from_env(data)
    assert settings.connection.redis_url == "redis://drainctl-redis:6379/0"
    assert settings.limits.max_in_flight_cluster == 5 and settings.limits.max_in_flight_per_node == 2


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    containers = doc["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_api_and_worker_run_real_commands_with_probes(rendered: list[dict[str, Any]]) -> None:
    api = one(rendered, "Deployment", "drainctl-api")
    c = _container(api)
    assert parse_cli(c["args"]).command.name == "api"
    assert c["image"] == "ghcr.io/drainctl/drainctl:0.1.0"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {e["name"] for e in c["env"]} >= {"DRAIN_API_TOKEN", "POD_NAMESPACE"}
    assert api["spec"]["template"]["spec"]["serviceAccountName"] == "drainctl"
    pdb = one(rendered, "PodDisruptionBudget", "drainctl-api")
    assert pdb["spec"]["selector"]["matchLabels"] == api["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] < api["spec"]["replicas"]
    worker = one(rendered, "Deployment", "drainctl-worker")
    assert parse_cli(_container(worker)["args"]).command.name == "worker"
    for doc in (api, worker):
        assert _container(doc)["envFrom"] == [{"configMapRef": {"name": "drainctl"}}]
        assert _container(doc)["securityContext"]["allowPrivilegeEscalation"] is False


def test_a_renamed_flag_would_be_caught() -> None:
    with pytest.raises(Exception, match="No such option: --no-such-flag"):
        parse_cli(["drainctl", "worker", "--no-such-flag"])


def test_redis_persists_with_append_only_file(rendered: list[dict[str, Any]]) -> None:
    sts = one(rendered, "StatefulSet", "drainctl-redis")
    args = _container(sts)["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    # The Redis restart tests and bench.chaos run redis-server with the same fsync policy as deployed.
    assert args[args.index("--appendfsync") + 1] == APPENDFSYNC == "always"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--dir") + 1] == "/data"
    assert _container(sts)["volumeMounts"] == [{"name": "data", "mountPath": "/data"}]
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert sts["spec"]["serviceName"] == "drainctl-redis"


def test_keda_scales_workers_on_the_arq_queue(rendered: list[dict[str, Any]]) -> None:
    scaled = one(rendered, "ScaledObject", "drainctl-worker")
    queue = one(rendered, "ConfigMap", "drainctl")["data"]["DRAIN_QUEUE_NAME"]
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == queue
    assert trigger["metadata"]["address"].startswith("drainctl-redis.drainctl")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "drainctl-worker"
    assert scaled["spec"]["minReplicaCount"] >= 1  # the reconcile cron needs a worker


def test_network_policy_lets_drainctl_pods_reach_redis(rendered: list[dict[str, Any]]) -> None:
    policy = one(rendered, "NetworkPolicy", "drainctl-redis")
    allowed = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for name in ("drainctl-api", "drainctl-worker"):
        labels = one(rendered, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert allowed.items() <= labels.items(), name
    job = yaml.safe_load((K8S / "examples" / "upgrade-hook-job.yaml").read_text())
    assert allowed.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_crd_matches_the_controller(rendered: list[dict[str, Any]]) -> None:
    crd = one(rendered, "CustomResourceDefinition", "drainrequests.drainctl.io")
    assert crd["spec"]["group"] == "drainctl.io" and crd["spec"]["names"]["kind"] == "DrainRequest"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    spec_props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert set(spec_props) == set(SPEC_FIELDS)
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase" and columns["Drain"] == ".status.drainId"
    status_props = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert {"phase", "drainId", "message", "nodes"} <= set(status_props)
    assert FINALIZER.startswith("drainctl.io/")


def test_examples_are_valid_requests_and_commands() -> None:
    request = yaml.safe_load((K8S / "examples" / "drainrequest.yaml").read_text())
    assert request["apiVersion"] == "drainctl.io/v1alpha1" and request["kind"] == "DrainRequest"
    parsed = request_from_spec(request["spec"])
    assert list(parsed.nodes) == request["spec"]["nodes"]
    job = yaml.safe_load((K8S / "examples" / "upgrade-hook-job.yaml").read_text())
    (container,) = job["spec"]["template"]["spec"]["containers"]
    ctx = parse_cli(container["args"])
    assert ctx.command.name == "drain" and ctx.params["wait"] is True and ctx.params["nodes"] == ["worker-07"]
