from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from channels.layers import channel_layers

from registry.presence.runtime import InstanceRuntime, reset_runtime
from tests.support.databases import current_database_url
from tests.support.processes import ServerProcess
from worker_agent import Backoff, WorkerAgent

# Agents on this machine's own network must never ask its real router for port mappings: only
# the tests that build a router of their own (network namespaces) turn port mapping on.
os.environ.setdefault("RENDEZVOUS_PORT_MAPPING", "off")


def pytest_configure(config: pytest.Config) -> None:
    # database_sync_to_async runs in pool threads; persistent connections there would outlive
    # the tests and stop PostgreSQL from dropping the test database.
    from django.conf import settings

    settings.DATABASES["default"]["CONN_MAX_AGE"] = 0
    # The suite's default is the open mode; tests of the secured mode ask for it themselves.
    settings.RENDEZVOUS["SECURITY_MODE"] = "open"
    # Tests press Ctrl-C on commands (SIGINT). A shell without job control starts a background
    # job (`make test &`) with SIGINT ignored, every child inherits that through exec, and a
    # Python started so never raises KeyboardInterrupt: the commands would run on. Handling it
    # here puts the children back on the default.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove what SQLite leaves beside the test database once Django has deleted it: the
    -wal and -shm files of connections (servers, pool threads) that outlived it."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"] != "django.db.backends.sqlite3":
        return
    name = Path(database["TEST"]["NAME"])
    if name.exists():
        return  # kept on purpose (--reuse-db)
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{name}{suffix}").unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def fresh_channel_layer() -> Iterator[None]:
    """A new layer object per test: a cached one keeps a closed event loop (channels #876)."""
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
def runtime() -> InstanceRuntime:
    """A fresh instance id per test, since each test starts from an empty database."""
    return reset_runtime()


@pytest.fixture
def server_factory(
    transactional_db: None, tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """Real daphne servers on the test database; every one is killed at teardown, pass or fail."""
    servers: list[ServerProcess] = []

    def make(**kwargs: object) -> ServerProcess:
        kwargs.setdefault("database_url", current_database_url())
        kwargs.setdefault("name", f"server{len(servers) + 1}")
        server = ServerProcess(log_dir=tmp_path, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def server(server_factory: Callable[..., ServerProcess]) -> ServerProcess:
    return server_factory().start()


@pytest.fixture
def agents() -> Iterator[Callable[..., WorkerAgent]]:
    """Agents in threads of this test process; each is stopped at teardown, pass or fail."""
    made: list[WorkerAgent] = []

    def make(url: str, worker_id: str, **kwargs: object) -> WorkerAgent:
        kwargs.setdefault("ip_echo_url", "")
        kwargs.setdefault("backoff", Backoff(base=0.2, cap=1.0))
        agent = WorkerAgent(url, worker_id, **kwargs)  # type: ignore[arg-type]
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop(timeout=5)
