"""Conntrack entries deleted through ctnetlink, for the NAT tests: these kernels come without
the `conntrack` tool (/work/shared/nat-testing.md). Run inside the namespace whose table it is:

    python -m tests.support.conntrack delete-udp 10.0.1.2    # prints how many were deleted
"""

from __future__ import annotations

import argparse
import socket

from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple


def delete_udp(source: str) -> int:
    """Delete every UDP entry whose original direction comes from `source`."""
    deleted = 0
    with Conntrack() as table:
        wanted = NFCTAttrTuple(saddr=source, proto=socket.IPPROTO_UDP)
        for entry in list(table.dump_entries(tuple_orig=wanted)):
            table.delete(entry)
            deleted += 1
    return deleted


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.conntrack")
    parser.add_argument("command", choices=["delete-udp"])
    parser.add_argument("source")
    args = parser.parse_args()
    print(delete_udp(args.source))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
