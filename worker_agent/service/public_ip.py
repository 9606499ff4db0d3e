"""The worker's public address, as an IP echo service (plain-text body) sees it.

Behind NAT the address the server observes may be a proxy's; the echo service sees the egress.
Failure is normal here (no network, echo service down): it is logged and answered with None.
"""

from __future__ import annotations

import ipaddress
import logging
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from ..version import __version__

DEFAULT_IP_ECHO_URL = "https://api.ipify.org"
DEFAULT_TIMEOUT = 5.0
# The longest IPv6 literal is 45 characters; anything much longer is not an address.
_MAX_BODY_BYTES = 128

logger = logging.getLogger("worker_agent")


def fetch_public_ip(
    url: str | None = DEFAULT_IP_ECHO_URL, *, timeout: float = DEFAULT_TIMEOUT
) -> str | None:
    """The canonical text of the address the echo service reports, or None. Never raises."""
    if not url:
        logger.debug("public ip: no IP echo URL configured, skipping")
        return None
    try:
        return _fetch(url, timeout)
    except _Unusable as exc:
        logger.warning("public ip: %s from %s", exc, url)
    except urllib.error.HTTPError as exc:
        logger.warning("public ip: %s answered HTTP %s", url, exc.code)
    except urllib.error.URLError as exc:
        logger.warning("public ip: cannot reach %s: %s", url, exc.reason)
    except TimeoutError:
        logger.warning("public ip: %s did not answer within %ss", url, timeout)
    except Exception as exc:  # the contract is "never raise": a worker must carry on without it
        logger.warning("public ip: fetching %s failed: %r", url, exc)
    return None


class _Unusable(Exception):
    pass


def _fetch(url: str, timeout: float) -> str:
    if urlsplit(url).scheme.lower() not in {"http", "https"}:
        raise _Unusable("the IP echo URL must be http or https")
    request = urllib.request.Request(
        url,
        headers={
            "Accept": "text/plain",
            "User-Agent": f"rendezvous-worker-agent/{__version__}",
        },
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body = response.read(_MAX_BODY_BYTES + 1)
    if len(body) > _MAX_BODY_BYTES:
        raise _Unusable("the answer is too long to be an address")
    try:
        text = body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise _Unusable("the answer is not plain text") from None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise _Unusable(f"the answer {text[:64]!r} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise _Unusable("the answer carries an IPv6 zone")
    return address.compressed
