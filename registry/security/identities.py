"""Worker identities: the certificate each agent makes for itself, as the service records it.

An agent sends its self-signed certificate (base64 DER) in the `Rendezvous-Certificate` header
of every connection; its private key never leaves the worker. The service checks that it is
one (X.509 with an Ed25519 or ECDSA key, at most 2 KiB), records it on the worker, and hands it
to the peers the worker is introduced to, which pin it (docs/peer-connections.md).

In secured mode a certificate is bound at enrolment (or at the first connection after an
operator reset it) and changes only by enrolling again or by an operator: a connection that
presents another is refused (registry/enrolment.py). In open mode it is taken as announced.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from django.db.models import Q
from django.utils import timezone

from registry.models import Worker

HEADER = b"rendezvous-certificate"
MAX_CERTIFICATE_BYTES = 2048


class InvalidCertificate(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate as presented: base64 of its DER bytes, and their SHA-256."""

    encoded: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Announcement:
    """A connection's certificate, to record on its worker once the connection is current."""

    connection_id: int
    certificate: Certificate


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


def record(
    announcements: Sequence[Announcement], *, secured: bool, now: datetime | None = None
) -> list[bool]:
    """Record each connection's certificate on its worker, if the connection is still current:
    in open mode as announced, in secured mode only where none is bound (after an operator's
    reset, or for a worker enrolled before identities existed). True where it was written."""
    now = now or timezone.now()
    results = []
    for announcement in announcements:
        certificate = announcement.certificate
        rows = Worker.objects.filter(current_connection_id=announcement.connection_id).exclude(
            certificate_fingerprint=certificate.fingerprint
        )
        if secured:
            rows = rows.filter(Q(certificate_fingerprint=""))
        results.append(
            bool(
                rows.update(
                    certificate=certificate.encoded,
                    certificate_fingerprint=certificate.fingerprint,
                    certificate_bound_at=now,
                )
            )
        )
    return results


def reset(worker_ids: Sequence[str]) -> int:
    """Forget the identities of these workers: each binds the next certificate it presents."""
    return (
        Worker.objects.filter(id__in=list(worker_ids))
        .exclude(certificate_fingerprint="")
        .update(certificate="", certificate_fingerprint="", certificate_bound_at=None)
    )
