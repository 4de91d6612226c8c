"""One shared, watch-fed view of the cluster per worker process.

Migration jobs follow their VMIMs through this view instead of opening a watch each: one list+watch of our
VMIMs (label `drainctl.io/drain-id`), of nodes and of pods feeds caches that every job in the process reads,
and a condition wakes the jobs waiting for a VMIM to change. Watches re-list on 410 and reconnect on errors
(`Kube.watch`); the view's supervisor restarts a watch or the cancel listener that ends anyway (a Redis outage
ends the listener) and names it in `problems()` while it is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from orchestrator import kube as k
from orchestrator.model import (
    DRAIN_ID_LABEL,
    FINAL_MIGRATION_PHASES,
    FINAL_POD_PHASES,
    VIRT_LAUNCHER_LABEL,
    VIRT_LAUNCHER_LABEL_VALUE,
    VMI_DOMAIN_ANNOTATION,
    ClusterSnapshot,
    Node,
)
from orchestrator.rules import pod_memory_bytes
from orchestrator.snapshot import (
    parse_kubevirt,
    parse_migration,
    parse_node,
    parse_pod,
    parse_vmi,
    quantity_to_int,
)
from orchestrator.supervise import Supervisor

log = structlog.get_logger("orchestrator.view")

Obj = dict[str, Any]


def _container_memory(containers: list[Obj]) -> list[int]:
    out = []
    for c in containers:
        resources = c.get("resources") or {}
        # A container with only a limit gets request = limit (Kubernetes defaulting).
        value = (resources.get("requests") or {}).get("memory") or (resources.get("limits") or {}).get("memory")
        out.append(0 if value is None else quantity_to_int(value))
    return out


def _pod_memory(pod: Obj) -> int:
    spec = pod.get("spec") or {}
    overhead = (spec.get("overhead") or {}).get("memory")
    return pod_memory_bytes(containers=_container_memory(spec.get("containers") or []),
                            init_containers=_container_memory(spec.get("initContainers") or []),
                            overhead=0 if overhead is None else quantity_to_int(overhead),
                            final=(pod.get("status") or {}).get("phase") in FINAL_POD_PHASES)


def _launcher_of(pod: Obj) -> str | None:
    """namespace/name of the VMI whose virt-launcher this pod is, else None."""
    meta = pod.get("metadata") or {}
    if (meta.get("labels") or {}).get(VIRT_LAUNCHER_LABEL) != VIRT_LAUNCHER_LABEL_VALUE:
        return None
    name = (meta.get("annotations") or {}).get(VMI_DOMAIN_ANNOTATION)
    return f"{meta.get('namespace')}/{name}" if name else None


_NODE_FIELDS = {
    "metadata": ("name", "uid", "resourceVersion", "labels", "annotations"),
    "spec": ("unschedulable", "taints"),
    "status": ("allocatable", "capacity", "conditions"),
}


def slim_node(obj: Obj) -> Obj:
    """The fields of a Node that `snapshot.parse_node` reads (a real node also carries images, managed fields,
    addresses, daemon endpoints and node info: kilobytes each, times a thousand nodes, in every worker)."""
    out: Obj = {"kind": obj.get("kind", "Node"), "apiVersion": obj.get("apiVersion", "v1")}
    for part, names in _NODE_FIELDS.items():
        src = obj.get(part)
        if isinstance(src, dict):
            out[part] = {name: src[name] for name in names if name in src}
    return out


def _rv(obj: Obj) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


class ClusterView:
    def __init__(self, kube: k.Kube) -> None:
        self.kube = kube
        self.vmims: dict[str, Obj] = {}
        self.nodes: dict[str, Obj] = {}
        self._pods: dict[str, tuple[str, int]] = {}  # ns/name -> (node, memory)
        self._launchers: dict[str, dict[str, int]] = defaultdict(dict)  # VMI ns/name -> {pod key: memory}
        self.node_used: dict[str, int] = defaultdict(int)
        self._changed = asyncio.Condition()
        self.supervisor = Supervisor("cluster-view")
        self._ready = {name: asyncio.Event() for name in ("vmims", "nodes", "pods")}
        self._cancelled: set[str] = set()
        self._parsed: dict[str, tuple[str, Node]] = {}

    async def start(self) -> None:
        self.supervisor.spawn("watch-vmims", lambda: self.kube.watch(
            k.VMIMS, label_selector=DRAIN_ID_LABEL, on_list=self._vmim_list, on_event=self._vmim_event))
        self.supervisor.spawn("watch-nodes", lambda: self.kube.watch(
            k.NODES, on_list=self._node_list, on_event=self._node_event))
        self.supervisor.spawn("watch-pods", lambda: self.kube.watch(
            k.PODS, on_pages=self._pod_pages, on_event=self._pod_event))
        async with asyncio.timeout(60):
            for ev in self._ready.values():
                await ev.wait()

    @property
    def warm(self) -> bool:
        """Every feed has listed once: the caches follow the cluster from here on."""
        return all(ev.is_set() for ev in self._ready.values())

    def cancel_requested(self, drain_id: str) -> bool:
        """Whether a cancel of `drain_id` was announced (see `listen_for_cancels`)."""
        return drain_id in self._cancelled

    def listen_for_cancels(self, redis: Any, channel: str) -> None:
        """Wake every job following a migration of a drain as soon as its cancel is announced (supervised:
        a Redis outage ends the subscription, the supervisor subscribes again; a cancel announced meanwhile is
        still seen by the jobs, which read the drain's phase from Redis)."""
        self.supervisor.spawn("cancel-listener", lambda: self._listen_for_cancels(redis, channel))

    async def _listen_for_cancels(self, redis: Any, channel: str) -> None:
        pubsub = redis.pubsub()
        await pubsub.subscribe(channel)
        try:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                if message is None:
                    continue
                data = message.get("data")
                self._cancelled.add(data.decode() if isinstance(data, bytes) else str(data))
                await self._notify()
        finally:
            await pubsub.aclose()

    async def stop(self) -> None:
        await self.supervisor.stop()

    # ------------------------------------------------------------------------------------------ feeds
    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _vmim_list(self, items: list[Obj]) -> None:
        self.vmims = {f"{o['metadata']['namespace']}/{o['metadata']['name']}": o for o in items}
        self._ready["vmims"].set()
        await self._notify()

    async def _vmim_event(self, etype: str, obj: Obj) -> None:
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        if etype == "DELETED":
            current = self.vmims.get(key)
            if current is None or current["metadata"].get("uid") == obj["metadata"].get("uid"):
                self.vmims.pop(key, None)
        else:
            self.observe(obj)
        await self._notify()

    def observe(self, obj: Obj) -> None:
        """Put a VMIM we just read or wrote into the cache unless the cache already has a newer one."""
        key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
        current = self.vmims.get(key)
        if current is not None and current["metadata"].get("uid") == obj["metadata"].get("uid") and \
                _rv(current) > _rv(obj):
            return
        self.vmims[key] = obj

    async def _node_list(self, items: list[Obj]) -> None:
        self.nodes = {o["metadata"]["name"]: slim_node(o) for o in items}
        self._ready["nodes"].set()

    async def _node_event(self, etype: str, obj: Obj) -> None:
        if etype == "DELETED":
            self.nodes.pop(obj["metadata"]["name"], None)
        else:
            self.nodes[obj["metadata"]["name"]] = slim_node(obj)

    async def _pod_pages(self, pages: k.Pages) -> None:
        """Reduce the pod list page by page to (node, memory) per pod: no pod object outlives its page."""
        def reset() -> None:
            self._pods.clear()
            self._launchers.clear()
            self.node_used = defaultdict(int)

        reset()
        pages.on_restart = reset
        async for page in pages:
            for pod in page:
                self._put_pod(pod)
        self._ready["pods"].set()

    def _put_pod(self, pod: Obj) -> None:
        key = f"{pod['metadata'].get('namespace')}/{pod['metadata']['name']}"
        old = self._pods.pop(key, None)
        if old is not None:
            self.node_used[old[0]] -= old[1]
        node = (pod.get("spec") or {}).get("nodeName")
        mem = _pod_memory(pod)
        if node:
            self._pods[key] = (sys.intern(node), mem)
            self.node_used[node] += mem
        vmi = _launcher_of(pod)
        if vmi is not None:
            if mem:
                self._launchers[vmi][key] = mem
            else:
                self._launchers[vmi].pop(key, None)
                if not self._launchers[vmi]:
                    del self._launchers[vmi]

    async def _pod_event(self, etype: str, obj: Obj) -> None:
        if etype == "DELETED":
            key = f"{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"
            old = self._pods.pop(key, None)
            if old is not None:
                self.node_used[old[0]] -= old[1]
            vmi = _launcher_of(obj)
            if vmi is not None and vmi in self._launchers:
                self._launchers[vmi].pop(key, None)
                if not self._launchers[vmi]:
                    del self._launchers[vmi]
        else:
            self._put_pod(obj)

    # ------------------------------------------------------------------------------------------ reads
    def parsed_nodes(self) -> list[Node]:
        """The nodes as model objects, parsed once per node resourceVersion (target choice runs per migration)."""
        out = []
        for index, (name, obj) in enumerate(self.nodes.items()):
            rv = str(obj["metadata"].get("resourceVersion") or "")
            cached = self._parsed.get(name)
            if cached is None or cached[0] != rv:
                cached = (rv, parse_node(obj, index))
                self._parsed[name] = cached
            out.append(cached[1])
        return out

    def vmis_on(self, nodes: Sequence[str]) -> dict[str, set[str]]:
        """The VMIs (namespace/name) with a live virt-launcher pod on each of `nodes`, from the pod cache: what
        a submitted plan is checked against before it is carried out (no request to the API server)."""
        wanted = set(nodes)
        out: dict[str, set[str]] = {node: set() for node in wanted}
        for vmi, pods in self._launchers.items():
            for pod in pods:
                placed = self._pods.get(pod)
                if placed is not None and placed[0] in wanted:
                    out[placed[0]].add(vmi)
        return out

    def launcher_memory(self, namespace: str, name: str) -> int | None:
        """The largest memory request among the VMI's live virt-launcher pods (None when none is seen)."""
        pods = self._launchers.get(f"{namespace}/{name}")
        return max(pods.values()) if pods else None

    def free_memory(self, node: Node) -> int:
        return node.allocatable_memory_bytes - self.node_used.get(node.name, 0)

    def inbound_counts(self) -> dict[str, int]:
        """Our non-final migrations per target node, in one pass over the cached VMIMs."""
        counts: dict[str, int] = defaultdict(int)
        for o in self.vmims.values():
            target = ((o.get("spec") or {}).get("addedNodeSelector") or {}).get("kubernetes.io/hostname")
            if target and (o.get("status") or {}).get("phase") not in FINAL_MIGRATION_PHASES:
                counts[target] += 1
        return counts

    async def wait_vmim(self, key: str, predicate: Callable[[Obj | None], bool], *, timeout_s: float) -> Obj | None:
        """Wait until `predicate(vmim or None)` holds or the timeout (wall seconds) passes; return the VMIM."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self._changed.wait_for(lambda: predicate(self.vmims.get(key)))
            return self.vmims.get(key)


# ============================================================================================ plan snapshots
VMI_NODE_LABEL = "kubevirt.io/nodeName"
"""Set by KubeVirt on every scheduled VMI and moved with it by a migration: the way to list the VMIs of one node,
since custom resources have no field selectors (KubeVirt's pkg/virt-controller/watch/vmi.go sets it from the
launcher pod's node; docs/kubevirt.md §1.2)."""


async def drain_snapshot(kube: k.Kube, nodes: Sequence[str], view: ClusterView | None = None) -> ClusterSnapshot:
    """What the planner needs to drain `nodes`, read at a cost that follows the drain, not the cluster.

    - every node (the warm view's when there is one, else a paged list),
    - the memory requested by the pods of every node as sums (the view's, else a paged list reduced page by
      page: no pod object is kept),
    - the pods and the VMIs of the drained nodes only (a field selector and KubeVirt's node label), plus the
      VMIs that virt-launcher pods on those nodes belong to when they run elsewhere,
    - every VMIM (few: KubeVirt garbage-collects them) and the KubeVirt CR.
    The planner gives the same plan as from a snapshot of the whole cluster (`Kube.snapshot`)."""
    if view is not None and view.warm:
        node_objs: list[Obj] = list(view.nodes.values())
        used: dict[str, int] = {name: value for name, value in view.node_used.items() if value}
    else:
        node_objs, _ = await kube.list(k.NODES)
        node_objs = [slim_node(o) for o in node_objs]
        used = defaultdict(int)
        pages = kube.pages(k.PODS)
        pages.on_restart = used.clear
        async for page in pages:
            for pod in page:
                node = (pod.get("spec") or {}).get("nodeName")
                if node:
                    used[node] += _pod_memory(pod)
        used = {name: value for name, value in used.items() if value}
    drained = list(dict.fromkeys(nodes))
    known = {o["metadata"]["name"] for o in node_objs}
    pods: list[Obj] = []
    vmis: dict[str, Obj] = {}
    for name in drained:
        if name not in known:
            continue  # the planner names unknown nodes
        found, _ = await kube.list(k.PODS, field_selector=f"spec.nodeName={name}")
        pods.extend(found)
        listed, _ = await kube.list(k.VMIS, label_selector=f"{VMI_NODE_LABEL}={name}")
        for obj in listed:
            vmis[f"{obj['metadata'].get('namespace')}/{obj['metadata']['name']}"] = obj
    for pod in pods:
        owner = _launcher_of(pod)
        if owner is not None and owner not in vmis:
            ns, _, name = owner.partition("/")
            elsewhere = await kube.find(k.VMIS, name, ns)
            if elsewhere is not None:
                vmis[owner] = elsewhere
    vmims, _ = await kube.list(k.VMIMS)
    kubevirts, _ = await kube.list(k.KUBEVIRTS)
    config, strategy = parse_kubevirt(kubevirts[0] if kubevirts else None)
    return ClusterSnapshot(
        nodes=tuple(parse_node(raw, i) for i, raw in enumerate(node_objs)),
        vmis=tuple(parse_vmi(raw, i, cluster_eviction_strategy=strategy) for i, raw in enumerate(vmis.values())),
        pods=tuple(parse_pod(raw, i) for i, raw in enumerate(pods)),
        migrations=tuple(parse_migration(raw, i) for i, raw in enumerate(vmims)),
        migration_config=config,
        cluster_eviction_strategy=strategy,
        pod_memory=used,
    )
