"""The SSRF guard for images fetched on a user's behalf (media.py): which addresses are refused, and
that the connection goes to the address that was checked (DNS rebinding), on every redirect hop.

No test here sends a packet off this machine: `loopback_only` refuses, and records, any connection
the code under test attempts to an address outside 127.0.0.0/8, before a socket is opened.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from tests.conftest import engines_for
from tests.doubles.images import image_app, png_bytes
from tests.doubles.live import LiveServer
from threadline import AsyncThreadline
from threadline.errors import BlockedURLError
from threadline.media import check_url

# Every family that is not globally routable, in IPv4 and IPv6, and IPv4 carried inside IPv6.
REFUSED = [
    # IPv4
    "0.0.0.0", "0.1.2.3",                              # this network
    "10.1.2.3", "172.16.0.1", "192.168.1.1",           # RFC 1918
    "100.64.0.1", "100.100.100.200", "100.127.255.254",  # shared address space (Alibaba metadata)
    "127.0.0.1", "127.255.255.254",                    # loopback
    "169.254.169.254",                                 # link-local, cloud metadata
    "192.0.0.1", "192.0.0.9", "192.0.0.170",           # IETF protocol assignments 192.0.0.0/24
    "192.0.2.1", "198.51.100.1", "203.0.113.1",        # TEST-NET-1/2/3
    "192.88.99.1",                                     # deprecated 6to4 relay anycast
    "198.18.0.1", "198.19.255.254",                    # benchmarking
    "224.0.0.1", "239.255.255.250",                    # multicast
    "240.0.0.1", "255.255.255.255",                    # reserved, broadcast
    # IPv6
    "::", "::1",                                       # unspecified, loopback
    "fc00::1", "fd00:ec2::254",                        # unique local (AWS metadata over IPv6)
    "fe80::1", "fec0::1",                              # link-local, site-local
    "ff02::1", "ff0e::1",                              # multicast
    "2001:db8::1", "3fff::1",                          # documentation
    "100::1",                                          # discard-only
    "5f00::1", "4000::1",                              # outside global unicast 2000::/3
    "2001:2::1",                                       # benchmarking, in the IETF block 2001::/23
    # IPv4 inside IPv6
    "::ffff:127.0.0.1", "::ffff:100.100.100.200", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "::127.0.0.1", "::8.8.8.8",                        # IPv4-compatible (deprecated)
    "::ffff:0:127.0.0.1",                              # IPv4-translated
    "64:ff9b::127.0.0.1", "64:ff9b::a00:1", "64:ff9b::100.100.100.200",  # NAT64 well-known prefix
    "64:ff9b:1::7f00:1", "64:ff9b:1::808:808",         # local-use NAT64
    "2002:7f00:0001::", "2002:a9fe:a9fe::", "2002:6464:64c8::1", "2002:c000:0201::",  # 6to4
    "2001:0:4136:e378:8000:63bf:80ff:fffe",            # Teredo (client 127.0.0.1)
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",            # Teredo, public-looking, refused all the same
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
           "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]


def _url(address: str) -> str:
    return f"http://[{address}]/x.png" if ":" in address else f"http://{address}/x.png"


async def test_address_table_refuses_every_non_global_family_and_passes_public_ones():
    wrongly_allowed = []
    for address in REFUSED:
        try:
            await check_url(_url(address), [])
        except BlockedURLError as exc:
            assert exc.code == "url_not_allowed"
        else:
            wrongly_allowed.append(address)
    wrongly_refused = []
    for address in ALLOWED:
        try:
            await check_url(_url(address), [])
        except BlockedURLError:
            wrongly_refused.append(address)
    assert wrongly_allowed == [] and wrongly_refused == []


async def test_an_allow_listed_address_passes_and_the_message_names_no_other_address():
    await check_url("http://100.100.100.200/x.png", ["100.100.100.200"])
    with pytest.raises(BlockedURLError) as ei:
        await check_url("http://[::ffff:100.100.100.200]/x.png", [])
    assert "shared address space" in ei.value.message and "mapped" in ei.value.message


# ---- connecting to the address that was checked ------------------------------------------------------


def _is_loopback(host: Any) -> bool:
    try:
        return ipaddress.ip_address(str(host).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class LoopbackOnly:
    """Wraps the running loop's connect calls: a destination outside loopback is recorded and refused
    (ECONNREFUSED) before any socket is opened, so a test can assert where a connection was aimed."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.attempts: list[tuple[str, int]] = []
        self._create, self._sock_connect = loop.create_connection, loop.sock_connect

    def _gate(self, host: Any, port: Any) -> None:
        if not _is_loopback(host):
            self.attempts.append((str(host), int(port or 0)))
            raise ConnectionRefusedError(111, "refused by the test: not a loopback address")

    async def create_connection(self, protocol_factory: Any, host: Any = None, port: Any = None, **kw: Any) -> Any:
        if kw.get("sock") is not None:
            self._gate(*kw["sock"].getpeername()[:2])
        else:
            self._gate(host, port)
        return await self._create(protocol_factory, host, port, **kw)

    async def sock_connect(self, sock: socket.socket, address: Any) -> Any:
        self._gate(*address[:2])
        return await self._sock_connect(sock, address)


@pytest.fixture
async def loopback_only(monkeypatch: pytest.MonkeyPatch) -> LoopbackOnly:
    loop = asyncio.get_running_loop()
    guard = LoopbackOnly(loop)
    monkeypatch.setattr(loop, "create_connection", guard.create_connection)
    monkeypatch.setattr(loop, "sock_connect", guard.sock_connect)
    return guard


class FakeDNS:
    """The loop's getaddrinfo with made-up names: each call for a name takes the next answer in its
    list (the last one repeats); every other name resolves as usual."""

    def __init__(self, loop: asyncio.AbstractEventLoop, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.calls: Counter[str] = Counter()
        self._real = loop.getaddrinfo

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kw: Any) -> list[tuple[Any, ...]]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in self.answers:
            return await self._real(host, port, *args, **kw)
        self.calls[name] += 1
        answers = self.answers[name]
        addresses = answers[min(self.calls[name], len(answers)) - 1]
        out: list[tuple[Any, ...]] = []
        for a in addresses:
            if ":" in a:
                out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, int(port or 0), 0, 0)))
            else:
                out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, int(port or 0))))
        return out


@pytest.fixture
async def fake_dns(monkeypatch: pytest.MonkeyPatch):
    loop = asyncio.get_running_loop()

    def install(answers: dict[str, list[list[str]]]) -> FakeDNS:
        dns = FakeDNS(loop, answers)
        monkeypatch.setattr(loop, "getaddrinfo", dns.getaddrinfo)
        return dns

    return install


@pytest.fixture
def recording_host() -> Iterator[tuple[int, list[tuple[str, str]]]]:
    """An image host of this test's own on 127.0.0.1: (port, every (path, Host) it was asked for)."""
    seen: list[tuple[str, str]] = []
    srv = LiveServer(image_app(seen)).start()
    yield srv.port, seen
    srv.stop()


def _gemini(gurl: str, allow_hosts: list[str], sqlite_url: str) -> AsyncThreadline:
    engines = engines_for(None, gurl)
    engines["gem"]["allow_hosts"] = allow_hosts
    return AsyncThreadline(database_url=sqlite_url, engines=engines, apps={"g": {"engine": "gem"}},
                           include_presets=False)


async def test_dns_rebinding_name_never_gets_a_connection_to_loopback(gem, sqlite_url, recording_host, fake_dns, loopback_only):
    gd, gurl = gem
    port, seen = recording_host
    dns = fake_dns({"rebind.test": [["8.8.8.8"], ["127.0.0.1"]]})  # public for the check, loopback after
    url = f"http://rebind.test:{port}/img/blue.png"
    async with _gemini(gurl, [], sqlite_url) as tl:
        with pytest.raises(Exception) as ei:
            await tl.chat("look", user="u", app="g", images=[url])
    assert seen == []  # the loopback server was never asked
    assert dns.calls["rebind.test"] == 1  # one lookup ...
    assert loopback_only.attempts == [("8.8.8.8", port)]  # ... and the connection went to the address it gave
    assert ei.value.code == "invalid_param" and url in ei.value.message and "8.8.8.8" not in ei.value.message
    assert gd.requests == []  # nothing reached the provider


async def test_each_hop_is_resolved_once_and_connected_at_exactly_that_address(gem, sqlite_url, recording_host, fake_dns,
                                                                               loopback_only):
    gd, gurl = gem
    port, seen = recording_host
    # Only the address is allow-listed, not the names: each name must be resolved, its answer checked
    # (and accepted by the allow-list), and the connection made to that answer. Neither name exists
    # outside this test, so a fetch that works went to the address the check saw.
    dns = fake_dns({"img.test": [["127.0.0.1"]], "img2.test": [["127.0.0.1"]]})
    async with _gemini(gurl, ["127.0.0.1"], sqlite_url) as tl:
        r = await tl.chat("look", user="u", app="g",
                          images=[f"http://img.test:{port}/redirect?to=http://img2.test:{port}/img/blue.png"])
    assert r.answer.endswith("[1 image(s)]")
    assert gd.requests[-1]["contents"][-1]["parts"][1]["inlineData"]["mimeType"] == "image/png"
    assert dict(dns.calls) == {"img.test": 1, "img2.test": 1}
    assert seen == [("/redirect", f"img.test:{port}"), ("/img/blue.png", f"img2.test:{port}")]  # Host as in the URL
    assert loopback_only.attempts == []


@pytest.mark.parametrize("target", [
    "http://100.100.100.200/latest/meta-data/",          # Alibaba's metadata, shared address space
    "http://[::ffff:100.100.100.200]/latest/meta-data/",  # the same, IPv4-mapped
    "http://[2002:7f00:1::]:{port}/img/blue.png",         # 6to4 carrying 127.0.0.1
    "http://cgnat.test:{port}/img/blue.png",              # a name that resolves to 100.64/10
    "http://mixed.test/img/blue.png",                     # a name with a public and a 192.0.0.0/24 answer
])
async def test_redirect_from_an_allowed_host_to_an_internal_address_is_refused(gem, sqlite_url, recording_host, fake_dns,
                                                                               loopback_only, target):
    gd, gurl = gem
    port, seen = recording_host
    fake_dns({"cgnat.test": [["100.64.0.5"]], "mixed.test": [["8.8.8.8", "192.0.0.9"]]})
    hop = target.format(port=port)
    async with _gemini(gurl, ["127.0.0.1"], sqlite_url) as tl:
        with pytest.raises(Exception) as ei:
            await tl.chat("look", user="u", app="g", images=[f"http://127.0.0.1:{port}/redirect?to={hop}"])
    assert ei.value.code == "url_not_allowed"
    assert seen == [("/redirect", f"127.0.0.1:{port}")]  # the allowed first hop was fetched, nothing after
    assert loopback_only.attempts == []  # the refused hop was never connected to
    assert gd.requests == []
    for leaked in ("100.64.0.5", "192.0.0.9"):
        assert leaked not in ei.value.message


class TLSImageHost:
    """An HTTPS image host on 127.0.0.1 with a certificate for `cert_name`; it records the SNI name and
    the Host header of each request."""

    def __init__(self, ca: trustme.CA, cert_name: str) -> None:
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(cert_name).configure_cert(self.ctx)
        self.sni: list[str | None] = []
        self.hosts: list[str] = []
        self.ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name)  # type: ignore[assignment,misc]
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            for line in head.decode("latin-1").split("\r\n"):
                if line.lower().startswith("host:"):
                    self.hosts.append(line.split(":", 1)[1].strip())
            body = png_bytes()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: %d\r\n"
                         b"connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def trusted_ca(tmp_path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    ca = trustme.CA()
    pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    monkeypatch.setenv("SSL_CERT_FILE", str(pem))  # what Threadline's outbound calls trust
    return ca


async def test_https_keeps_sni_certificate_and_host_for_the_name_while_connecting_to_the_checked_address(
        gem, sqlite_url, trusted_ca, fake_dns, loopback_only):
    gd, gurl = gem
    dns = fake_dns({"img.test": [["127.0.0.1"]]})
    host = TLSImageHost(trusted_ca, "img.test")  # the certificate names img.test, not 127.0.0.1
    async with host as port, _gemini(gurl, ["127.0.0.1"], sqlite_url) as tl:
        r = await tl.chat("look", user="u", app="g", images=[f"https://img.test:{port}/img/blue.png"])
    assert r.answer.endswith("[1 image(s)]")
    assert host.sni == ["img.test"] and host.hosts == [f"img.test:{port}"]
    assert dns.calls["img.test"] == 1
    assert loopback_only.attempts == []


async def test_https_certificate_for_another_name_is_rejected(gem, sqlite_url, trusted_ca, fake_dns, loopback_only):
    gd, gurl = gem
    fake_dns({"img.test": [["127.0.0.1"]]})
    host = TLSImageHost(trusted_ca, "other.test")
    async with host as port, _gemini(gurl, ["127.0.0.1"], sqlite_url) as tl:
        with pytest.raises(Exception) as ei:
            await tl.chat("look", user="u", app="g", images=[f"https://img.test:{port}/img/blue.png"])
    assert ei.value.code == "invalid_param" and "127.0.0.1" not in ei.value.message
    assert host.hosts == []  # no request was sent over the unverified connection
    assert gd.requests == []


async def test_a_cookie_one_image_url_sets_is_not_sent_with_the_next_users_fetch(gem, sqlite_url):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    cookies: list[str | None] = []

    async def img(request: Request) -> Response:
        cookies.append(request.headers.get("cookie"))
        resp = Response(png_bytes(), media_type="image/png")
        resp.set_cookie("session", "alice-secret")
        return resp

    srv = LiveServer(Starlette(routes=[Route("/img.png", img)])).start()
    try:
        _, gurl = gem
        async with _gemini(gurl, ["127.0.0.1"], sqlite_url) as tl:
            await tl.chat("look", user="alice", app="g", images=[f"{srv.url}/img.png"])
            await tl.chat("look", user="bob", app="g", images=[f"{srv.url}/img.png"])
    finally:
        srv.stop()
    assert cookies == [None, None]
