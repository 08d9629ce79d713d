"""Which webhook URLs may be called: https (or an allow-listed host), and no address inside.

Checked when a request names a URL and again before every attempt, on the addresses the
name resolves to then; the attempt connects to the address that was checked, so a name that
changes its answer in between (DNS rebinding) cannot reach a refused address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Link-local (the cloud metadata service, 169.254.169.254, lives there): refused always.
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
MAX_URL_CHARS = 2000


class UnsafeURL(ValueError):
    """A webhook URL that may not be called; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked URL and the address an attempt connects to."""

    url: str
    scheme: str
    host: str
    address: str


def _plain(address: IPAddress) -> IPAddress:
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def address_refusal(address: IPAddress) -> str | None:
    """Why an attempt may not connect to `address`, or None when it may."""
    address = _plain(address)
    if address.is_link_local or any(address in net for net in LINK_LOCAL):
        return "a link-local address"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "a reserved address"
    if settings.CONFIG.WEBHOOK_ALLOW_PRIVATE:
        return None
    if address.is_loopback:
        return "a loopback address"
    if address.is_private or not address.is_global:
        return "a private address"
    return None


def check_form(url: str) -> tuple[str, str, int]:
    """The scheme, host and port of a well-formed URL this deployment may call; UnsafeURL if not."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise UnsafeURL(f"must be a URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"is not a valid URL ({exc})") from None
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("http", "https") or not host:
        raise UnsafeURL("must be an http(s) URL with a host")
    if parts.username or parts.password:
        raise UnsafeURL("must not carry credentials")
    config = settings.CONFIG
    if parts.scheme != "https" and not config.DEBUG and host.lower() not in config.WEBHOOK_ALLOWED_HOSTS:
        raise UnsafeURL("must use https (WEBHOOK_ALLOWED_HOSTS lists the hosts allowed over http)")
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80)


async def resolve(url: str) -> Target:
    """Check `url` and resolve its host; every address it resolves to must be allowed."""
    scheme, host, port = check_form(url)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        except (OSError, UnicodeError) as exc:
            raise UnsafeURL(f"host {host!r} does not resolve ({exc})") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise UnsafeURL(f"host {host!r} does not resolve")
    for address in addresses:
        refusal = address_refusal(address)
        if refusal is not None:
            raise UnsafeURL(f"resolves to {refusal} ({address}), which webhooks may not call")
    return Target(url=url, scheme=scheme, host=host, address=str(addresses[0]))
