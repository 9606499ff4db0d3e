"""Why a peer connection did not come about, or ended. Importable without the `p2p` extra."""

from __future__ import annotations


class PeerError(Exception):
    """A connection to a peer that did not come about, or that ended; the message says why.

    `code` is the service's `connect_failed` code when the service refused, else None.
    """

    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class PeerUnavailable(PeerError):
    """The peer is not connected to the service (or is disabled, or went offline)."""


class PeerRefused(PeerError):
    """The peer does not accept connections (no `on_peer`, busy, or its agent said no)."""


class PolicyDenied(PeerRefused):
    """The service's peer policy does not let this worker reach that one (`POLICY_DENIED`)."""


class PeerUnresponsive(PeerUnavailable):
    """The peer is registered but its agent did not answer the introduction in time."""


class NoPath(PeerError):
    """Introduced, but no route carried data: the relay was refused and no ICE pair worked."""


class PeerClosed(PeerError):
    """The connection ended: closed by either side, or every route to the peer was lost."""


class IdentityMismatch(PeerError):
    """The peer did not prove the identity it was introduced with (another certificate, or
    none): the connection is refused, whichever side noticed."""

    code = "IDENTITY_MISMATCH"


class HandshakeFailed(PeerError):
    code = "HANDSHAKE_FAILED"


class StreamReset(PeerError):
    """The peer reset the stream: what it had not yet sent never will be."""

    code = "STREAM_RESET"


class P2PUnavailable(PeerError):
    """This agent was installed without the `p2p` extra (aioice)."""


MISSING_EXTRA = (
    "peer connections need the agent's p2p extra: "
    "pip install 'rendezvous-worker-agent[p2p]' (it adds aioice)"
)
