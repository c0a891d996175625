"""The egress policy's rules, without a network: parsing (each bad entry named, a policy
that allows an always-denied range refused), names against patterns, every address
against the always-denied ranges and the host's own, and the SNI of a real ClientHello."""

from __future__ import annotations

import ipaddress
import ssl

import pytest

from era_kernel.egress.policy import EgressPolicy, always_denied, host_addresses, parse_policy
from era_kernel.egress.proxy import client_hello_sni, parse_authority
from era_kernel.errors import BadRequest
from era_kernel.models import CreateSession, parse

ip = ipaddress.ip_address


@pytest.mark.parametrize("entry", ["not a host", "exa_mple.org", "*.*.example.org", "example.org/path",
                                   "http://example.org", "203.0.113.0/33", "1.2.3", "-bad.example.org", ""])
def test_an_entry_that_is_neither_a_host_pattern_nor_a_cidr_is_refused_by_name(entry):
    with pytest.raises(BadRequest) as err:
        parse_policy({"allow": ["example.org", entry]})
    assert repr(entry) in err.value.message and err.value.field == "allowInternetAccess.allow"


@pytest.mark.parametrize("cidr", ["10.0.0.0/8", "10.1.2.3", "0.0.0.0/0", "169.254.169.254/32", "127.0.0.1",
                                  "192.168.1.0/24", "::1", "fd00::/8", "::/0"])
def test_a_policy_allowing_an_always_denied_range_is_refused(cidr):
    with pytest.raises(BadRequest) as err:
        parse_policy({"allow": [cidr]})
    assert "always denied" in err.value.message


def test_the_api_model_names_the_entry():
    with pytest.raises(BadRequest) as err:
        parse(CreateSession, {"allowInternetAccess": {"allow": ["ok.example.org", "bad entry!"]}})
    assert "'bad entry!'" in err.value.message and "allowInternetAccess" in err.value.message
    with pytest.raises(BadRequest):
        parse(CreateSession, {"allowInternetAccess": {"allow": ["x.org"], "other": []}})
    with pytest.raises(BadRequest):
        parse(CreateSession, {"allowInternetAccess": {"allow": []}})
    assert parse(CreateSession, {"allowInternetAccess": True}).allowInternetAccess is True
    doc = {"allow": ["*.Example.org", "203.0.113.0/24"], "deny": ["evil.example.org"]}
    assert parse(CreateSession, {"allowInternetAccess": doc}).allowInternetAccess == doc


def test_names_match_exact_and_wildcard_patterns_and_deny_wins():
    policy = parse_policy({"allow": ["example.org", "*.pkg.example.net"], "deny": ["bad.pkg.example.net"]})
    assert policy.check_name("example.org") is None
    assert policy.check_name("a.example.org") == "a.example.org is not in the allow list"
    assert policy.check_name("x.pkg.example.net") is None and policy.check_name("a.b.pkg.example.net") is None
    assert policy.check_name("pkg.example.net") is not None  # *.name is below it, not it
    assert "denied pattern" in policy.check_name("bad.pkg.example.net")


def test_every_address_is_checked_whatever_the_name():
    policy = parse_policy({"allow": ["*"], "deny": ["198.51.100.0/24"]})
    for address in ("127.0.0.1", "10.0.0.5", "172.20.1.1", "192.168.0.1", "169.254.169.254", "100.64.0.1",
                    "::1", "fe80::1", "fd12::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "224.0.0.1"):
        why = policy.check_address(ip(address), "allowed.example.org")
        assert why is not None and "always denied" in why, address
    assert "denied range" in policy.check_address(ip("198.51.100.7"), "x.example.org")
    assert policy.check_address(ip("203.0.113.10"), "x.example.org") is None
    assert "server's host" in policy.check_address(ip("203.0.113.1"), "x.example.org", {ip("203.0.113.1")})


def test_addresses_given_literally_need_an_allowed_range():
    policy = parse_policy({"allow": ["203.0.113.0/24", "files.example.org"]})
    assert policy.check_address(ip("203.0.113.10"), None) is None
    assert policy.check_address(ip("198.51.100.1"), None) == "198.51.100.1 is not in the allow list"
    assert policy.check_name("other.example.org") is None  # may resolve into 203.0.113.0/24 ...
    assert "not in an allowed range" in policy.check_address(ip("198.51.100.1"), "other.example.org")  # ... not here


def test_allow_all_still_refuses_the_always_denied_and_the_host():
    policy = EgressPolicy.allow_all()
    assert policy.check_address(ip("198.51.100.1"), None) is None
    own = host_addresses()
    assert ip("127.0.0.1") in own
    assert all(policy.check_address(a, "x.org", own) for a in own)
    assert always_denied(ip("169.254.169.254"))


def test_authorities_parse_and_refuse_junk():
    assert parse_authority("Files.Example.org:8443", 443).name == "files.example.org"
    assert parse_authority("[2001:db8::1]:443", 80).literal
    assert parse_authority("203.0.113.10", 80).port == 80
    for bad in ("a b:80", "example.org:0", "example.org:99999", "*.example.org:443"):
        with pytest.raises(Exception):
            parse_authority(bad, 443)


def test_the_sni_of_a_real_client_hello_is_read():
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="files.example.org")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    record = outgoing.read()
    assert record[0] == 0x16
    assert client_hello_sni(record[5:5 + int.from_bytes(record[3:5], "big")]) == "files.example.org"
    assert client_hello_sni(b"\x01\x00") is None


def test_the_operators_ranges_are_refused_before_any_connection():
    import asyncio

    from era_kernel.config import Settings
    from era_kernel.egress.policy import operator_denied
    from era_kernel.egress.proxy import EgressProxy, Refused, Target

    with pytest.raises(ValueError, match="'nope'"):
        Settings.from_env({"ERA_EGRESS_DENY": "198.51.100.0/24, nope"})
    denied = []

    async def resolve(name, port):
        return ["198.51.100.7"]

    proxy = EgressProxy(resolve, lambda *a: denied.append(a), operator_denied("198.51.100.0/24"))
    with pytest.raises(Refused) as err:
        asyncio.run(proxy.open("s", EgressPolicy.allow_all(), Target("x.example.org", 443, False)))
    assert err.value.status == 403 and "ERA_EGRESS_DENY" in err.value.reason
