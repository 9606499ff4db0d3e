"""Delay for the packets of one network namespace, where the kernel has no netem: an NFQUEUE
reader that hands each queued packet back (NF_ACCEPT) a fixed time after it arrived.

    ip netns exec NAT python -m tests.support.impair --queue 0 --delay-ms 20

with an iptables rule in the same namespace sending packets to the queue, e.g.
`iptables -t mangle -A FORWARD -p udp -j NFQUEUE --queue-num 0 --queue-bypass` (bypass: while no
reader is bound, packets pass). It speaks ctnetlink's queue protocol directly over a netlink
socket (the messages of linux/netfilter/nfnetlink_queue.h): no library needed. Only packet ids
are copied to user space, so the cost per packet is one message in and one out; thousands of
packets a second are fine, which is what a lossy, delayed path carries.
"""

from __future__ import annotations

import argparse
import heapq
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian: packed separately)


def _attribute(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attributes: bytes, seq: int = 0) -> bytes:
    body = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack("!H", queue) + attributes
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind,
                            NLM_F_REQUEST, seq, 0)  # fmt: skip
    return header + body


def bind(sock: socket.socket, queue: int) -> None:
    """Bind the socket to `queue`, asking for packet metadata only (the id)."""
    command = struct.pack("=BBH", NFQNL_CFG_CMD_BIND, 0, socket.htons(socket.AF_INET))
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attribute(NFQA_CFG_CMD, command), seq=1))
    params = struct.pack("!IB", 0, NFQNL_COPY_META) + b"\0\0\0"
    sock.send(_message(NFQNL_MSG_CONFIG, queue, _attribute(NFQA_CFG_PARAMS, params), seq=2))


def packet_ids(data: bytes) -> list[int]:
    """The ids of the queued packets in one netlink read (errors are ignored: acks)."""
    ids: list[int] = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            position = offset + _NLMSGHDR.size + _NFGENMSG.size
            while position + 4 <= offset + length:
                size, attribute = struct.unpack_from("=HH", data, position)
                if size < 4:
                    break
                if attribute & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, position + 4)[0])
                position += size + (-size % 4)
        offset += length + (-length % 4)
    return ids


def verdict(queue: int, packet_id: int) -> bytes:
    return _message(
        NFQNL_MSG_VERDICT,
        queue,
        _attribute(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id)),
    )


def run(queue: int, delay: float) -> None:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sock.bind((0, 0))
    bind(sock, queue)
    print(f"delaying queue {queue} by {delay * 1000:g} ms", flush=True)
    due: list[tuple[float, int]] = []
    while True:
        timeout = max(0.0, due[0][0] - time.monotonic()) if due else None
        readable, _, _ = select.select([sock], [], [], timeout)
        now = time.monotonic()
        if readable:
            for packet_id in packet_ids(sock.recv(1 << 16)):
                heapq.heappush(due, (now + delay, packet_id))
        while due and due[0][0] <= now:
            _, packet_id = heapq.heappop(due)
            sock.send(verdict(queue, packet_id))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.impair")
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    try:
        run(args.queue, args.delay_ms / 1000)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
