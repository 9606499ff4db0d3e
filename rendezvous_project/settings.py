"""Settings, all from the environment; every variable is in the README's configuration table.

With nothing set the service runs on its own: SQLite under `var/` and the in-memory channel layer.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from registry.core.addresses import parse_networks
from registry.ops.logs import log_stream

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else float(value)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else int(value)


DATA_DIR = Path(os.environ.get("RENDEZVOUS_DATA_DIR") or BASE_DIR / "var")


def _local_secret_key() -> str:
    """A key kept beside the local database, so sessions survive restarts of `make run`."""
    path = DATA_DIR / "secret_key"
    if path.exists():
        return path.read_text().strip()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process started at the same moment and won
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key


SECRET_KEY_FROM_ENVIRONMENT = bool(os.environ.get("SECRET_KEY"))
SECRET_KEY = os.environ.get("SECRET_KEY") or _local_secret_key()
DEBUG = env_bool("DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])
CSRF_FAILURE_VIEW = "registry.ops.views.csrf_failure"  # errors are JSON, never HTML pages

# Where `manage.py serve` binds daphne.
HOST = os.environ.get("HOST") or "127.0.0.1"
PORT = env_int("PORT", 8000)

INSTALLED_APPS = [
    # registry first: its `runworker` (the worker agent) wins over channels' and delegates to it.
    "registry",
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "rendezvous_project.urls"
ASGI_APPLICATION = "rendezvous_project.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{DATA_DIR / 'rendezvous.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the admin read while consumers write; IMMEDIATE avoids lock-upgrade deadlocks.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # On disk, not in memory: the daphne processes the end-to-end tests start must share it.
    # One per test process, so two test runs on one checkout cannot clobber each other's.
    DATABASES["default"]["TEST"] = {
        "NAME": str(DATA_DIR / f"test-rendezvous-{os.getpid()}.sqlite3")
    }
    DATA_DIR.mkdir(parents=True, exist_ok=True)
else:
    # Fail fast when the database is unreachable instead of waiting out TCP's own timeout.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("connect_timeout", 5)
    DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}

REDIS_URL = os.environ.get("REDIS_URL") or ""


REDIS_MAX_CONNECTIONS = env_int("RENDEZVOUS_REDIS_MAX_CONNECTIONS", 1000)


def redis_hosts(url: str) -> list[dict[str, object]]:
    # The socket timeout must outlast channels-redis's 5 s blocking pop: with redis-py's shorter
    # one every idle receive failed with a TimeoutError (and could lose a message popped just then).
    # redis-py 8 caps a pool at 100 connections and fails the 101st command at once ("Too many
    # connections"): a burst of supersedes or peer events needs more.
    return [
        {
            "address": url,
            "socket_timeout": 15,
            "socket_connect_timeout": 5,
            "max_connections": REDIS_MAX_CONNECTIONS,
        }
    ]


CHANNEL_CAPACITY = env_int("RENDEZVOUS_CHANNEL_CAPACITY", 1000)
# Each instance has one command channel for all of its connections (registry/presence/runtime.py).
INSTANCE_CHANNEL_CAPACITY = {"rendezvous.instance.*": max(CHANNEL_CAPACITY, 100_000)}
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "registry.ops.layers.RedisChannelLayer",
            "CONFIG": {
                "hosts": redis_hosts(REDIS_URL),
                "capacity": CHANNEL_CAPACITY,
                "channel_capacity": INSTANCE_CHANNEL_CAPACITY,
                "expiry": 60,
                "prefix": os.environ.get("RENDEZVOUS_REDIS_PREFIX") or "rendezvous",
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "registry.ops.layers.InMemoryChannelLayer",
            "CONFIG": {
                "capacity": CHANNEL_CAPACITY,
                "channel_capacity": INSTANCE_CHANNEL_CAPACITY,
                "expiry": 60,
            },
        }
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"

# ---- Rendezvous ---------------------------------------------------------------------------------
SECURITY_MODE = (
    (os.environ.get("RENDEZVOUS_SECURITY_MODE") or ("open" if DEBUG else "secured")).strip().lower()
)
if SECURITY_MODE not in {"open", "secured"}:
    raise ImproperlyConfigured(
        f"RENDEZVOUS_SECURITY_MODE must be 'open' or 'secured', not {SECURITY_MODE!r}"
    )

PEER_POLICY = (os.environ.get("RENDEZVOUS_PEER_POLICY") or "allow-all").strip().lower()
if PEER_POLICY not in {"allow-all", "rules"}:
    raise ImproperlyConfigured(
        f"RENDEZVOUS_PEER_POLICY must be 'allow-all' or 'rules', not {PEER_POLICY!r}"
    )

RENDEZVOUS = {
    # This process's name in the registry; a restart under the same name closes what it left open.
    "INSTANCE_NAME": os.environ.get("RENDEZVOUS_INSTANCE_NAME") or f"{socket.gethostname()}:{PORT}",
    # Seconds between the application heartbeats the service asks of agents (sent in `welcome`).
    "HEARTBEAT_INTERVAL": env_float("RENDEZVOUS_HEARTBEAT_INTERVAL", 30.0),
    # Seconds between an instance's housekeeping rounds: its own heartbeat, last_seen, sweeps.
    "HOUSEKEEPING_INTERVAL": env_float("RENDEZVOUS_HOUSEKEEPING_INTERVAL", 5.0),
    # An instance silent this long is dead; its sessions are closed by any live instance.
    "INSTANCE_DEAD_AFTER": env_float("RENDEZVOUS_INSTANCE_DEAD_AFTER", 30.0),
    "MAX_FRAME_BYTES": env_int("RENDEZVOUS_MAX_FRAME_BYTES", 4096),
    # Per connection: a token bucket of RATE_BURST messages refilled at RATE_LIMIT per second.
    "RATE_LIMIT": env_float("RENDEZVOUS_RATE_LIMIT", 10.0),
    "RATE_BURST": env_int("RENDEZVOUS_RATE_BURST", 30),
    # Messages dropped for the rate limit before the connection is closed (code 4029).
    "RATE_LIMIT_CLOSE_AFTER": env_int("RENDEZVOUS_RATE_LIMIT_CLOSE_AFTER", 100),
    # Seconds daphne keeps a WebSocket open at most; agents reconnect when it ends.
    "WEBSOCKET_TIMEOUT": env_int("RENDEZVOUS_WEBSOCKET_TIMEOUT", 86400),
    # Pending TCP connections the listening socket queues (the kernel caps it at somaxconn).
    # Twisted's default, 50, drops SYNs in a burst of handshakes and clients retry after 1 s.
    "LISTEN_BACKLOG": env_int("RENDEZVOUS_LISTEN_BACKLOG", 2048),
    "PING_INTERVAL": env_int("RENDEZVOUS_PING_INTERVAL", 20),
    "PING_TIMEOUT": env_int("RENDEZVOUS_PING_TIMEOUT", 30),
    # daphne's access log: a line per HTTP request and two per WebSocket. The service logs its own
    # line per registration and close, so this is off unless asked for.
    "ACCESS_LOG": env_bool("RENDEZVOUS_ACCESS_LOG", False),
    # Start the housekeeping thread with the ASGI application (tests call it directly instead).
    "HOUSEKEEPING": env_bool("RENDEZVOUS_HOUSEKEEPING", True),
    "API_PAGE_SIZE": env_int("RENDEZVOUS_API_PAGE_SIZE", 100),
    # Connection limits (registry/presence/admission.py); 0 = none. Per-address limits are off by
    # default: fleets behind one NAT share an address.
    "MAX_CONNECTIONS": env_int("RENDEZVOUS_MAX_CONNECTIONS", 20000),
    "MAX_CONNECTIONS_PER_ADDRESS": env_int("RENDEZVOUS_MAX_CONNECTIONS_PER_ADDRESS", 0),
    "HANDSHAKE_RATE_PER_ADDRESS": env_float("RENDEZVOUS_HANDSHAKE_RATE_PER_ADDRESS", 0.0),
    # Proxies whose X-Forwarded-For is believed (CIDRs); anyone else's header is ignored.
    "TRUSTED_PROXIES": parse_networks(env_list("RENDEZVOUS_TRUSTED_PROXIES", [])),
    # Browser origins allowed to open a worker WebSocket besides the service's own hosts.
    "ALLOWED_ORIGINS": env_list("RENDEZVOUS_ALLOWED_ORIGINS", []),
    "API_MAX_PAGE_SIZE": 1000,
    # `open`: anyone may register any id and read the registry (the proof of concept's
    # behaviour, for trying it out); `secured`: enrolment keys and per-worker credentials,
    # protected JSON views (docs/security.md). Secured unless DEBUG is on.
    "SECURITY_MODE": SECURITY_MODE,
    # Failed authentications per source address per minute before its handshakes are refused.
    "AUTH_FAILURES_PER_MINUTE": env_int("RENDEZVOUS_AUTH_FAILURES_PER_MINUTE", 20),
    # STUN servers (host:port) the service tells agents to use, e.g. its own `manage.py runstun`
    # on two addresses; at least two at different addresses classify a NAT.
    "STUN_SERVERS": env_list("RENDEZVOUS_STUN_SERVERS", []),
    # The service relay (registry/peering/relay.py): per worker connection, introduced peers at
    # once, and what it may send through the relay (bytes and frames per second, bursts of a
    # second).
    # Off: the service carries no peer traffic; pairs connect over UDP (direct, LAN or TURN).
    "RELAY": env_bool("RENDEZVOUS_RELAY", True),
    # Hard-NAT ("birthday") probing for pairs where exactly one NAT maps endpoint-dependently:
    # up to a few hundred UDP datagrams per introduction (registry/peering/probing.py).
    "HARD_NAT_PROBING": env_bool("RENDEZVOUS_HARD_NAT_PROBING", False),
    "RELAY_MAX_PEERS": env_int("RENDEZVOUS_RELAY_MAX_PEERS", 64),
    # Seconds an accepted introduction may go unused (no relay frame, ICE candidates or path
    # report from either side) before it is ended for both (peer_closed UNUSED).
    "UNUSED_INTRODUCTION_TIMEOUT": env_float("RENDEZVOUS_UNUSED_INTRODUCTION_TIMEOUT", 10.0),
    "RELAY_BYTES_PER_SECOND": env_float("RENDEZVOUS_RELAY_BYTES_PER_SECOND", 32 * 1024 * 1024),
    "RELAY_FRAMES_PER_SECOND": env_float("RENDEZVOUS_RELAY_FRAMES_PER_SECOND", 5000.0),
    # TURN servers (coturn, host:port, UDP) and the shared secret of coturn's TURN REST API
    # (--use-auth-secret --static-auth-secret): the service mints credentials per introduction,
    # valid for TURN_TTL seconds; agents never see the secret (registry/core/turn.py).
    "TURN_SERVERS": env_list("RENDEZVOUS_TURN_SERVERS", []),
    "TURN_SECRET": os.environ.get("RENDEZVOUS_TURN_SECRET") or "",
    "TURN_TTL": env_float("RENDEZVOUS_TURN_TTL", 3600.0),
    # Seconds an ephemeral worker stays in the registry after it went offline.
    "EPHEMERAL_AFTER": env_float("RENDEZVOUS_EPHEMERAL_AFTER", 1800.0),
    # Who may reach whom (registry/core/peer_policy.py, docs/peer-policy.md): `allow-all` (any
    # worker may ask for any other) or `rules` (only what an enabled peer rule allows).
    "PEER_POLICY": PEER_POLICY,
    # Days the records of ended peer connections are kept (housekeeping deletes older ones).
    "PEER_CONNECTION_RETENTION_DAYS": env_float("RENDEZVOUS_PEER_CONNECTION_RETENTION_DAYS", 30.0),
}

LOG_LEVEL = os.environ.get("LOG_LEVEL") or "INFO"
# `text`: one plain line per event; `json`: one JSON object per line (Cloud Logging's format).
LOG_FORMAT = (os.environ.get("LOG_FORMAT") or "text").strip().lower()
if LOG_FORMAT not in {"text", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be 'text' or 'json', not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "registry.ops.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            # stdout for the servers, stderr for other management commands (registry/ops/logs.py).
            "stream": log_stream(sys.argv),
            "formatter": LOG_FORMAT,
        }
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.channels.server": {"level": "WARNING"},
    },
}
