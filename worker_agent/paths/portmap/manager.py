"""`PortMapper`: which of NAT-PMP, PCP and UPnP IGD the default gateway speaks, and the UDP
mappings the agent holds through it.

Probed when the agent starts and again when the gateway or the agent's address changes (checked
before each mapping): the three at once, a few hundred milliseconds at most, the first that
answered in the order NAT-PMP, PCP, UPnP taken (as Tailscale's portmapper). A mapping is made for
one ICE attempt's socket: aioice binds fresh sockets for every attempt, so there is no one agent
port to map; each mapping is renewed at half its lifetime while its attempt lives and deleted
when the attempt ends or the agent stops. A gateway that fails, answers garbage or maps another
internal port gives no mapping: it is logged, and ICE goes on with the candidates it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from .exchange import SERVER_PORT, PortMapError
from .natpmp import NatPmpClient
from .pcp import PcpClient

logger = logging.getLogger("worker_agent.portmap")

PROBE_TIMEOUT = 0.5
PROBE_WAIT = 0.25  # how long an ICE attempt waits for a probe under way before going without
MAP_TIMEOUT = 0.5
RELEASE_TIMEOUT = 0.5
LIFETIME = 600  # seconds asked for; a crashed agent's mappings go within ten minutes
PREFERENCE = ("nat-pmp", "pcp", "upnp")

Endpoint = tuple[str, int]


@dataclass
class Mapping:
    """One UDP port mapping the gateway made for a local socket."""

    protocol: str
    internal: Endpoint
    external: Endpoint
    lifetime: int
    made_at: float = field(default_factory=time.monotonic)
    renewal: asyncio.Task[None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "internal": f"{self.internal[0]}:{self.internal[1]}",
            "external": f"{self.external[0]}:{self.external[1]}",
            "lifetime": self.lifetime,
        }


def default_gateway() -> str | None:
    """The IPv4 default route's gateway (Linux: /proc/net/route), or None."""
    try:
        with open("/proc/net/route") as table:
            next(table, None)
            for line in table:
                fields = line.split()
                if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 2:
                    return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))
    except (OSError, ValueError):
        return None
    return None


def source_address(gateway: str) -> str | None:
    """The local address packets to the gateway leave from (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((gateway, SERVER_PORT))
        except OSError:
            return None
        return probe.getsockname()[0]


class PortMapper:
    """The agent's port mappings, on the peer loop. `enabled=False`: never a packet sent."""

    def __init__(self, *, enabled: bool = True, gateway: str | None = None) -> None:
        self.enabled = enabled
        self._fixed_gateway = gateway
        self.gateway: str | None = None
        self.local: str | None = None
        self.client: Any = None  # the protocol's client that answered the probe
        self.external_ip: str | None = None
        self.probe_error: str | None = None
        self.probed_at: float | None = None
        self.mappings: dict[int, Mapping] = {}
        self.last_mapping: Mapping | None = None
        self._probing: asyncio.Task[None] | None = None

    @property
    def protocol(self) -> str | None:
        return None if self.client is None else self.client.protocol

    async def probe(self) -> str | None:
        """Ask the gateway for all three at once; the protocol that will map, or None."""
        if not self.enabled:
            return None
        if self._probing is None or self._probing.done():
            self._probing = asyncio.get_running_loop().create_task(self._probe())
        await asyncio.shield(self._probing)
        return self.protocol

    async def _probe(self) -> None:
        self.client = self.external_ip = self.probe_error = None
        self.gateway = self._fixed_gateway or default_gateway()
        self.local = source_address(self.gateway) if self.gateway else None
        self.probed_at = time.monotonic()
        if self.gateway is None or self.local is None:
            self.probe_error = "no IPv4 default gateway"
            return
        clients: list[Any] = [
            NatPmpClient(self.gateway, source=self.local),
            PcpClient(self.gateway, self.local),
        ]
        try:
            from .upnp import UpnpClient  # async-upnp-client: part of the p2p extra since 0.2
        except ImportError as exc:
            logger.info("port mapping: no UPnP IGD without async-upnp-client (%s)", exc)
        else:
            clients.append(UpnpClient(self.gateway, self.local))
        # All three at once; decided as soon as the preferred one that answers is known.
        asked = [asyncio.ensure_future(_ask(client, PROBE_TIMEOUT)) for client in clients]
        errors = []
        try:
            for client, task in zip(clients, asked, strict=True):
                try:
                    self.external_ip = await task
                except (PortMapError, OSError, TimeoutError) as exc:
                    errors.append(f"{client.protocol}: {exc or type(exc).__name__}")
                    continue
                self.client = client
                break
        finally:
            for task in asked:
                task.cancel()
        if self.client is None:
            self.probe_error = "; ".join(errors)
        logger.info(
            "port mapping: gateway %s speaks %s%s",
            self.gateway,
            self.protocol or "none of NAT-PMP, PCP, UPnP IGD",
            f" (external address {self.external_ip})" if self.client else f" ({self.probe_error})",
        )

    async def map(self, local_ip: str, port: int) -> Mapping | None:
        """A mapping of UDP `local_ip:port` (an ICE attempt's host socket), renewed until it is
        released; None where the gateway maps nothing (logged)."""
        if not self.enabled:
            return None
        if self._changed():
            try:  # an attempt does not wait long for a gateway that is slow to say nothing
                await asyncio.wait_for(self.probe(), PROBE_WAIT)
            except TimeoutError:
                return None
        if self.client is None or local_ip != self.local:
            return None
        try:
            mapping = await self._make(port)
        except (PortMapError, OSError) as exc:
            logger.warning(
                "port mapping: %s did not map %s:%d: %s", self.protocol, local_ip, port, exc
            )
            self.probed_at = None  # ask again next time: the gateway may have changed
            return None
        self.mappings[port] = mapping
        self.last_mapping = mapping
        self.external_ip = self.external_ip or mapping.external[0]  # PCP says it here first
        mapping.renewal = asyncio.get_running_loop().create_task(self._renew(mapping))
        logger.info(
            "port mapping: %s mapped %s:%d to %s:%d for %d s",
            mapping.protocol,
            local_ip,
            port,
            *mapping.external,
            mapping.lifetime,
        )
        return mapping

    async def release(self, mapping: Mapping) -> None:
        """Delete the mapping at the gateway (best effort, bounded) and stop renewing it."""
        if self.mappings.get(mapping.internal[1]) is mapping:
            del self.mappings[mapping.internal[1]]
        if mapping.renewal is not None:
            mapping.renewal.cancel()
        client = self.client
        if client is None or client.protocol != mapping.protocol:
            return
        port = mapping.external[1] if client.protocol == "upnp" else mapping.internal[1]
        try:
            await client.unmap(port, RELEASE_TIMEOUT)
        except (PortMapError, OSError) as exc:
            logger.info("port mapping: %s did not delete %s: %s", mapping.protocol, port, exc)

    async def close(self) -> None:
        """Every mapping deleted (the agent stops)."""
        if self._probing is not None:
            self._probing.cancel()
        await asyncio.gather(*(self.release(m) for m in list(self.mappings.values())))

    def snapshot(self) -> dict[str, Any] | None:
        """What status and the NAT report show; None when off or nothing was probed yet."""
        if not self.enabled or (self.probed_at is None and self.client is None):
            return None
        last = self.last_mapping
        return {
            "protocol": self.protocol,
            "gateway": self.gateway,
            "external_ip": self.external_ip,
            "mapped": None if last is None else f"{last.external[0]}:{last.external[1]}",
            "mappings": len(self.mappings),
            "error": self.probe_error,
        }

    def _changed(self) -> bool:
        """Never probed, or the gateway or this host's address towards it changed."""
        if self.probed_at is None:
            return True
        gateway = self._fixed_gateway or default_gateway()
        return gateway != self.gateway or (
            gateway is not None and source_address(gateway) != self.local
        )

    async def _make(self, port: int, suggested: int | None = None) -> Mapping:
        client = self.client
        assert client is not None and self.local is not None and self.external_ip is not None
        if client.protocol == "upnp":
            external_port, lifetime = await client.map(port, LIFETIME, MAP_TIMEOUT, suggested)
            external = (self.external_ip, external_port)
        else:
            answer = await client.map(port, LIFETIME, MAP_TIMEOUT, suggested)
            address = getattr(answer, "external_address", None) or self.external_ip
            external, lifetime = (address, answer.external_port), answer.lifetime
        return Mapping(client.protocol, (self.local, port), external, lifetime)

    async def _renew(self, mapping: Mapping) -> None:
        """At half the lifetime, ask again for the same external port (RFC 6886 3.3, RFC 6887
        11.2.1); a gateway that now maps another port, or none, has lost it: logged, dropped."""
        while True:
            await asyncio.sleep(max(1.0, mapping.lifetime / 2))
            port = mapping.internal[1]
            try:
                renewed = await self._make(port, suggested=mapping.external[1])
            except (PortMapError, OSError) as exc:
                logger.warning(
                    "port mapping: renewing %s failed, dropped: %s", mapping.external, exc
                )
                self.mappings.pop(port, None)
                return
            if renewed.external != mapping.external:
                logger.warning(
                    "port mapping: the gateway forgot %s:%d (now %s:%d); the candidate is dropped",
                    *mapping.external,
                    *renewed.external,
                )
                self.mappings.pop(port, None)
                with contextlib.suppress(PortMapError):
                    await self.client.unmap(
                        renewed.external[1] if mapping.protocol == "upnp" else port, RELEASE_TIMEOUT
                    )
                return
            mapping.lifetime, mapping.made_at = renewed.lifetime, time.monotonic()


async def _ask(client: Any, timeout: float) -> str:
    """One protocol's probe: its external address (PortMapError when it does not answer)."""
    if isinstance(client, NatPmpClient):
        return await client.external_address(timeout)
    if isinstance(client, PcpClient):
        await client.announce(timeout)
        return ""  # PCP says its external address in each MAP answer
    return await asyncio.wait_for(client.discover(timeout), timeout)  # UPnP IGD
