"""What each control request does: thin, over the agent's Python API and its peer API. Each
handler answers with events and leaves the final reply to `reply_*` here or to the server
(which turns a raised failure into the coded reply).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..peerapi.exposure import format_endpoint, parse_endpoint
from ..peerapi.peer_api import DIRECT_KINDS, PeerApi
from ..peerapi.receiving import Inbox
from ..peerapi.splice import splice
from . import protocol
from .session import FramedEnd, Session

if TYPE_CHECKING:
    from ..agent import WorkerAgent

Handler = Callable[["WorkerAgent", Session, dict[str, Any]], None]
WAIT_STEP = 0.5  # seconds between checks that a waiting command is still there


def status(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    nat = agent.peers.last_nat_report
    described = agent.peer_api.describe() if agent.peer_api else {}
    session.reply(
        protocol.ok(
            worker={**agent.status(), "nat": nat.as_dict() if nat else None},
            connections=agent.peer_connections(),
            **described,
        )
    )


def peers(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    session.reply(protocol.ok(peers=agent.list_peers(offline=True)))


def netcheck(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    peer = request.get("peer")
    session.reply(protocol.ok(report=agent.netcheck(peer_id=str(peer) if peer else None)))


def ping(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    peer, api = _peer(request), _peer_api(agent)
    until_direct = bool(request.get("until_direct"))
    session.watch()
    sent = answered = direct = 0
    for event in api.ping(
        peer,
        count=_number(request, "count", 4, int),
        interval=_number(request, "interval", 1.0, float),
        until_direct=until_direct,
        stop=session.gone,
    ):
        session.event(event)
        sent += 1
        if event["event"] == "pong":
            answered += 1
            direct += event["kind"] in DIRECT_KINDS
    if not answered:
        session.reply(protocol.failed("NO_ANSWER", f"no pong from {peer} in {sent} pings"))
    elif until_direct and not direct:
        message = f"{peer} answered, but not over a direct path within {sent} pings"
        session.reply(protocol.failed("NOT_DIRECT", message, sent=sent, answered=answered))
    else:
        session.reply(protocol.ok(sent=sent, answered=answered))


def forward(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    peer, api = _peer(request), _peer_api(agent)
    target = parse_endpoint(str(request.get("target")))
    bind = parse_endpoint(str(request.get("bind")))
    opened = api.forward(peer, target, bind, _teller(session))
    try:
        session.event(
            {
                "event": "listening",
                "address": format_endpoint(opened.address),
                "peer": peer,
                "target": format_endpoint(target),
            }
        )
        session.watch()
        session.gone.wait()
    finally:
        opened.stop()


def expose(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    api = _peer_api(agent)
    target = parse_endpoint(str(request.get("target")))
    handle = api.expose(target)
    try:
        session.event({"event": "exposed", "target": format_endpoint(target)})
        session.watch()
        session.gone.wait()
    finally:
        api.withdraw(handle)


def pipe(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    peer, api = _peer(request), _peer_api(agent)
    with api.pipe(peer) as stream:
        session.event({"event": "connected", "peer": peer})
        done = splice(FramedEnd(session), stream)
    _reply_spliced(session, done.error, sent=done.sent, received=done.received)


def pipe_accept(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    api = _peer_api(agent)
    from_peer = request.get("from")
    listener = api.listen_pipe(str(from_peer) if from_peer else None)
    try:
        session.event({"event": "waiting", "from": from_peer})
        while (asked := listener.wait(WAIT_STEP)) is None:
            if not session.still_there():
                return
        asked.accept()
        session.event({"event": "connected", "peer": asked.peer_id})
        done = splice(FramedEnd(session), asked.stream)
        _reply_spliced(session, done.error, sent=done.sent, received=done.received)
    finally:
        api.pipes.withdraw(listener)


def send(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    peer, api = _peer(request), _peer_api(agent)
    paths = request.get("paths")
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise protocol.ControlError("BAD_REQUEST", "send needs at least one path")
    session.watch()
    try:
        outcome = api.send(peer, paths, _teller(session), cancelled=session.gone)
    except FileNotFoundError as exc:
        raise protocol.ControlError(
            "NOT_FOUND", f"{exc.filename}: no such file or folder"
        ) from None
    failed = outcome.failed
    if failed:
        first = failed[0]
        message = f"{len(failed)} of {len(outcome.files)} files failed; {first['name']}: "
        session.reply(protocol.failed(first["code"], message + first["error"], **outcome.as_dict()))
    else:
        session.reply(protocol.ok(**outcome.as_dict()))


def receive(agent: WorkerAgent, session: Session, request: dict[str, Any]) -> None:
    api = _peer_api(agent)
    root = Path(str(request.get("dir")))
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise protocol.ControlError("NOT_FOUND", f"{root}: {exc.strerror or exc}") from None
    from_peer = request.get("from")
    inbox = Inbox(
        root,
        from_peer=str(from_peer) if from_peer else None,
        overwrite=bool(request.get("overwrite")),
        event=_teller(session),
    )
    api.receive(inbox)
    try:
        session.event({"event": "waiting", "dir": str(root), "from": from_peer})
        session.watch()
        while not inbox.finished.wait(WAIT_STEP):
            if session.gone.is_set():
                return
    finally:
        api.stop_receiving(inbox)
    outcome = dict(inbox.outcome or {})
    if outcome.pop("ok", False):
        session.reply(protocol.ok(**outcome))
    else:
        code, error = str(outcome.pop("code", "INTERRUPTED")), str(outcome.pop("error", ""))
        session.reply(protocol.failed(code, error, **outcome))


HANDLERS: dict[str, Handler] = {
    "status": status,
    "peers": peers,
    "netcheck": netcheck,
    "ping": ping,
    "forward": forward,
    "expose": expose,
    "pipe": pipe,
    "pipe_accept": pipe_accept,
    "send": send,
    "receive": receive,
}


def _peer_api(agent: WorkerAgent) -> PeerApi:
    if agent.peer_api is None:
        raise protocol.ControlError(
            "NO_PEER_API", "this agent was started without the peer API (peer_api=False)"
        )
    return agent.peer_api


def _peer(request: dict[str, Any]) -> str:
    peer = request.get("peer")
    if not isinstance(peer, str) or not peer:
        raise protocol.ControlError("BAD_REQUEST", "which peer?")
    return peer


def _number(request: dict[str, Any], name: str, default: Any, kind: type) -> Any:
    value = request.get(name, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise protocol.ControlError("BAD_REQUEST", f"{name} must be a number") from None
    if number <= 0:
        raise protocol.ControlError("BAD_REQUEST", f"{name} must be above 0")
    return number


def _teller(session: Session) -> Callable[[dict[str, Any]], None]:
    """Events to the command; one that went away misses them (what it started goes on)."""

    def tell(message: dict[str, Any]) -> None:
        try:
            session.event(message)
        except OSError:
            session.gone.set()

    return tell


def _reply_spliced(session: Session, error: str | None, **counts: int) -> None:
    if error is None:
        session.reply(protocol.ok(**counts))
    else:
        session.reply(protocol.failed("INTERRUPTED", error, **counts))
