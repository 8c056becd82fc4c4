"""Image references: every form parses and formats back; every refusal names its field."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from server.config import MediaSettings
from server.domain.errors import FieldViolation, InvalidArgumentError, Violations
from server.media.references import (
    ArtifactRef,
    FileRef,
    PredictionRef,
    Reference,
    ReferencePolicy,
    UrlRef,
    format_reference,
    is_fetched,
    parse_reference,
    parse_reference_or_raise,
)

FIELD = "params.base_image_url"
SHA = "0123456789abcdef" * 4
PREDICTION = "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b"

EMPTY = (
    "must not be empty: an image reference is one of prediction:<id>, artifact:<sha256>, "
    "file:///absolute/path, http:// or https://"
)
UNKNOWN_SCHEME = (
    "must start with one of prediction:<id>, artifact:<sha256>, file:///absolute/path, "
    "http:// or https://"
)
BAD_PREDICTION = "must be prediction:<prediction id>, the id a UUID in lowercase canonical form"
BAD_ARTIFACT = "must be artifact:<sha256> with 64 lowercase hexadecimal digits"
NO_ROOTS = "must not be a file:// reference: the server has no input roots configured"
NOT_ABSOLUTE = "must be file:///absolute/path"
HAS_HOST = "must not name a host: a file reference is file:///absolute/path"
DOT_DOT = "must not contain '.' or '..' segments"
BAD_PERCENT = "must percent-encode '%' as %25 (a '%' must be followed by two hex digits)"
ENCODED_DOTS = "must not percent-encode dots or dot segments (%2E, ..%2F, %2F.., %5C)"
UNSAFE = "must not contain whitespace, control characters or backslashes"
OUTSIDE = "must be a file under one of the server's input roots"
NO_HOST = "must be an http(s) URL with a host: http(s)://host/path"
CREDENTIALS = "must not contain credentials (user:password@)"
NON_PUBLIC = (
    "must not target a loopback, private, link-local, multicast, reserved or otherwise "
    "non-public address"
)


def policy(*roots: Path, allow_private_networks: bool = False) -> ReferencePolicy:
    return ReferencePolicy(input_roots=roots, allow_private_networks=allow_private_networks)


def refused(text: str, rules: ReferencePolicy) -> list[FieldViolation]:
    v = Violations()
    assert parse_reference(text, FIELD, v, rules) is None
    return v.items


def accepted(text: str, rules: ReferencePolicy) -> Reference:
    v = Violations()
    reference = parse_reference(text, FIELD, v, rules)
    assert not v, v.items
    assert reference is not None
    return reference


@pytest.fixture
def root(tmp_path: Path) -> Path:
    inputs = tmp_path / "inputs"
    (inputs / "looks").mkdir(parents=True)
    (inputs / "looks" / "a.png").write_bytes(b"png")
    return inputs


# --- valid forms -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"prediction:{PREDICTION}", PredictionRef(PREDICTION)),
        (f"artifact:{SHA}", ArtifactRef(SHA)),
        (
            "https://images.example.com/looks/a.png?v=2",
            UrlRef("https://images.example.com/looks/a.png?v=2"),
        ),
        ("http://images.example.com:8080/a.png", UrlRef("http://images.example.com:8080/a.png")),
        ("https://93.184.216.34/a.png", UrlRef("https://93.184.216.34/a.png")),
        ("https://[2606:4700::1111]/a.png", UrlRef("https://[2606:4700::1111]/a.png")),
    ],
)
def test_valid_references_parse_and_format_back(text: str, expected: Reference) -> None:
    reference = accepted(text, policy())

    assert reference == expected
    assert format_reference(reference) == text
    assert accepted(format_reference(reference), policy()) == reference


def test_a_file_under_a_root_parses_and_formats_back(root: Path) -> None:
    text = f"file://{root}/looks/a.png"

    reference = accepted(text, policy(root))

    assert reference == FileRef(root / "looks" / "a.png")
    assert format_reference(reference) == text
    assert accepted(format_reference(reference), policy(root)) == reference


def test_file_paths_are_percent_decoded_and_encoded_back(root: Path) -> None:
    (root / "spring look #1.png").write_bytes(b"png")
    text = f"file://{root}/spring%20look%20%231.png"

    reference = accepted(text, policy(root))

    assert reference == FileRef(root / "spring look #1.png")
    assert format_reference(reference) == text


def test_a_file_that_does_not_exist_yet_is_checked_when_read(root: Path) -> None:
    # Existence is not syntax: resolving and fetching the reference report it.
    assert accepted(f"file://{root}/later.png", policy(root)) == FileRef(root / "later.png")


def test_schemes_are_case_insensitive(root: Path) -> None:
    assert accepted(f"PREDICTION:{PREDICTION}", policy()) == PredictionRef(PREDICTION)
    assert accepted(f"Prediction:{PREDICTION}", policy()) == PredictionRef(PREDICTION)
    assert accepted(f"ARTIFACT:{SHA}", policy()) == ArtifactRef(SHA)
    assert accepted(f"FILE://{root}/looks/a.png", policy(root)) == FileRef(root / "looks/a.png")
    for scheme in ("HTTPS", "Https", "hTTps"):
        assert accepted(f"{scheme}://images.example.com/a.png", policy()) == UrlRef(
            "https://images.example.com/a.png"
        )
    assert is_fetched("HTTP://x/a.png")
    assert is_fetched("File:///srv/a.png")
    assert not is_fetched(f"ARTIFACT:{SHA}")


@pytest.mark.parametrize(
    "text",
    [
        "HTTPS://IMAGES.Example.COM/a.png",
        "https://images.example.com:443/a.png",
        "https://images.example.com/looks/../a.png",
        "https://images.example.com/./a.png",
        "https://images.example.com/%61.png",  # an unreserved character, encoded
    ],
)
def test_a_url_is_stored_in_one_normal_spelling(text: str) -> None:
    assert accepted(text, policy()) == UrlRef("https://images.example.com/a.png")


def test_percent_encodings_are_upper_cased_and_non_ascii_encoded() -> None:
    assert accepted("https://images.example.com/a%2fb/ü.png?q=%7e%3d", policy()) == UrlRef(
        "https://images.example.com/a%2Fb/%C3%BC.png?q=~%3D"
    )


@pytest.mark.parametrize(
    "path",
    [
        "%2e%2e/x",
        "%2E%2E/x",
        ".%2e/x",
        "%2e/x",
        "..%2fx",
        "..%2Fx",
        "x%2f..",
        ".%5cx",
        "%252e%252e/x",
    ],
)
def test_encoded_dot_segments_are_refused(path: str) -> None:
    text = f"https://images.example.com/looks/{path}"
    assert refused(text, policy()) == [FieldViolation(FIELD, ENCODED_DOTS)]
    assert refused(text.replace("https", "HTTPS", 1), policy()) == [
        FieldViolation(FIELD, ENCODED_DOTS)
    ]


def test_the_longest_reference_is_accepted_and_one_more_character_is_not() -> None:
    prefix = "https://images.example.com/"
    longest = prefix + "a" * (2048 - len(prefix))

    assert accepted(longest, policy()) == UrlRef(longest)
    assert refused(longest + "a", policy()) == [
        FieldViolation(FIELD, "must be at most 2048 characters (it has 2049)")
    ]


def test_host_names_are_left_to_the_connection_to_check() -> None:
    # "localhost" may resolve anywhere; the fetcher checks the address it connects to.
    assert accepted("http://localhost/a.png", policy()) == UrlRef("http://localhost/a.png")


# --- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "description"),
    [
        ("", EMPTY),
        ("looks/a.png", UNKNOWN_SCHEME),
        ("/srv/inputs/a.png", UNKNOWN_SCHEME),
        ("ftp://images.example.com/a.png", UNKNOWN_SCHEME),
        ("s3://bucket/a.png", UNKNOWN_SCHEME),
        ("data:image/png;base64,iVBORw0KGgo=", UNKNOWN_SCHEME),
        ("prediction:", BAD_PREDICTION),
        ("prediction:not-a-uuid", BAD_PREDICTION),
        (f"prediction:{PREDICTION.upper()}", BAD_PREDICTION),
        (f"prediction:{PREDICTION.replace('-', '')}", BAD_PREDICTION),
        (f"prediction:{{{PREDICTION}}}", BAD_PREDICTION),
        (f"prediction:urn:uuid:{PREDICTION}", BAD_PREDICTION),
        (f"prediction: {PREDICTION}", UNSAFE),
        ("artifact:", BAD_ARTIFACT),
        (f"artifact:{SHA.upper()}", BAD_ARTIFACT),
        (f"artifact:{SHA[:-1]}", BAD_ARTIFACT),
        (f"artifact:{SHA}0", BAD_ARTIFACT),
        ("artifact:" + "g" * 64, BAD_ARTIFACT),
        ("http:///a.png", NO_HOST),
        ("https://", NO_HOST),
        ("https:images.example.com/a.png", NO_HOST),
        ("https://user:secret@images.example.com/a.png", CREDENTIALS),
        ("https://token@images.example.com/a.png", CREDENTIALS),
        ("https://@images.example.com/a.png", CREDENTIALS),
        ("https://images.example.com/a b.png", UNSAFE),
        ("https://evil.example\\@127.0.0.1/", UNSAFE),
        ("HTTPS://evil.example\\@127.0.0.1/", UNSAFE),
        ("https://images.example.com:0/a.png", "must have a port from 1 to 65535"),
        ("https://images.example.com:70000/a.png", "must have a port from 1 to 65535"),
        ("https://images%2Eexample.com/a.png", ENCODED_DOTS),
        ("https://images.example.com/a%zz.png", BAD_PERCENT),
    ],
)
def test_malformed_references_are_refused_on_their_field(text: str, description: str) -> None:
    assert refused(text, policy()) == [FieldViolation(FIELD, description)]


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",  # legacy forms the C resolver reads as 127.0.0.1
        "2130706433",
        "0x7f.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.10",
        "100.64.0.1",  # shared address space (carrier-grade NAT)
        "169.254.169.254",  # cloud metadata, link-local
        "0.0.0.0",
        "0",
        "224.0.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "[::1]",
        "[::]",
        "[fe80::1]",
        "[fc00::1]",
        "[ff02::1]",
        "[::ffff:127.0.0.1]",
        "[::ffff:10.0.0.1]",
    ],
)
def test_literal_non_public_addresses_are_refused_unless_allowed(host: str) -> None:
    text = f"http://{host}:8080/a.png"

    assert refused(text, policy()) == [FieldViolation(FIELD, NON_PUBLIC)]
    assert accepted(text, policy(allow_private_networks=True)) == UrlRef(text)


def test_file_references_are_refused_without_input_roots(root: Path) -> None:
    assert refused(f"file://{root}/looks/a.png", policy()) == [FieldViolation(FIELD, NO_ROOTS)]


@pytest.mark.parametrize(
    ("text", "description"),
    [
        ("file:looks/a.png", NOT_ABSOLUTE),
        ("file:/srv/inputs/a.png", NOT_ABSOLUTE),
        ("file://", NOT_ABSOLUTE),
        ("file://fileserver/ROOT/looks/a.png", HAS_HOST),
        ("file://localhost/ROOT/looks/a.png", HAS_HOST),
        ("file://ROOT/looks/../looks/a.png", DOT_DOT),
        ("file://ROOT/looks/%2e%2e/looks/a.png", ENCODED_DOTS),
        ("FILE://ROOT/looks/./a.png", DOT_DOT),
        ("file://ROOT/../inputs/looks/a.png", DOT_DOT),
        (
            "file://ROOT/looks/a.png?v=1",
            "must not have a query or fragment (percent-encode '?' and '#' in file names)",
        ),
        (
            "file://ROOT/looks/a.png#top",
            "must not have a query or fragment (percent-encode '?' and '#' in file names)",
        ),
        ("file://ROOT/looks/a%00.png", "must not contain NUL characters"),
        ("file://ROOT/looks/a%ff.png", "must percent-encode its path as UTF-8"),
    ],
)
def test_malformed_file_references_are_refused(root: Path, text: str, description: str) -> None:
    text = text.replace("ROOT", str(root))

    assert refused(text, policy(root)) == [FieldViolation(FIELD, description)]


def test_a_file_outside_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"png")

    assert refused(f"file://{outside}", policy(root)) == [FieldViolation(FIELD, OUTSIDE)]
    assert refused("file:///etc/passwd", policy(root)) == [FieldViolation(FIELD, OUTSIDE)]


def test_a_root_prefix_is_not_containment(tmp_path: Path, root: Path) -> None:
    # /x/inputs-private is not under /x/inputs, even though the string starts alike.
    sibling = tmp_path / "inputs-private"
    sibling.mkdir()
    (sibling / "a.png").write_bytes(b"png")

    assert refused(f"file://{sibling}/a.png", policy(root)) == [FieldViolation(FIELD, OUTSIDE)]


def test_a_symlink_out_of_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "key.png").write_bytes(b"secret")
    (root / "escape").symlink_to(secrets)
    (root / "key.png").symlink_to(secrets / "key.png")

    for text in (f"file://{root}/escape/key.png", f"file://{root}/key.png"):
        assert refused(text, policy(root)) == [FieldViolation(FIELD, OUTSIDE)]


def test_a_symlink_that_stays_inside_a_root_is_allowed(root: Path) -> None:
    (root / "latest").symlink_to(root / "looks")
    (root / "cover.png").symlink_to(root / "looks" / "a.png")

    assert accepted(f"file://{root}/latest/a.png", policy(root)) == FileRef(root / "latest/a.png")
    assert accepted(f"file://{root}/cover.png", policy(root)) == FileRef(root / "cover.png")


def test_a_root_that_is_a_symlink_is_compared_by_its_real_path(tmp_path: Path, root: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(root)

    assert accepted(f"file://{root}/looks/a.png", policy(alias)) == FileRef(root / "looks/a.png")
    assert accepted(f"file://{alias}/looks/a.png", policy(root)) == FileRef(alias / "looks/a.png")


def test_any_of_several_roots_may_hold_the_file(tmp_path: Path, root: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()

    assert accepted(f"file://{root}/looks/a.png", policy(other, root)) == FileRef(
        root / "looks/a.png"
    )


def test_every_refused_reference_is_reported_on_its_own_field() -> None:
    v = Violations()
    rules = policy()

    parse_reference("artifact:nope", "params.base_img_path", v, rules)
    parse_reference("http://10.0.0.1/a.png", "params.mask_url", v, rules)
    parse_reference(f"artifact:{SHA}", "params.style_image", v, rules)

    assert v.items == [
        FieldViolation("params.base_img_path", BAD_ARTIFACT),
        FieldViolation("params.mask_url", NON_PUBLIC),
    ]


def test_parse_reference_or_raise() -> None:
    assert parse_reference_or_raise(f"artifact:{SHA}", FIELD, policy()) == ArtifactRef(SHA)

    with pytest.raises(InvalidArgumentError) as raised:
        parse_reference_or_raise("ftp://x/a.png", FIELD, policy())

    assert raised.value.violations == [FieldViolation(FIELD, UNKNOWN_SCHEME)]


def test_policy_from_settings(tmp_path: Path) -> None:
    media = MediaSettings(input_roots=(tmp_path,), allow_private_networks=True)

    assert ReferencePolicy.from_settings(media) == ReferencePolicy((tmp_path,), True)
    assert ReferencePolicy.from_settings(MediaSettings()) == ReferencePolicy((), False)


def test_a_random_prediction_id_round_trips() -> None:
    prediction_id = str(uuid.uuid4())
    reference = accepted(f"prediction:{prediction_id}", policy())

    assert format_reference(reference) == f"prediction:{prediction_id}"
