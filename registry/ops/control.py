"""Commands to live connections, from the admin or the command line.

A disconnect is recorded first, then delivered through the channel layer to whichever consumer
(on whichever instance) holds the socket. If the message cannot arrive (the in-memory layer of
another process, Redis away), the holding instance still closes the socket at its next
housekeeping round, because its row is closed (`presence/instances.py: reconcile_instance`).
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync

from registry.core import protocol
from registry.presence import selectors, sessions
from registry.presence.runtime import COMMAND_CLOSE_CODES, InstanceRuntime
from registry.security import bans

log = logging.getLogger("registry.control")


def disconnect_worker(
    worker_id: str, code: protocol.CloseCode = protocol.CloseCode.DISCONNECTED_BY_OPERATOR
) -> bool:
    """End `worker_id`'s session (code 4001, or 4011 for a disabled worker). False if it is
    not connected."""
    target = selectors.current_channel(worker_id)
    if target is None:
        return False
    connection_id, channel_name = target
    sessions.close_connection(
        connection_id=connection_id, code=code, reason=protocol.CLOSE_REASONS[code]
    )
    try:
        command = next(name for name, value in COMMAND_CLOSE_CODES.items() if value == code)
        async_to_sync(InstanceRuntime.send_command)(channel_name, command, connection_id)
    except Exception as exc:  # the row is closed; housekeeping closes the socket
        log.warning(
            "worker=%s connection=%s disconnect not delivered: %s", worker_id, connection_id, exc
        )
    log.info(
        "worker=%s connection=%s disconnected by an operator (code %s)",
        worker_id,
        connection_id,
        int(code),
    )
    return True


def disable_and_disconnect(worker_ids: list[str], *, reason: str = "") -> list[str]:
    """Ban the ids (every mode: security/bans.py) and close their live sessions with 4011.
    Returns those newly disabled."""
    disabled = bans.mark_disabled(worker_ids, reason=reason)
    for worker_id in disabled:
        disconnect_worker(worker_id, protocol.CloseCode.WORKER_DISABLED)
        log.warning(
            "worker=%s disabled by an operator%s", worker_id, f": {reason}" if reason else ""
        )
    return disabled
