"""Bearer-token authentication: API keys, each bound to one organization.

Keys are kept only as SHA-256 digests, so a key never sits in memory in the clear after
start-up and the lookup does not compare secrets byte by byte. Without any key the
server is in development mode: every call belongs to one configured organization.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

from pydantic import TypeAdapter, ValidationError

from server.config import ApiKey, AuthSettings
from server.domain.errors import StartupError, UnauthenticatedError

AUTHORIZATION_HEADER = "authorization"
_KEYS = TypeAdapter(tuple[ApiKey, ...])


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


class Authenticator:
    """Maps a call's ``authorization`` metadata to the organization it acts for."""

    def __init__(self, keys: Sequence[ApiKey], *, development_organization: str) -> None:
        self._organizations = {_digest(k.key.get_secret_value()): k.organization for k in keys}
        self._development = development_organization if not keys else None

    @property
    def development_mode(self) -> bool:
        """True when no key is configured and every call is the default organization."""
        return self._development is not None

    def organization(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        """The organization of a call.

        Raises:
            UnauthenticatedError: keys are configured and the call has no known one.
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
        if not token:
            raise UnauthenticatedError("send 'authorization: Bearer <API key>' call metadata")
        organization = self._organizations.get(_digest(token.strip()))
        if organization is None:
            raise UnauthenticatedError("the API key is not valid")
        return organization
