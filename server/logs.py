"""Structured logging: one JSON object per line on stderr, credentials removed first.

No credential may reach a log line, including the lines a library writes for us: grpc's
Cython layer logs a metadata value it cannot decode as UTF-8 at ERROR, whole, so a
valid API key followed by one stray byte in ``authorization`` used to land in the log.
``RedactSecrets`` cleans every record before a handler formats it; it sits on the root
handler and on each of grpc's loggers (so a handler added elsewhere sees clean records
too). It knows no secret: keys live only as digests, so it removes what looks like one.

C-core's own tracers write to stderr past any Python filter; ``server/__init__.py`` keeps
them off (see there).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from server.api.context import current_request_id

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}
REDACTED = "[REDACTED]"

# The credentials of an authorization scheme: "Bearer <token>", "basic <user:password>".
_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+)[^\s'\"`,;&)\]}]+")
# A JWT anywhere: three base64url segments, the first a JSON object ("{" is "eyJ").
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*")
# The value beside a credential's name: authorization=x, "api_key": "x", ('authorization', b'x').
# AWS: a session token travels in a header (botocore logs headers and the canonical
# request at DEBUG); the secret key never should, but is named here all the same.
_NAMED = re.compile(
    r"(?i)\b(authorization|x-api-key|api[_-]?key|access[_-]?token|password"
    r"|x-amz-security-token|(?:aws[_-]?)?(?:session[_-]?token|secret[_-]?access[_-]?key))"
    r"(['\"]?\s*[:=,]\s*\(?\s*(?:b?['\"])?)(?:(?:bearer|basic)\s+)?[^\s'\"`,;&)\]}]+"
)
# A bytes literal in a grpc record is a raw metadata value or frame: never shown.
_BYTES = re.compile(r"""\bb'(?:[^'\\]|\\.)*'|\bb"(?:[^"\\]|\\.)*\"""")
_GRPC = "grpc"
# What grpc logs, at ERROR with a traceback, when a caller sends a metadata value that is
# not UTF-8: the caller's fault, not ours, so a WARNING without the traceback.
_UNDECODABLE = "Invalid encoding on "


def redact(text: str, *, raw_values: bool = False) -> str:
    """``text`` with anything that looks like a credential replaced by ``[REDACTED]``.

    Args:
        text: a log message, traceback or field.
        raw_values: also hide every bytes literal (``b'...'``), as grpc prints raw values.
    """
    if raw_values:
        text = _BYTES.sub(f"b'{REDACTED}'", text)
    text = _NAMED.sub(rf"\1\2{REDACTED}", text)
    text = _SCHEME.sub(rf"\1\2{REDACTED}", text)
    return _JWT.sub(REDACTED, text)


class RedactSecrets(logging.Filter):
    """Removes credentials from a record's message, traceback and extra fields.

    The record is changed in place, so every handler after this filter sees it clean. A
    traceback is rendered here (and cleaned) rather than left for a formatter to render.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Clean ``record``; never drops it."""
        raw = record.name == _GRPC or record.name.startswith(_GRPC + ".")
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: show the template, never fail the caller
            message = str(record.msg)
        if raw and message.startswith(_UNDECODABLE) and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        record.msg, record.args = redact(message, raw_values=raw), ()
        if record.exc_info:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text, raw_values=raw)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, raw_values=raw)
        for key, value in record.__dict__.items():
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = redact(value, raw_values=raw)
        return True


def install_redaction(*handlers: logging.Handler) -> RedactSecrets:
    """Put one ``RedactSecrets`` on grpc's loggers and on ``handlers``; idempotent.

    grpc's loggers are those loaded so far (``grpc`` and below); records of any logger
    created later still pass the root handler's filter.
    """
    loggers = [logging.getLogger(_GRPC)] + [
        item
        for name, item in logging.root.manager.loggerDict.items()
        if name.startswith(_GRPC + ".") and isinstance(item, logging.Logger)
    ]
    existing = [f for f in loggers[0].filters if isinstance(f, RedactSecrets)]
    redactor = existing[0] if existing else RedactSecrets()
    for target in [*loggers, *handlers]:
        if redactor not in target.filters:
            target.addFilter(redactor)
    return redactor


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON, with its extra fields and the current request id.

    Args:
        fields: added to every line (a worker's index and process id).
    """

    def __init__(self, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self._fields = dict(fields or {})

    def format(self, record: logging.LogRecord) -> str:
        """Render one line."""
        body: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._fields,
        }
        body.setdefault("request_id", current_request_id())
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                body[key] = value
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            body["exception"] = record.exc_text
        return json.dumps(body, default=str)


def configure(level: str, fields: Mapping[str, Any] | None = None) -> None:
    """Send every log record to stderr as JSON at ``level``, credentials removed.

    ``fields`` go on every line: the workers of one server share its stderr.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(fields))
    install_redaction(handler)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
