"""A worker's identity for peer connections: an Ed25519 key pair and a self-signed certificate.

Made by the agent on its first start and kept beside its credential (the credential file, mode
0600); the private key never leaves the worker. The certificate goes to the service with every
connection (`Rendezvous-Certificate`), which records it (secured mode: bound at enrolment) and
hands it to the peers the worker is introduced to; peers pin it (peer-connections.md).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

# Every worker certificate names this host: the TLS layer wants a name to check, and the pin is
# the certificate itself, not the name.
SERVER_NAME = "worker.rendezvous.invalid"
VALID_FOR = datetime.timedelta(days=20 * 365)


@dataclass(frozen=True, slots=True)
class WorkerIdentity:
    private_key_pem: bytes
    certificate_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_pem)

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def private_key(self) -> ed25519.Ed25519PrivateKey:
        key = serialization.load_pem_private_key(self.private_key_pem, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ValueError("the identity's private key is not an Ed25519 key")
        return key

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.certificate_der)

    def header_value(self) -> str:
        """The certificate as the service takes it: base64 of its DER bytes."""
        return base64.b64encode(self.certificate_der).decode()


def create(worker_id: str) -> WorkerIdentity:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_id[:64])])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + VALID_FOR)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
        # Its own issuer: the TLS layer verifies a pinned certificate as a one-entry trust store.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, None)
    )
    return WorkerIdentity(
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
    )


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate's DER bytes, as 64 hex digits: what a peer is pinned to."""
    return hashlib.sha256(der).hexdigest()


def certificate_from_header(value: str) -> x509.Certificate:
    """A certificate as the service sends it in an introduction (base64 DER); ValueError if not."""
    try:
        der = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64: {exc}") from None
    return x509.load_der_x509_certificate(der)


def to_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def to_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)
