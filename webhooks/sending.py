"""Outbound HTTP for webhooks: a tenant's URL is hostile, so its address is checked after DNS
resolution and the request goes to the very address checked (no second lookup to rebind)."""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.conf import settings


class UnsafeAddress(ValueError):
    """The URL is not one a webhook may be sent to; the message says why, for the tenant."""


@dataclass(frozen=True)
class Target:
    """Where one request goes: the URL as the tenant wrote it, and the address it resolved to."""

    url: str
    scheme: str
    host: str
    port: int
    address: str  # an IP, checked

    @property
    def pinned_url(self) -> str:
        """The URL with its host replaced by the checked address (the Host header and TLS SNI
        carry the name)."""
        parts = urlsplit(self.url)
        ip = f"[{self.address}]" if ":" in self.address else self.address
        return urlunsplit((parts.scheme, f"{ip}:{self.port}", parts.path or "/", parts.query, ""))

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"


@dataclass(frozen=True)
class Answer:
    status_code: int | None
    body: str
    error: str
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def _refusal(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` is not a public unicast address, or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 and friends reach the IPv4 address inside.
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return _refusal(mapped)
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_private or ip.is_reserved or not ip.is_global:
        # is_global is False for shared address space (100.64.0.0/10) and documentation ranges.
        return "a private or reserved address"
    return None


def target_resolve(url: str) -> Target:
    """The URL's scheme, host and port checked, its host resolved, and every address it resolves
    to checked; UnsafeAddress otherwise. Any one internal address refuses the whole name, since
    which one a client picks is not ours to choose."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UnsafeAddress(f"The URL is malformed: {error}.") from error
    if parts.scheme not in ("http", "https"):
        raise UnsafeAddress("Only http and https URLs can receive webhooks.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeAddress("Put no user name or password in the URL; verify signatures instead.")
    if not parts.hostname:
        raise UnsafeAddress("The URL has no host.")
    try:
        # An international name in its ASCII form, as DNS, the Host header and SNI need it.
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError as error:
        raise UnsafeAddress(f"The host {parts.hostname!r} is not a valid name.") from error
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as error:
        raise UnsafeAddress(f"The host {host!r} does not resolve.") from error
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise UnsafeAddress(f"The host {host!r} does not resolve.")
    if not settings.WEBHOOKS_ALLOW_PRIVATE_ADDRESSES:
        for address in addresses:
            reason = _refusal(ipaddress.ip_address(address.split("%", 1)[0]))
            if reason:
                raise UnsafeAddress(
                    f"The host {host!r} resolves to {address}, {reason}; webhooks go only to "
                    "public addresses."
                )
    return Target(url=url, scheme=parts.scheme, host=host, port=port, address=addresses[0])


def post(*, target: Target, body: bytes, headers: dict[str, str]) -> Answer:
    """POST `body` to the checked address; never follows a redirect (a 3xx is a failure) and
    reads at most WEBHOOKS_RESPONSE_MAX_BYTES of the answer, within WEBHOOKS_TIMEOUT_S."""
    limit = settings.WEBHOOKS_RESPONSE_MAX_BYTES
    timeout = settings.WEBHOOKS_TIMEOUT_S
    started = time.monotonic()
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    status_code, body_read, error = None, b"", ""
    try:
        with (
            httpx.Client(
                follow_redirects=False,
                timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
                trust_env=False,  # a proxy from the environment would resolve the name again
            ) as client,
            client.stream(
                "POST",
                target.pinned_url,
                content=body,
                headers={**headers, "Host": target.host_header},
                extensions=extensions,
            ) as response,
        ):
            status_code = response.status_code
            for chunk in response.iter_raw():
                body_read += chunk
                # A huge or dripping answer is cut, not waited for: the log keeps an excerpt.
                if len(body_read) >= limit or time.monotonic() - started > timeout:
                    break
    except Exception as exc:
        # Whatever the tenant's URL and receiver make of the request is the receiver's failure,
        # logged and retried; never an error that stops the drain.
        error = f"{type(exc).__name__}: {exc}"[:500]
    duration_ms = int((time.monotonic() - started) * 1000)
    text = body_read[:limit].decode("utf-8", errors="replace")
    if status_code is not None and 300 <= status_code < 400:
        error = f"Answered {status_code} (a redirect, which webhooks never follow)."
    return Answer(status_code=status_code, body=text, error=error, duration_ms=duration_ms)
