"""Why the service will not (or could not) answer one request, carried as a value.

A ``Rejection`` is an outcome like an image: the core returns it for one request and the rest of the batch
goes on. It says *what kind* of failure happened and which field is at fault; which HTTP status a kind
becomes is the protocols' business (``handler/protocols/http.py``, once for all), so the core can serve any
protocol.
"""

from dataclasses import dataclass
from typing import Optional

# The kinds of failure a door must be able to answer, each with what it means for the client.
INVALID_FIELD = "invalid_field"            # a field's value is outside what the contract allows
UNKNOWN_FIELD = "unknown_field"            # a field the contract does not declare
MISSING_PROMPT = "missing_prompt"          # no prompt at all
INVALID_BODY = "invalid_body"              # the body cannot be read (encoding, duplicate keys, shape)
INVALID_JSON = "invalid_json"              # declared JSON, not JSON
INVALID_IMAGE = "invalid_image"            # an image field that is not a readable PNG, JPEG or WebP
IMAGE_TOO_LARGE = "image_too_large"        # an input image over the pixel limit (checked before decoding)
UNSUPPORTED_TASK = "unsupported_task"      # a field this model's family or tasks do not have
UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # a Content-Type the service does not read
NOT_ACCEPTABLE = "not_acceptable"          # an Accept header that allows none of the output formats
NOT_IMPLEMENTED = "not_implemented"        # a route the service does not offer (explanations)
OUT_OF_MEMORY = "out_of_memory"            # the device ran out of memory for this generation
TIMEOUT = "timeout"                        # the generation ran past its timeout_seconds and was stopped
INTERNAL_ERROR = "internal_error"          # a server-side bug; the log has the details

REASONS = (INVALID_FIELD, UNKNOWN_FIELD, MISSING_PROMPT, INVALID_BODY, INVALID_JSON, INVALID_IMAGE, IMAGE_TOO_LARGE,
           UNSUPPORTED_TASK, UNSUPPORTED_MEDIA_TYPE, NOT_ACCEPTABLE, NOT_IMPLEMENTED, OUT_OF_MEMORY, TIMEOUT,
           INTERNAL_ERROR)
MAX_SHOWN = 80
MAX_UNKNOWN_SHOWN = 5  # an unknown-field message names this many, then counts the rest


@dataclass  # not frozen: raising sets __traceback__ and __cause__ on the instance
class Rejection(Exception):
    """A request the service will not run, or could not finish: the kind, the field at fault, what to fix."""

    reason: str
    message: str
    field: Optional[str] = None

    def __str__(self) -> str:
        return self.message


def invalid(field: Optional[str], message: str, reason: str = INVALID_FIELD) -> Rejection:
    """A client error for a field; the message must say what was received and what is allowed."""
    return Rejection(reason=reason, message=message, field=field)


def shown(value) -> str:
    """A client's value for a message or a log line, cut short: a 1 MB string must never echo back whole."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # integers over Python's digit limit, deeply nested values
        text = f"a {type(value).__name__} too large to show"
    return text if len(text) <= MAX_SHOWN else text[:MAX_SHOWN - 3] + "..."


def unknown_names(names: list[str], what: str, allowed: str) -> Rejection:
    """The refusal of names nobody declared: the first few shown cut short, the rest counted, then what is
    allowed (``names`` may hold 200,000 keys of a megabyte each: the message stays short)."""
    listed = ", ".join(shown(name) for name in names[:MAX_UNKNOWN_SHOWN])
    more = f" and {len(names) - MAX_UNKNOWN_SHOWN} more" if len(names) > MAX_UNKNOWN_SHOWN else ""
    return invalid(names[0][:MAX_SHOWN], f"unknown {what}(s) {listed}{more}{allowed}", reason=UNKNOWN_FIELD)
