"""`python -m worker_agent` / `rendezvous-worker`: with no command, the agent of this machine,
configured from the proof-of-concept worker's environment (read the same way, with the same exit
status 1 when the service URL is missing), serving the peer API to peers and its control socket
to the commands (`ping`, `status`, `netcheck`, `peers`, `forward`, `expose`, `pipe`, `send`,
`receive`: `commands.py`), which talk to it rather than becoming agents themselves.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from . import commands
from .version import __version__

if TYPE_CHECKING:  # the agent's parts load only when it runs: a command starts in a blink
    from .agents import AgentGroup
    from .control.server import ControlServer

DEFAULT_PORT = 8080
DEFAULT_HEALTH_HOST = "0.0.0.0"

logger = logging.getLogger("worker_agent")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Config:
    service_url: str
    worker_id: str | None
    ping_interval: float
    ping_timeout: float
    ip_echo_url: str
    port: int
    health_host: str
    log_level: str
    enrolment_key: str | None = None
    credential_file: str | None = None
    expose: tuple[str, ...] = ()
    inbox: str | None = None
    control: bool = True  # serve the control socket (RENDEZVOUS_CONTROL_SOCKET=off: not)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Config:
        from .options import DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT
        from .service.public_ip import DEFAULT_IP_ECHO_URL

        service_url = environ.get("RENDEZVOUS_SERVICE_URL", "").strip()
        if not service_url:
            raise ConfigError(
                "RENDEZVOUS_SERVICE_URL is not set: give the Rendezvous service base URL, "
                "e.g. RENDEZVOUS_SERVICE_URL=https://rendezvous.example.com"
            )
        ip_echo_url = environ.get("IP_ECHO_URL")
        return cls(
            service_url=service_url,
            worker_id=environ.get("WORKER_ID", "").strip() or None,
            ping_interval=_number(environ, "PING_INTERVAL_SEC", DEFAULT_PING_INTERVAL),
            ping_timeout=_number(environ, "PING_TIMEOUT_SEC", DEFAULT_PING_TIMEOUT),
            # Unset means the default service; set and empty means "do not ask".
            ip_echo_url=DEFAULT_IP_ECHO_URL if ip_echo_url is None else ip_echo_url.strip(),
            port=_port(environ),
            health_host=environ.get("HEALTH_HOST", "").strip() or DEFAULT_HEALTH_HOST,
            log_level=environ.get("LOG_LEVEL", "").strip().upper() or "INFO",
            enrolment_key=environ.get("RENDEZVOUS_ENROLMENT_KEY", "").strip() or None,
            credential_file=environ.get("RENDEZVOUS_CREDENTIAL_FILE", "").strip() or None,
            expose=tuple(_exposures(environ)),
            inbox=_inbox(environ),
            control=environ.get("RENDEZVOUS_CONTROL_SOCKET", "").strip().lower() != "off",
        )


def _number(environ: Mapping[str, str], name: str, default: float) -> float:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a number of seconds") from None
    if value < 0:
        raise ConfigError(f"{name}={text!r} must not be negative")
    return value


def _exposures(environ: Mapping[str, str]) -> list[str]:
    from .peerapi.exposure import parse_exposures

    try:
        return parse_exposures(environ.get("RENDEZVOUS_EXPOSE", ""))
    except ValueError as exc:
        raise ConfigError(f"RENDEZVOUS_EXPOSE: {exc}") from None


def _inbox(environ: Mapping[str, str]) -> str | None:
    text = environ.get("RENDEZVOUS_INBOX", "").strip()
    if text and not os.path.isdir(text):
        raise ConfigError(f"RENDEZVOUS_INBOX={text!r} is not a folder")
    return os.path.abspath(text) if text else None


def _port(environ: Mapping[str, str]) -> int:
    text = environ.get("PORT", "").strip()
    if not text:
        return DEFAULT_PORT
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"PORT={text!r} is not a TCP port number (0-65535)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rendezvous-worker",
        description=(
            "With no command: run this machine's agent, which keeps the worker registered with "
            "a Rendezvous service and serves the commands below. Configured from the "
            "environment: RENDEZVOUS_SERVICE_URL (required), WORKER_ID, PING_INTERVAL_SEC, "
            "PING_TIMEOUT_SEC, IP_ECHO_URL, PORT, HEALTH_HOST, LOG_LEVEL, "
            "RENDEZVOUS_ENROLMENT_KEY, RENDEZVOUS_CREDENTIAL_FILE, RENDEZVOUS_CONTROL_SOCKET, "
            "RENDEZVOUS_EXPOSE, RENDEZVOUS_INBOX. The commands talk to the running agent."
        ),
    )
    parser.add_argument(
        "--count",
        type=int,
        default=1,
        help="run this many agents in one process (ids WORKER_ID-1..N when WORKER_ID is set)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands.add_parsers(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def main(
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    stop_event: threading.Event | None = None,
) -> int:
    """Exit status: 0 after SIGTERM / SIGINT (or `stop_event`), 1 on bad configuration or when
    the service refused every worker id."""
    args = _parser().parse_args(argv)
    env = os.environ if environ is None else environ
    if args.command is not None:
        return commands.run(args, env, sys.stdout, sys.stderr)
    try:
        config = Config.from_environ(env)
        group = _group(config, args.count)
    except ValueError as exc:  # ConfigError, and the agent's own URL and id checks
        print(f"rendezvous-worker: {exc}", file=sys.stderr, flush=True)
        return 1

    from .control.socketfile import SocketFileError

    configure_logging(config.log_level)
    try:  # first: a second agent on this socket must not reach the service at all
        servers = _control_servers(group, config, env)
    except SocketFileError as exc:
        print(f"rendezvous-worker: {exc}", file=sys.stderr, flush=True)
        return 1
    return _run(group, servers, config, stop_event or threading.Event())


def _run(
    group: AgentGroup, servers: list[ControlServer], config: Config, stop_event: threading.Event
) -> int:
    received: list[str] = []
    restore = stop_on_signals(stop_event, received)
    try:
        try:
            group.start()
        except OSError as exc:
            print(
                f"rendezvous-worker: cannot serve the health check on "
                f"{config.health_host}:{config.port}: {exc}",
                file=sys.stderr,
                flush=True,
            )
            return 1
        logger.info(
            "rendezvous-worker %s: %d agent(s) for %s, health on %s:%s",
            __version__,
            len(group.agents),
            config.service_url,
            config.health_host,
            group.health.port if group.health else "-",
        )
        ended = group.wait(stop_event)
        if received:
            logger.info("received %s, stopping", received[0])
    finally:
        for server in servers:
            server.stop()  # commands still running hear that the agent stops
        group.stop()
        restore()
    if ended == "refused":
        logger.error("the service refused every worker id; exiting")
        return 1
    return 0


def _group(config: Config, count: int) -> AgentGroup:
    """Every agent the configuration asks for, built (and so checked) before any starts."""
    from .agents import AgentGroup

    if count < 1:
        raise ConfigError("--count must be at least 1")
    return AgentGroup(
        config.service_url,
        count,
        _worker_ids(config.worker_id, count),
        health_host=config.health_host,
        health_port=config.port,
        ping_interval=config.ping_interval,
        ping_timeout=config.ping_timeout,
        ip_echo_url=config.ip_echo_url,
        enrolment_key=config.enrolment_key,
        credential_file=config.credential_file,
        peer_api=True,
        expose=config.expose,
        inbox=config.inbox,
    )


def _control_servers(
    group: AgentGroup, config: Config, environ: Mapping[str, str]
) -> list[ControlServer]:
    """One control socket per agent (numbered as the credential files are), unless off."""
    from .control.server import ControlServer
    from .control.socketfile import default_path

    servers: list[ControlServer] = []
    if not config.control:
        return servers
    try:
        for index, agent in enumerate(group.agents):
            server = ControlServer(agent, default_path(environ, index))
            server.start()
            servers.append(server)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _worker_ids(worker_id: str | None, count: int) -> list[str] | None:
    if worker_id is None:
        return None
    if count == 1:
        return [worker_id]
    return [f"{worker_id}-{n}" for n in range(1, count + 1)]


def configure_logging(level: str) -> None:
    """One line per event on stdout; every record is flushed as it is written."""
    logging.basicConfig(
        stream=sys.stdout,
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("worker_agent").setLevel(getattr(logging, level, logging.INFO))
    # websocket-client logs every ordinary disconnect as an ERROR ("... - goodbye"); the agent
    # logs the same events once, with the worker id, so keep the library quiet unless debugging.
    logging.getLogger("websocket").setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
    # aioice logs every ICE connectivity check at INFO; the agent logs each path change once.
    logging.getLogger("aioice").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)
    logging.getLogger("quic").setLevel(logging.DEBUG if level == "DEBUG" else logging.WARNING)


def stop_on_signals(
    stop_event: threading.Event, received: list[str] | None = None
) -> Callable[[], None]:
    """SIGTERM / SIGINT set the stop event (the main thread then closes with code 1000).

    Returns a function that puts the previous handlers back. Off the main thread it does nothing.
    """
    received = [] if received is None else received

    def handle(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop_event.set()

    previous: dict[int, Any] = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handle)
    except ValueError:  # not the main thread (tests): the caller stops us through the event
        pass

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
