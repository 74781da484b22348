"""Hostile and malformed input: the offender gets a clear error and is closed; everyone else carries on."""

from __future__ import annotations

import os
import socket
import struct
import time

import psycopg
import pytest

from tests.conftest import bystander_session
from tests.pgwire import RawClient
from wardgate.engines.postgres import codec


@pytest.fixture
def bystander(gateway):  # noqa: ANN001, ANN201
    """A live session that must keep working while others misbehave."""
    with bystander_session(gateway) as conn:
        yield conn


def _assert_gateway_serves(gateway) -> None:  # noqa: ANN001
    with psycopg.connect(gateway.dsn(gateway.credential())) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize(
    "payload,expected",
    [
        (struct.pack("!I", 3) + b"\x00" * 4, "invalid startup packet length"),
        (struct.pack("!I", 1 << 30) + struct.pack("!I", 196608), "invalid startup packet length"),
        (struct.pack("!II", 16, 2 << 16) + b"user\x00x\x00\x00", "unsupported frontend protocol 2.0"),
        (struct.pack("!II", 14, 196608) + b"user\x00x", "not terminated"),
        (struct.pack("!II", 17, 196608) + b"user\x00\xff\xfe\x00\x00", "not valid UTF-8"),
    ],
)
def test_malformed_startup_packets(gateway, bystander, payload, expected) -> None:
    c = RawClient(gateway.port)
    c.send(payload)
    err = c.error()
    assert err["C"] == "08P01" and expected in err["M"]
    assert c.closed()
    _assert_gateway_serves(gateway)


def test_truncated_startup_then_disconnect(gateway, bystander) -> None:
    for cut in (1, 3, 7, 20):
        c = RawClient(gateway.port)
        c.send(codec.startup_message({"user": "alice", "database": "shop"})[:cut])
        c.close()
    _assert_gateway_serves(gateway)


def test_garbage_after_ssl_request_is_refused(gateway, bystander) -> None:
    c = RawClient(gateway.port)
    c.send(codec.ssl_request() + b"\x16\x03garbage")
    # PostgreSQL refuses unencrypted bytes that follow an SSLRequest (CVE-2021-23214); so do we.
    data = c.recv_raw(1)
    assert data in (b"", b"E")
    assert c.closed()
    _assert_gateway_serves(gateway)


def test_garbage_instead_of_tls_handshake(gateway, bystander) -> None:
    c = RawClient(gateway.port)
    c.send(codec.ssl_request())
    assert c.recv_raw(1) == b"S"
    c.send(os.urandom(2048))
    assert c.closed()
    _assert_gateway_serves(gateway)


def test_gssenc_request_is_declined(gateway) -> None:
    c = RawClient(gateway.port)
    c.send(struct.pack("!II", 8, codec.GSSENC_REQUEST_CODE))
    assert c.recv_raw(1) == b"N"
    cred = gateway.credential()
    c.login("alice", cred["credential"], "shop")  # the connection goes on in the clear
    c.send(codec.message(b"Q", codec.cstr("select 41 + 1")))
    msgs = c.read_until("Z")
    assert any(t == "D" and b"42" in body for t, body in msgs)


def test_negotiate_protocol_version_for_newer_minor_and_options(gateway) -> None:
    c = RawClient(gateway.port)
    c.send(codec.startup_message({"user": "alice", "database": "shop", "_pq_.compression": "on"}, minor=2))
    mtype, body = c.read()
    assert mtype == "v"
    minor, count = struct.unpack("!ii", body[:8])
    assert (minor, count) == (0, 1) and b"_pq_.compression" in body
    mtype, body = c.read()
    assert mtype == "R"  # authentication continues on protocol 3.0


def test_absurd_message_length_after_login(gateway, bystander) -> None:
    c = RawClient(gateway.port)
    c.login("alice", gateway.credential()["credential"], "shop")
    c.send(b"Q" + struct.pack("!I", 1 << 30))
    err = c.error()
    assert err["C"] == "08P01" and "over the gateway's limit" in err["M"]
    assert c.closed()
    _assert_gateway_serves(gateway)


def test_unknown_message_type_after_login(gateway, bystander) -> None:
    c = RawClient(gateway.port)
    c.login("alice", gateway.credential()["credential"], "shop")
    c.send(b"!" + struct.pack("!I", 8) + b"abcd")
    err = c.error()
    assert err["C"] == "08P01" and "unexpected message type" in err["M"]
    assert c.closed()
    s = gateway.wait_for_session(lambda s: (s["end_reason"] or "").startswith("protocol violation"))
    assert s["status"] == "closed"


def test_malformed_bind_and_unterminated_query(gateway, bystander) -> None:
    c = RawClient(gateway.port)
    c.login("alice", gateway.credential()["credential"], "shop")
    c.send(codec.message(b"Q", b"select 1"))  # no terminating NUL
    err = c.error()
    assert err["C"] == "08P01"
    assert c.closed()


def test_wrong_sasl_mechanism_and_bad_scram(gateway) -> None:
    c = RawClient(gateway.port)
    c.send(codec.startup_message({"user": "alice", "database": "shop"}))
    c.read()
    c.send(codec.sasl_initial_response("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"))
    err = c.error()
    assert err["C"] == "28000" and "not offered" in err["M"]

    c = RawClient(gateway.port)
    c.send(codec.startup_message({"user": "alice", "database": "shop"}))
    c.read()
    c.send(codec.sasl_initial_response("SCRAM-SHA-256", b"garbage"))
    err = c.error()
    assert err["C"] == "28000" and "SCRAM" in err["M"]


def test_slow_loris_is_cut_off(tmp_path, pg) -> None:
    from tests.conftest import make_gateway

    gw = make_gateway(tmp_path / "gw", pg, extra_toml="auth_timeout = 1.0")
    gw.start()
    try:
        c = RawClient(gw.port)
        c.send(codec.startup_message({"user": "alice", "database": "shop"})[:5])
        time.sleep(1.5)
        assert c.closed()
    finally:
        gw.stop()


def test_many_bad_clients_at_once(gateway, bystander) -> None:
    socks = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", gateway.port))
        s.sendall(os.urandom(64) if i % 2 else struct.pack("!I", 0xFFFFFFFF))
        socks.append(s)
    for s in socks:
        s.close()
    _assert_gateway_serves(gateway)


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_client_that_never_reads_cannot_exhaust_memory(gateway, bystander) -> None:
    baseline = _rss_mb(gateway.proc.pid)
    c = RawClient(gateway.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    c.login("alice", gateway.credential()["credential"], "shop")
    # about 2 GB of result that the client never reads
    c.send(codec.message(b"Q", codec.cstr("select repeat('x', 100000) from generate_series(1, 20000)")))
    time.sleep(3)
    grown = _rss_mb(gateway.proc.pid) - baseline
    assert grown < 100, f"the gateway buffered {grown:.0f} MB for a client that does not read"
    with psycopg.connect(gateway.dsn(gateway.credential())) as conn:  # others are served meanwhile
        assert conn.execute("select 1").fetchone() == (1,)
    c.close()
    _assert_gateway_serves(gateway)


def test_malformed_attempts_are_recorded(gateway) -> None:
    before = {s["id"] for s in gateway.sessions()}
    c = RawClient(gateway.port)
    c.send(struct.pack("!II", 16, 2 << 16) + b"user\x00x\x00\x00")
    c.error()
    c = RawClient(gateway.port)
    c.send(codec.ssl_request())
    c.recv_raw(1)
    c.send(b"\x16\x03\x01" + os.urandom(200))
    c.closed()
    time.sleep(0.5)
    new = gateway.wait_for_session(lambda s: s["id"] not in before and "unsupported frontend protocol" in (s["end_reason"] or ""))
    assert new["status"] == "rejected" and new["error_code"] == "08P01"
    tls = gateway.wait_for_session(lambda s: s["id"] not in before and (s["end_reason"] or "").startswith("TLS handshake failed"))
    assert tls["status"] == "rejected"
