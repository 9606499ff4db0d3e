"""Secured mode in process: enrolment keys, per-worker credentials, bans, ephemeral workers,
API tokens and protected views. The same attacks against a real daphne and real agents are in
tests/test_security_e2e.py."""

from __future__ import annotations

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from registry.core import protocol, tokens
from registry.models import ApiToken, Connection, EnrolmentKey, Worker, WorkerStatus
from registry.ops import control
from registry.presence import sessions
from registry.presence.runtime import InstanceRuntime
from registry.routing import websocket_urlpatterns
from registry.security import api_access, bans, enrolment

application = URLRouter(websocket_urlpatterns)
DAY = timedelta(days=1)


@pytest.fixture
def secured(settings) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "SECURITY_MODE": "secured"}


def handshake(
    worker_id: str,
    bearer: str | None = None,
    client: tuple[str, int] = ("203.0.113.5", 40000),
    offered: str | None = None,
    certificate: str | None = None,
) -> WebsocketCommunicator:
    headers = [(b"authorization", f"Bearer {bearer}".encode())] if bearer else []
    if offered:
        headers.append((b"rendezvous-credential", offered.encode()))
    if certificate:
        headers.append((b"rendezvous-certificate", certificate.encode()))
    comm = WebsocketCommunicator(application, f"/ws/register/{worker_id}", headers=headers)
    comm.scope["client"] = client
    return comm


async def welcome_or_close(comm: WebsocketCommunicator) -> tuple[dict, int | None]:
    """The first frame and, when the service refused, the close code that followed it."""
    accepted, _ = await comm.connect()
    assert accepted  # refusals are accepted, then closed with a `closing` frame and a code
    first = await comm.receive_json_from()
    if first["type"] != "closing":
        return first, None
    closed = await comm.receive_output()
    assert closed["type"] == "websocket.close"
    return first, closed["code"]


def enrol(grant: enrolment.Enrolment, worker_id: str, instance_id: str) -> sessions.Registration:
    """Bind `grant` to `worker_id` and register a connection for it, as the consumer does."""
    request = sessions.RegistrationRequest(worker_id, "c", None, None)
    return enrolment.enrol_and_register(grant, request, instance_id=instance_id)


def new_key(**kwargs) -> str:
    kwargs.setdefault("name", "test")
    kwargs.setdefault("expires_in", DAY)
    return enrolment.create_enrolment_key(**kwargs)[1]


# ---- tokens --------------------------------------------------------------------------------------


def test_secrets_are_stored_as_digests_and_say_what_they_are() -> None:
    issued = tokens.issue(tokens.Kind.ENROLMENT_KEY)
    assert issued.secret.startswith("rvk_") and len(issued.secret) > 40
    assert issued.digest != issued.secret and tokens.matches(issued.secret, issued.digest)
    assert not tokens.matches(issued.secret + "x", issued.digest)
    assert tokens.kind_of(issued.secret) is tokens.Kind.ENROLMENT_KEY
    assert tokens.kind_of("rvc_abc") is tokens.Kind.WORKER_CREDENTIAL


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("", None),
        ("Bearer " + "x" * 500, None),
    ],
)
def test_bearer_headers_are_parsed_strictly(header: str, token: str | None) -> None:
    assert tokens.parse_bearer(header) == token


# ---- authentication, service level ---------------------------------------------------------------


@pytest.mark.django_db
def test_a_usable_key_grants_an_enrolment_and_a_used_single_use_key_grants_nothing(
    runtime: InstanceRuntime,
) -> None:
    secret = new_key(tags=["gpu"], ephemeral=True)
    grant = enrolment.authenticate(worker_id="w1", bearer=secret)
    assert grant is not None and grant.ephemeral and grant.tags == ",gpu,"
    request = sessions.RegistrationRequest("w1", "chan", "192.0.2.1", 1)
    registration = enrolment.enrol_and_register(
        grant, request, instance_id=runtime.ensure_registered()
    )
    worker = Worker.objects.get(id="w1")
    assert worker.current_connection_id == registration.connection_id
    assert tokens.matches(grant.credential.secret, worker.credential_digest)
    assert worker.tag_list == ["gpu"] and worker.ephemeral
    assert EnrolmentKey.objects.get().use_count == 1
    with pytest.raises(enrolment.AuthenticationFailed, match="enrolment key used"):
        enrolment.authenticate(worker_id="w2", bearer=secret)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "state"),
    [
        ({"revoked_at": timezone.now()}, "revoked"),
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, "expired"),
    ],
)
def test_revoked_and_expired_keys_enrol_nobody(change: dict, state: str) -> None:
    secret = new_key(reusable=True)
    EnrolmentKey.objects.update(**change)
    with pytest.raises(enrolment.AuthenticationFailed, match=f"enrolment key {state}"):
        enrolment.authenticate(worker_id="w1", bearer=secret)
    assert not Worker.objects.exists()


@pytest.mark.django_db
def test_a_single_use_key_spent_between_check_and_enrolment_enrols_nobody(
    runtime: InstanceRuntime,
) -> None:
    secret = new_key()
    first = enrolment.authenticate(worker_id="w1", bearer=secret)
    second = enrolment.authenticate(worker_id="w2", bearer=secret)
    instance = runtime.ensure_registered()
    enrol(first, "w1", instance)
    with pytest.raises(enrolment.AuthenticationFailed, match="no longer usable"):
        enrol(second, "w2", instance)
    assert list(Worker.objects.values_list("id", flat=True)) == ["w1"]


@pytest.mark.django_db
def test_two_parties_racing_to_enrol_one_id_cannot_both_win(runtime: InstanceRuntime) -> None:
    key = new_key(reusable=True)
    first = enrolment.authenticate(worker_id="w1", bearer=key)
    second = enrolment.authenticate(worker_id="w1", bearer=key)
    instance = runtime.ensure_registered()
    enrol(first, "w1", instance)
    with pytest.raises(enrolment.AuthenticationFailed, match="is enrolled"):
        enrol(second, "w1", instance)
    worker = Worker.objects.get(id="w1")
    assert tokens.matches(first.credential.secret, worker.credential_digest)
    assert EnrolmentKey.objects.get().use_count == 1  # the loser's use was rolled back
    assert Connection.objects.count() == 1


@pytest.mark.django_db
def test_a_bound_id_takes_only_its_credential_whatever_key_is_presented(
    runtime: InstanceRuntime,
) -> None:
    grant = enrolment.authenticate(worker_id="w1", bearer=new_key())
    enrol(grant, "w1", runtime.ensure_registered())
    assert enrolment.authenticate(worker_id="w1", bearer=grant.credential.secret) is None
    for bearer in [new_key(reusable=True), None, "rvc_" + "A" * 43, grant.credential.secret[:-1]]:
        with pytest.raises(enrolment.AuthenticationFailed, match="is enrolled"):
            enrolment.authenticate(worker_id="w1", bearer=bearer)


@pytest.mark.django_db
def test_a_credential_is_bound_to_its_own_id_only(runtime: InstanceRuntime) -> None:
    key = new_key(reusable=True)
    instance = runtime.ensure_registered()
    grants = {}
    for worker_id in ("w1", "w2"):
        grants[worker_id] = enrolment.authenticate(worker_id=worker_id, bearer=key)
        enrol(grants[worker_id], worker_id, instance)
    with pytest.raises(enrolment.AuthenticationFailed):
        enrolment.authenticate(worker_id="w2", bearer=grants["w1"].credential.secret)
    with pytest.raises(enrolment.AuthenticationFailed, match="invalid enrolment key"):
        enrolment.authenticate(worker_id="w3", bearer=grants["w1"].credential.secret)


@pytest.mark.django_db
def test_a_disabled_worker_is_refused_in_every_mode(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    sessions.register_connection(
        worker_id="w1", channel_name="c", instance_id=instance, observed_ip=None, observed_port=None
    )
    assert control.disable_and_disconnect(["w1"], reason="compromised") == ["w1"]
    worker = Worker.objects.get(id="w1")
    assert worker.status == WorkerStatus.DISCONNECTED and worker.disabled_reason == "compromised"
    assert Connection.objects.get().close_code == protocol.CloseCode.WORKER_DISABLED
    with pytest.raises(enrolment.WorkerDisabled):
        enrolment.authenticate(worker_id="w1", bearer=None)
    # Open mode registers through the batch alone: the ban is checked there, under the row lock.
    registration = sessions.register_connection(
        worker_id="w1", channel_name="c", instance_id=instance, observed_ip=None, observed_port=None
    )
    assert registration.refused and Connection.objects.count() == 1
    assert bans.mark_enabled(["w1"]) == 1
    assert not sessions.register_connection(
        worker_id="w1", channel_name="c", instance_id=instance, observed_ip=None, observed_port=None
    ).refused


@pytest.mark.django_db
def test_a_batch_with_a_disabled_worker_registers_the_others(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    Worker.objects.create(
        id="banned", first_seen=timezone.now(), last_seen=timezone.now(), disabled_at=timezone.now()
    )
    results = sessions.register_connections(
        [sessions.RegistrationRequest(i, "c", None, None) for i in ("a", "banned", "b")],
        instance_id=instance,
    )
    assert [r.refused for r in results] == [False, True, False]
    assert set(Worker.objects.connected().values_list("id", flat=True)) == {"a", "b"}


@pytest.mark.django_db
def test_ephemeral_workers_are_removed_once_offline_long_enough(runtime: InstanceRuntime) -> None:
    instance = runtime.ensure_registered()
    now = timezone.now()
    for worker_id, ephemeral in [
        ("eph", True),
        ("keep", False),
        ("eph-online", True),
        ("eph-banned", True),
    ]:
        registration = sessions.register_connection(
            worker_id=worker_id,
            channel_name="c",
            instance_id=instance,
            observed_ip=None,
            observed_port=None,
            now=now - timedelta(hours=2),
        )
        Worker.objects.filter(id=worker_id).update(ephemeral=ephemeral)
        if worker_id != "eph-online":
            sessions.close_connection(
                connection_id=registration.connection_id,
                code=1000,
                reason="bye",
                now=now - timedelta(hours=1),
            )
    Worker.objects.filter(id="eph-banned").update(disabled_at=now)
    assert enrolment.purge_ephemeral_workers(offline_for=timedelta(hours=2), now=now) == 0
    assert enrolment.purge_ephemeral_workers(offline_for=timedelta(minutes=30), now=now) == 1
    # A banned one stays: removing it would lift the ban.
    assert set(Worker.objects.values_list("id", flat=True)) == {"keep", "eph-online", "eph-banned"}
    assert not Connection.objects.filter(worker_id="eph").exists()


# ---- the consumer in secured mode ----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_enrolment_over_the_socket_hands_out_a_credential_that_reconnects(secured) -> None:
    key = await database_sync_to_async(new_key)()
    welcome, code = await welcome_or_close(handshake("w1", key))
    assert code is None and welcome["security_mode"] == "secured"
    credential = welcome["credential"]
    assert credential.startswith("rvc_")
    # The credential, not the key, brings it back; and the reconnect's welcome carries none.
    again = handshake("w1", credential)
    welcome2, code2 = await welcome_or_close(again)
    assert code2 is None and "credential" not in welcome2
    await again.disconnect()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
@pytest.mark.parametrize("bearer", [None, "rvk_not-a-key", "garbage", "rvt_x"])
async def test_handshakes_without_a_usable_key_are_closed_with_4010(secured, bearer) -> None:
    closing, code = await welcome_or_close(handshake("w1", bearer))
    assert code == protocol.CloseCode.AUTHENTICATION_FAILED
    assert closing["code"] == code and "key" in closing["reason"]
    assert not await database_sync_to_async(Worker.objects.exists)()


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_failed_authentications_from_one_address_are_throttled(secured, settings) -> None:
    settings.RENDEZVOUS = {**settings.RENDEZVOUS, "AUTH_FAILURES_PER_MINUTE": 3}
    codes = []
    for attempt in range(5):
        _, code = await welcome_or_close(handshake(f"w{attempt}", "rvk_guess"))
        codes.append(code)
    assert codes[:3] == [protocol.CloseCode.AUTHENTICATION_FAILED] * 3
    assert codes[3:] == [protocol.CloseCode.LIMIT_EXCEEDED] * 2
    # Another address is not affected.
    _, code = await welcome_or_close(handshake("w9", "rvk_guess", client=("198.51.100.9", 1)))
    assert code == protocol.CloseCode.AUTHENTICATION_FAILED


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_open_mode_ignores_credentials_like_the_proof_of_concept() -> None:
    welcome, code = await welcome_or_close(handshake("w1", "rvk_whatever"))
    assert code is None and welcome["security_mode"] == "open" and "credential" not in welcome


# ---- API tokens and protected views --------------------------------------------------------------


PROTECTED = ["/api/workers/", "/api/workers/w1/", "/debug/list_workers", "/metrics"]


@pytest.mark.django_db
@pytest.mark.parametrize("path", PROTECTED)
def test_secured_views_answer_401_json_without_a_session_or_token(
    secured, client: Client, path: str
) -> None:
    response = client.get(path)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert "API token" in response.json()["error"]
    bad = client.get(path, HTTP_AUTHORIZATION="Bearer rvt_wrong")
    assert bad.status_code == 401


@pytest.mark.django_db
@pytest.mark.parametrize("path", ["/", "/healthz"])
def test_probes_and_the_root_stay_open_in_secured_mode(secured, client: Client, path: str) -> None:
    assert client.get(path).status_code == 200


@pytest.mark.django_db
def test_an_api_token_opens_the_views_until_revoked(secured, client: Client) -> None:
    token, secret = api_access.create_api_token(name="prometheus")
    for path in ("/api/workers/", "/debug/list_workers", "/metrics"):
        assert client.get(path, HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 200
    assert ApiToken.objects.get().last_used_at is not None
    api_access.revoke_api_tokens([token.pk])
    assert client.get("/api/workers/", HTTP_AUTHORIZATION=f"Bearer {secret}").status_code == 401


@pytest.mark.django_db
def test_a_staff_session_opens_the_views_and_a_plain_user_does_not(secured, client: Client) -> None:
    plain = User.objects.create_user("plain", password="x")
    client.force_login(plain)
    assert client.get("/api/workers/").status_code == 401
    staff = User.objects.create_user("staff", password="x", is_staff=True)
    client.force_login(staff)
    assert client.get("/api/workers/").status_code == 200


@pytest.mark.django_db
def test_the_api_shows_tags_enrolment_and_bans(runtime: InstanceRuntime, client: Client) -> None:
    grant = enrolment.authenticate(worker_id="w1", bearer=new_key(tags=["gpu", "eu"]))
    enrol(grant, "w1", runtime.ensure_registered())
    Worker.objects.create(id="w2", first_seen=timezone.now(), last_seen=timezone.now())
    body = client.get("/api/workers/?tag=gpu").json()
    assert [w["id"] for w in body["results"]] == ["w1"]
    (w1,) = body["results"]
    assert w1["tags"] == ["eu", "gpu"] and w1["enrolled_at"] and w1["disabled_at"] is None
    assert "credential" not in str(body)  # neither the secret nor its digest
    assert client.get("/api/workers/?tag=no%20spaces").status_code == 400


# ---- operators' commands -------------------------------------------------------------------------


@pytest.mark.django_db
def test_create_enrolment_key_prints_a_key_that_enrols(capsys) -> None:
    call_command(
        "create_enrolment_key", "--name", "ci", "--reusable", "--tag", "ci", "--expires-in", "2h"
    )
    secret = capsys.readouterr().out.strip()
    key = EnrolmentKey.objects.get()
    assert key.reusable and key.tag_list == ["ci"] and secret.startswith(key.prefix)
    assert key.expires_at - timezone.now() > timedelta(hours=1, minutes=59)
    assert enrolment.authenticate(worker_id="w1", bearer=secret) is not None


@pytest.mark.django_db
def test_create_api_token_prints_a_token_that_authenticates(capsys) -> None:
    call_command("create_api_token", "--name", "prometheus")
    secret = capsys.readouterr().out.strip()
    assert api_access.authenticate_api_token(secret) is not None


def test_the_default_mode_follows_debug(tmp_path) -> None:
    import subprocess
    import sys

    def mode(env: dict[str, str]) -> str:
        code = "from django.conf import settings; print(settings.RENDEZVOUS['SECURITY_MODE'])"
        result = subprocess.run(
            [sys.executable, "-c", f"import django; django.setup(); {code}"],
            env={
                "DJANGO_SETTINGS_MODULE": "rendezvous_project.settings",
                "PATH": "",
                "RENDEZVOUS_DATA_DIR": str(tmp_path),  # its secret key and database go there
                **env,
            },
            capture_output=True,
            text=True,
            check=True,
            cwd=settings.BASE_DIR,
        )
        return result.stdout.strip()

    assert mode({}) == "secured"
    assert mode({"DEBUG": "1"}) == "open"
    assert mode({"RENDEZVOUS_SECURITY_MODE": "open"}) == "open"


# ---- a lost welcome, and the enrolment race ---------------------------------------------------


@pytest.mark.django_db
def test_a_worker_whose_welcome_was_lost_comes_back_with_its_own_credential_alone(
    runtime: InstanceRuntime,
) -> None:
    instance = runtime.ensure_registered()
    key = new_key(reusable=True)
    own = tokens.issue(tokens.Kind.WORKER_CREDENTIAL).secret  # made by the agent
    first = enrolment.authenticate(worker_id="w1", bearer=key, offered=own)
    assert first is not None and not first.issued
    enrol(first, "w1", instance)
    assert tokens.matches(own, Worker.objects.get(id="w1").credential_digest)
    # The welcome never arrived: the agent presents the key and its credential again, and is
    # let in as itself; the key is not spent again.
    assert enrolment.authenticate(worker_id="w1", bearer=key, offered=own) is None
    assert enrolment.authenticate(worker_id="w1", bearer=own) is None
    assert EnrolmentKey.objects.get(digest=tokens.digest(key)).use_count == 1
    # Anyone else holding the key cannot redo the enrolment, with a credential of its own or
    # none: only the enrolling agent knows the bound credential.
    other = tokens.issue(tokens.Kind.WORKER_CREDENTIAL).secret
    for offered in (other, None):
        with pytest.raises(enrolment.AuthenticationFailed, match="is enrolled"):
            enrolment.authenticate(worker_id="w1", bearer=key, offered=offered)


@pytest.mark.django_db
def test_a_service_issued_credential_cannot_be_redone_with_the_key(
    runtime: InstanceRuntime,
) -> None:
    """An agent that brings no credential (before identities) gets one in its welcome; its
    enrolment can no longer be redone with the key by anyone, since nobody can prove to be it."""
    instance = runtime.ensure_registered()
    key = new_key(reusable=True)
    grant = enrolment.authenticate(worker_id="w1", bearer=key)
    assert grant is not None and grant.issued
    enrol(grant, "w1", instance)
    with pytest.raises(enrolment.AuthenticationFailed, match="is enrolled"):
        enrolment.authenticate(worker_id="w1", bearer=key)
    assert enrolment.authenticate(worker_id="w1", bearer=grant.credential.secret) is None


@pytest.mark.parametrize(
    "offered", ["rvc_short", "rvk_" + "a" * 43, "rvc_" + "!" * 43, "rvc_" + "a" * 200]
)
@pytest.mark.django_db
def test_a_malformed_credential_to_bind_is_refused(offered: str) -> None:
    with pytest.raises(enrolment.AuthenticationFailed, match="credential to bind"):
        enrolment.authenticate(worker_id="w1", bearer=new_key(), offered=offered)


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_nobody_but_the_enrolling_agent_can_redo_its_enrolment_before_its_first_frame(
    secured,
) -> None:
    """The attack: between a new worker's welcome and its first frame, a party holding the same
    enrolment key enrols the same id again, gets a fresh credential and pushes the worker out.
    Now the worker's own credential is what is bound, and only it may come back."""
    key = await database_sync_to_async(new_key)(reusable=True)
    own = tokens.issue(tokens.Kind.WORKER_CREDENTIAL).secret
    worker = handshake("w1", key, offered=own)
    welcome, code = await welcome_or_close(worker)
    assert code is None and "credential" not in welcome  # its own is bound: nothing to send
    attacker_credential = tokens.issue(tokens.Kind.WORKER_CREDENTIAL).secret
    for offered in (attacker_credential, None):
        closing, code = await welcome_or_close(handshake("w1", key, ("198.51.100.66", 1), offered))
        assert code == protocol.CloseCode.AUTHENTICATION_FAILED
        assert "is enrolled" in closing["reason"]
    # The worker was not pushed out, and its first frame still confirms its enrolment.
    await worker.send_json_to({"type": "heartbeat"})
    assert (await worker.receive_json_from())["type"] == "heartbeat_ack"
    row = await database_sync_to_async(Worker.objects.get)(id="w1")
    assert tokens.matches(own, row.credential_digest) and row.credential_confirmed_at
    await worker.disconnect()


@pytest.mark.django_db(transaction=True)
def test_credentials_bound_before_confirmation_existed_count_as_confirmed() -> None:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.migrate([("registry", "0003_nat_traversal")])
    old = executor.loader.project_state([("registry", "0003_nat_traversal")]).apps
    issued = timezone.now() - timedelta(days=3)
    old.get_model("registry", "Worker").objects.create(
        id="veteran", first_seen=issued, last_seen=issued, credential_digest="d" * 64,
        credential_issued_at=issued,
    )  # fmt: skip
    old.get_model("registry", "Worker").objects.create(
        id="open-mode", first_seen=issued, last_seen=issued
    )
    executor = MigrationExecutor(connection)
    executor.migrate([("registry", "0004_credential_confirmation")])
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    assert Worker.objects.get(id="veteran").credential_confirmed_at == issued
    assert Worker.objects.get(id="open-mode").credential_confirmed_at is None
