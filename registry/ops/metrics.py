"""Prometheus metrics: what this process sees (counters and gauges on the hot path, one `inc`
each) and what the registry holds (read from the database when `/metrics` is scraped).

Process metrics carry an `instance_name` label (`RENDEZVOUS_INSTANCE_NAME`), not `instance`,
which Prometheus sets itself to the scrape target. With `PROMETHEUS_MULTIPROC_DIR` set before
the process starts, prometheus-client keeps the values in files in that directory and `/metrics`
adds up every process writing there (docs/operations.md).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Iterator

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from registry.core import protocol
from registry.peering import records
from registry.presence import selectors

log = logging.getLogger("registry.metrics")

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
# The text format every Prometheus version reads (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

CONNECTED = Gauge(
    "rendezvous_connected_workers",
    "Worker sockets held by this server instance.",
    ["instance_name"],
    multiprocess_mode="livesum",
)
REGISTRATIONS = Counter(
    "rendezvous_registrations",
    "Connections registered by this server instance.",
    ["instance_name"],
)
CLOSES = Counter(
    "rendezvous_closes",
    "Connections closed on this server instance, by close code (docs/protocol.md).",
    ["instance_name", "code"],
)
PROTOCOL_ERRORS = Counter(
    "rendezvous_protocol_errors",
    "Error frames sent to workers, by error code (docs/protocol.md).",
    ["instance_name", "code"],
)
AUTHENTICATION_REFUSALS = Counter(
    "rendezvous_authentication_refusals",
    "Handshakes refused for a missing, wrong or unusable credential or key, or a disabled worker.",
    ["instance_name", "code"],
)
API_REFUSALS = Counter(
    "rendezvous_api_refusals",
    "Requests to protected JSON views refused for want of a staff session or API token.",
    ["instance_name"],
)
INTRODUCTIONS = Counter(
    "rendezvous_introductions",
    "Introductions between workers, by outcome (introduced, or the connect_failed code).",
    ["instance_name", "outcome"],
)
PEER_PATHS = Counter(
    "rendezvous_peer_paths",
    "Paths peer connections came up on or moved to, as the agents reported them, by kind.",
    ["instance_name", "kind"],
)
PEER_LINKS = Gauge(
    "rendezvous_peer_links",
    "Introduced peer pairs whose relay and signalling this instance carries (one per side).",
    ["instance_name"],
    multiprocess_mode="livesum",
)
RELAYED_BYTES = Counter(
    "rendezvous_relay_bytes",
    "Bytes of relay frames forwarded between workers (headers included).",
    ["instance_name"],
)
RELAYED_FRAMES = Counter(
    "rendezvous_relay_frames",
    "Relay frames forwarded between workers.",
    ["instance_name"],
)
RELAY_DROPPED = Counter(
    "rendezvous_relay_dropped",
    "Relay frames not delivered, by reason (docs/protocol.md, the service relay).",
    ["instance_name", "reason"],
)
TURN_CREDENTIALS = Counter(
    "rendezvous_turn_credentials",
    "TURN credentials minted for introduced workers.",
    ["instance_name"],
)
MESSAGES_RECEIVED = Counter(
    "rendezvous_messages_received",
    "Frames received from workers (before the rate limit).",
    ["instance_name"],
)
MESSAGES_DROPPED = Counter(
    "rendezvous_messages_dropped",
    "Text frames from workers dropped unanswered, by reason: over the rate limit (rate_limited),"
    " or arriving once the service had begun to close the connection (closing).",
    ["instance_name", "reason"],
)
MESSAGES_SENT = Counter(
    "rendezvous_messages_sent",
    "Frames sent to workers.",
    ["instance_name"],
)
REPORTS = Counter(
    "rendezvous_reports",
    "Reports from workers (public_ip, agent_info, nat_report), by whether they were stored or"
    " ignored (sent by a connection that was no longer the worker's current one).",
    ["instance_name", "kind", "outcome"],
)
SENDS_AFTER_CLOSE = Counter(
    "rendezvous_sends_after_close",
    "Frames dropped because the worker's socket closed while they were on their way.",
    ["instance_name"],
)
UNUSED_INTRODUCTIONS = Counter(
    "rendezvous_unused_introductions",
    "Introductions ended because neither worker sent anything on them in time"
    " (RENDEZVOUS_UNUSED_INTRODUCTION_TIMEOUT), counted on the target's instance.",
    ["instance_name"],
)
POLICY_ERRORS = Counter(
    "rendezvous_policy_errors",
    "Peer policy decisions that could not be made (refused, never allowed), and stored rules that"
    " could not be read (skipped).",
    ["instance_name"],
)
POLICY_RELOADS = Counter(
    "rendezvous_policy_reloads",
    "Times this instance read the peer policy's rules again after a change.",
    ["instance_name"],
)
POLICY_LINKS_ENDED = Counter(
    "rendezvous_policy_links_ended",
    "Peer links (and the relaying for them) this instance ended because a rule change no longer"
    " allows the pair.",
    ["instance_name"],
)
HEARTBEAT_INTERVAL = Histogram(
    "rendezvous_heartbeat_interval_seconds",
    "Time between two application heartbeats on one connection, as the service saw them.",
    ["instance_name"],
    buckets=(1, 5, 10, 20, 30, 35, 40, 45, 60, 90, 120, 300, 600),
)

if MULTIPROCESS:
    # `livesum` gauges count only processes that are alive; tell the library when we are not.
    atexit.register(multiprocess.mark_process_dead, os.getpid())


def _instance() -> str:
    return settings.RENDEZVOUS["INSTANCE_NAME"]


# ---- hooks, one call per event ------------------------------------------------------------------


def socket_attached() -> None:
    CONNECTED.labels(_instance()).inc()


def socket_detached() -> None:
    CONNECTED.labels(_instance()).dec()


def registered() -> None:
    REGISTRATIONS.labels(_instance()).inc()


# Close codes that get a label of their own; anything a client invents is counted as "other",
# so a misbehaving client cannot create thousands of series.
_KNOWN_CLOSE_CODES = {1000, 1001, 1006, *(int(c) for c in protocol.CloseCode)}


def closed(code: int | None) -> None:
    code = code or 1006
    CLOSES.labels(_instance(), str(code) if code in _KNOWN_CLOSE_CODES else "other").inc()


def protocol_error(code: str) -> None:
    PROTOCOL_ERRORS.labels(_instance(), str(code)).inc()


def authentication_refused(code: int) -> None:
    AUTHENTICATION_REFUSALS.labels(_instance(), str(int(code))).inc()


def api_refused() -> None:
    API_REFUSALS.labels(_instance()).inc()


def introduction(failure: str | None) -> None:
    INTRODUCTIONS.labels(_instance(), str(failure) if failure else "introduced").inc()


def peer_path(kind: str) -> None:
    PEER_PATHS.labels(_instance(), kind).inc()


def peer_link_opened() -> None:
    PEER_LINKS.labels(_instance()).inc()


def peer_link_closed() -> None:
    PEER_LINKS.labels(_instance()).dec()


def relayed(size: int) -> None:
    instance = _instance()
    RELAYED_BYTES.labels(instance).inc(size)
    RELAYED_FRAMES.labels(instance).inc()


def relay_dropped(reason: str) -> None:
    RELAY_DROPPED.labels(_instance(), reason).inc()


def unused_introduction() -> None:
    UNUSED_INTRODUCTIONS.labels(_instance()).inc()


def turn_credentials(count: int) -> None:
    TURN_CREDENTIALS.labels(_instance()).inc(count)


def message_received() -> None:
    MESSAGES_RECEIVED.labels(_instance()).inc()


def message_dropped(reason: str) -> None:
    MESSAGES_DROPPED.labels(_instance(), reason).inc()


def message_sent() -> None:
    MESSAGES_SENT.labels(_instance()).inc()


def report(kind: str, stored: bool) -> None:
    REPORTS.labels(_instance(), kind, "stored" if stored else "ignored").inc()


def policy_error() -> None:
    POLICY_ERRORS.labels(_instance()).inc()


def policy_reloaded() -> None:
    POLICY_RELOADS.labels(_instance()).inc()


def policy_link_ended() -> None:
    POLICY_LINKS_ENDED.labels(_instance()).inc()


def send_after_close() -> None:
    SENDS_AFTER_CLOSE.labels(_instance()).inc()


def heartbeat(previous: float | None) -> float:
    """Observe the time since the connection's previous heartbeat; returns this one's time."""
    now = time.monotonic()
    if previous is not None:
        HEARTBEAT_INTERVAL.labels(_instance()).observe(now - previous)
    return now


# ---- the registry, read at scrape time ----------------------------------------------------------


class RegistryCollector(Collector):
    """Registry-wide numbers from the database: the same on every instance (aggregate with max)."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "rendezvous_registry_up", "1 if the registry could be read for this scrape."
        )
        try:
            counts = selectors.worker_counts_by_status()
            running = selectors.running_instances()
            by_path = {
                **{str(kind): 0 for kind in protocol.PathKind},
                records.PATH_PENDING: 0,
                **records.peer_connections_by_path(),
            }
        except DatabaseError as exc:
            log.warning("metrics: registry not readable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        workers = GaugeMetricFamily(
            "rendezvous_registry_workers", "Workers in the registry, by status.", labels=["status"]
        )
        for status, count in counts.items():
            workers.add_metric([status], count)
        yield workers
        now = timezone.now()
        age = GaugeMetricFamily(
            "rendezvous_registry_instance_heartbeat_age_seconds",
            "Seconds since each running server instance last heartbeat its registry row.",
            labels=["instance_name", "instance_id"],
        )
        for instance_id, name, heartbeat_at in running:
            age.add_metric([name, instance_id], (now - heartbeat_at).total_seconds())
        yield age
        paths = GaugeMetricFamily(
            "rendezvous_registry_peer_connections",
            "Open peer connections, by the route their data takes now (pending: none reported).",
            labels=["path_kind"],
        )
        for kind, count in by_path.items():
            paths.add_metric([kind], count)
        yield paths


def render() -> bytes:
    """The text exposition: this process (or every process in multiprocess mode) + the registry."""
    if MULTIPROCESS:
        processes = CollectorRegistry()
        multiprocess.MultiProcessCollector(processes)
        body = generate_latest(processes)
    else:
        body = generate_latest(REGISTRY)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(RegistryCollector())
    return body + generate_latest(registry)
