"""TURN credentials: minted per introduction without the secret ever leaving the service, checked
at start-up, and accepted or refused by a real coturn (on loopback) the way ICE sees it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.checks import run_checks
from django.test import override_settings

from registry.core import turn
from tests.support.backing import require_or_skip
from tests.support.processes import free_port, wait_until
from worker_agent import wire
from worker_agent.paths import ice

pytestmark = pytest.mark.standalone

SECRET = "turn-secret-for-tests-0123456789"


def test_credentials_follow_the_turn_rest_scheme_and_expire_after_the_ttl() -> None:
    minted = turn.mint(
        servers=["turn.example.com:3478"], secret=SECRET, name="gpu-box-7", ttl=600, now=1000.5
    )
    assert minted is not None
    assert minted.username == "1600:gpu-box-7" and minted.expires_at == 1600
    expected = base64.b64encode(hmac.new(SECRET.encode(), b"1600:gpu-box-7", hashlib.sha1).digest())
    assert minted.password == expected.decode()
    assert SECRET not in str(minted.as_dict())
    assert turn.mint(servers=[], secret=SECRET, name="w", ttl=600) is None
    assert turn.mint(servers=["t:3478"], secret="", name="w", ttl=600) is None


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("turn.example.com:3478", ("turn.example.com", 3478)),
        ("[2001:db8::1]:3478", ("2001:db8::1", 3478)),
        ("203.0.113.10", None),
        ("turn.example.com:0", None),
        ("2001:db8::1:3478", None),
        (":3478", None),
    ],
)
def test_turn_server_entries_are_host_and_port(entry: str, parsed: object) -> None:
    assert turn.parse_server(entry) == parsed


def check_ids(**config: object) -> set[str]:
    from django.conf import settings

    with override_settings(RENDEZVOUS={**settings.RENDEZVOUS, **config}):
        return {problem.id for problem in run_checks() if problem.id.startswith("rendezvous")}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"TURN_SERVERS": ["turn.example.com:3478"], "TURN_SECRET": SECRET}, set()),
        ({"TURN_SERVERS": ["turn.example.com"], "TURN_SECRET": SECRET}, {"rendezvous.E005"}),
        ({"TURN_SERVERS": ["turn.example.com:3478"], "TURN_SECRET": ""}, {"rendezvous.E006"}),
        ({"TURN_SERVERS": ["turn.example.com:3478"], "TURN_SECRET": "short"}, {"rendezvous.E006"}),
        ({"TURN_SERVERS": [], "TURN_SECRET": SECRET}, {"rendezvous.W002"}),
        (
            {"TURN_SERVERS": ["t.example:3478"], "TURN_SECRET": SECRET, "TURN_TTL": 5.0},
            {"rendezvous.E007"},
        ),
    ],
    ids=["good", "no port", "no secret", "short secret", "secret alone", "short ttl"],
)
def test_the_system_checks_catch_a_turn_misconfiguration(config: dict, expected: set) -> None:
    assert check_ids(**config) == expected


# ---- a real coturn ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    binary = shutil.which("turnserver", path="/usr/bin:/usr/sbin:/bin:/sbin")
    require_or_skip(
        binary is not None, "coturn is not installed (tools/install_system_packages.sh)"
    )
    directory = tmp_path_factory.mktemp("coturn")
    config = directory / "turnserver.conf"
    config.write_text("")
    port = free_port()
    log = directory / "coturn.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                str(binary),
                "-c",
                str(config),
                "--no-cli",
                "--no-tls",
                "--no-dtls",
                "--listening-ip=127.0.0.1",
                f"--listening-port={port}",
                "--relay-ip=127.0.0.1",
                "--min-port=51000",
                "--max-port=51100",
                "--use-auth-secret",
                f"--static-auth-secret={SECRET}",
                "--realm=rendezvous.test",
                "--simple-log",
                "--log-file=stdout",
                f"--pidfile={directory / 'coturn.pid'}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(
            lambda: "Total General servers" in Path(log).read_text(errors="replace"),
            timeout=15,
            what="coturn",
        )
        yield ("127.0.0.1", port)
    finally:
        process.terminate()
        process.wait(10)


def turn_attempt(server: tuple[str, int], credentials: turn.TurnCredentials) -> ice.IceAttempt:
    return ice.IceAttempt(
        introduction_id="ab" * 16,
        attempt=0,
        policy=wire.IcePolicy.RELAY,
        controlling=True,
        signal=lambda frame: True,
        datagram=lambda attempt, data: None,
        turn=ice.TurnServer(
            host=server[0],
            port=server[1],
            username=credentials.username,
            password=credentials.password,
            expires_at=credentials.expires_at,
        ),
        use_ipv6=False,
    )


def relay_candidates(attempt: ice.IceAttempt) -> list[str]:
    async def gather() -> list[str]:
        await attempt.connection.gather_candidates()
        found = [c.to_sdp() for c in attempt.connection.local_candidates if c.type == "relay"]
        await attempt.close()
        return found

    return asyncio.run(gather())


def test_credentials_the_service_mints_get_an_allocation_from_coturn(coturn) -> None:
    credentials = turn.mint(servers=["x:1"], secret=SECRET, name="w1", ttl=600)
    assert credentials is not None
    found = relay_candidates(turn_attempt(coturn, credentials))
    assert len(found) == 1 and " typ relay " in found[0] and " 127.0.0.1 " in found[0]


@pytest.mark.parametrize("problem", ["expired", "forged"])
def test_expired_or_forged_credentials_get_no_allocation_and_the_attempt_says_so(
    coturn, problem: str
) -> None:
    if problem == "expired":
        credentials = turn.mint(
            servers=["x:1"], secret=SECRET, name="w1", ttl=60, now=time.time() - 120
        )
    else:
        credentials = turn.mint(
            servers=["x:1"], secret="not-the-secret-0123456789", name="w1", ttl=600
        )
    assert credentials is not None
    attempt = turn_attempt(coturn, credentials)

    async def run() -> bool:
        return await attempt.run(timeout=8)

    assert asyncio.run(run()) is False
    assert attempt.failure == "no local candidates (the TURN server did not grant an allocation)"
