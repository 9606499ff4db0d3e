"""Commands to live connections, delivered through the channel layer to whichever consumer
(on whichever instance) holds the socket."""

from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from registry import selectors

log = logging.getLogger("registry.control")


def disconnect_worker(worker_id: str) -> bool:
    """Ask the consumer holding `worker_id` to close (code 4001). False if it is not connected."""
    target = selectors.current_channel(worker_id)
    if target is None:
        return False
    connection_id, channel_name = target
    async_to_sync(get_channel_layer().send)(
        channel_name, {"type": "worker.disconnect", "connection_id": connection_id}
    )
    log.info("worker=%s connection=%s disconnect requested", worker_id, connection_id)
    return True
