"""KubeVirt's MigrationPolicy (`migrations.kubevirt.io/v1alpha1`, cluster-scoped) in the simulated cluster.

What it promises, following kubevirt/kubevirt at d923fdb815 (main after v1.9.0):
- The kind is served like the CRD virt-operator installs (`components/crds.go: NewMigrationPolicyCrd`:
  cluster scope, plural `migrationpolicies`, a status subresource, no short names): discovery, CRUD, watch,
  kubectl and kubernetes-asyncio's CustomObjectsApi work on it.
- Writes are checked by the CRD's OpenAPI schema (`spec` and `spec.selectors` required, selectors are
  string maps, booleans, integers and quantities typed; unknown fields pruned) and by the validating webhook
  `migration-policy-validator.kubevirt.io` (`admitters/migrationpolicy-admitter.go`: completionTimeoutPerGiB
  and bandwidthPerMigration not negative; maxDowntimeMs only with the MigrationStallDetection or
  MigrationDowntimeTuning feature gate).
- `match_policy` is `matchPolicy` / `countMatchingLabels` of `pkg/virt-controller/watch/migration/
  migrationpolicy.go`, quirks included: a policy matches when every selector label is on the VMI
  (virtualMachineInstanceSelector) or its namespace (namespaceSelector); the policy with the most matching
  labels wins, VMI labels break a tie, then the lexicographically first name; the namespace selector is
  only consulted when the VMI has labels (the Go code tests the VMI's labels there, not the namespace's).
- `resolve_migration_config` is the controller's `resolveMigrationConfig` at hand-off: the cluster's
  migration configuration as `VMIMConfigurationOptions` (`pkg/util/migrations.ToVMIMConfigurationOptions`,
  allowWorkloadDisruption inheriting allowPostCopy when unset), overlaid with the matched policy's non-null
  fields (`applyMigrationPolicySpec`, where a policy's allowPostCopy also sets allowWorkloadDisruption
  unless the policy sets that itself). The migration controller writes the result to
  `vmi.status.migrationState.migrationConfiguration` and the policy's name to `migrationPolicyName`; the
  launcher's monitor and bandwidth cap then use it for that migration only.

Not modelled: the `experimental` options (stall detector, downtime tuning, compression) are accepted and
kept but change nothing in the physics.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from simulator.errors import ApiError
from simulator.resources import KUBEVIRTS, NAMESPACES, ResourceType
from simulator.store import Obj, Store

__all__ = [
    "MIGRATION_POLICIES",
    "POLICY_FIELDS",
    "admit",
    "apply_policy",
    "match_policy",
    "resolve_migration_config",
]

MIGRATION_POLICIES = ResourceType("migrations.kubevirt.io", "v1alpha1", "migrationpolicies", "migrationpolicy",
                                  "MigrationPolicy", False, builtin=False, subresources=("status",))
WEBHOOK = "migration-policy-validator.kubevirt.io"
MIGRATION_TARGET_LABEL = "kubevirt.io/migrationTargetNodeName"

POLICY_FIELDS = ("allowAutoConverge", "bandwidthPerMigration", "completionTimeoutPerGiB", "maxDowntimeMs",
                 "allowPostCopy", "allowWorkloadDisruption")
"""The MigrationPolicySpec fields that override the cluster configuration (besides `experimental`)."""

# VMIMConfigurationOptions: what ToVMIMConfigurationOptions copies from the KubeVirt CR (migrations.go).
_VMIM_OPTIONS = ("allowAutoConverge", "bandwidthPerMigration", "completionTimeoutPerGiB", "maxDowntimeMs",
                 "progressTimeout", "utilityVolumesTimeout", "unsafeMigrationOverride", "allowPostCopy",
                 "allowWorkloadDisruption", "matchSELinuxLevelOnMigration", "parallelOutboundMigrationsPerNode",
                 "nodeDrainTaintKey", "parallelMigrationsPerCluster", "disableTLS", "network")
_BOOLEANS = ("allowAutoConverge", "allowPostCopy", "allowWorkloadDisruption")
_INTEGERS = ("completionTimeoutPerGiB", "maxDowntimeMs")
_QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
                       r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_DOWNTIME_GATES = ("MigrationStallDetection", "MigrationDowntimeTuning")


# ------------------------------------------------------------------------------------------- matching
Score = tuple[int, int]
"""(matching VMI labels, matching namespace labels), migrationPolicyMatchScore."""


def _greater(a: Score, b: Score) -> bool:
    if sum(a) == sum(b):
        return a[0] > b[0]
    return sum(a) > sum(b)


def _less(a: Score, b: Score) -> bool:
    return a != b and not _greater(a, b)


def _labels(value: Any) -> dict[str, str] | None:
    """Go's view of a labels map decoded from the API: an empty or missing map is nil."""
    return dict(value) if isinstance(value, Mapping) and value else None


def count_matching_labels(policy: Obj, vmi_labels: Mapping[str, str] | None,
                          namespace_labels: Mapping[str, str] | None) -> tuple[bool, Score]:
    """countMatchingLabels: whether `policy` matches and its score; the score means nothing without a match."""
    selectors = (policy.get("spec") or {}).get("selectors")
    if selectors is None:
        return False, (0, 0)
    does_match = True

    def count(selector: Mapping[str, Any], labels: Mapping[str, str] | None) -> int:
        nonlocal does_match
        matched = 0
        for key, value in selector.items():
            if labels is not None and key in labels and labels[key] == value:
                matched += 1
            else:
                does_match = False
                return matched
        return matched

    vmi_selector = selectors.get("virtualMachineInstanceSelector")
    ns_selector = selectors.get("namespaceSelector")
    matching_vmi = matching_ns = 0
    if vmi_selector is not None and vmi_labels is not None:
        matching_vmi = count(vmi_selector, vmi_labels)
    # sic: KubeVirt checks the VMI's labels, not the namespace's, before counting namespace labels
    if does_match and ns_selector is not None and vmi_labels is not None:
        matching_ns = count(ns_selector, namespace_labels)
    return (does_match, (matching_vmi, matching_ns)) if does_match else (False, (0, 0))


def match_policy(policies: Iterable[Obj], vmi_labels: Mapping[str, str] | None,
                 namespace_labels: Mapping[str, str] | None) -> Obj | None:
    """matchPolicy: the most detailed matching policy, ties broken by VMI labels, then by name; None if none."""
    best: Score = (0, 0)
    matching: list[Obj] = []
    for policy in policies:
        ok, score = count_matching_labels(policy, vmi_labels, namespace_labels)
        if not ok or _less(score, best):
            continue
        if _greater(score, best):
            best = score
            matching = [policy]
        else:
            matching.append(policy)
    if not matching:
        return None
    return min(matching, key=lambda p: str(p["metadata"]["name"]))


# ------------------------------------------------------------------------------------- configuration
def vmim_options(cluster_config: Mapping[str, Any]) -> dict[str, Any]:
    """ToVMIMConfigurationOptions(GetMigrationConfiguration()): the cluster's options for one migration."""
    options = {k: cluster_config[k] for k in _VMIM_OPTIONS if cluster_config.get(k) is not None}
    if options.get("allowWorkloadDisruption") is None:
        options["allowWorkloadDisruption"] = bool(options.get("allowPostCopy"))
    return options


def apply_policy(base: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, Any]:
    """applyMigrationPolicySpec: the policy's non-null fields over `base`, without changing `base`."""
    result = dict(base)
    if spec.get("allowWorkloadDisruption") is None and spec.get("allowPostCopy") is not None:
        result["allowWorkloadDisruption"] = spec["allowPostCopy"]
    for name in POLICY_FIELDS:
        if spec.get(name) is not None:
            result[name] = spec[name]
    if spec.get("experimental") is not None:
        result["experimental"] = {**(base.get("experimental") or {}), **spec["experimental"]}
    return result


def resolve_migration_config(store: Store, vmi: Obj, cluster_config: Mapping[str, Any], *,
                             target_node: str | None) -> tuple[dict[str, Any], str | None]:
    """The effective migration options of a migration handed off now, and the matched policy's name.

    The controller adds the migrationTargetNodeName label to its VMI copy before matching, so a policy can
    select on it (migration.go handoff)."""
    labels = dict(vmi["metadata"].get("labels") or {})
    if target_node:
        labels[MIGRATION_TARGET_LABEL] = target_node
    namespace = store.get(NAMESPACES, None, vmi["metadata"].get("namespace", ""))
    ns_labels = _labels((namespace or {}).get("metadata", {}).get("labels"))
    base = vmim_options(cluster_config)
    policy = match_policy(store.iter(MIGRATION_POLICIES), _labels(labels), ns_labels)
    if policy is None:
        return base, None
    return apply_policy(base, policy.get("spec") or {}), str(policy["metadata"]["name"])


# -------------------------------------------------------------------------------------------- admission
def admit(store: Store, op: str, rt: ResourceType, new: Obj | None, old: Obj | None) -> None:
    """The CRD schema, then the validating webhook, for MigrationPolicy creates and updates."""
    if rt.key != MIGRATION_POLICIES.key or new is None or op not in ("CREATE", "UPDATE"):
        return
    name = str(new.get("metadata", {}).get("name") or "")
    causes = _schema_causes(new)
    if causes:
        message = causes[0]["message"] if len(causes) == 1 else f"[{', '.join(c['message'] for c in causes)}]"
        raise ApiError.invalid(MIGRATION_POLICIES.kind, name, message, MIGRATION_POLICIES.group, causes=causes)
    _prune(new)
    webhook = _webhook_causes(store, new, old)
    if webhook:
        raise ApiError(422, f'admission webhook "{WEBHOOK}" denied the request: '
                            f"{', '.join(c['message'] for c in webhook)}", details={"causes": webhook})


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "object"


def _type_cause(path: str, value: Any, expected: str) -> dict[str, str]:
    got = _type_name(value)
    return {"reason": "FieldValueTypeInvalid", "field": path,
            "message": f'{path}: Invalid value: "{got}": {path} in body must be of type {expected}: "{got}"'}


def _required(path: str) -> dict[str, str]:
    return {"reason": "FieldValueRequired", "field": path, "message": f"{path}: Required value"}


def _schema_causes(policy: Obj) -> list[dict[str, str]]:
    if "spec" not in policy:
        return [_required("spec")]
    spec = policy["spec"]
    if not isinstance(spec, dict):
        return [_type_cause("spec", spec, "object")]
    causes: list[dict[str, str]] = []
    selectors = spec.get("selectors")
    if "selectors" not in spec:
        causes.append(_required("spec.selectors"))
    elif not isinstance(selectors, dict):
        causes.append(_type_cause("spec.selectors", selectors, "object"))
    else:
        for which in ("namespaceSelector", "virtualMachineInstanceSelector"):
            if which not in selectors:
                continue
            labels = selectors[which]
            path = f"spec.selectors.{which}"
            if not isinstance(labels, dict):
                causes.append(_type_cause(path, labels, "object"))
                continue
            causes.extend(_type_cause(f"{path}.{k}", v, "string") for k, v in labels.items()
                          if not isinstance(v, str))
    for name in _BOOLEANS:
        if name in spec and not isinstance(spec[name], bool):
            causes.append(_type_cause(f"spec.{name}", spec[name], "boolean"))
    for name in _INTEGERS:
        value = spec.get(name)
        if name in spec and (isinstance(value, bool) or not isinstance(value, int)):
            causes.append(_type_cause(f"spec.{name}", value, "integer"))
    if spec.get("maxDowntimeMs") is not None and isinstance(spec["maxDowntimeMs"], int) and \
            not isinstance(spec["maxDowntimeMs"], bool) and not 1 <= spec["maxDowntimeMs"] <= 2_000_000:
        causes.append({"reason": "FieldValueInvalid", "field": "spec.maxDowntimeMs",
                       "message": f"spec.maxDowntimeMs: Invalid value: {spec['maxDowntimeMs']}: spec.maxDowntimeMs "
                                  "in body should be greater than or equal to 1 and less than or equal to 2000000"})
    if "bandwidthPerMigration" in spec:
        bw = spec["bandwidthPerMigration"]
        if isinstance(bw, bool) or not isinstance(bw, int | str):
            causes.append(_type_cause("spec.bandwidthPerMigration", bw, "integer or string"))
        elif isinstance(bw, str) and not _QUANTITY.match(bw):
            causes.append({"reason": "FieldValueInvalid", "field": "spec.bandwidthPerMigration",
                           "message": f'spec.bandwidthPerMigration: Invalid value: "{bw}": '
                                      f"spec.bandwidthPerMigration in body should match '{_QUANTITY.pattern}'"})
    if "experimental" in spec and not isinstance(spec["experimental"], dict):
        causes.append(_type_cause("spec.experimental", spec["experimental"], "object"))
    return causes


def _prune(policy: Obj) -> None:
    """Drop fields the structural schema does not know, as the API server prunes them."""
    spec = policy["spec"]
    for key in list(spec):
        if key not in (*POLICY_FIELDS, "selectors", "experimental"):
            del spec[key]
    selectors = spec["selectors"]
    for key in list(selectors):
        if key not in ("namespaceSelector", "virtualMachineInstanceSelector"):
            del selectors[key]
    for key in list(policy):
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            del policy[key]


def _webhook_causes(store: Store, new: Obj, old: Obj | None) -> list[dict[str, str]]:
    spec = new["spec"]
    causes: list[dict[str, str]] = []
    timeout = spec.get("completionTimeoutPerGiB")
    if timeout is not None and timeout < 0:
        causes.append({"reason": "FieldValueInvalid", "field": "spec.completionTimeoutPerGiB",
                       "message": "must not be negative"})
    downtime = spec.get("maxDowntimeMs")
    if downtime is not None and downtime != ((old or {}).get("spec") or {}).get("maxDowntimeMs"):
        kv = store.get(KUBEVIRTS, "kubevirt", "kubevirt") or {}
        gates = (((kv.get("spec") or {}).get("configuration") or {}).get("developerConfiguration") or {}) \
            .get("featureGates") or []
        if not any(g in gates for g in _DOWNTIME_GATES):
            causes.append({"reason": "FieldValueInvalid", "field": "spec.maxDowntimeMs",
                           "message": "maxDowntimeMs cannot be modified without enabling the "
                                      "MigrationStallDetection or MigrationDowntimeTuning feature gate"})
    bandwidth = spec.get("bandwidthPerMigration")
    if bandwidth is not None and str(bandwidth).strip().startswith("-") and _nonzero(str(bandwidth)):
        causes.append({"reason": "FieldValueInvalid", "field": "spec.bandwidthPerMigration",
                       "message": "must not be negative"})
    return causes


def _nonzero(quantity: str) -> bool:
    return any(ch in "123456789" for ch in quantity.split("e")[0].split("E")[0])
