"""daphne's WebSocket server (autobahn), with one fix over upstream.

autobahn builds a pretty-printed dump of ~50 configuration attributes for a DEBUG log line on
every new connection, whether or not DEBUG is logged (`WebSocketProtocol._connectionMade`), a
cost that shows while thousands of workers register (docs/performance.md). Here the dump is made
only when the line is written, with the same text.
"""

from __future__ import annotations

import pprint
from typing import Any


class LazyPformat:
    """`pprint.pformat(value)`, computed when the object is turned into text."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __str__(self) -> str:
        return pprint.pformat(self.value)


def _timings_text(timings: Any) -> str:
    return pprint.pformat(timings._timings)  # `Timings.__str__`, which must return text


def install() -> bool:
    """Make autobahn's per-connection dump lazy. False if autobahn is not there to patch."""
    try:
        from autobahn.websocket import protocol
    except ImportError:
        return False
    if getattr(protocol, "pformat", None) is not pprint.pformat:
        return protocol.pformat is LazyPformat  # already installed, or changed upstream
    protocol.pformat = LazyPformat
    protocol.Timings.__str__ = _timings_text
    return True
