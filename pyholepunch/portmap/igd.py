"""The UPnP IGD actions over HTTP to the gateway (asyncio): the description fetched once,
then SOAP calls to its WAN connection service (port mappings) and its WANIPv6FirewallControl
service (IPv6 pinholes). Bytes in and out go through the sans-IO ``upnp`` module."""
from __future__ import annotations

from ..address import Address
from ..errors import PortMapError
from . import upnp
from .transport import http

DESCRIPTION = "pyholepunch"
PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}


class Igd:
    def __init__(self, gateway: str, local_ip: str, location: str) -> None:
        self.gateway, self.local_ip, self.location = gateway, local_ip, location
        self._services: list[upnp.Service] | None = None

    async def services(self) -> list[upnp.Service]:
        if self._services is None:
            status, _, body = await http(self.gateway, self.local_ip, "GET", self.location)
            if status != 200:
                raise PortMapError(f"UPnP description: HTTP {status}", protocol="upnp", code=status)
            self._services = upnp.parse_description(body, self.location)
        return self._services

    async def service(self, kinds: tuple[str, ...]) -> upnp.Service:
        for s in await self.services():
            if s.service_type in kinds:
                return s
        raise PortMapError(f"the IGD offers none of {', '.join(kinds)}", protocol="upnp")

    async def wan(self) -> upnp.Service:
        return await self.service(upnp.WAN_SERVICES)

    async def soap(self, service: upnp.Service, action: str,
                   args: list[tuple[str, str]]) -> dict[str, str]:
        body = upnp.encode_soap(service.service_type, action, args)
        status, _, reply = await http(self.gateway, self.local_ip, "POST", service.control_url,
                                      body=body, headers=soap_headers(service, action))
        return upnp.parse_soap_response(status, reply, action)

    # -- IPv4 port mappings ----------------------------------------------------------------
    async def add_port_mapping(self, service: upnp.Service, transport: str, internal: Address,
                               want: int, lease: int) -> tuple[Address, int]:
        """Map ``internal`` (external port ``want`` if free; IGD:2 picks another on conflict);
        returns ((external ip, port), lease granted)."""
        def args(port: int) -> list[tuple[str, str]]:
            return [("NewRemoteHost", ""), ("NewExternalPort", str(port)),
                    ("NewProtocol", transport.upper()), ("NewInternalPort", str(internal[1])),
                    ("NewInternalClient", internal[0]), ("NewEnabled", "1"),
                    ("NewPortMappingDescription", DESCRIPTION), ("NewLeaseDuration", str(lease))]

        port = want
        try:
            await self.soap(service, "AddPortMapping", args(want))
        except PortMapError as exc:
            if exc.code == upnp.ONLY_PERMANENT_LEASES:
                lease = 0
                await self.soap(service, "AddPortMapping", args(want))
            elif exc.code == upnp.CONFLICT_IN_MAPPING and service.version >= 2:
                out = await self.soap(service, "AddAnyPortMapping", args(want))
                port = int(out.get("NewReservedPort", "0") or 0) if \
                    out.get("NewReservedPort", "").isdigit() else 0
                if not 0 < port < 65536:
                    raise PortMapError(f"AddAnyPortMapping reserved port {port}",
                                       protocol="upnp") from exc
            else:
                raise
        return (await self.external_ip(service), port), lease

    async def external_ip(self, service: upnp.Service) -> str:
        return (await self.soap(service, "GetExternalIPAddress", [])).get("NewExternalIPAddress", "")

    async def delete_port_mapping(self, service: upnp.Service, transport: str, port: int) -> None:
        await self.soap(service, "DeletePortMapping", delete_args(transport, port))

    # -- IPv6 pinholes (WANIPv6FirewallControl:1) ------------------------------------------
    async def add_pinhole(self, internal: Address, transport: str, lease: int, *,
                          remote: Address = ("", 0)) -> int:
        """Open the router's IPv6 firewall for ``internal`` (from ``remote``; empty/0: anyone);
        returns the pinhole's UniqueID."""
        fw = await self.service((upnp.PINHOLE_SERVICE,))
        out = await self.soap(fw, "AddPinhole", [
            ("RemoteHost", remote[0]), ("RemotePort", str(remote[1])), ("InternalClient", internal[0]),
            ("InternalPort", str(internal[1])), ("Protocol", str(PROTOCOL_NUMBERS[transport])),
            ("LeaseTime", str(lease))])
        uid = out.get("UniqueID", "")
        if not uid.isdigit():
            raise PortMapError(f"AddPinhole returned UniqueID {uid[:20]!r}", protocol="upnp")
        return int(uid)

    async def update_pinhole(self, uid: int, lease: int) -> None:
        fw = await self.service((upnp.PINHOLE_SERVICE,))
        await self.soap(fw, "UpdatePinhole", [("UniqueID", str(uid)), ("NewLeaseTime", str(lease))])

    async def delete_pinhole(self, uid: int) -> None:
        fw = await self.service((upnp.PINHOLE_SERVICE,))
        await self.soap(fw, "DeletePinhole", [("UniqueID", str(uid))])


def soap_headers(service: upnp.Service, action: str) -> dict[str, str]:
    return {"Content-Type": 'text/xml; charset="utf-8"',
            "SOAPAction": f'"{service.service_type}#{action}"'}


def delete_args(transport: str, port: int) -> list[tuple[str, str]]:
    return [("NewRemoteHost", ""), ("NewExternalPort", str(port)), ("NewProtocol", transport.upper())]
