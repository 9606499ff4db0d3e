"""`manage.py serve` listens with the configured backlog (RENDEZVOUS_LISTEN_BACKLOG), on IPv4 and
IPv6: for a listening socket, `ss` shows the backlog in its Send-Q column."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest

from tests.support.processes import ServerProcess

pytestmark = pytest.mark.django_db(transaction=True)


def listen_backlog(host: str, port: int) -> int:
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed; tools/install_system_packages.sh installs it")
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    local = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    for line in out.splitlines():
        state, _recv_q, send_q, address, *_ = line.split()
        if state == "LISTEN" and address == local:
            return int(send_q)
    raise AssertionError(f"nothing listens on {local}:\n{out}")


def somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())


def test_the_service_listens_with_a_backlog_of_2048_by_default(server: ServerProcess) -> None:
    assert listen_backlog("127.0.0.1", server.port) == min(2048, somaxconn())


def test_the_backlog_is_configurable_and_works_on_ipv6(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(host="::1", env={"RENDEZVOUS_LISTEN_BACKLOG": "777"}).start()
    assert listen_backlog("::1", server.port) == 777
