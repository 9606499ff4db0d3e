"""Who may register a worker id: enrolment keys and the credential each worker is enrolled with.

In secured mode a new id enrols with an enrolment key and the credential the enrolling agent
made for itself (`Rendezvous-Credential`): the service binds that credential (or, for an agent
that brings none, one it issues) and the agent's certificate to the id. Every later connection
under that id must present that credential, and no other certificate. Since only the enrolling
agent knows its credential, nobody else holding the same key can redo or take over the
enrolment, even before the worker's first frame. In open mode nobody is asked for anything (the
proof of concept's behaviour), but a disabled worker (security/bans.py) stays refused. See
docs/security.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from registry.core import protocol, tokens
from registry.core.certificates import Certificate
from registry.models import EnrolmentKey, Worker, encode_tags
from registry.presence import sessions

log = logging.getLogger("registry.enrolment")


class AuthenticationFailed(Exception):
    """A handshake the service refuses. `reason` goes to the client, `detail` to the log only."""

    code = protocol.CloseCode.AUTHENTICATION_FAILED

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


class WorkerDisabled(AuthenticationFailed):
    code = protocol.CloseCode.WORKER_DISABLED


@dataclass(frozen=True, slots=True)
class Handshake:
    """What a handshake presents: its `Authorization: Bearer` secret, the credential its agent
    made to be bound at enrolment, and its certificate."""

    worker_id: str
    bearer: str | None
    offered: str | None = None
    certificate: Certificate | None = None


@dataclass(frozen=True, slots=True)
class Enrolment:
    """What a successful key check grants: the credential to bind, and the key's tags and kind."""

    key_id: int
    key_prefix: str
    credential: tokens.Issued
    tags: str
    ephemeral: bool
    issued: bool  # the service made the credential (the agent brought none): send it in welcome
    certificate: Certificate | None = None


class _Unconfirmed:
    """The credential matched, but its enrolling connection never confirmed it: the
    connection that presents it now confirms it."""

    def __repr__(self) -> str:
        return "UNCONFIRMED"


UNCONFIRMED = _Unconfirmed()


def authenticate(
    *,
    worker_id: str,
    bearer: str | None,
    offered: str | None = None,
    certificate: Certificate | None = None,
    now: datetime | None = None,
) -> Enrolment | None:
    """Secured mode: may this handshake register `worker_id`?

    None: it presented the id's credential (as bearer, or as the credential to bind). An
    Enrolment: the id is unbound and it presented a usable enrolment key (nothing is written
    yet; `enrol_and_register` binds). Otherwise AuthenticationFailed. Read-only.
    """
    handshake = Handshake(worker_id, bearer, offered, certificate)
    outcome = authenticate_many([handshake], now=now)[0]
    if isinstance(outcome, AuthenticationFailed):
        raise outcome
    return None if outcome is UNCONFIRMED else outcome  # type: ignore[return-value]


Outcome = Enrolment | _Unconfirmed | None | AuthenticationFailed


def authenticate_many(
    requests: Sequence[Handshake], *, now: datetime | None = None
) -> list[Outcome]:
    """`authenticate` for a batch of handshakes, in two queries at most whatever its size (the
    runtime coalesces handshakes like registrations). Refusals are returned, not raised, so
    one bad handshake cannot fail its neighbours."""
    now = now or timezone.now()
    rows = {
        row[0]: _Row(*row[1:])
        for row in Worker.objects.filter(id__in={r.worker_id for r in requests})
        .values_list(
            "id",
            "credential_digest",
            "disabled_at",
            "credential_confirmed_at",
            "certificate_fingerprint",
        )
        .iterator()
    }
    key_digests = {
        tokens.digest(r.bearer)
        for r in requests
        if r.bearer and tokens.kind_of(r.bearer) is tokens.Kind.ENROLMENT_KEY
    }
    keys = (
        {key.digest: key for key in EnrolmentKey.objects.filter(digest__in=key_digests)}
        if key_digests
        else {}
    )
    return [_authenticate_one(request, rows, keys, now) for request in requests]


@dataclass(frozen=True, slots=True)
class _Row:
    digest: str = ""
    disabled_at: datetime | None = None
    confirmed_at: datetime | None = None
    fingerprint: str = ""


def _authenticate_one(
    request: Handshake, rows: dict[str, _Row], keys: dict[str, EnrolmentKey], now: datetime
) -> Outcome:
    bearer = request.bearer
    row = rows.get(request.worker_id, _Row())
    if row.disabled_at is not None:
        return WorkerDisabled(protocol.CLOSE_REASONS[protocol.CloseCode.WORKER_DISABLED])
    kind = tokens.kind_of(bearer) if bearer else None
    if row.digest:
        held = kind is tokens.Kind.WORKER_CREDENTIAL and tokens.matches(bearer or "", row.digest)
        # An agent that made its own credential proves it by presenting it, the key or not:
        # its welcome may have been lost. Nobody else knows it.
        held = held or bool(request.offered and tokens.matches(request.offered, row.digest))
        if not held:
            return AuthenticationFailed(
                "this worker id is enrolled: present its credential (Authorization: Bearer)",
                f"credential missing or wrong (presented {_describe(bearer)})",
            )
        certificate = request.certificate
        if certificate and row.fingerprint and certificate.fingerprint != row.fingerprint:
            return AuthenticationFailed(
                "this certificate is not the identity bound to this worker id (an operator can "
                "reset it; enrolling again binds a new one)",
                f"certificate {certificate.fingerprint[:16]}… is not the bound "
                f"{row.fingerprint[:16]}…",
            )
        return UNCONFIRMED if row.confirmed_at is None else None
    if bearer is None:
        return AuthenticationFailed(
            "an enrolment key is required (Authorization: Bearer)", "no credential presented"
        )
    if kind is not tokens.Kind.ENROLMENT_KEY:
        return AuthenticationFailed(
            "invalid enrolment key", f"not an enrolment key (presented {_describe(bearer)})"
        )
    key = keys.get(tokens.digest(bearer))
    if key is None:
        return AuthenticationFailed("invalid enrolment key", f"unknown key {_describe(bearer)}")
    state = key.state(now)
    if state != "usable":
        return AuthenticationFailed(f"enrolment key {state}", f"key {key.prefix}… is {state}")
    offered = request.offered
    if offered is not None and not tokens.is_well_formed(offered, tokens.Kind.WORKER_CREDENTIAL):
        return AuthenticationFailed(
            "the credential to bind must be rvc_ and at least 32 random characters",
            f"malformed credential offered ({_describe(offered)})",
        )
    return Enrolment(
        key_id=key.pk,
        key_prefix=key.prefix,
        credential=tokens.adopt(offered)
        if offered
        else tokens.issue(tokens.Kind.WORKER_CREDENTIAL),
        tags=key.tags,
        ephemeral=key.ephemeral,
        issued=offered is None,
        certificate=request.certificate,
    )


def enrol_and_register(
    enrolment: Enrolment,
    request: sessions.RegistrationRequest,
    *,
    instance_id: str,
    now: datetime | None = None,
) -> sessions.Registration:
    """Spend the key, bind the credential and register the connection, all or nothing.

    One transaction, so a single-use key is never spent without a worker to show for it, and
    two parties racing to enrol one id cannot both win.
    """
    now = now or timezone.now()
    with transaction.atomic():
        keys = EnrolmentKey.objects.filter(pk=enrolment.key_id)
        spent = keys.usable(now).update(use_count=F("use_count") + 1, last_used_at=now)
        if not spent:
            raise AuthenticationFailed(
                "enrolment key no longer usable", f"key {enrolment.key_prefix}… spent meanwhile"
            )
        Worker.objects.bulk_create(
            [Worker(id=request.worker_id, first_seen=now, last_seen=now)], ignore_conflicts=True
        )
        certificate = enrolment.certificate
        bound = Worker.objects.filter(
            credential_digest="", id=request.worker_id, disabled_at__isnull=True
        ).update(
            credential_digest=enrolment.credential.digest,
            credential_prefix=enrolment.credential.display_prefix,
            credential_issued_at=now,
            credential_confirmed_at=None,
            enrolled_with_id=enrolment.key_id,
            tags=enrolment.tags,
            ephemeral=enrolment.ephemeral,
            # Enrolling binds the identity too (a new one replaces what an earlier one bound).
            certificate=certificate.encoded if certificate else "",
            certificate_fingerprint=certificate.fingerprint if certificate else "",
            certificate_bound_at=now if certificate else None,
        )
        if not bound:
            raise AuthenticationFailed(
                "this worker id is enrolled: present its credential (Authorization: Bearer)",
                "id bound by another enrolment meanwhile",
            )
        return sessions.register_connections([request], instance_id=instance_id, now=now)[0]


def confirm_credential(*, connection_id: int, now: datetime | None = None) -> bool:
    """The worker holding `connection_id` has its credential (it spoke after its welcome)."""
    return bool(
        Worker.objects.filter(
            current_connection_id=connection_id, credential_confirmed_at__isnull=True
        )
        .exclude(credential_digest="")
        .update(credential_confirmed_at=now or timezone.now())
    )


def _describe(bearer: str | None) -> str:
    """A secret as the log may show it: its kind and first characters, never the rest."""
    if not bearer:
        return "nothing"
    return f"{bearer[: tokens.DISPLAY_PREFIX_LENGTH]}…"


# ---- operators' actions (admin, management commands) -------------------------------------------


def create_enrolment_key(
    *,
    name: str,
    expires_in: timedelta,
    reusable: bool = False,
    ephemeral: bool = False,
    tags: Iterable[str] = (),
    created_by_id: int | None = None,
    now: datetime | None = None,
) -> tuple[EnrolmentKey, str]:
    """A new key and its secret, which is not stored and cannot be shown again."""
    now = now or timezone.now()
    issued = tokens.issue(tokens.Kind.ENROLMENT_KEY)
    key = EnrolmentKey.objects.create(
        name=name,
        digest=issued.digest,
        prefix=issued.display_prefix,
        reusable=reusable,
        ephemeral=ephemeral,
        tags=encode_tags(tags),
        expires_at=now + expires_in,
        created_at=now,
        created_by_id=created_by_id,
    )
    log.info("enrolment key %s (%s) created", key.prefix, name)
    return key, issued.secret


def revoke_enrolment_keys(key_ids: Iterable[int], *, now: datetime | None = None) -> int:
    """Stop the keys enrolling anyone; workers they enrolled keep their credentials."""
    return EnrolmentKey.objects.filter(pk__in=list(key_ids), revoked_at__isnull=True).update(
        revoked_at=now or timezone.now()
    )


def forget_credentials(worker_ids: Iterable[str]) -> int:
    """Unbind the ids' credentials: the next holder of a usable key may enrol them again."""
    return Worker.objects.filter(id__in=list(worker_ids)).update(
        credential_digest="",
        credential_prefix="",
        credential_issued_at=None,
        credential_confirmed_at=None,
    )


def purge_ephemeral_workers(*, offline_for: timedelta, now: datetime | None = None) -> int:
    """Remove ephemeral workers offline longer than `offline_for`, history included."""
    now = now or timezone.now()
    doomed = list(
        Worker.objects.ephemeral_gone_since(now - offline_for).values_list("id", flat=True)
    )
    if not doomed:
        return 0
    with transaction.atomic():
        # Re-checked under the delete: a worker that reconnected meanwhile stays.
        _, by_model = (
            Worker.objects.ephemeral_gone_since(now - offline_for).filter(id__in=doomed).delete()
        )
        count = by_model.get(Worker._meta.label, 0)
    if count:
        log.info("%d ephemeral workers removed after %s offline", count, offline_for)
    return count
