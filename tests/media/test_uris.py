"""URI normalisation: RFC 3986's own examples, the refusals, and prefix containment."""

from __future__ import annotations

import pytest

from server.media.uris import UriError, is_under, normalize, remove_dot_segments, scheme_of


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b/c/./../../g", "/a/g"),  # RFC 3986 §5.2.4
        ("/b/c/../../../g", "/g"),  # §5.4.2: ".." above the root stays at the root
        ("/b/c/./g", "/b/c/g"),
        ("/b/c/g/.", "/b/c/g/"),
        ("/b/c/..", "/b/"),
        ("/b/c/g;x=1/../y", "/b/c/y"),
        ("/a/b..c/.d/e.", "/a/b..c/.d/e."),  # dots inside names are names
    ],
)
def test_dot_segments_are_removed_as_rfc_3986_says(path: str, expected: str) -> None:
    assert remove_dot_segments(path) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("eXAMPLE://a/./b/../b/%63/%7bfoo%7d", "example://a/b/c/%7Bfoo%7D"),  # §6.2.2
        ("HTTP://www.Example.com:80", "http://www.example.com/"),  # §6.2.3
        ("https://h:443/x", "https://h/x"),
        ("https://h:8443/x", "https://h:8443/x"),
        ("https://h:/x", "https://h/x"),
        ("S3://Loras/Ana/../Bo.safetensors", "s3://loras/Bo.safetensors"),
        ("https://[2001:DB8::1]:8080/a", "https://[2001:db8::1]:8080/a"),
        ("https://User@H/a", "https://User@h/a"),
        ("ARTIFACT:abc", "artifact:abc"),
        ("https://h/ü?q=é#ö", "https://h/%C3%BC?q=%C3%A9#%C3%B6"),
        ("https://h/a?%2e=%7E", "https://h/a?.=~"),  # the query is not a path: "." is fine
    ],
)
def test_equivalent_spellings_normalise_to_one(text: str, expected: str) -> None:
    assert str(normalize(text)) == expected
    assert str(normalize(expected)) == expected  # normalising is idempotent


@pytest.mark.parametrize(
    "text",
    [
        "https://h/%2e%2e/x",
        "https://h/a/%2E",
        "https://h/a/.%2e/x",
        "https://h/a/..%2fx",
        "https://h/a/x%2F..",
        "https://h/a/..%5cx",
        "https://h/a/%252e%252e/x",
        "https://h%2e/x",
        "s3://loras/%2e%2e/x",
    ],
)
def test_encoded_dots_are_refused(text: str) -> None:
    with pytest.raises(UriError, match="must not percent-encode dots"):
        normalize(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("https://h/a b", "whitespace"),
        ("https://h\\@evil/", "backslashes"),
        ("https://h/a%zz", "two hex digits"),
        ("https://h/a%2", "two hex digits"),
        ("https://h:8x/", "port"),
        ("1https://h/", "scheme"),
    ],
)
def test_unsafe_spellings_are_refused(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        normalize(text)


def test_the_scheme_is_read_whatever_its_case() -> None:
    assert scheme_of("HTTP://x") == "http"
    assert scheme_of("Prediction:x") == "prediction"
    assert scheme_of("looks/a.png") == ""
    assert scheme_of("/srv/a:b") == ""


@pytest.mark.parametrize(
    ("uri", "prefix", "under"),
    [
        ("https://a.example/loras/x", "https://a.example/loras", True),
        ("https://a.example/loras/x", "https://a.example/loras/", True),
        ("https://a.example/loras", "https://a.example/loras", True),
        ("https://a.example/loras-evil/x", "https://a.example/loras", False),
        ("https://a.example/lora", "https://a.example/loras", False),
        ("https://a.example.evil/loras/x", "https://a.example/", False),
        ("s3://loras-evil/x", "s3://loras", False),
        ("s3://loras/x", "s3://loras", True),
    ],
)
def test_a_prefix_contains_only_what_lies_below_a_segment_boundary(
    uri: str, prefix: str, under: bool
) -> None:
    assert is_under(uri, prefix) is under
