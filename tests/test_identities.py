"""Worker identities through the consumer: certificates recorded per worker (open mode: as
announced; secured mode: bound at enrolment, changed only by enrolling again or an operator),
refused when malformed or not the bound one, carried to the peer in each QUIC introduction, and
shown and reset in the admin. The QUIC handshake that pins them: tests/test_quic.py."""

from __future__ import annotations

import asyncio
import base64

import pytest
from channels.db import database_sync_to_async
from django.test import Client

from registry.core import certificates, protocol, tokens
from registry.models import Worker
from registry.security import identities
from tests.test_peering import ask, connected
from tests.test_security import handshake, new_key, welcome_or_close
from worker_agent.secure import identity

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]

A, B, C = identity.create("a"), identity.create("b"), identity.create("c")


async def worker(worker_id: str) -> Worker:
    return await database_sync_to_async(Worker.objects.get)(id=worker_id)


async def recorded(worker_id: str, fingerprint: str) -> None:
    """The identity is written just after the welcome (coalesced): wait for it."""
    for _ in range(100):
        if (await worker(worker_id)).certificate_fingerprint == fingerprint:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{worker_id} never recorded {fingerprint[:16]}")


async def registered(worker_id: str, me: identity.WorkerIdentity, port: int = 1, **kwargs):
    comm = handshake(
        worker_id, certificate=me.header_value(), client=("203.0.113.5", port), **kwargs
    )
    welcome, code = await welcome_or_close(comm)
    assert code is None, welcome
    return comm, welcome


async def test_open_mode_records_each_certificate_as_announced() -> None:
    comm, _ = await registered("w", A)
    await recorded("w", A.fingerprint)
    row = await worker("w")
    assert base64.b64decode(row.certificate) == A.certificate_der
    assert row.certificate_bound_at is not None
    await comm.disconnect()
    comm, _ = await registered("w", B, port=2)  # a new key: open mode takes it
    await recorded("w", B.fingerprint)
    await comm.disconnect()


@pytest.mark.parametrize(
    "header",
    [
        "not base64!",
        base64.b64encode(b"not a certificate").decode(),
        "A" * 4000,
    ],
    ids=["not base64", "not x509", "too large"],
)
async def test_a_malformed_certificate_is_refused_at_the_handshake(header: str) -> None:
    closing, code = await welcome_or_close(handshake("w", certificate=header))
    assert code == protocol.CloseCode.AUTHENTICATION_FAILED
    assert closing["reason"].startswith("invalid certificate")
    assert not await database_sync_to_async(Worker.objects.exists)()


@pytest.fixture
def secured(settings) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "SECURITY_MODE": "secured"}


async def test_secured_mode_binds_the_certificate_at_enrolment_and_refuses_another(
    secured,
) -> None:
    key = await database_sync_to_async(new_key)(reusable=True)
    own = tokens.issue(tokens.Kind.WORKER_CREDENTIAL).secret
    comm, _ = await registered("w", A, bearer=key, offered=own)
    row = await worker("w")
    assert row.certificate_fingerprint == A.fingerprint  # bound in the enrolment itself
    await comm.disconnect()
    # Its credential with another certificate: someone who stole the credential, or the
    # worker after losing its key file. Refused, and the bound identity stays.
    closing, code = await welcome_or_close(
        handshake("w", own, ("203.0.113.5", 2), certificate=B.header_value())
    )
    assert code == protocol.CloseCode.AUTHENTICATION_FAILED
    assert "not the identity bound" in closing["reason"]
    assert (await worker("w")).certificate_fingerprint == A.fingerprint
    # An operator resets it: the next certificate presented is bound.
    assert await database_sync_to_async(identities.reset)(["w"]) == 1
    comm, _ = await registered("w", B, port=3, bearer=own)
    await recorded("w", B.fingerprint)
    await comm.disconnect()
    closing, code = await welcome_or_close(
        handshake("w", own, ("203.0.113.5", 4), certificate=A.header_value())
    )
    assert code == protocol.CloseCode.AUTHENTICATION_FAILED  # and now A's is the stranger


async def test_a_quic_introduction_carries_each_sides_certificate_to_the_other() -> None:
    a, _ = await registered("a", A, port=1)
    b, _ = await registered("b", B, port=2)
    await ask(
        a, {"type": "connect_request", "peer_id": "b", "request_id": "r", "protocol_version": 2}
    )
    asked = await b.receive_json_from(timeout=3)
    assert asked["transport"] == "quic"
    for_b = await ask(
        b,
        {
            "type": "introduction_accept",
            "introduction_id": asked["introduction_id"],
            "protocol_version": 2,
        },
    )
    for_a = await a.receive_json_from(timeout=3)
    assert (for_a["transport"], for_b["transport"]) == ("quic", "quic")
    assert for_a["peer_certificate"] == B.header_value()
    assert for_b["peer_certificate"] == A.header_value()
    await a.disconnect()
    await b.disconnect()


async def test_a_quic_introduction_without_a_certificate_on_either_side_is_refused() -> None:
    bare = await connected("bare", 1)  # an agent without the p2p extra: no certificate
    a, _ = await registered("a", A, port=2)
    request = {"type": "connect_request", "request_id": "r", "protocol_version": 2}
    reply = await ask(bare, {**request, "peer_id": "a"})
    assert (reply["code"], "p2p extra" in reply["reason"]) == ("NO_IDENTITY", True)
    assert await a.receive_nothing(timeout=0.2)  # not bothered
    await ask(a, {**request, "peer_id": "bare"})
    asked = await bare.receive_json_from(timeout=3)
    answer = {
        "type": "introduction_accept",
        "introduction_id": asked["introduction_id"],
        "protocol_version": 2,
    }
    for_bare = await ask(bare, answer)
    for_a = await a.receive_json_from(timeout=3)
    assert for_bare["code"] == for_a["code"] == "NO_IDENTITY"
    await a.disconnect()
    await bare.disconnect()


async def test_the_admin_shows_the_fingerprint_and_resets_it(admin_client: Client) -> None:
    comm, _ = await registered("w", C)
    await recorded("w", C.fingerprint)
    page = await database_sync_to_async(admin_client.get)("/admin/registry/worker/w/change/")
    shown = certificates.display(C.fingerprint)
    assert shown.startswith("SHA256:") and shown in page.content.decode()
    api = await database_sync_to_async(admin_client.get)("/api/workers/w/")
    assert api.json()["identity"]["fingerprint"] == C.fingerprint
    response = await database_sync_to_async(admin_client.post)(
        "/admin/registry/worker/",
        {"action": "reset_identities", "_selected_action": ["w"]},
        follow=True,
    )
    assert "1 identity(ies) reset" in response.content.decode()
    assert (await worker("w")).certificate_fingerprint == ""
    await comm.disconnect()
