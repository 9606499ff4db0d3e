"""Commands to live connections, from the admin or the command line.

A disconnect is recorded first, then delivered through the channel layer to whichever consumer
(on whichever instance) holds the socket. If the message cannot arrive (the in-memory layer of
another process, Redis away), the holding instance still closes the socket at its next
housekeeping round, because its row is closed (`services.reconcile_instance`).
"""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync

from registry import protocol, selectors, services
from registry.runtime import DISCONNECT, InstanceRuntime

log = logging.getLogger("registry.control")


def disconnect_worker(worker_id: str) -> bool:
    """End `worker_id`'s session (code 4001). False if it is not connected."""
    target = selectors.current_channel(worker_id)
    if target is None:
        return False
    connection_id, channel_name = target
    code = protocol.CloseCode.DISCONNECTED_BY_OPERATOR
    services.close_connection(
        connection_id=connection_id, code=code, reason=protocol.CLOSE_REASONS[code]
    )
    try:
        async_to_sync(InstanceRuntime.send_command)(channel_name, DISCONNECT, connection_id)
    except Exception as exc:  # the row is closed; housekeeping closes the socket
        log.warning(
            "worker=%s connection=%s disconnect not delivered: %s", worker_id, connection_id, exc
        )
    log.info("worker=%s connection=%s disconnected by an operator", worker_id, connection_id)
    return True
