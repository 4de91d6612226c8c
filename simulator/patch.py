"""PATCH bodies applied the way the Kubernetes API server applies them.

Promises:
- `application/merge-patch+json`: RFC 7386 (objects merge recursively, `null` deletes, lists are replaced);
- `application/json-patch+json`: RFC 6902 through the `jsonpatch` library; a body that is not a JSON array is
  rejected with the real server's 400 message, a failing operation with its 422;
- `application/strategic-merge-patch+json`, for built-in kinds only: merge patch plus the list-merge keys the
  real Go types declare for the fields our kinds carry (conditions by `type`, containers by `name`, ...),
  `finalizers` merged as a set, the `$patch` (`replace`/`delete`), `$deleteFromPrimitiveList/<field>` and
  `$retainKeys` directives; `$setElementOrder/<field>` is accepted and ignored. Lists the Go types leave
  without a patch strategy (node taints, tolerations, container statuses, ...) are replaced, as on a real
  cluster, so a client that sends a partial list there loses the other entries here too;
- strategic merge on a custom resource and server-side apply answer 415 with the real message.

Inputs are never modified; results may share unchanged sub-trees with the input (callers copy on commit).
"""

from __future__ import annotations

import json
from typing import Any

import jsonpatch
import jsonpointer
import yaml

from simulator import protobuf
from simulator.errors import ApiError

Obj = dict[str, Any]

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"

# patchMergeKey of the list fields (by field name) in the Go types of the kinds we serve.
_MERGE_KEYS: dict[str, str] = {
    "conditions": "type",
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "ports": "containerPort",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "addresses": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "podIPs": "ip",
    "hostIPs": "ip",
    "resourceClaims": "name",
}
# Lists of scalars with patchStrategy "merge": the patch's items are added to the current ones.
_PRIMITIVE_MERGE = frozenset({"finalizers", "podCIDRs"})

_DIRECTIVE = "$patch"
_RETAIN = "$retainKeys"
_DELETE_PRIMITIVE = "$deleteFromPrimitiveList/"
_ELEMENT_ORDER = "$setElementOrder/"


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header (parameters dropped, lower case)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def unsupported_patch(*, builtin: bool) -> ApiError:
    accepted = [JSON_PATCH, MERGE_PATCH]
    if builtin:
        accepted.append(STRATEGIC_PATCH)
    accepted.append(APPLY_PATCH)
    return ApiError(415, "the body of the request was in an unknown format - accepted media types include: "
                         + ", ".join(accepted))


def apply_patch(current: Obj, body: bytes, content_type: str | None, *, builtin: bool) -> Obj:
    """The object that results from applying a PATCH request body to `current`."""
    kind = media_type(content_type)
    if kind == JSON_PATCH:
        return json_patch(current, _decode(body))
    if kind == MERGE_PATCH:
        patched = merge_patch(current, _decode_object(body))
        return _as_object(patched)
    if kind == STRATEGIC_PATCH and builtin:
        return strategic_merge_patch(current, _decode_object(body))
    raise unsupported_patch(builtin=builtin)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result: Obj = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Obj, ops: Any) -> Obj:
    """RFC 6902 JSON patch; `ops` must be a list of operations."""
    if not isinstance(ops, list):
        found = "object" if isinstance(ops, dict) else type(ops).__name__
        raise ApiError.bad_request(f"json: cannot unmarshal {found} into Go value of type jsonpatch.Patch")
    try:
        patched = jsonpatch.JsonPatch(ops).apply(target, in_place=False)
    except jsonpatch.InvalidJsonPatch as exc:
        raise ApiError.bad_request(str(exc)) from exc
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise ApiError(422, "the server rejected our request due to an error in our request",
                       details={"causes": [{"message": str(exc)}]}) from exc
    return _as_object(patched)


def strategic_merge_patch(target: Obj, patch: Obj) -> Obj:
    """A strategic merge patch over the list-merge keys of the built-in kinds we serve."""
    merged = _merge_map(target, patch)
    return merged if merged is not None else {}


def _merge_map(original: Obj, patch: Obj) -> Obj | None:
    """Merge `patch` into `original`; None when the patch deletes the whole map."""
    directive = patch.get(_DIRECTIVE)
    if directive == "delete":
        return None
    if directive == "replace":
        replaced: Obj = _strip({k: v for k, v in patch.items() if k != _DIRECTIVE})
        return replaced
    if directive is not None:
        raise ApiError.bad_request(f"Unknown patch type: {directive!r}")
    result: Obj = dict(original)
    for key, value in patch.items():
        if key in (_RETAIN, _DIRECTIVE) or key.startswith(_ELEMENT_ORDER):
            continue
        if key.startswith(_DELETE_PRIMITIVE):
            field = key[len(_DELETE_PRIMITIVE):]
            current = result.get(field)
            if isinstance(current, list) and isinstance(value, list):
                result[field] = [item for item in current if item not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict):
            old = result.get(key)
            merged = _merge_map(old if isinstance(old, dict) else {}, value)
            if merged is None:
                result.pop(key, None)
            else:
                result[key] = merged
        elif isinstance(value, list):
            old_list = result.get(key)
            result[key] = _merge_list(key, old_list if isinstance(old_list, list) else [], value)
        else:
            result[key] = value
    retain = patch.get(_RETAIN)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(field: str, original: list[Any], patch: list[Any]) -> list[Any]:
    if any(isinstance(item, dict) and item.get(_DIRECTIVE) == "replace" for item in patch):
        return [_strip(item) for item in patch
                if not (isinstance(item, dict) and item.get(_DIRECTIVE) == "replace")]
    if field in _PRIMITIVE_MERGE:
        return list(original) + [item for item in patch if item not in original]
    key = _MERGE_KEYS.get(field)
    if key is None or not all(isinstance(item, dict) for item in patch):
        return [_strip(item) for item in patch]
    result = list(original)
    for item in patch:
        wanted = item.get(key)
        index = next((i for i, cur in enumerate(result) if isinstance(cur, dict) and cur.get(key) == wanted),
                     None)
        if item.get(_DIRECTIVE) == "delete":
            if index is not None:
                del result[index]
            continue
        if index is None:
            added = _merge_map({}, item)
            if added is not None:
                result.append(added)
        else:
            merged = _merge_map(result[index], item)
            if merged is None:
                del result[index]
            else:
                result[index] = merged
    return result


def _strip(value: Any) -> Any:
    """Drop patch directives and nulls from a value that replaces rather than merges."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items()
                if v is not None and not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _decode(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ApiError.bad_request(f"error decoding patch: {exc}") from exc


def _decode_object(body: bytes) -> Obj:
    value = _decode(body)
    if not isinstance(value, dict):
        raise ApiError.bad_request("json: cannot unmarshal array into Go value of type map[string]interface {}"
                                   if isinstance(value, list) else "patch body must be a JSON object")
    return value


def _as_object(value: Any) -> Obj:
    if not isinstance(value, dict):
        raise ApiError.bad_request("the patched document is not a JSON object")
    return value


def decode_body(body: bytes, content_type: str | None) -> Any:
    """A request body as JSON data; YAML is accepted too, as the real server does for create/update."""
    if not body:
        return None
    kind = media_type(content_type)
    if kind == protobuf.MEDIA_TYPE:
        return protobuf.decode(body)
    try:
        if kind in ("application/yaml", "application/x-yaml", "text/yaml"):
            return yaml.safe_load(body)
        return json.loads(body)
    except (ValueError, yaml.YAMLError) as exc:
        raise ApiError.bad_request(f"couldn't decode the request body: {exc}") from exc
