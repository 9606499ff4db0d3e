"""Enrolment keys, API tokens and worker bans in the admin: a secret is shown once and never
stored, keys and tokens are revoked not edited, and disabling a worker closes its session."""

from __future__ import annotations

from datetime import timedelta

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from registry.core import protocol, tokens
from registry.models import ApiToken, EnrolmentKey, Worker
from registry.routing import websocket_urlpatterns
from registry.security import enrolment

SECRET_FIELD = 'id="rv-secret"'


def shown_secret(page: str) -> str:
    start = page.index(SECRET_FIELD)
    value = page.index('value="', start) + len('value="')
    return page[value : page.index('"', value)]


@pytest.mark.django_db
def test_adding_an_enrolment_key_shows_its_secret_once_and_stores_a_digest(
    admin_client: Client,
) -> None:
    response = admin_client.post(
        "/admin/registry/enrolmentkey/add/",
        {
            "name": "fleet",
            "reusable": "on",
            "ephemeral": "on",
            "tag_text": "gpu, eu-west",
            "expires_in": "604800",
        },
    )
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    secret = shown_secret(response.content.decode())
    key = EnrolmentKey.objects.get()
    assert secret.startswith("rvk_") and tokens.matches(secret, key.digest)
    assert key.reusable and key.ephemeral and key.tag_list == ["eu-west", "gpu"]
    assert timedelta(days=6, hours=23) < key.expires_at - timezone.now() <= timedelta(days=7)
    assert key.created_by is not None
    # Nowhere else: not on the list, not on the key's page, not in a message cookie.
    for url in ("/admin/registry/enrolmentkey/", f"/admin/registry/enrolmentkey/{key.pk}/change/"):
        page = admin_client.get(url).content.decode()
        assert key.prefix in page and secret not in page
    assert secret not in str(admin_client.cookies)


@pytest.mark.django_db
def test_a_bad_tag_is_refused_by_the_key_form(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/registry/enrolmentkey/add/",
        {"name": "x", "tag_text": "ok, not ok", "expires_in": "3600"},
    )
    assert "not valid tags: not ok" in response.content.decode()
    assert not EnrolmentKey.objects.exists()


@pytest.mark.django_db
def test_keys_are_revoked_by_an_action_and_cannot_be_edited(admin_client: Client) -> None:
    key, secret = enrolment.create_enrolment_key(name="k", expires_in=timedelta(days=1))
    response = admin_client.post(
        f"/admin/registry/enrolmentkey/{key.pk}/change/", {"name": "renamed"}
    )
    assert response.status_code == 403
    admin_client.post(
        "/admin/registry/enrolmentkey/",
        {"action": "revoke_selected", "_selected_action": [key.pk]},
    )
    key.refresh_from_db()
    assert key.name == "k" and key.state(timezone.now()) == "revoked"
    with pytest.raises(enrolment.AuthenticationFailed, match="revoked"):
        enrolment.authenticate(worker_id="w", bearer=secret)


@pytest.mark.django_db
def test_adding_an_api_token_shows_it_once_and_revoking_it_works(admin_client: Client) -> None:
    response = admin_client.post("/admin/registry/apitoken/add/", {"name": "prometheus"})
    secret = shown_secret(response.content.decode())
    token = ApiToken.objects.get()
    assert secret.startswith("rvt_") and tokens.matches(secret, token.digest)
    admin_client.post(
        "/admin/registry/apitoken/", {"action": "revoke_selected", "_selected_action": [token.pk]}
    )
    assert ApiToken.objects.get().revoked_at is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.asyncio
async def test_the_disable_action_closes_the_live_session_with_4011_and_keeps_it_out(
    async_client, admin_user
) -> None:
    application = URLRouter(websocket_urlpatterns)
    comm = WebsocketCommunicator(application, "/ws/register/w1")
    comm.scope["client"] = ("203.0.113.5", 1)
    assert (await comm.connect())[0]
    await comm.receive_json_from()
    await async_client.aforce_login(admin_user)
    await async_client.post(
        "/admin/registry/worker/", {"action": "disable_selected", "_selected_action": ["w1"]}
    )
    closing = await comm.receive_json_from()
    assert closing["code"] == protocol.CloseCode.WORKER_DISABLED
    assert (await comm.receive_output())["code"] == protocol.CloseCode.WORKER_DISABLED
    again = WebsocketCommunicator(application, "/ws/register/w1")
    again.scope["client"] = ("203.0.113.5", 2)
    await again.connect()
    assert (await again.receive_json_from())["code"] == protocol.CloseCode.WORKER_DISABLED
    worker = await database_sync_to_async(Worker.objects.get)(id="w1")
    assert worker.is_disabled and "admin" in worker.disabled_reason


@pytest.mark.django_db
def test_the_worker_page_shows_enrolment_tags_and_ban_state(admin_client: Client) -> None:
    key, _ = enrolment.create_enrolment_key(
        name="fleet", tags=["gpu"], expires_in=timedelta(days=1)
    )
    now = timezone.now()
    Worker.objects.create(
        id="w1",
        first_seen=now,
        last_seen=now,
        tags=",gpu,",
        credential_digest="x" * 64,
        credential_prefix="rvc_abcdefgh",
        credential_issued_at=now,
        enrolled_with=key,
        disabled_at=now,
        disabled_reason="lost laptop",
    )
    page = admin_client.get("/admin/registry/worker/w1/change/").content.decode()
    for text in ["rvc_abcdefgh", "fleet", "gpu", "lost laptop", "disabled"]:
        assert text in page
    assert "x" * 64 not in page  # the digest stays out of sight too
    listing = admin_client.get("/admin/registry/worker/", {"access": "disabled"}).content.decode()
    assert "w1" in listing
