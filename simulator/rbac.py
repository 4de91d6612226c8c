"""Who a request speaks for, and whether RBAC lets it: ServiceAccount tokens bound to stored Roles.

Users:
- the admin token (`/sim/v1/*` and everything else) and the cluster token are cluster administrators: RBAC is
  not consulted for them (a kubeconfig of a cluster's admin);
- a ServiceAccount token, issued by `POST .../serviceaccounts/NAME/token` (TokenRequest, as `kubectl create
  token` asks), speaks for `system:serviceaccount:NS:NAME` with the groups `system:serviceaccounts`,
  `system:serviceaccounts:NS` and `system:authenticated`. It stops working when the ServiceAccount is deleted or
  the token expires.

Authorization of a ServiceAccount's request follows kube-apiserver's RBAC authorizer
(plugin/pkg/auth/authorizer/rbac, the SubjectAccessReview semantics):
- ClusterRoleBindings grant their ClusterRole everywhere; RoleBindings grant their Role or ClusterRole inside
  their own namespace only;
- a rule allows when its verbs hold the verb (or `*`), its apiGroups the group (or `*`), its resources the
  resource or `resource/subresource` (or `*`, or `*/subresource`), and its resourceNames, if any, the name;
- verbs as the API server names them: get, list, watch (a list with watch=true), create, update, patch,
  delete, deletecollection;
- non-resource paths (discovery, /version, /openapi) and SelfSubjectAccessReviews (`kubectl auth can-i`) are
  allowed to every authenticated user, as the default `system:discovery`, `system:public-info-viewer` and
  `system:basic-user` bindings do.
A refusal is the API server's 403 Forbidden Status, word for word.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from simulator.errors import ApiError
from simulator.resources import CLUSTERROLEBINDINGS, CLUSTERROLES, ROLEBINDINGS, ROLES, SERVICEACCOUNTS
from simulator.store import Store, iso

Obj = dict[str, Any]
DEFAULT_TOKEN_SECONDS = 3600
MIN_TOKEN_SECONDS = 600


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    superuser: bool = False
    """RBAC is not consulted (the cluster's admin credentials)."""
    sim_admin: bool = False
    """May use /sim/v1/* (the simulator's admin token only)."""


@dataclass(frozen=True)
class Request:
    """The attributes RBAC decides on (authorizer.Attributes)."""

    verb: str
    group: str
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None


@dataclass(frozen=True)
class _Token:
    namespace: str
    name: str
    uid: str
    expires_at: float


class Rbac:
    """ServiceAccount tokens and the RBAC authorizer over the Roles and bindings in `store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._tokens: dict[str, _Token] = {}

    # ----------------------------------------------------------------------------------------- tokens
    def issue_token(self, namespace: str, name: str, body: Obj | None) -> Obj:
        """TokenRequest for a ServiceAccount: the answer's status carries the bearer token."""
        sa = self.store.require(SERVICEACCOUNTS, namespace, name)
        spec = dict((body or {}).get("spec") or {})
        seconds = spec.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS
        if not isinstance(seconds, int) or seconds < MIN_TOKEN_SECONDS:
            raise ApiError.invalid("TokenRequest", name, "spec.expirationSeconds: Invalid value: "
                                   f"{seconds}: may not specify a duration less than 10 minutes",
                                   "authentication.k8s.io")
        token = f"sim-sa.{secrets.token_urlsafe(24)}"
        expires = self.store.now() + seconds
        self._tokens[token] = _Token(namespace, name, sa["metadata"]["uid"], expires)
        spec.setdefault("audiences", ["https://kubernetes.default.svc"])
        spec["expirationSeconds"] = seconds
        return {"kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"name": name, "namespace": namespace, "creationTimestamp": iso(self.store.now())},
                "spec": spec, "status": {"token": token, "expirationTimestamp": iso(expires)}}

    def user_for(self, token: str) -> User | None:
        """The ServiceAccount a token speaks for; None when it is not one of ours or no longer valid."""
        issued = self._tokens.get(token)
        if issued is None:
            return None
        sa = self.store.get(SERVICEACCOUNTS, issued.namespace, issued.name)
        if sa is None or sa["metadata"]["uid"] != issued.uid or self.store.now() >= issued.expires_at:
            return None
        return User(f"system:serviceaccount:{issued.namespace}:{issued.name}",
                    ("system:serviceaccounts", f"system:serviceaccounts:{issued.namespace}", "system:authenticated"))

    # -------------------------------------------------------------------------------------- authorize
    def allows(self, user: User, req: Request) -> bool:
        if user.superuser:
            return True
        if req.group == "authorization.k8s.io" and req.verb == "create" and \
                req.resource in ("selfsubjectaccessreviews", "selfsubjectrulesreviews"):
            return True  # the default system:basic-user binding of every authenticated user
        rules = (rule for role in self._rules_for(user, req.namespace) for rule in role)
        return any(_rule_allows(rule, req) for rule in rules)

    def check(self, user: User, req: Request) -> None:
        if not self.allows(user, req):
            raise forbidden(user, req)

    def _rules_for(self, user: User, namespace: str | None) -> list[list[Obj]]:
        out: list[list[Obj]] = []
        for binding in self.store.iter(CLUSTERROLEBINDINGS):
            if _binds(binding, user):
                role = self._role(binding, None)
                if role is not None:
                    out.append(list(role.get("rules") or []))
        if namespace:
            for binding in self.store.list(ROLEBINDINGS, namespace):
                if _binds(binding, user):
                    role = self._role(binding, namespace)
                    if role is not None:
                        out.append(list(role.get("rules") or []))
        return out

    def _role(self, binding: Obj, namespace: str | None) -> Obj | None:
        ref = binding.get("roleRef") or {}
        if ref.get("kind") == "ClusterRole":
            return self.store.get(CLUSTERROLES, None, str(ref.get("name") or ""))
        if ref.get("kind") == "Role" and namespace is not None:
            return self.store.get(ROLES, namespace, str(ref.get("name") or ""))
        return None


def _binds(binding: Obj, user: User) -> bool:
    binding_ns = binding["metadata"].get("namespace")
    for subject in binding.get("subjects") or []:
        kind, name = subject.get("kind"), subject.get("name")
        if kind == "ServiceAccount":
            ns = subject.get("namespace") or binding_ns
            if user.name == f"system:serviceaccount:{ns}:{name}":
                return True
        elif (kind == "User" and name == user.name) or (kind == "Group" and name in user.groups):
            return True
    return False


def _rule_allows(rule: Obj, req: Request) -> bool:
    verbs = rule.get("verbs") or []
    if "*" not in verbs and req.verb not in verbs:
        return False
    groups = rule.get("apiGroups") or []
    if "*" not in groups and req.group not in groups:
        return False
    combined = req.resource if not req.subresource else f"{req.resource}/{req.subresource}"
    resources = rule.get("resources") or []
    if not ("*" in resources or combined in resources
            or (req.subresource and f"*/{req.subresource}" in resources)):
        return False
    names = rule.get("resourceNames") or []
    return not names or (req.name is not None and req.name in names)


def forbidden(user: User, req: Request) -> ApiError:
    """kube-apiserver's Forbidden Status (endpoints/handlers/responsewriters.ForbiddenStatusError)."""
    combined = req.resource if not req.subresource else f"{req.resource}/{req.subresource}"
    scope = f'in the namespace "{req.namespace}"' if req.namespace else "at the cluster scope"
    what = f'{req.resource}.{req.group}' if req.group else req.resource
    subject = f'{what} "{req.name}"' if req.name else what
    message = (f'{subject} is forbidden: User "{user.name}" cannot {req.verb} resource "{combined}" in API group '
               f'"{req.group}" {scope}')
    details: Obj = {"kind": req.resource}
    if req.group:
        details["group"] = req.group
    if req.name:
        details["name"] = req.name
    return ApiError(403, message, details=details)
