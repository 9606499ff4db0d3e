"""UPnP IGD (Internet Gateway Device) port mappings, with async-upnp-client.

Discovery asks the gateway itself: one SSDP M-SEARCH unicast to its port 1900, as Tailscale's
portmapper does, rather than multicast to the whole LAN. The description and every control URL
must be on the gateway's own address: another host on the LAN that answers cannot point the
agent's requests elsewhere. Mappings are WANIPConnection's (or WANPPPConnection's)
AddPortMapping with a lease, renewed by adding it again, and DeletePortMapping.
"""

from __future__ import annotations

import asyncio
import ipaddress
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionError, UpnpError
from async_upnp_client.profiles.igd import IgdDevice
from async_upnp_client.search import SsdpSearchListener

from .exchange import PortMapError

SSDP_PORT = 1900
SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
DESCRIPTION = "rendezvous worker agent"
ONLY_PERMANENT_LEASES = 725  # UPnP IGD WANIPConnection:1, AddPortMapping's error 725


class UpnpClient:
    """The gateway's Internet Gateway Device, from one agent."""

    protocol = "upnp"

    def __init__(self, gateway: str, client: str) -> None:
        self.gateway = gateway
        self.client = client
        self.device: IgdDevice | None = None
        self.rebooted = False  # UPnP says nothing of lost mappings; a renewal re-adds them
        self._permanent_only = False

    async def discover(self, timeout: float) -> str:
        """Find the gateway's IGD; its external address."""
        location = await asyncio.wait_for(self._search(), timeout)
        if urlsplit(location).hostname != self.gateway:
            raise PortMapError(f"the IGD's description is not on the gateway: {location[:100]}")
        requester = AiohttpRequester(timeout=max(1, round(timeout)))
        try:
            device = await asyncio.wait_for(
                UpnpFactory(requester, non_strict=True).async_create_device(location), timeout
            )
        except (UpnpError, OSError, ValueError) as exc:
            raise PortMapError(f"the IGD's description is unusable: {exc}") from exc
        for service in device.all_services:
            if urlsplit(service.control_url).hostname != self.gateway:
                raise PortMapError(f"an IGD service is not on the gateway: {service.control_url}")
        if not IgdDevice.is_profile_device(device):
            raise PortMapError("the gateway's UPnP device is not an Internet Gateway Device")
        self.device = IgdDevice(device, None)
        address = await self._call(self.device.async_get_external_ip_address(), timeout)
        try:
            return str(ipaddress.IPv4Address(address or ""))
        except ValueError:
            raise PortMapError(f"the IGD's external address is {address!r}") from None

    async def map(
        self, internal_port: int, lifetime: int, timeout: float, suggested: int | None = None
    ) -> tuple[int, int]:
        """(external port, lease) of a UDP mapping to `internal_port`, external port the same
        (IGD:1 maps exactly the port asked, or refuses)."""
        device = self._device()
        external = internal_port if suggested is None else suggested
        lease = 0 if self._permanent_only else lifetime
        try:
            await self._add(device, external, internal_port, lease, timeout)
        except UpnpActionError as exc:
            if exc.error_code != ONLY_PERMANENT_LEASES or lease == 0:
                raise PortMapError(f"the IGD refused the mapping: {exc}") from exc
            self._permanent_only, lease = True, 0  # deleted on release, as every mapping is
            await self._add(device, external, internal_port, 0, timeout)
        return external, lifetime if lease == 0 else lease

    async def unmap(self, external_port: int, timeout: float) -> None:
        device = self._device()
        await self._call(
            device.async_delete_port_mapping(
                remote_host=ipaddress.IPv4Address("0.0.0.0"),
                external_port=external_port,
                protocol="UDP",
            ),
            timeout,
        )

    async def _add(
        self, device: IgdDevice, external: int, internal: int, lease: int, timeout: float
    ) -> None:
        await self._call(
            device.async_add_port_mapping(
                remote_host=ipaddress.IPv4Address("0.0.0.0"),
                external_port=external,
                protocol="UDP",
                internal_port=internal,
                internal_client=ipaddress.IPv4Address(self.client),
                enabled=True,
                description=DESCRIPTION,
                lease_duration=timedelta(seconds=lease),
            ),
            timeout,
            passing=(UpnpActionError,),
        )

    async def _search(self) -> str:
        found: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def answered(headers: Any) -> None:
            location = headers.get("location")
            if location and not found.done():
                found.set_result(str(location))

        listener = SsdpSearchListener(
            callback=answered,
            source=(self.client, 0),
            target=(self.gateway, SSDP_PORT),
            timeout=1,
            search_target=SEARCH_TARGET,
            connect_callback=lambda: listener.async_search(),
        )
        try:
            await listener.async_start()
            return await found
        finally:
            listener.async_stop()

    def _device(self) -> IgdDevice:
        if self.device is None:
            raise PortMapError("no IGD discovered")
        return self.device

    @staticmethod
    async def _call(
        call: Any, timeout: float, passing: tuple[type[BaseException], ...] = ()
    ) -> Any:
        try:
            return await asyncio.wait_for(call, timeout)
        except passing:
            raise
        except TimeoutError:
            raise PortMapError(f"the IGD did not answer within {timeout:g}s") from None
        except (UpnpError, OSError, ValueError, KeyError) as exc:
            raise PortMapError(f"the IGD failed: {exc}") from exc
