"""Bearer-token authentication: API keys and signed JWTs, each acting for one organization.

API keys are kept only as SHA-256 digests, so a key never sits in memory in the clear
after start-up and the lookup does not compare secrets byte by byte. JWTs are verified
with the configured public keys (a JWKS file or one PEM key): signature, expiry, issuer
and audience, and an ``org`` claim naming the organization; their ``scope`` claim
(space-separated) grants scopes, "read write" when absent.

Every call needs a scope: ``read`` for reads and watches, ``write`` for creates, cancels
and uploads, ``admin`` for catalog deletes. Without keys and JWTs the server is in
development mode: every call is one configured organization with every scope.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from pydantic import TypeAdapter, ValidationError

from server.config import ApiKey, AuthSettings
from server.domain.errors import PermissionDeniedError, StartupError, UnauthenticatedError

AUTHORIZATION_HEADER = "authorization"
ALL_SCOPES = frozenset({"read", "write", "admin"})
DEFAULT_SCOPES = frozenset({"read", "write"})
_KEYS = TypeAdapter(tuple[ApiKey, ...])
_ORGANIZATION = re.compile(r"[A-Za-z0-9._-]{1,128}")
# The algorithms each kind of key verifies. A token is checked only with the algorithms of
# the key its header names, so an RS256 header on an EC key (or any other mismatch) is
# refused as a wrong algorithm before PyJWT is handed a key it cannot use.
_FAMILIES: tuple[tuple[type[Any] | tuple[type[Any], ...], frozenset[str]], ...] = (
    (rsa.RSAPublicKey, frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})),
    (ec.EllipticCurvePublicKey, frozenset({"ES256", "ES256K", "ES384", "ES512"})),
    ((ed25519.Ed25519PublicKey, ed448.Ed448PublicKey), frozenset({"EdDSA"})),
    (bytes, frozenset({"HS256", "HS384", "HS512"})),  # a JWKS "oct" key: a shared secret
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a call acts for, and what it may do."""

    organization: str
    scopes: frozenset[str]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def load_keys(settings: AuthSettings) -> tuple[ApiKey, ...]:
    """The configured keys: those in the settings plus those in ``api_keys_file``.

    Raises:
        StartupError: the file cannot be read or is not a list of {organization, key}.
    """
    keys = list(settings.api_keys)
    if settings.api_keys_file is not None:
        try:
            raw = json.loads(settings.api_keys_file.read_text())
            keys.extend(_KEYS.validate_python(raw))
        except (OSError, ValueError, ValidationError) as exc:
            raise StartupError(
                f"cannot read API keys from {settings.api_keys_file}: {type(exc).__name__}"
            ) from None
    return tuple(keys)


def required_scope(method: str) -> str:
    """The scope a method (``/package.Service/Method``) needs."""
    name = method.rpartition("/")[2]
    if name.startswith("Delete"):
        return "admin"
    if name.startswith(("Create", "Cancel", "Upload")):
        return "write"
    return "read"


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JwtVerifier:
    """Checks bearer JWTs against the configured keys and claims."""

    def __init__(self, settings: AuthSettings) -> None:
        path = settings.jwt_keys_file
        if path is None:
            raise ValueError("jwt_keys_file is not set")
        try:
            text = path.read_text()
        except OSError as exc:
            raise StartupError(f"cannot read JWT keys from {path}: {exc.strerror}") from None
        algorithms = frozenset(settings.jwt_algorithms)
        self._keys: dict[str, _VerificationKey] = {}
        try:
            if text.lstrip().startswith("{"):
                for jwk in jwt.PyJWKSet.from_json(text).keys:
                    usable = _usable(jwk.key, algorithms)
                    if usable is not None:
                        self._keys[jwk.key_id or ""] = usable
            else:
                usable = _usable(load_pem_public_key(text.encode()), algorithms)
                if usable is not None:
                    self._keys[""] = usable
        except (jwt.PyJWTError, ValueError, UnsupportedAlgorithm) as exc:
            raise StartupError(f"cannot use the JWT keys in {path}: {exc}") from None
        if not self._keys:
            raise StartupError(
                f"no JWT key in {path} verifies any of the configured algorithms "
                f"({', '.join(sorted(algorithms))})"
            )
        self._issuer = settings.jwt_issuer or None
        self._audience = settings.jwt_audience or None
        self._leeway = settings.jwt_leeway

    def principal(self, token: str) -> Principal:
        """The principal a valid token names.

        Raises:
            UnauthenticatedError: a bad signature, expired, wrong issuer or audience, no
                ``org`` claim, or anything else that stops verification; the reason says
                which (cause ``expired`` or ``invalid``).
        """
        try:
            claims = self._claims(token)
        except UnauthenticatedError:
            raise
        except jwt.ExpiredSignatureError:
            raise UnauthenticatedError(
                "the token has expired", metadata={"cause": "expired"}
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise UnauthenticatedError(
                f"the token has no {exc.claim!r} claim", metadata={"cause": "invalid"}
            ) from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError) as exc:
            raise UnauthenticatedError(
                f"the token is not for this service: {exc}", metadata={"cause": "invalid"}
            ) from None
        except jwt.PyJWTError:
            raise UnauthenticatedError(
                "the token is not valid (signature, format or algorithm)",
                metadata={"cause": "invalid"},
            ) from None
        except Exception as exc:
            # Whatever else a library raises on a hostile token (a TypeError for a key of
            # another kind, a warning turned into an error) is still a token we cannot
            # trust, never INTERNAL. Logged by type only: no traceback, no token.
            log.warning("a bearer JWT could not be verified (%s)", type(exc).__name__)
            raise UnauthenticatedError(
                "the token could not be verified", metadata={"cause": "invalid"}
            ) from None
        organization = claims.get("org")
        if not isinstance(organization, str) or not _ORGANIZATION.fullmatch(organization):
            raise UnauthenticatedError(
                "the token's org claim is not an organization", metadata={"cause": "invalid"}
            )
        scope = claims.get("scope")
        scopes = DEFAULT_SCOPES if scope is None else frozenset(str(scope).split()) & ALL_SCOPES
        return Principal(organization, frozenset(scopes))

    def _claims(self, token: str) -> dict[str, Any]:
        """The verified claims of ``token``; PyJWT's exceptions pass through."""
        header = jwt.get_unverified_header(token)
        kid = str(header.get("kid") or "")
        key = self._keys.get(kid)
        if key is None and not kid and len(self._keys) == 1:
            key = next(iter(self._keys.values()))  # one key: a token may omit its id
        if key is None:
            raise UnauthenticatedError(
                "the token's key id is not known", metadata={"cause": "invalid"}
            )
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=sorted(key.algorithms),
            audience=self._audience,
            issuer=self._issuer,
            leeway=self._leeway,
            options={"require": ["exp", "org"], "verify_aud": self._audience is not None},
        )
        return claims


@dataclass(frozen=True, slots=True)
class _VerificationKey:
    """A configured public key and the algorithms a token may use with it."""

    key: Any
    algorithms: frozenset[str]


def _usable(key: Any, configured: frozenset[str]) -> _VerificationKey | None:
    """``key`` with the configured algorithms of its kind, or None when there are none."""
    family = next((algs for kind, algs in _FAMILIES if isinstance(key, kind)), frozenset())
    algorithms = family & configured
    return _VerificationKey(key, algorithms) if algorithms else None


class Authenticator:
    """Maps a call's ``authorization`` metadata to the principal it acts for."""

    def __init__(
        self,
        keys: Sequence[ApiKey],
        *,
        development_organization: str,
        jwt_verifier: JwtVerifier | None = None,
    ) -> None:
        self._principals = {
            _digest(k.key.get_secret_value()): Principal(k.organization, frozenset(k.scopes))
            for k in keys
        }
        self._jwt = jwt_verifier
        development = not keys and jwt_verifier is None
        self._development = Principal(development_organization, ALL_SCOPES) if development else None

    @property
    def development_mode(self) -> bool:
        """True when nothing is configured and every call is the default organization."""
        return self._development is not None

    def principal(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal:
        """The principal of a call.

        Raises:
            UnauthenticatedError: credentials are required and missing or not valid.
        """
        if self._development is not None:
            return self._development
        token = ""
        for key, value in metadata:
            if key == AUTHORIZATION_HEADER and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer":
                    token = ""
                break
        token = token.strip()
        if not token:
            raise UnauthenticatedError(
                "send 'authorization: Bearer <API key or JWT>' call metadata",
                metadata={"cause": "missing"},
            )
        principal = self._principals.get(_digest(token))
        if principal is not None:
            return principal
        if self._jwt is not None and token.count(".") == 2:
            return self._jwt.principal(token)
        raise UnauthenticatedError("the API key is not valid", metadata={"cause": "invalid"})

    @staticmethod
    def authorize(principal: Principal, method: str) -> None:
        """Check that ``principal`` holds the scope ``method`` needs.

        Raises:
            PermissionDeniedError: it does not.
        """
        scope = required_scope(method)
        if scope not in principal.scopes:
            raise PermissionDeniedError(
                f"this call needs the {scope!r} scope", metadata={"scope": scope}
            )
