"""What a worker's handshake becomes: its certificate read, its credential or enrolment key checked
(secured mode), its connection registered (superseding an older one), the credential the service
issued on enrolment, and its certificate recorded when it is new. Plain async functions over the
instance's coalescers: the consumer calls `register` and only turns a refusal into a close.
"""

from __future__ import annotations

from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings

from registry.core import certificates, protocol, tokens
from registry.core.certificates import Certificate
from registry.presence import sessions
from registry.presence.runtime import InstanceRuntime
from registry.security import enrolment, identities
from registry.security.modes import SECURED

Headers = list[tuple[bytes, bytes]] | list[list[bytes]]  # an ASGI scope's


@dataclass(frozen=True, slots=True)
class Admitted:
    """A handshake the service took: the registration, and what the consumer keeps of it."""

    registration: sessions.Registration
    certificate: Certificate | None
    credential: str | None  # issued by the service at enrolment: the welcome carries it
    confirm_credential: bool  # the worker's first frame after the welcome confirms its credential


async def register(
    runtime: InstanceRuntime, request: sessions.RegistrationRequest, headers: Headers
) -> Admitted:
    """Authenticate (secured mode) and register `request`; AuthenticationFailed (WorkerDisabled
    for a disabled id) when the handshake is refused."""
    try:
        certificate = certificates.presented(headers)
    except certificates.InvalidCertificate as exc:
        raise enrolment.AuthenticationFailed(
            f"invalid certificate: {exc}", f"invalid certificate ({exc})"
        ) from None
    secured = settings.RENDEZVOUS["SECURITY_MODE"] == SECURED
    grant = None
    if secured:
        grant = await runtime.authentications.submit(
            enrolment.Handshake(
                worker_id=request.worker_id,
                bearer=tokens.bearer_token(headers),
                offered=tokens.header_value(headers, tokens.CREDENTIAL_HEADER),
                certificate=certificate,
            )
        )
    # An unconfirmed credential, presented: presenting it proves the worker has it.
    confirm = grant is enrolment.UNCONFIRMED
    if confirm:
        grant = None
    if grant is None:
        registration = await runtime.registrations.submit(request)
    else:
        registration = await database_sync_to_async(_enrol)(runtime, grant, request)
    if registration.refused:
        raise enrolment.WorkerDisabled(
            protocol.CLOSE_REASONS[protocol.CloseCode.WORKER_DISABLED], "worker is disabled"
        )
    if grant is None and _identity_is_new(certificate, registration.fingerprint, secured):
        assert certificate is not None
        runtime.spawn(
            runtime.identities.submit(
                identities.Announcement(registration.connection_id or 0, certificate)
            ),
            what=f"identity of worker {request.worker_id}",
        )
    return Admitted(
        registration=registration,
        certificate=certificate,
        credential=grant.credential.secret if grant is not None and grant.issued else None,
        confirm_credential=confirm or grant is not None,  # enrolled: at its first frame
    )


def _identity_is_new(certificate: Certificate | None, recorded: str, secured: bool) -> bool:
    """Whether this connection's certificate is to be recorded: in open mode whenever it
    changed, in secured mode only where none is bound (a bound one never changes here)."""
    if certificate is None or certificate.fingerprint == recorded:
        return False
    return not secured or not recorded


def _enrol(
    runtime: InstanceRuntime, grant: enrolment.Enrolment, request: sessions.RegistrationRequest
) -> sessions.Registration:
    instance_id = runtime.ensure_registered()
    return enrolment.enrol_and_register(grant, request, instance_id=instance_id)
