"""Fetching an image part's `http(s)` URL for the HTTP API, off by default.

Enabled by `--allowed-media-domains` (host names, exact or as a suffix after a dot: "example.com" allows
"img.example.com"). A fetch is refused unless the host is allowed and every address it resolves to is
public (no loopback, private, link-local, multicast or reserved ranges, so the server cannot be made to
reach its own network); the connection goes to the address that was checked, not to a second lookup,
so a name that changes its answer in between gains nothing. One GET, no redirects, no proxies from the
environment, at most `max_bytes` read and `timeout_s` seconds in all. Runs on a worker thread
(urllib, the standard library's client).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse

from service.openai_protocol import ApiError

CHUNK = 64 << 10


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    return any(host == domain or host.endswith("." + domain) for domain in allowed)


def public_address(host: str, port: int) -> str:
    """One address of `host` after checking that all of them are public. Raises ApiError 400."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise ApiError(400, f"image URL host {host!r} does not resolve ({error.strerror})") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            raise ApiError(400, f"image URL host {host!r} resolves to {address}, a non-public address; "
                                "images are fetched from public addresses only")
    return addresses[0]


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self):
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host, port, address, timeout):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self):
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # the name's certificate


def fetch_image(url: str, *, allowed_domains: tuple[str, ...], max_bytes: int, timeout_s: float,
                where: str = "image_url") -> bytes:
    """The bytes at `url`. Raises ApiError: 400 (fetching off, a scheme other than http(s), a host not
    allowed or not public, an HTTP error or a timeout), 413 (over `max_bytes`)."""
    if not allowed_domains:
        raise ApiError(400, f"{where}: image_url must be a base64 data: URL (data:image/png;base64,...); this "
                            "server does not fetch images from the network (--allowed-media-domains)", param=where)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(400, f"{where}: only data:, http: and https: image URLs are accepted", param=where)
    if not host_allowed(parts.hostname, allowed_domains):
        raise ApiError(400, f"{where}: images are fetched only from {', '.join(allowed_domains)} "
                            f"(--allowed-media-domains), not from {parts.hostname!r}", param=where)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = public_address(parts.hostname, port)
    kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    deadline = time.monotonic() + timeout_s
    connection = kind(parts.hostname, port, address, timeout_s)
    try:
        path = parts.path or "/"
        connection.request("GET", path + (f"?{parts.query}" if parts.query else ""),
                           headers={"User-Agent": "tessera", "Accept": "image/*"})
        reply = connection.getresponse()
        if reply.status != 200:
            raise ApiError(400, f"{where}: fetching the image gave HTTP {reply.status} (redirects are not followed)",
                           param=where)
        declared = reply.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise ApiError(413, f"{where}: the image is {int(declared):,} bytes; at most {max_bytes:,}", param=where)
        data = bytearray()
        while chunk := reply.read(CHUNK):
            data += chunk
            if len(data) > max_bytes:
                raise ApiError(413, f"{where}: the image exceeds {max_bytes:,} bytes", param=where)
            if time.monotonic() > deadline:
                raise ApiError(400, f"{where}: fetching the image took over {timeout_s:g} s", param=where)
        return bytes(data)
    except (OSError, http.client.HTTPException) as error:
        raise ApiError(400, f"{where}: fetching the image failed ({type(error).__name__}: {error})",
                       param=where) from None
    finally:
        connection.close()
