"""JWTs for tests: the issuer's keys, valid tokens, and tokens forged with any header."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

ISSUER = "https://id.example"
AUDIENCE = "sartiq"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    """Valid claims for org ``org-jwt``; ``extra`` overrides them (None removes one)."""
    body = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 300, "org": "org-jwt"}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def forge(header: Any, sign: Callable[[bytes], bytes], body: dict[str, Any] | None = None) -> str:
    """A token with exactly ``header`` and ``body``, signed by ``sign`` over the signing input."""
    signing_input = (
        f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body or claims()).encode())}"
    )
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def jwk(public_key: Any, kid: str) -> dict[str, Any]:
    """The public JWK of an RSA or EC key, with its key id."""
    if isinstance(public_key, rsa.RSAPublicKey):
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    else:
        data = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public_key))
    return {**data, "kid": kid, "use": "sig"}


def pem(public_key: Any) -> bytes:
    """A public key as PEM (SubjectPublicKeyInfo)."""
    encoded: bytes = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encoded


class Keys:
    """The issuer's keys (EC P-256 ``ec-1``, RSA 2048 ``rsa-1``) and two outsiders' keys."""

    def __init__(self) -> None:
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ed = ed25519.Ed25519PrivateKey.generate()
        self.other_ec = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> str:
        """The issuer's JWKS."""
        keys = [jwk(self.ec.public_key(), "ec-1"), jwk(self.rsa.public_key(), "rsa-1")]
        return json.dumps({"keys": keys})

    def rs256(self, data: bytes) -> bytes:
        """An RS256 signature by the RSA key."""
        return self.rsa.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def es256(self, data: bytes) -> bytes:
        """An ES256 signature (raw r||s) by the EC key."""
        signature = self.ec.sign(data, ec.ECDSA(hashes.SHA256()))
        return jwt.utils.der_to_raw_signature(signature, self.ec.curve)

    def _other_es256(self, data: bytes) -> bytes:
        signature = self.other_ec.sign(data, ec.ECDSA(hashes.SHA256()))
        return jwt.utils.der_to_raw_signature(signature, self.other_ec.curve)

    def valid(self, **extra: Any) -> str:
        """A valid ES256 token of the EC key; ``extra`` changes its claims."""
        return forge({"alg": "ES256", "kid": "ec-1"}, self.es256, claims(**extra))

    def hostile(self) -> dict[str, str]:
        """Tokens no server may accept, by what is wrong with them."""
        return {
            "RS256 on the EC key": forge({"alg": "RS256", "kid": "ec-1"}, self.rs256),
            "ES256 on the RSA key": forge({"alg": "ES256", "kid": "rsa-1"}, self.es256),
            "EdDSA on the RSA key": forge({"alg": "EdDSA", "kid": "rsa-1"}, self.ed.sign),
            "alg none": forge({"alg": "none", "kid": "ec-1"}, lambda _: b""),
            "HS256 keyed with the RSA public key": forge(
                {"alg": "HS256", "kid": "rsa-1"},
                lambda data: hmac.new(pem(self.rsa.public_key()), data, hashlib.sha256).digest(),
            ),
            "no kid among several keys": forge({"alg": "ES256"}, self.es256),
            "kid not a string": forge({"alg": "ES256", "kid": 7}, self.es256),
            "alg a list": forge({"alg": ["ES256"], "kid": "ec-1"}, self.es256),
            "header not an object": forge([1, 2], self.es256),
            "unknown critical header": forge(
                {"alg": "ES256", "kid": "ec-1", "crit": ["x"]}, self.es256
            ),
            "expired": self.valid(exp=int(time.time()) - 600),
            "another audience": self.valid(aud="someone-else"),
            "no org": self.valid(org=None),
            "another issuer": self.valid(iss="https://evil.example"),
            "unknown kid": forge({"alg": "ES256", "kid": "k9"}, self.es256),
            "signed by another key": forge({"alg": "ES256", "kid": "ec-1"}, self._other_es256),
            "not base64": "@@@.@@@.@@@",
            "empty segments": "..",
        }
