"""Log lines: JSON on stderr, and nothing that looks like a credential in them."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from server.logs import configure, redact


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bearer abc123", "Bearer [REDACTED]"),
        ("bearer   abc123  ", "bearer   [REDACTED]  "),
        ("got Basic dXNlcjpwYXNz", "got Basic [REDACTED]"),
        ("authorization: Bearer abc", "authorization: [REDACTED]"),
        ("authorization=abc&x=1", "authorization=[REDACTED]&x=1"),
        ("('authorization', 'abc')", "('authorization', '[REDACTED]')"),
        ('{"api_key": "abc", "n": 1}', '{"api_key": "[REDACTED]", "n": 1}'),
        ("password=hunter2", "password=[REDACTED]"),
        ("x-amz-security-token:IQoJb3JpZ2lu\nhost", "x-amz-security-token:[REDACTED]\nhost"),
        ("{'X-Amz-Security-Token': b'IQoJ'}", "{'X-Amz-Security-Token': b'[REDACTED]'}"),
        ("aws_secret_access_key=abc", "aws_secret_access_key=[REDACTED]"),
        ("AWS_SESSION_TOKEN=abc", "AWS_SESSION_TOKEN=[REDACTED]"),
        ("token eyJhbGciOi.eyJvcmci.c2ln here", "token [REDACTED] here"),
        ("the token has expired", "the token has expired"),
        ("cannot read API keys from /etc/keys.json", "cannot read API keys from /etc/keys.json"),
        ("rpc ListGenerations OK", "rpc ListGenerations OK"),
    ],
)
def test_what_looks_like_a_credential_is_redacted(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_raw_values_hide_every_bytes_literal() -> None:
    text = "Invalid encoding on b'a-key-0123\\xff' and b\"x\""
    assert redact(text, raw_values=True) == "Invalid encoding on b'[REDACTED]' and b'[REDACTED]'"
    assert redact(text) == text  # only grpc's records print raw values


@pytest.fixture
def restored_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restored_root")
def test_every_logger_s_lines_pass_the_filter(capsys: pytest.CaptureFixture[str]) -> None:
    configure("INFO")
    log = logging.getLogger("somewhere.else")  # not grpc: only the root handler filters it
    log.warning("calling with %s", "Bearer abc123-secret", extra={"header": "Basic dXNlcjE="})
    try:
        raise ValueError("password=hunter2")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["message"] for line in lines] == ["calling with Bearer [REDACTED]", "failed"]
    assert lines[0]["header"] == "Basic [REDACTED]"
    assert "ValueError: password=[REDACTED]" in lines[1]["exception"]
    text = json.dumps(lines)
    for secret in ("abc123", "hunter2", "dXNlcjE"):
        assert secret not in text
