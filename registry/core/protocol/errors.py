"""The error codes of `error` frames, and the exception for each kind of refused frame: raised
where the problem is found, turned into the `error` frame in one place (the consumer)."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_JSON = "INVALID_JSON"
    NOT_AN_OBJECT = "NOT_AN_OBJECT"
    MISSING_TYPE = "MISSING_TYPE"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    MISSING_FIELD = "MISSING_FIELD"
    INVALID_IP = "INVALID_IP"
    INVALID_FIELD = "INVALID_FIELD"
    FRAME_TOO_LARGE = "FRAME_TOO_LARGE"
    RATE_LIMITED = "RATE_LIMITED"
    UNAVAILABLE = "UNAVAILABLE"
    # Binary relay frames (docs/protocol.md, "The service relay").
    RELAY_NOT_INTRODUCED = "RELAY_NOT_INTRODUCED"
    RELAY_MALFORMED = "RELAY_MALFORMED"
    RELAY_FRAME_TOO_LARGE = "RELAY_FRAME_TOO_LARGE"
    RELAY_RATE_LIMITED = "RELAY_RATE_LIMITED"
    RELAY_OFF = "RELAY_OFF"  # the introduction said relay: false (RENDEZVOUS_RELAY off)


class ProtocolError(Exception):
    """A frame the service refuses. The connection stays open; the sender gets an error frame."""

    code: ErrorCode = ErrorCode.INVALID_FIELD

    def __init__(self, message: str, *, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message


class InvalidJson(ProtocolError):
    code = ErrorCode.INVALID_JSON


class NotAnObject(ProtocolError):
    code = ErrorCode.NOT_AN_OBJECT


class MissingType(ProtocolError):
    code = ErrorCode.MISSING_TYPE


class UnknownType(ProtocolError):
    code = ErrorCode.UNKNOWN_TYPE


class MissingField(ProtocolError):
    code = ErrorCode.MISSING_FIELD


class InvalidIp(ProtocolError):
    code = ErrorCode.INVALID_IP


class InvalidField(ProtocolError):
    code = ErrorCode.INVALID_FIELD


class FrameTooLarge(ProtocolError):
    code = ErrorCode.FRAME_TOO_LARGE


class RateLimited(ProtocolError):
    code = ErrorCode.RATE_LIMITED


class Unavailable(ProtocolError):
    """The frame was valid but the registry could not record it now; send it again later."""

    code = ErrorCode.UNAVAILABLE


class RelayError(ProtocolError):
    """A relay frame the service dropped; the error names the introduction it was for."""

    def __init__(self, message: str, *, code: ErrorCode, introduction_id: str | None) -> None:
        super().__init__(message, code=code)
        self.introduction_id = introduction_id
