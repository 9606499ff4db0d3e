"""The service in the public namespace of a NAT topology, for the tests across real NAT: daphne
on this test's database, naming the topology's two STUN listeners, stopped with the topology."""

from __future__ import annotations

import subprocess
import time
from typing import Any

from tests.support.netns import (
    SECOND_SERVICE_IP,
    SECOND_STUN_PORT,
    SERVICE_IP,
    STUN_PORT,
    NatTopology,
)
from tests.support.processes import ServerProcess, wait_until

SERVICE_PORT = 8000


def serve_public(
    net: NatTopology, name: str, *, port: int = SERVICE_PORT, **extra: str
) -> tuple[str, subprocess.Popen[Any]]:
    """`manage.py serve` in `net`'s public namespace, with `extra` settings; its URL and process,
    once it listens. The topology stops it at its end at the latest (`NatTopology.down`)."""
    from tests.support.databases import current_database_url

    probe = ServerProcess(log_dir=net.log_dir, database_url=current_database_url())
    env = {
        **probe.env,
        "HOST": SERVICE_IP,
        "PORT": str(port),
        "ALLOWED_HOSTS": SERVICE_IP,
        "RENDEZVOUS_STUN_SERVERS": (
            f"{SERVICE_IP}:{STUN_PORT},{SECOND_SERVICE_IP}:{SECOND_STUN_PORT}"
        ),
        **extra,
    }
    log_name = f"{name}-{time.monotonic_ns()}.log"  # a log of its own: a fresh "Listening"
    process = net.python(net.public, "manage.py", "serve", env=env, log_name=log_name)
    assert net.log_dir is not None
    log = net.log_dir / log_name
    wait_until(
        lambda: "Listening on TCP address" in log.read_text(), timeout=30, what=f"service {name}"
    )
    return f"http://{SERVICE_IP}:{port}", process
