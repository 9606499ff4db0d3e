"""`make test`: the whole suite on SQLite, then again on PostgreSQL.

PostgreSQL is taken from RENDEZVOUS_TEST_DATABASE_URL (default: the local server, database
`test`). Where it is not reachable the second pass is skipped with the reason printed, unless
RENDEZVOUS_REQUIRE_SERVICES=1 (CI), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from urllib.parse import urlparse

DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/test"


def reachable(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname or "127.0.0.1", parsed.port or 5432), 2):
            return True
    except OSError:
        return False


def pytest(label: str, env: dict[str, str], extra: list[str]) -> int:
    print(f"\n===== test pass: {label} =====", flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", *extra], env=env)


def main(argv: list[str]) -> int:
    # Everything the suite and the processes it starts write under RENDEZVOUS_DATA_DIR (test
    # databases, the local secret key) goes to a directory of its own, removed afterwards.
    data_dir = tempfile.mkdtemp(prefix="rendezvous-tests-")
    try:
        return run(argv, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def run(argv: list[str], data_dir: str) -> int:
    required = os.environ.get("RENDEZVOUS_REQUIRE_SERVICES", "") not in ("", "0", "false")
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    base["RENDEZVOUS_DATA_DIR"] = data_dir
    failures = 0
    failures += pytest("SQLite", base, ["-m", "not postgres_only", *argv]) != 0
    postgres_url = os.environ.get("RENDEZVOUS_TEST_DATABASE_URL") or DEFAULT_POSTGRES_URL
    if reachable(postgres_url):
        # The database-independent tests already ran in the first pass.
        env = {**base, "DATABASE_URL": postgres_url}
        failures += pytest("PostgreSQL", env, ["-m", "not standalone", *argv]) != 0
    elif required:
        print(f"FAILED: PostgreSQL not reachable at {postgres_url} (RENDEZVOUS_REQUIRE_SERVICES=1)")
        failures += 1
    else:
        print(f"SKIPPED the PostgreSQL pass: nothing answers at {postgres_url}.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
