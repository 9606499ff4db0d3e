"""What a worker's handshake becomes: admitted within the connection limits, its certificate
read, its credential or enrolment key checked (secured mode), its connection registered
(superseding an older one), the credential the service issued on enrolment, and its certificate
recorded when it is new; or refused, with the close code that says why. Plain async functions
over the instance's coalescers: the consumer calls `admit` and turns a refusal into a close.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError

from registry.core import certificates, protocol, tokens
from registry.core.certificates import Certificate
from registry.ops import metrics
from registry.ops.logs import InstanceLogAdapter
from registry.presence import sessions
from registry.presence.runtime import InstanceRuntime, get_runtime
from registry.security import enrolment, identities
from registry.security.modes import SECURED

# The logger's name is the one operators' log pipelines know (docs/operations.md): a refused
# handshake logs as the consumer always has.
log = InstanceLogAdapter(logging.getLogger("registry.consumers"), lambda: get_runtime().instance_id)

Headers = list[tuple[bytes, bytes]] | list[list[bytes]]  # an ASGI scope's


class Refused(Exception):
    """A handshake refused once accepted: closed with `code`, after a `closing` frame that says
    `reason` (by default the code's). Raised where the refusal is found; the consumer's
    `connect` turns it into the close."""

    def __init__(self, code: int, reason: str | None = None) -> None:
        super().__init__(reason or f"refused with {code}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Admitted:
    """A handshake the service took: the registration, and what the consumer keeps of it."""

    registration: sessions.Registration
    certificate: Certificate | None
    credential: str | None  # issued by the service at enrolment: the welcome carries it
    confirm_credential: bool  # the worker's first frame after the welcome confirms its credential


async def admit(
    runtime: InstanceRuntime, request: sessions.RegistrationRequest, headers: Headers
) -> Admitted:
    """`register`, within this instance's connection limits; Refused otherwise, logged and
    counted (a failed authentication also towards its address's throttle)."""
    address = request.observed_ip
    refusal = runtime.admission_refusal(address)
    if refusal is not None:
        log.warning("worker=%s from %s refused: %s", request.worker_id, address, refusal)
        raise Refused(protocol.CloseCode.LIMIT_EXCEEDED, refusal)
    try:
        return await register(runtime, request, headers)
    except enrolment.AuthenticationFailed as exc:
        if not isinstance(exc, enrolment.WorkerDisabled):
            runtime.admission.authentication_failed(address)
        log.warning("worker=%s from %s refused: %s", request.worker_id, address, exc.detail)
        metrics.authentication_refused(exc.code)
        raise Refused(exc.code, exc.reason) from None
    except DatabaseError as exc:
        log.error("worker=%s registration failed, database unavailable: %s", request.worker_id, exc)
        raise Refused(protocol.CloseCode.TRY_AGAIN_LATER) from None


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
