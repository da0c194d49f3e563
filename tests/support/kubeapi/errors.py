"""API errors as the Kubernetes API server reports them: an HTTP status plus a ``Status`` body.

Clients branch on these fields, not on prose: kopf on the HTTP code (404 skips a
patch, 409/422 retry a JSON patch), the Python client on ``reason``, kubectl on
``reason`` + ``details.causes`` to print ``The HalfClosePolicy "x" is invalid: ...``.
So the messages below copy the API server's wording (k8s.io/apimachinery
``pkg/api/errors`` and ``pkg/util/validation/field``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Go's %q is close enough to JSON string quoting for the ASCII names and values we see.
quote = json.dumps


@dataclass(frozen=True)
class FieldError:
    """One ``field.Error``: ``<field>: <type>: <detail>`` in the API server's words."""

    kind: str  # FieldValueRequired, FieldValueNotSupported, FieldValueInvalid, ...
    field: str  # spec.action, spec.capturePorts[0], metadata.name
    text: str  # everything after "<field>: ", e.g. 'Unsupported value: "Foo": supported ...'

    def __str__(self) -> str:
        return f"{self.field}: {self.text}" if self.field else self.text


def invalid(path: str, value: object, detail: str) -> FieldError:
    return FieldError("FieldValueInvalid", path, f"Invalid value: {render_value(value)}: {detail}")


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(
        "FieldValueRequired", path, "Required value" + (f": {detail}" if detail else "")
    )


def not_supported(path: str, value: object, supported: Sequence[object]) -> FieldError:
    choices = ", ".join(render_value(v) for v in supported)
    text = f"Unsupported value: {render_value(value)}: supported values: {choices}"
    return FieldError("FieldValueNotSupported", path, text)


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError("FieldValueForbidden", path, f"Forbidden: {detail}")


def duplicate(path: str, value: object) -> FieldError:
    return FieldError("FieldValueDuplicate", path, f"Duplicate value: {render_value(value)}")


def too_many(path: str, actual: int, limit: int) -> FieldError:
    return FieldError(
        "FieldValueTooMany", path, f"Too many: {actual}: must have at most {limit} items"
    )


def too_long(path: str, limit: int) -> FieldError:
    return FieldError("FieldValueTooLong", path, f"Too long: may not be more than {limit} bytes")


def render_value(value: object) -> str:
    """The ``%#v``-ish rendering field errors use: strings quoted, numbers bare."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return '"null"'
    if isinstance(value, int | float):
        return str(value)
    return quote(json.dumps(value, separators=(",", ":")))


REASONS: Mapping[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass
class APIError(Exception):
    """An error the emulated API server answers with (never an emulator bug)."""

    code: int
    message: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)
        if not self.reason:
            self.reason = REASONS.get(self.code, "Unknown")

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
        if self.details:
            body["details"] = self.details
        return body


def qualified(plural: str, group: str) -> str:
    """``halfclosepolicies.halfclose.io`` or ``pods``: how errors name a resource."""
    return f"{plural}.{group}" if group else plural


def not_found(plural: str, group: str, name: str) -> APIError:
    return APIError(
        404,
        f"{qualified(plural, group)} {quote(name)} not found",
        details=_details(plural, group, name),
    )


def already_exists(plural: str, group: str, name: str) -> APIError:
    return APIError(
        409,
        f"{qualified(plural, group)} {quote(name)} already exists",
        reason="AlreadyExists",
        details=_details(plural, group, name),
    )


def conflict(plural: str, group: str, name: str, why: str) -> APIError:
    return APIError(
        409,
        f"Operation cannot be fulfilled on {qualified(plural, group)} {quote(name)}: {why}",
        reason="Conflict",
        details=_details(plural, group, name),
    )


MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def invalid_object(kind: str, group: str, name: str, errors: Sequence[FieldError]) -> APIError:
    """422 with ``details.causes``: kubectl prints ``The <Kind> "<name>" is invalid: ...``."""
    qualified_kind = f"{kind}.{group}" if group else kind
    aggregate = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    return APIError(
        422,
        f"{qualified_kind} {quote(name)} is invalid: {aggregate}",
        reason="Invalid",
        details={
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [{"reason": e.kind, "message": e.text, "field": e.field} for e in errors],
        },
    )


def bad_request(message: str) -> APIError:
    return APIError(400, message, reason="BadRequest")


def not_found_path() -> APIError:
    return APIError(404, "the server could not find the requested resource", details={})


def method_not_allowed(method: str, what: str) -> APIError:
    return APIError(
        405, f"the server does not allow this method on the requested resource ({method} {what})"
    )


def unsupported_media_type(content_type: str) -> APIError:
    del content_type  # the server does not echo it back
    return APIError(
        415,
        "the body of the request was in an unknown format - accepted media types include: "
        "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
    )


def gone(message: str) -> APIError:
    return APIError(410, message, reason="Expired")


def _details(plural: str, group: str, name: str) -> dict[str, Any]:
    details: dict[str, Any] = {"name": name, "kind": plural}
    if group:
        details["group"] = group
    return details
