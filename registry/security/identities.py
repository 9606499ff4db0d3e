"""Worker identities: the certificate each agent makes for itself (core/certificates.py), as
the service records it on the worker and hands it to the peers the worker is introduced to,
which pin it (docs/peer-connections.md).

In secured mode a certificate is bound at enrolment (or at the first connection after an
operator reset it) and changes only by enrolling again or by an operator: a connection that
presents another is refused (security/enrolment.py). In open mode it is taken as announced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from django.db.models import Q
from django.utils import timezone

from registry.core.certificates import Certificate
from registry.models import Worker


@dataclass(frozen=True, slots=True)
class Announcement:
    """A connection's certificate, to record on its worker once the connection is current."""

    connection_id: int
    certificate: Certificate


def record(
    announcements: Sequence[Announcement], *, secured: bool, now: datetime | None = None
) -> list[bool]:
    """Record each connection's certificate on its worker, if the connection is still current:
    in open mode as announced, in secured mode only where none is bound (after an operator's
    reset, or for a worker that enrolled without one). True where it was written."""
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
