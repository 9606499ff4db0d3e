"""Is a TURN server there, and does it grant this host an allocation? For `netcheck`.

Reachability needs no credentials: an Allocate request without them is answered 401 with the
server's realm and a nonce by any TURN server (RFC 8656, 7.2), which proves the address, the
UDP path to it and that a TURN server answers there. An allocation needs credentials, which the
service mints per introduction only (`registry/core/turn.py`): the caller passes an
introduction's, when it has one, and the allocation is deleted at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aioice import stun, turn

from .netcheck import DEFAULT_TIMEOUT, RETRANSMISSIONS, Endpoint, StunClient

UDP_TRANSPORT = 0x11000000  # REQUESTED-TRANSPORT: UDP (RFC 8656, 14.7)


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str


@dataclass(frozen=True)
class TurnCheck:
    server: Endpoint
    reachable: bool
    reachable_ms: float | None = None
    error: str | None = None
    allocated: bool | None = None  # None: not tried (no credentials)
    relayed: Endpoint | None = None
    allocate_ms: float | None = None
    allocate_error: str | None = None


async def reachable(server: Endpoint, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, float, str]:
    """(answered as a TURN server, milliseconds, what it said)."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    transport, client = await loop.create_datagram_endpoint(StunClient, remote_addr=server)
    request = stun.Message(message_method=stun.Method.ALLOCATE, message_class=stun.Class.REQUEST)
    request.attributes["REQUESTED-TRANSPORT"] = UDP_TRANSPORT
    transaction = stun.Transaction(request, server, client, RETRANSMISSIONS)
    client.transactions[request.transaction_id] = transaction
    try:
        await asyncio.wait_for(transaction.run(), timeout)
    except stun.TransactionFailed as exc:
        elapsed = 1000 * (time.monotonic() - started)
        attributes = exc.response.attributes
        code = attributes.get("ERROR-CODE", (0, ""))[0]
        if code == 401 and "REALM" in attributes and "NONCE" in attributes:
            return True, elapsed, f"asks for credentials (realm {attributes['REALM']})"
        return False, elapsed, f"answered {code} {attributes.get('ERROR-CODE', ('', ''))[1]}"
    except (TimeoutError, stun.TransactionError, OSError) as exc:
        return False, 1000 * (time.monotonic() - started), str(exc) or "no answer"
    finally:
        transport.close()
    return False, 1000 * (time.monotonic() - started), "allocated without credentials"


async def allocate(
    server: Endpoint, credentials: Credentials, timeout: float = DEFAULT_TIMEOUT
) -> tuple[Endpoint, float]:
    """An allocation with these credentials, deleted at once: its relayed address and the
    milliseconds it took. Raises (ConnectionError, TransactionError, TimeoutError) otherwise."""
    started = time.monotonic()
    relay, _ = await asyncio.wait_for(
        turn.create_turn_endpoint(
            asyncio.DatagramProtocol,
            server_addr=server,
            username=credentials.username,
            password=credentials.password,
            lifetime=60,
        ),
        timeout,
    )
    elapsed = 1000 * (time.monotonic() - started)
    relayed = relay.get_extra_info("sockname")
    relay.close()
    return (relayed[0], relayed[1]), elapsed


async def check(
    server: Endpoint, credentials: Credentials | None, timeout: float = DEFAULT_TIMEOUT
) -> TurnCheck:
    answered, elapsed, said = await reachable(server, timeout)
    if not answered:
        return TurnCheck(server, False, round(elapsed, 2), said)
    if credentials is None:
        return TurnCheck(server, True, round(elapsed, 2), said)
    try:
        relayed, took = await allocate(server, credentials, timeout)
    except (ConnectionError, stun.TransactionError, TimeoutError, OSError) as exc:
        return TurnCheck(
            server, True, round(elapsed, 2), said, allocated=False,
            allocate_error=str(exc) or type(exc).__name__,
        )  # fmt: skip
    return TurnCheck(
        server, True, round(elapsed, 2), said, allocated=True, relayed=relayed,
        allocate_ms=round(took, 2),
    )  # fmt: skip
