"""The one error type a client can cause, carried as a value so one bad request never fails its batch."""

import json
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RequestError(Exception):
    """A request the service will not run: the HTTP status, the field at fault and what to fix."""

    status: int
    message: str
    field: Optional[str] = None
    reason: str = "invalid_request"

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> bytes:
        """The error body every 4xx/5xx carries: ``{"error": {"code", "reason", "field", "message"}}``."""
        return json.dumps(
            {"error": {"code": self.status, "reason": self.reason, "field": self.field, "message": self.message}}
        ).encode()


def invalid(field: Optional[str], message: str, status: int = 400, reason: str = "invalid_field") -> RequestError:
    """A 4xx for a field; the message must say what was received and what is allowed."""
    return RequestError(status=status, message=message, field=field, reason=reason)
