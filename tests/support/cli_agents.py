"""Agents as `rendezvous-worker` runs them, and its commands, for the end-to-end tests of the
command line: each agent a child process with its own control socket (under the test's
temporary folder) and a free health port; each command a child process too, as a user runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.processes import REPO, WORKER_ARGV, wait_until


class Agent:
    """`python -m worker_agent` with a control socket of its own."""

    def __init__(
        self, url: str, worker_id: str, folder: Path, *, prefix: Sequence[str] = (), **env: str
    ) -> None:
        self.worker_id = worker_id
        self.folder = folder
        self.prefix = list(prefix)  # `ip netns exec NS` to run it in a namespace
        self.socket = folder / f"{worker_id}.sock"
        self.log_path = folder / f"{worker_id}.log"
        self.env = {
            "PATH": os.environ["PATH"],
            "PYTHONUNBUFFERED": "1",
            "RENDEZVOUS_SERVICE_URL": url,
            "WORKER_ID": worker_id,
            "PORT": "0",
            "HEALTH_HOST": "127.0.0.1",
            "IP_ECHO_URL": "",
            "RENDEZVOUS_CONTROL_SOCKET": str(self.socket),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.argv: list[str] = []  # options of the agent's own (`--count 2`)

    def start(self, *, registered: bool = True, timeout: float = 30) -> Agent:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.prefix, sys.executable, *WORKER_ARGV, *self.argv],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        if registered:
            wait_until(self._registered, timeout=timeout, what=f"{self.worker_id} to register")
        return self

    def _registered(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"{self.worker_id} exited:\n{self.log()}")
        if not self.socket.exists():
            return False
        result = self.command("status", "--json", timeout=10, check=False)
        return result.returncode == 0 and json.loads(result.stdout)["worker"]["registered"]

    def command(
        self,
        *args: str,
        input: bytes | str | None = None,
        timeout: float = 60,
        check: bool = True,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """A command against this agent, to its end."""
        result = subprocess.run(
            [*self.prefix, sys.executable, *WORKER_ARGV, *args],
            cwd=cwd or REPO,
            env=self.command_env(),
            input=input.decode() if isinstance(input, bytes) else input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def command_env(self) -> dict[str, str]:
        return {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(REPO),  # commands may run in any folder
            "PYTHONUNBUFFERED": "1",
            "RENDEZVOUS_CONTROL_SOCKET": str(self.socket),
        }

    @contextlib.contextmanager
    def running(self, *args: str, **popen: Any) -> Iterator[subprocess.Popen[str]]:
        """A command that runs until it is stopped (forward, expose, receive): SIGINT at the
        end of the block, as Ctrl-C, then SIGKILL if it lingers."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        process = subprocess.Popen(
            [*self.prefix, sys.executable, *WORKER_ARGV, *args],
            cwd=popen.pop("cwd", REPO),
            env=self.command_env(),
            text=True,
            **popen,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)

    def status(self) -> dict[str, Any]:
        return json.loads(self.command("status", "--json").stdout)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class Lines:
    """The lines a running command prints, read as they come (wait on them, not on a clock)."""

    def __init__(self, stream: Any) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def until(self, text: str, timeout: float = 30) -> str:
        """The first line from now on that holds `text`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"no line with {text!r} after {timeout}s: {self.seen}"
                ) from None
            if line is None:
                self._queue.put(None)
                raise AssertionError(f"the command ended before a line with {text!r}: {self.seen}")
            self.seen.append(line)
            if text in line:
                return line
