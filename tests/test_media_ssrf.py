"""The SSRF guard for images fetched on a user's behalf (media.py): which addresses are refused, and
that the connection goes to the address that was checked (DNS rebinding), on every redirect hop.

No test here sends a packet off this machine: `loopback_only` refuses, and records, any connection
the code under test attempts to an address outside 127.0.0.0/8, before a socket is opened.
"""

from __future__ import annotations

import pytest

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
