"""Why the peer API refused or failed: one small exception class per kind, each with its code.

A refusal travels on the stream it refuses (`header.refuse`) and is raised again from its code
on the other side (`from_reply`), so both agents and the command line say the same thing. The
codes are the command line's too: `rendezvous-worker` prints them and exits 1.
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    NoPath,
    P2PUnavailable,
    PeerClosed,
    PeerError,
    StreamReset,
)


class PeerApiError(PeerError):
    """A refusal or failure of the peer API, with its code."""

    code = "REFUSED"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, code=code or type(self).code)


class BadRequest(PeerApiError):
    """A header or a message that is not what the protocol says."""

    code = "BAD_REQUEST"


class UnsupportedVersion(PeerApiError):
    code = "UNSUPPORTED_VERSION"


class NotServed(PeerApiError):
    """The peer's agent does not serve this (its host program takes the connections itself,
    the kind is unknown to it, or the stream went against the introduction's direction)."""

    code = "NOT_SERVED"


class NotExposed(PeerApiError):
    """A forward to a host and port the peer's operator did not expose."""

    code = "NOT_EXPOSED"


class TargetUnreachable(PeerApiError):
    """The peer could not connect to the exposed host and port."""

    code = "TARGET_UNREACHABLE"


class PortInUse(PeerApiError):
    code = "PORT_IN_USE"


class NoListener(PeerApiError):
    """A pipe to a peer where no `pipe --accept` waits (for this worker)."""

    code = "NO_LISTENER"


class NotReceiving(PeerApiError):
    """Files offered to a peer that has no `receive` running and no inbox."""

    code = "NOT_RECEIVING"


class BadName(PeerApiError):
    """A file name that would leave the receiving directory, or is not a name at all."""

    code = "BAD_NAME"


class Exists(PeerApiError):
    """A file the receiver already has, with other contents, and no `--overwrite`."""

    code = "EXISTS"


class NoSpace(PeerApiError):
    code = "NO_SPACE"


class FileChanged(PeerApiError):
    """A file that vanished, shrank or could not be read while it was being sent."""

    code = "FILE_CHANGED"


class ChecksumMismatch(PeerApiError):
    code = "CHECKSUM_MISMATCH"


class WriteFailed(PeerApiError):
    """The receiver could not write (permissions, a read-only disk)."""

    code = "WRITE_FAILED"


class Interrupted(PeerApiError):
    """The stream or the connection ended before the exchange did."""

    code = "INTERRUPTED"


_KINDS: dict[str, type[PeerApiError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnsupportedVersion,
        NotServed,
        NotExposed,
        TargetUnreachable,
        PortInUse,
        NoListener,
        NotReceiving,
        BadName,
        Exists,
        NoSpace,
        FileChanged,
        ChecksumMismatch,
        WriteFailed,
        Interrupted,
    )
}


def from_reply(reply: dict[str, Any], peer_id: str) -> PeerApiError:
    """The exception a peer's coded refusal stands for, saying it was the peer's."""
    code = str(reply.get("code") or "REFUSED")
    reason = str(reply.get("reason") or "refused")
    return _KINDS.get(code, PeerApiError)(f"{peer_id} refused: {reason}", code=code)


def code_of(exc: BaseException) -> str:
    """The code a failure is reported under (the service's, the peer API's, or its kind's)."""
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code:
        return code
    if isinstance(exc, NoPath):
        return "NO_PATH"
    if isinstance(exc, P2PUnavailable):
        return "P2P_UNAVAILABLE"
    if isinstance(exc, StreamReset | PeerClosed):
        return "INTERRUPTED"
    if isinstance(exc, TimeoutError):
        return "TIMEOUT"
    return "PEER_ERROR"
