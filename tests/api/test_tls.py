"""TLS and mutual TLS over a real channel, with certificates made by the test."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import make_settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from helpers import GenerationStub

from sartiq_grpc.client import SartiqClient, tls_credentials
from sartiq_grpc.sartiq.generation.v1 import generation_service_pb2 as pb
from server.app import App
from server.compute.fake import FakeComputeBackend
from server.config import ServerSettings

Key = ec.EllipticCurvePrivateKey


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(
    subject: str, key: Key, issuer: tuple[str, Key] | None, *, ca: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Pki:
    """A CA, a server certificate it signed, and a client certificate it signed."""

    ca: bytes
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert: bytes
    client_key: bytes
    ca_key: Key

    def issue_server(self, directory: Path, name: str) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key, ("Test CA", self.ca_key))
        cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
        cert_file.write_bytes(_pem(cert))
        key_file.write_bytes(_key_pem(key))
        return cert_file, key_file


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _pem(_certificate("Test CA", ca_key, None, ca=True))
    (tmp_path / "ca.pem").write_bytes(ca)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("client-one", client_key, ("Test CA", ca_key))
    pki = Pki(
        ca,
        tmp_path / "server.pem",
        tmp_path / "server.key",
        tmp_path / "ca.pem",
        _pem(client),
        _key_pem(client_key),
        ca_key,
    )
    cert_file, key_file = pki.issue_server(tmp_path, "server-one")
    cert_file.rename(pki.server_cert)
    key_file.rename(pki.server_key)
    return pki


async def _serve(tmp_path: Path, pki: Pki, *, mutual: bool) -> AsyncIterator[App]:
    server = ServerSettings(
        port=0,
        grace_period=1.0,
        tls_cert_file=pki.server_cert,
        tls_key_file=pki.server_key,
        tls_client_ca_file=pki.ca_file if mutual else None,
    )
    settings = make_settings(tmp_path).model_copy(update={"server": server})
    async with App(settings, compute=FakeComputeBackend()) as app:
        yield app


@pytest.fixture
async def tls_app(tmp_path: Path, pki: Pki) -> AsyncIterator[App]:
    async for app in _serve(tmp_path, pki, mutual=False):
        yield app


@pytest.fixture
async def mtls_app(tmp_path: Path, pki: Pki) -> AsyncIterator[App]:
    async for app in _serve(tmp_path, pki, mutual=True):
        yield app


async def _list(target: str, credentials: grpc.ChannelCredentials) -> None:
    async with grpc.aio.secure_channel(target, credentials) as channel:
        await GenerationStub(channel).ListGenerations(pb.ListGenerationsRequest(), timeout=10)


async def _peer_certificate_subject(target: str, credentials: grpc.ChannelCredentials) -> str:
    """The common name of the certificate the server presented, read off a health call."""
    async with grpc.aio.secure_channel(target, credentials) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    host, port = target.split(":")
    pem = await asyncio.to_thread(ssl.get_server_certificate, (host, int(port)))
    cert = x509.load_pem_x509_certificate(pem.encode())
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


async def test_tls_serves_only_tls_and_reloads_its_certificate(
    tls_app: App, pki: Pki, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{tls_app.port}"
    trusted = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    await _list(target, trusted)
    with pytest.raises(grpc.aio.AioRpcError) as caught:  # plaintext is not spoken
        async with grpc.aio.insecure_channel(target) as plain:
            await GenerationStub(plain).ListGenerations(pb.ListGenerationsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await _peer_certificate_subject(target, trusted) == "server-one"
    renewed_cert, renewed_key = pki.issue_server(tmp_path, "server-two")
    renewed_cert.replace(pki.server_cert)
    renewed_key.replace(pki.server_key)
    tls_app.reload_tls()  # what SIGHUP does
    assert await _peer_certificate_subject(target, trusted) == "server-two"


async def test_mutual_tls_refuses_a_client_without_a_valid_certificate(
    mtls_app: App, pki: Pki, tmp_path: Path
) -> None:
    target = f"127.0.0.1:{mtls_app.port}"
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=pki.ca, private_key=pki.client_key, certificate_chain=pki.client_cert
    )
    await _list(target, with_cert)
    cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
    cert_file.write_bytes(pki.client_cert)
    key_file.write_bytes(pki.client_key)
    credentials = tls_credentials(pki.ca_file, cert_file, key_file)
    async with SartiqClient(target, credentials=credentials) as client:  # the Python client
        generations, _ = await client.list()
        assert generations == []
    without = grpc.ssl_channel_credentials(root_certificates=pki.ca)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(target, without)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _certificate("stranger", stranger_key, None)  # self-signed, not by the CA
    foreign = grpc.ssl_channel_credentials(
        root_certificates=pki.ca,
        private_key=_key_pem(stranger_key),
        certificate_chain=_pem(stranger),
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _list(target, foreign)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
