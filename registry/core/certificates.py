"""Worker certificates as a handshake presents them: read, checked and fingerprinted.

An agent sends its self-signed certificate (base64 DER) in the `Rendezvous-Certificate` header
of every connection; its private key never leaves the worker. A usable one is X.509 with an
Ed25519 or ECDSA key, at most 2 KiB; its SHA-256 is the identity peers pin
(docs/peer-connections.md). Recording it on the worker is security/identities.py.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

HEADER = b"rendezvous-certificate"
MAX_CERTIFICATE_BYTES = 2048


class InvalidCertificate(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate as presented: base64 of its DER bytes, and their SHA-256."""

    encoded: str
    fingerprint: str


def presented(headers: Sequence[tuple[bytes, bytes]] | Sequence[list[bytes]]) -> Certificate | None:
    """The certificate in a handshake's headers; None without one; InvalidCertificate if the
    header is there but holds no usable certificate."""
    for name, value in headers:
        if name.lower() == HEADER:
            return parse(value.decode("latin-1"))
    return None


def parse(value: str) -> Certificate:
    text = value.strip()
    if len(text) > 4 * MAX_CERTIFICATE_BYTES // 3 + 4:
        raise InvalidCertificate(f"the certificate is larger than {MAX_CERTIFICATE_BYTES} bytes")
    try:
        der = base64.b64decode(text, validate=True)
        certificate = x509.load_der_x509_certificate(der)
        key = certificate.public_key()
    except (binascii.Error, ValueError) as exc:
        raise InvalidCertificate(f"not a base64 DER X.509 certificate ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise InvalidCertificate("the certificate's key must be Ed25519 or ECDSA")
    canonical = certificate.public_bytes(serialization.Encoding.DER)
    return Certificate(base64.b64encode(canonical).decode(), fingerprint(canonical))


def fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def display(value: str) -> str:
    """A fingerprint as people compare it: `SHA256:ab12:cd34:...` in groups of four."""
    if not value:
        return ""
    return "SHA256:" + ":".join(value[i : i + 4] for i in range(0, len(value), 4))
