"""Kubernetes protobuf request bodies, decoded as far as the simulator needs.

client-go sends built-in kinds as `application/vnd.kubernetes.protobuf` from some kubectl commands
(`kubectl create namespace X` does). The wire format (apimachinery runtime/serializer/protobuf): the magic
bytes `k8s\\x00`, then a `runtime.Unknown` message {1: TypeMeta {1: apiVersion, 2: kind}, 2: raw, 3:
contentEncoding, 4: contentType}, `raw` being the object's own message, whose field 1 is ObjectMeta
{1: name, 2: generateName, 3: namespace, 11: labels, 12: annotations (map<string,string> entries {1: key,
2: value})}.

Only Namespace (whose spec and status carry nothing a creation needs), TokenRequest (`kubectl create token`;
spec {1: audiences, 4: expirationSeconds}) and SelfSubjectAccessReview (`kubectl auth can-i`; spec
{1: resourceAttributes {1: namespace, 2: verb, 3: group, 4: version, 5: resource, 6: subresource, 7: name},
2: nonResourceAttributes {1: path, 2: verb}}) are decoded; any other kind answers 415 so the client can send
JSON. Responses are always JSON (clients accept it).
"""

from __future__ import annotations

from typing import Any

from simulator.errors import ApiError

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
_MAGIC = b"k8s\x00"
DECODED_KINDS = frozenset({("v1", "Namespace"), ("authentication.k8s.io/v1", "TokenRequest"),
                           ("authorization.k8s.io/v1", "SelfSubjectAccessReview")})

Fields = dict[int, list[Any]]


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def fields(data: bytes) -> Fields:
    """The fields of one message: number -> values (bytes for length-delimited, int for varint/fixed)."""
    out: Fields = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        value: Any
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated field")
            value, pos = data[pos:pos + length], pos + length
        elif wire == 1:
            value, pos = int.from_bytes(data[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, pos = int.from_bytes(data[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _text(f: Fields, number: int) -> str | None:
    values = f.get(number)
    return values[-1].decode() if values else None


def _string_map(f: Fields, number: int) -> dict[str, str]:
    out = {}
    for entry in f.get(number, []):
        e = fields(entry)
        out[_text(e, 1) or ""] = _text(e, 2) or ""
    return out


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf request body; 400 when it is not one, 415 for a kind not decoded here."""
    try:
        if not body.startswith(_MAGIC):
            raise ValueError("missing the k8s protobuf magic prefix")
        unknown = fields(body[len(_MAGIC):])
        type_meta = fields(unknown.get(1, [b""])[-1])
        api_version, kind = _text(type_meta, 1) or "", _text(type_meta, 2) or ""
        if (api_version, kind) not in DECODED_KINDS:
            raise ApiError(415, f"the simulator does not decode protobuf bodies of {api_version} {kind}; send JSON",
                           reason="UnsupportedMediaType")
        obj = fields(unknown.get(2, [b""])[-1])
        meta_fields = fields(obj.get(1, [b""])[-1])
    except ValueError as exc:
        raise ApiError.bad_request(f"couldn't decode the protobuf request body: {exc}") from exc
    meta: dict[str, Any] = {}
    for number, name in ((1, "name"), (2, "generateName"), (3, "namespace")):
        value = _text(meta_fields, number)
        if value:
            meta[name] = value
    for number, name in ((11, "labels"), (12, "annotations")):
        mapping = _string_map(meta_fields, number)
        if mapping:
            meta[name] = mapping
    out: dict[str, Any] = {"apiVersion": api_version, "kind": kind, "metadata": meta}
    try:
        spec_fields = fields(obj.get(2, [b""])[-1])
        if kind == "TokenRequest":
            spec: dict[str, Any] = {"audiences": [a.decode() for a in spec_fields.get(1, [])]}
            if spec_fields.get(4):
                spec["expirationSeconds"] = int(spec_fields[4][-1])
            out["spec"] = spec
        elif kind == "SelfSubjectAccessReview":
            out["spec"] = _review_spec(spec_fields)
    except ValueError as exc:
        raise ApiError.bad_request(f"couldn't decode the protobuf request body: {exc}") from exc
    return out


_RESOURCE_ATTRIBUTES = ((1, "namespace"), (2, "verb"), (3, "group"), (4, "version"), (5, "resource"),
                        (6, "subresource"), (7, "name"))


def _review_spec(spec_fields: Fields) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if spec_fields.get(1):
        attrs = fields(spec_fields[1][-1])
        spec["resourceAttributes"] = {name: _text(attrs, n) for n, name in _RESOURCE_ATTRIBUTES
                                      if _text(attrs, n) is not None}
    if spec_fields.get(2):
        attrs = fields(spec_fields[2][-1])
        spec["nonResourceAttributes"] = {"path": _text(attrs, 1) or "", "verb": _text(attrs, 2) or ""}
    return spec


def _encode_field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def encode_for_tests(api_version: str, kind: str, *, name: str, labels: dict[str, str] | None = None) -> bytes:
    """A protobuf body as client-go writes it (only what `decode` reads), for tests."""
    meta = _encode_field(1, name.encode())
    for key, value in (labels or {}).items():
        meta += _encode_field(11, _encode_field(1, key.encode()) + _encode_field(2, value.encode()))
    type_meta = _encode_field(1, api_version.encode()) + _encode_field(2, kind.encode())
    return _MAGIC + _encode_field(1, type_meta) + _encode_field(2, _encode_field(1, meta))
