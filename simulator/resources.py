"""The resource registry: every kind the simulated API server serves, and how.

One table drives discovery, routing, scope, short names, subresources, supported field selectors and the
patch types a kind accepts (strategic merge only for built-in kinds, as on a real API server).
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
COMMON_FIELDS = ("metadata.name", "metadata.namespace")


@dataclass(frozen=True)
class ResourceType:
    """One REST resource, e.g. pods or kubevirt.io/v1 virtualmachineinstances."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    field_selectors: tuple[str, ...] = COMMON_FIELDS
    builtin: bool = True
    verbs: tuple[str, ...] = ALL_VERBS

    @property
    def key(self) -> str:
        """Store key: the plural for the core group, `group/plural` otherwise."""
        return self.plural if not self.group else f"{self.group}/{self.plural}"

    @property
    def api_version(self) -> str:
        return self.version if not self.group else f"{self.group}/{self.version}"

    @property
    def group_version(self) -> str:
        return self.api_version

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


NAMESPACES = ResourceType("", "v1", "namespaces", "namespace", "Namespace", False, ("ns",),
                          subresources=("status",), field_selectors=(*COMMON_FIELDS, "status.phase"))
NODES = ResourceType("", "v1", "nodes", "node", "Node", False, ("no",), subresources=("status",),
                     field_selectors=(*COMMON_FIELDS, "spec.unschedulable"))
PODS = ResourceType(
    "", "v1", "pods", "pod", "Pod", True, ("po",), ("all",), subresources=("status", "eviction"),
    field_selectors=(*COMMON_FIELDS, "spec.nodeName", "status.phase", "spec.restartPolicy",
                     "spec.schedulerName", "spec.serviceAccountName", "status.podIP"),
)
EVENTS = ResourceType("", "v1", "events", "event", "Event", True, ("ev",),
                      field_selectors=(*COMMON_FIELDS, "involvedObject.kind", "involvedObject.name",
                                       "involvedObject.namespace", "involvedObject.uid", "reason", "type"))
DAEMONSETS = ResourceType("apps", "v1", "daemonsets", "daemonset", "DaemonSet", True, ("ds",), ("all",),
                          subresources=("status",))
PDBS = ResourceType("policy", "v1", "poddisruptionbudgets", "poddisruptionbudget", "PodDisruptionBudget",
                    True, ("pdb",), subresources=("status",))
LEASES = ResourceType("coordination.k8s.io", "v1", "leases", "lease", "Lease", True)
CRDS = ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "customresourcedefinition",
                    "CustomResourceDefinition", False, ("crd", "crds"), subresources=("status",))

SERVICEACCOUNTS = ResourceType("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", True, ("sa",),
                               subresources=("token",))
RBAC_GROUP = "rbac.authorization.k8s.io"
ROLES = ResourceType(RBAC_GROUP, "v1", "roles", "role", "Role", True)
CLUSTERROLES = ResourceType(RBAC_GROUP, "v1", "clusterroles", "clusterrole", "ClusterRole", False)
ROLEBINDINGS = ResourceType(RBAC_GROUP, "v1", "rolebindings", "rolebinding", "RoleBinding", True)
CLUSTERROLEBINDINGS = ResourceType(RBAC_GROUP, "v1", "clusterrolebindings", "clusterrolebinding",
                                   "ClusterRoleBinding", False)
SELFSUBJECTACCESSREVIEWS = ResourceType("authorization.k8s.io", "v1", "selfsubjectaccessreviews",
                                        "selfsubjectaccessreview", "SelfSubjectAccessReview", False,
                                        verbs=("create",))

KUBEVIRT_GROUP = "kubevirt.io"
VMIS = ResourceType(KUBEVIRT_GROUP, "v1", "virtualmachineinstances", "virtualmachineinstance",
                    "VirtualMachineInstance", True, ("vmi", "vmis"), ("all",), builtin=False,
                    subresources=("status",))
VMIMS = ResourceType(KUBEVIRT_GROUP, "v1", "virtualmachineinstancemigrations",
                     "virtualmachineinstancemigration", "VirtualMachineInstanceMigration", True,
                     ("vmim", "vmims"), ("all",), builtin=False, subresources=("status",))
VMS = ResourceType(KUBEVIRT_GROUP, "v1", "virtualmachines", "virtualmachine", "VirtualMachine", True,
                   ("vm", "vms"), ("all",), builtin=False, subresources=("status",))
KUBEVIRTS = ResourceType(KUBEVIRT_GROUP, "v1", "kubevirts", "kubevirt", "KubeVirt", True, ("kv", "kvs"),
                         ("all",), builtin=False, subresources=("status",))

BUILTIN: tuple[ResourceType, ...] = (NAMESPACES, NODES, PODS, EVENTS, DAEMONSETS, PDBS, LEASES, CRDS,
                                     SERVICEACCOUNTS, ROLES, CLUSTERROLES, ROLEBINDINGS, CLUSTERROLEBINDINGS,
                                     SELFSUBJECTACCESSREVIEWS, VMIS, VMIMS, VMS, KUBEVIRTS)


class Registry:
    """The kinds served right now; CRDs created through the API add to it."""

    def __init__(self, types: tuple[ResourceType, ...] = BUILTIN) -> None:
        self._by_key: dict[str, ResourceType] = {}
        self._by_gv: dict[tuple[str, str, str], ResourceType] = {}
        for rt in types:
            self.add(rt)

    def add(self, rt: ResourceType) -> None:
        self._by_key[rt.key] = rt
        self._by_gv[(rt.group, rt.version, rt.plural)] = rt

    def remove(self, rt: ResourceType) -> None:
        self._by_key.pop(rt.key, None)
        self._by_gv.pop((rt.group, rt.version, rt.plural), None)

    def get(self, key: str) -> ResourceType:
        return self._by_key[key]

    def find(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_gv.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        return list(self._by_key.values())

    def groups(self) -> dict[str, list[str]]:
        """Group name -> versions, in registration order, core group ("") included."""
        out: dict[str, list[str]] = {}
        for rt in self._by_key.values():
            versions = out.setdefault(rt.group, [])
            if rt.version not in versions:
                versions.append(rt.version)
        return out
