"""Log lines: every event names its worker, connection and instance; `LOG_FORMAT=json` writes
them as JSON lines for Cloud Logging and other pipelines.

Only the standard library here: `settings.LOGGING` loads this module before Django's apps are ready.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, MutableMapping, Sequence
from datetime import UTC, datetime
from typing import Any

# The ids as the service's messages write them (`worker=w1 connection=42 instance=ab12...`).
# The management commands that are servers: they log on stdout, as a container's main process
# does. Every other command prints its result there (a key, a token, a listing), so it logs on
# stderr and `KEY=$(python manage.py create_enrolment_key ...)` captures the key alone.
SERVER_COMMANDS = frozenset({"serve", "runstun"})


def log_stream(argv: Sequence[str]) -> str:
    """The stream log lines go to in a process started as `argv` (a `logging` config string)."""
    command = argv[1] if len(argv) > 1 else ""
    if argv and argv[0].endswith("manage.py") and command not in SERVER_COMMANDS:
        return "ext://sys.stderr"
    return "ext://sys.stdout"  # daphne, `manage.py serve`, `runstun`, the test runner


_ID = re.compile(r"(?<![\w.])(worker|connection|instance)=([^\s,;()'\"]+)")
_FIELDS = {"worker": "worker_id", "connection": "connection_id", "instance": "instance_id"}


def event_ids(record: logging.LogRecord, message: str) -> dict[str, Any]:
    """The worker, connection and instance ids of a record: from `extra=` or else its message."""
    ids: dict[str, Any] = {}
    for key, value in _ID.findall(message):
        ids.setdefault(_FIELDS[key], value)
    for field in _FIELDS.values():
        value = getattr(record, field, None)
        if value is not None:
            ids[field] = value
    connection_id = ids.get("connection_id")
    if isinstance(connection_id, str) and connection_id.isascii() and connection_id.isdigit():
        ids["connection_id"] = int(ids["connection_id"])
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `time`, `severity`, `logger`, `message` and the event's ids.

    `severity` and `time` are the keys Google Cloud Logging reads from a container's stdout; a
    traceback stays inside `message`, where Error Reporting looks for it.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if record.stack_info:
            message = f"{message}\n{self.formatStack(record.stack_info)}"
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "severity": record.levelname,
            "logger": record.name,
            "message": message,
            **event_ids(record, message),
        }
        return json.dumps(entry, default=str, ensure_ascii=False)


class InstanceLogAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes `instance=<id>` to every message (and sets `instance_id` for JSON lines).

    The id is asked for at each call: an instance that was declared dead comes back as a new one.
    """

    def __init__(self, logger: logging.Logger, instance_id: Callable[[], str]) -> None:
        super().__init__(logger, {})
        self._instance_id = instance_id

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        instance_id = self._instance_id()
        kwargs["extra"] = {**(kwargs.get("extra") or {}), "instance_id": instance_id}
        return f"instance={instance_id} {msg}", kwargs
