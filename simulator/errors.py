"""API errors rendered as Kubernetes `Status` objects, shaped like the real API server's."""

from __future__ import annotations

from typing import Any

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
}


class ApiError(Exception):
    """An error the API server answers with; `status()` is the wire body."""

    def __init__(self, code: int, message: str, *, reason: str | None = None,
                 details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = _REASONS.get(code, "Unknown") if reason is None else reason
        self.details = details

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if not self.reason:
            del body["reason"]  # metav1.Status omits an empty reason
        if self.details is not None:
            body["details"] = self.details
        return body

    # Constructors for the shapes the API server uses.
    @classmethod
    def not_found(cls, resource: str, name: str, group: str = "") -> ApiError:
        qualified = f"{resource}.{group}" if group else resource
        return cls(404, f'{qualified} "{name}" not found',
                   details={"name": name, "group": group, "kind": resource} if group else
                   {"name": name, "kind": resource})

    @classmethod
    def already_exists(cls, resource: str, name: str, group: str = "") -> ApiError:
        qualified = f"{resource}.{group}" if group else resource
        return cls(409, f'{qualified} "{name}" already exists', reason="AlreadyExists",
                   details={"name": name, "group": group, "kind": resource})

    @classmethod
    def conflict(cls, resource: str, name: str, group: str = "") -> ApiError:
        qualified = f"{resource}.{group}" if group else resource
        return cls(409, f'Operation cannot be fulfilled on {qualified} "{name}": the object has been '
                        "modified; please apply your changes to the latest version and try again",
                   details={"name": name, "group": group, "kind": resource})

    @classmethod
    def invalid(cls, kind: str, name: str, message: str, group: str = "",
                causes: list[dict[str, str]] | None = None) -> ApiError:
        return cls(422, f'{kind}{"." + group if group else ""} "{name}" is invalid: {message}',
                   details={"name": name, "group": group, "kind": kind, "causes": causes or []})

    @classmethod
    def bad_request(cls, message: str) -> ApiError:
        return cls(400, message)

    @classmethod
    def gone(cls, message: str) -> ApiError:
        return cls(410, message, reason="Expired")

    @classmethod
    def webhook_denied(cls, webhook: str, message: str, code: int = 400) -> ApiError:
        """An admission webhook denial as kube-apiserver wraps it (apiserver's webhook errors.ToStatusErr): the
        webhook's Result.Code and message, with no reason (KubeVirt's ToAdmissionResponseError and its
        eviction denial set none)."""
        return cls(code, f'admission webhook "{webhook}" denied the request: {message}', reason="")

    @classmethod
    def webhook_invalid(cls, webhook: str, causes: list[dict[str, str]]) -> ApiError:
        """KubeVirt's webhookutils.ToAdmissionResponse: 422 Invalid, the causes' messages joined by ", "."""
        message = ", ".join(c["message"] for c in causes[:10])
        return cls(422, f'admission webhook "{webhook}" denied the request: {message}', reason="Invalid",
                   details={"causes": causes[:10]})
