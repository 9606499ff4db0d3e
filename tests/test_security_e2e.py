"""Attacks on a secured service: a real daphne, real agents, real sockets.

Each attacker is refused with the documented outcome (a `closing` frame, then close code 4010,
4011 or 4008), and the legitimate worker stays connected with its record untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from registry.core import protocol
from registry.models import EnrolmentKey, Worker, WorkerStatus
from registry.ops import control
from registry.security import api_access, enrolment
from tests.support.processes import ServerProcess, get_json, wait_until
from worker_agent import WorkerAgent

pytestmark = pytest.mark.django_db(transaction=True)

DAY = timedelta(days=1)


@pytest.fixture
def secured_server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory(
        env={"RENDEZVOUS_SECURITY_MODE": "secured", "RENDEZVOUS_AUTH_FAILURES_PER_MINUTE": "5"}
    ).start()


def new_key(**kwargs: object) -> str:
    kwargs.setdefault("name", "e2e")
    kwargs.setdefault("expires_in", DAY)
    return enrolment.create_enrolment_key(**kwargs)[1]  # type: ignore[arg-type]


def attempt(
    server: ServerProcess,
    worker_id: str,
    bearer: str | None,
    *,
    headers: dict[str, str] | None = None,
) -> tuple[dict, int | None]:
    """One raw handshake: the first frame, and the close code if the service closed."""

    async def run() -> tuple[dict, int | None]:
        extra = dict(headers or {})
        if bearer is not None:
            extra["Authorization"] = f"Bearer {bearer}"
        async with websockets.connect(
            f"{server.ws_url}/ws/register/{worker_id}", additional_headers=extra
        ) as ws:
            first = json.loads(await ws.recv())
            if first["type"] != "closing":
                return first, None
            with contextlib.suppress(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return first, ws.close_code

    return asyncio.run(run())


def snapshot(worker_id: str) -> tuple:
    worker = Worker.objects.get(id=worker_id)
    return (
        worker.status,
        worker.current_connection_id,
        worker.credential_digest,
        worker.observed_ip,
        worker.tags,
        worker.disabled_at,
    )


@pytest.fixture
def legit(
    secured_server: ServerProcess, agents: Callable[..., WorkerAgent], tmp_path: Path
) -> WorkerAgent:
    """The worker every attack is aimed at: enrolled, connected, credential in a file."""
    agent = agents(
        secured_server.url,
        "victim",
        enrolment_key=new_key(tags=["prod"]),
        credential_file=tmp_path / "victim.json",
    )
    agent.start()
    assert agent.wait_registered(15)
    wait_until(lambda: Worker.objects.filter(id="victim", status="connected").exists(), timeout=10)
    return agent


def test_an_enrolled_agent_comes_back_with_its_credential_file_alone(
    secured_server: ServerProcess, agents: Callable[..., WorkerAgent], tmp_path: Path
) -> None:
    file = tmp_path / "identity" / "worker.json"
    first = agents(secured_server.url, None, enrolment_key=new_key(), credential_file=file)
    first.start()
    assert first.wait_registered(15)
    stored = json.loads(file.read_text())
    assert stored["worker_id"] == first.worker_id and stored["credential"].startswith("rvc_")
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert first.status()["enrolled"] and "rvc_" not in json.dumps(first.status())
    assert first.stop(5)
    # No key, no id: the file is the identity. The single-use key is spent, and not needed.
    second = agents(secured_server.url, None, credential_file=file)
    assert second.worker_id == first.worker_id
    second.start()
    assert second.wait_registered(15)
    assert EnrolmentKey.objects.get().use_count == 1
    assert "rvc_" not in secured_server.log_tail(400)  # secrets never reach the log


def test_id_hijack_with_another_valid_key_is_refused(
    secured_server: ServerProcess, legit: WorkerAgent
) -> None:
    before = snapshot("victim")
    closing, code = attempt(secured_server, "victim", new_key(reusable=True))
    assert code == protocol.CloseCode.AUTHENTICATION_FAILED
    assert "enrolled" in closing["reason"]
    assert snapshot("victim") == before and legit.state == "registered"


@pytest.mark.parametrize("which", ["another worker's credential", "a forged credential", "none"])
def test_a_wrong_or_replayed_credential_is_refused(
    secured_server: ServerProcess,
    legit: WorkerAgent,
    agents: Callable[..., WorkerAgent],
    which: str,
) -> None:
    other = agents(secured_server.url, "other", enrolment_key=new_key())
    other.start()
    assert other.wait_registered(15)
    before = snapshot("victim")
    bearer = {
        "another worker's credential": other.credential,
        "a forged credential": "rvc_" + "A" * 43,
        "none": None,
    }[which]
    _, code = attempt(secured_server, "victim", bearer)
    assert code == protocol.CloseCode.AUTHENTICATION_FAILED
    assert snapshot("victim") == before and legit.state == "registered"


@pytest.mark.parametrize("state", ["expired", "revoked", "used"])
def test_an_agent_with_an_unusable_key_stops_with_a_clear_reason(
    secured_server: ServerProcess, agents: Callable[..., WorkerAgent], state: str
) -> None:
    key, secret = enrolment.create_enrolment_key(name=state, expires_in=DAY)
    if state == "expired":
        EnrolmentKey.objects.filter(pk=key.pk).update(expires_at=key.created_at)
    elif state == "revoked":
        enrolment.revoke_enrolment_keys([key.pk])
    else:
        EnrolmentKey.objects.filter(pk=key.pk).update(use_count=1)
    agent = agents(secured_server.url, f"late-{state}", enrolment_key=secret)
    agent.start()
    wait_until(lambda: agent.state == "refused", timeout=15, what="the agent to give up")
    reason = agent.status()["final_reason"]
    assert "authentication failed" in reason and f"enrolment key {state}" in reason
    assert agent.status()["attempts"] == 1  # not retried
    assert not Worker.objects.filter(id=f"late-{state}").exists()


def test_guessing_keys_is_throttled_and_a_spoofed_forwarded_for_does_not_help(
    secured_server: ServerProcess, legit: WorkerAgent
) -> None:
    before = snapshot("victim")
    codes = [
        attempt(
            secured_server,
            f"guess-{n}",
            f"rvk_guess{n}",
            headers={"X-Forwarded-For": f"192.0.2.{n}"},  # from an untrusted peer: ignored
        )[1]
        for n in range(8)
    ]
    assert codes[:5] == [protocol.CloseCode.AUTHENTICATION_FAILED] * 5
    assert codes[5:] == [protocol.CloseCode.LIMIT_EXCEEDED] * 3
    assert snapshot("victim") == before and legit.state == "registered"
    assert not Worker.objects.filter(id__startswith="guess-").exists()


def test_disabling_a_worker_closes_it_with_4011_and_keeps_it_out(
    secured_server: ServerProcess, legit: WorkerAgent
) -> None:
    credential = legit.credential
    assert control.disable_and_disconnect(["victim"], reason="lost laptop") == ["victim"]
    # The server is another process: the holder closes the socket from the recorded close code.
    wait_until(lambda: legit.state == "refused", timeout=15, what="the agent to stop")
    assert "disabled" in legit.status()["final_reason"]
    assert legit.status()["last_close_code"] == protocol.CloseCode.WORKER_DISABLED
    _, code = attempt(secured_server, "victim", credential)
    assert code == protocol.CloseCode.WORKER_DISABLED
    assert Worker.objects.get(id="victim").status == WorkerStatus.DISCONNECTED


def test_protected_views_need_a_token_on_a_real_server(
    secured_server: ServerProcess, legit: WorkerAgent
) -> None:
    status, body = get_json(f"{secured_server.url}/debug/list_workers")
    assert status == 401 and "API token" in body["error"]
    assert get_json(f"{secured_server.url}/api/workers/")[0] == 401
    assert get_json(f"{secured_server.url}/healthz")[0] == 200
    _, token = api_access.create_api_token(name="scraper")
    status, body = get_json(
        f"{secured_server.url}/debug/list_workers", headers={"Authorization": f"Bearer {token}"}
    )
    assert status == 200 and "victim" in body["workers"]


def test_the_service_says_its_mode_in_its_first_log_lines(
    secured_server: ServerProcess, server: ServerProcess
) -> None:
    for process, mode in ((server, "OPEN"), (secured_server, "SECURED")):
        lines = process.log_tail(400).splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("Rendezvous on http"))
        assert f"security mode {mode}" in lines[start + 1], lines  # right after the address


def test_an_agent_whose_credential_was_forgotten_enrols_again_with_its_key(
    secured_server: ServerProcess, agents: Callable[..., WorkerAgent], tmp_path: Path
) -> None:
    file = tmp_path / "w.json"
    agent = agents(
        secured_server.url, "phoenix", enrolment_key=new_key(reusable=True), credential_file=file
    )
    agent.start()
    assert agent.wait_registered(15)
    first = agent.credential
    enrolment.forget_credentials(["phoenix"])
    control.disconnect_worker("phoenix")
    wait_until(
        lambda: agent.credential not in (None, first) and agent.registered,
        timeout=20,
        what="a new enrolment",
    )
    assert json.loads(file.read_text())["credential"] == agent.credential
    assert agent.status()["attempts"] >= 3  # the refused credential, then the key
    assert Worker.objects.get(id="phoenix").status == WorkerStatus.CONNECTED


def test_a_flooding_oversized_or_cross_site_attacker_leaves_the_victim_untouched(
    secured_server: ServerProcess, legit: WorkerAgent, agents: Callable[..., WorkerAgent]
) -> None:
    """An enrolled worker turned hostile, and a browser page: neither reaches the victim."""
    before = snapshot("victim")
    hostile = agents(secured_server.url, "hostile", enrolment_key=new_key())
    hostile.start()
    assert hostile.wait_registered(15)
    credential = hostile.credential
    assert hostile.stop(5)

    async def attack() -> tuple[list[str], int | None]:
        codes: list[str] = []
        async with websockets.connect(
            f"{secured_server.ws_url}/ws/register/hostile",
            additional_headers={"Authorization": f"Bearer {credential}"},
            max_size=None,
        ) as ws:
            await ws.recv()  # welcome
            await ws.send(json.dumps({"type": "heartbeat", "pad": "x" * 10_000}))
            codes.append(json.loads(await ws.recv())["code"])
            with contextlib.suppress(ConnectionClosed):
                for _ in range(500):
                    await ws.send('{"type": "heartbeat"}')
                async for frame in ws:
                    message = json.loads(frame)
                    if message["type"] in ("error", "closing"):
                        codes.append(message.get("code"))
            return codes, ws.close_code

    codes, close_code = asyncio.run(attack())
    assert codes[0] == "FRAME_TOO_LARGE" and "RATE_LIMITED" in codes
    assert close_code == protocol.CloseCode.RATE_LIMITED

    async def browser() -> int:
        try:
            await websockets.connect(
                f"{secured_server.ws_url}/ws/register/victim",
                origin="https://evil.example",
                additional_headers={"Authorization": f"Bearer {legit.credential}"},
            )
        except websockets.InvalidStatus as refused:
            return refused.response.status_code
        return 101

    assert asyncio.run(browser()) == 403  # even with the stolen credential in hand
    assert snapshot("victim") == before and legit.state == "registered"
