"""The commands of `rendezvous-worker` besides running the agent: each a thin function that
asks the running agent over its control socket (`control.client`) and prints what it answers
(`render`). A command never becomes an agent itself: with none running it says so and exits 1.

Exit status: 0 when the command did what it was asked, 1 with `rendezvous-worker: <why> (CODE)`
on standard error otherwise, 130 after Ctrl-C (0 for `forward` and `expose`, which run until it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from . import render
from .control import protocol
from .control.client import Exchange
from .control.protocol import ControlError
from .control.socketfile import default_path
from .peerapi.exposure import format_endpoint, parse_endpoint
from .peerapi.files import human

Command = Callable[[argparse.Namespace, Path, TextIO], int]
PIPE_READ = 256 * 1024


def add_parsers(commands: Any) -> None:
    """The subcommands, on `argparse`'s subparsers object."""
    ping = commands.add_parser("ping", help="round trips to a peer, with the path each took")
    ping.add_argument("peer")
    ping.add_argument(
        "--count", "-c", type=int, default=None, help="pings (4; 30 with --until-direct)"
    )
    ping.add_argument("--interval", "-i", type=float, default=1.0, help="seconds between pings")
    ping.add_argument("--until-direct", action="store_true", help="until a pong comes direct")
    for name, text in (
        ("status", "this worker and its open peer connections"),
        ("peers", "the workers this one may reach, online or not"),
    ):
        commands.add_parser(name, help=text).add_argument("--json", action="store_true")
    netcheck = commands.add_parser("netcheck", help="what this network lets the agent do")
    netcheck.add_argument("--json", action="store_true")
    netcheck.add_argument("--peer", help="also try a TURN allocation, with an introduction to it")
    forward = commands.add_parser("forward", help="a local TCP port to a port a peer exposed")
    forward.add_argument("local", metavar="[BIND:]LOCAL_PORT")
    forward.add_argument("remote", metavar="PEER:[HOST:]PORT")
    expose = commands.add_parser("expose", help="let peers forward to a port, until Ctrl-C")
    expose.add_argument("target", metavar="[HOST:]PORT")
    pipe = commands.add_parser("pipe", help="standard input to a peer's standard output, and back")
    pipe.add_argument("peer", nargs="?")
    pipe.add_argument("--accept", action="store_true", help="wait for a peer's pipe")
    pipe.add_argument("--from", dest="from_peer", help="with --accept: only from this peer")
    send = commands.add_parser("send", help="files and folders to a peer, checked, resumable")
    send.add_argument("peer")
    send.add_argument("paths", nargs="+", metavar="PATH")
    receive = commands.add_parser("receive", help="take one transfer of files from a peer")
    receive.add_argument("--dir", default=".", help="where the files go (the current folder)")
    receive.add_argument("--from", dest="from_peer", help="only from this peer")
    receive.add_argument(
        "--overwrite", action="store_true", help="replace files with other contents"
    )


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    path = default_path(environ)
    try:
        return COMMANDS[args.command](args, path, out)
    except ControlError as exc:
        print(f"rendezvous-worker: {exc}{_hint(exc)} ({exc.code})", file=err, flush=True)
        return 1
    except ValueError as exc:
        print(f"rendezvous-worker {args.command}: {exc}", file=err, flush=True)
        return 1
    except KeyboardInterrupt:
        if args.command in ("forward", "expose"):
            return 0
        if args.command == "send":
            print("rendezvous-worker: cancelled; send again to resume", file=err, flush=True)
        return 130


def _hint(exc: ControlError) -> str:
    files = getattr(exc, "reply", {}).get("files")
    if exc.code == "INTERRUPTED" and files is not None and "resume" not in str(exc):
        return "; run the same command again to resume"
    return ""


def ping(args: argparse.Namespace, path: Path, out: TextIO) -> int:
    count = args.count or (30 if args.until_direct else 4)
    with Exchange(
        path, "ping", peer=args.peer, count=count, interval=args.interval,
        until_direct=args.until_direct,
    ) as exchange:  # fmt: skip
        for event in exchange.events():
            print(render.pong(event), file=out, flush=True)
        exchange.checked()
    return 0


def _reply_command(op: str, show: Callable[[dict[str, Any]], list[str]]) -> Command:
    def command(args: argparse.Namespace, path: Path, out: TextIO) -> int:
        arguments = {"peer": args.peer} if getattr(args, "peer", None) else {}
        with Exchange(path, op, arguments) as exchange:
            reply = exchange.result()
        if args.json:
            reply.pop("ok", None)
            json.dump(reply, out, indent=2)
            out.write("\n")
        else:
            out.write("\n".join(show(reply)) + "\n")
        return 0

    return command


def forward(args: argparse.Namespace, path: Path, out: TextIO) -> int:
    bind = parse_endpoint(args.local)
    peer, colon, target_text = args.remote.partition(":")
    if not colon or not peer:
        raise ValueError(f"{args.remote!r}: expected PEER:[HOST:]PORT")
    target = parse_endpoint(target_text)
    request = {"peer": peer, "target": format_endpoint(target), "bind": format_endpoint(bind)}
    with Exchange(path, "forward", request) as exchange:
        for event in exchange.events():
            print(_forward_line(event), file=out, flush=True)
        exchange.checked()
    return 0


def _forward_line(event: dict[str, Any]) -> str:
    kind = event["event"]
    if kind == "listening":
        return (
            f"forwarding {event['address']} -> {event['peer']} {event['target']} (Ctrl-C to stop)"
        )
    if kind == "opened":
        return f"connection from {event['from']}: open ({event['open']} now)"
    if kind == "closed":
        broke = f"; {event['error']}" if event.get("error") else ""
        return (
            f"connection from {event['from']}: closed, {human(event['sent'])} sent, "
            f"{human(event['received'])} received{broke}"
        )
    return f"connection from {event['from']}: refused: {event['error']} ({event['code']})"


def expose(args: argparse.Namespace, path: Path, out: TextIO) -> int:
    target = format_endpoint(parse_endpoint(args.target))
    with Exchange(path, "expose", target=target) as exchange:
        for event in exchange.events():
            print(f"exposing {event['target']} to peers (Ctrl-C to stop)", file=out, flush=True)
        exchange.checked()
    return 0


def pipe(args: argparse.Namespace, path: Path, out: TextIO) -> int:
    if args.accept == bool(args.peer):
        raise ValueError("give a PEER to pipe to, or --accept to wait for one")
    if args.accept:
        exchange = Exchange(
            path, "pipe_accept", **({"from": args.from_peer} if args.from_peer else {})
        )
    else:
        exchange = Exchange(path, "pipe", peer=args.peer)
    with exchange:
        for event in exchange.events():
            if event["event"] == "waiting":
                who = event.get("from") or "any peer"
                print(f"waiting for a pipe from {who}", file=sys.stderr, flush=True)
            if event["event"] == "connected":
                return _pipe_bytes(exchange)
        exchange.checked()
    return 1


def _pipe_bytes(exchange: Exchange, stdin: int = 0, stdout: int = 1) -> int:
    """Standard input out in frames, the peer's bytes to standard output, until both ended.
    A terminal on standard input is read only when standard output is a terminal too (a
    conversation); `pipe --accept | tar x` typed at a terminal only receives."""
    read_input = not (os.isatty(stdin) and not os.isatty(stdout))

    def pump() -> None:
        try:
            if read_input:
                while data := os.read(stdin, PIPE_READ):
                    exchange.send_frame(protocol.DATA, data)
            exchange.send_frame(protocol.END)
        except OSError:
            pass  # the agent went away: the reply (or its absence) says so

    threading.Thread(target=pump, daemon=True).start()
    while True:
        kind, payload = exchange.read_frame()
        if kind == protocol.DATA:
            view = memoryview(payload)
            while view:
                view = view[os.write(stdout, view) :]
        elif kind == protocol.END:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stdout)  # the reader of our output sees its end now
            os.close(devnull)
        elif kind == protocol.REPLY:
            exchange.final = json.loads(payload)
            exchange.checked()
            return 0


def send(args: argparse.Namespace, path: Path, out: TextIO) -> int:
    paths = [os.path.abspath(p) for p in args.paths]
    with Exchange(path, "send", peer=args.peer, paths=paths) as exchange:
        _transfer(exchange, out, "sent")
        reply = exchange.checked()
    done = [f for f in reply["files"] if f["ok"]]
    print(
        f"sent {_files(len(done))} ({human(reply['total'])}; {human(reply['sent'])} over the wire) "
        f"to {args.peer} in {reply['seconds']:.1f} s, SHA-256 checked",
        file=out,
        flush=True,
    )
    return 0


def receive(args: argparse.Namespace, path: Path, out: TextIO) -> int:
    folder = os.path.abspath(args.dir)
    request: dict[str, Any] = {"dir": folder, "overwrite": args.overwrite}
    if args.from_peer:
        request["from"] = args.from_peer
    with Exchange(path, "receive", request) as exchange:
        _transfer(exchange, out, "received")
        reply = exchange.checked()
    files = [f for f in reply["files"] if f["ok"]]
    print(f"received {_files(len(files))} from {reply['peer']} into {folder}", file=out, flush=True)
    return 0


def _transfer(exchange: Exchange, out: TextIO, verb: str) -> None:
    """Show a transfer's events: a progress bar on a terminal, a line per file otherwise."""
    progress: render.Progress | None = None
    for event in exchange.events():
        kind = event["event"]
        if kind == "waiting":
            source = f" from {event['from']}" if event.get("from") else ""
            print(
                f"waiting for files{source} in {event['dir']} (Ctrl-C to stop)",
                file=out,
                flush=True,
            )
        elif kind in ("sending", "receiving"):
            progress = render.Progress(
                out, event.get("total", event.get("bytes", 0)), terminal=out.isatty()
            )
            if kind == "receiving":
                size = human(event["bytes"])
                line = f"receiving {_files(event['files'])} ({size}) from {event['peer']}"
                print(line, file=out, flush=True)
        elif kind == "progress" and progress is not None:
            progress.update(event.get("done", event.get("bytes", 0)))
        elif progress is not None:
            progress.say(_file_line(event, verb))
        else:
            print(_file_line(event, verb), file=out, flush=True)


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _file_line(event: dict[str, Any], verb: str) -> str:
    kind, name = event["event"], event.get("name", event.get("path"))
    if kind == "file":
        start = f", resuming at {human(event['start'])}" if event.get("start") else ""
        return f"{name} ({human(event['size'])}{start})"
    if kind == "done":
        return f"{verb} {name}, SHA-256 checked"
    if kind == "unchanged":
        return f"{name}: the peer has it already"
    if kind == "skipped":
        return f"skipped {name}: {event['reason']}"
    kept = f"; {human(event['kept'])} kept for resume" if event.get("kept") else ""
    return f"{name}: {event.get('error')} ({event.get('code')}){kept}"


COMMANDS: dict[str, Command] = {
    "ping": ping,
    "status": _reply_command("status", render.status),
    "peers": _reply_command("peers", render.peers),
    "netcheck": _reply_command("netcheck", lambda reply: render.netcheck(reply["report"])),
    "forward": forward,
    "expose": expose,
    "pipe": pipe,
    "send": send,
    "receive": receive,
}
