"""The sans-IO codec, framer and statement tracker, without sockets."""

from __future__ import annotations

import os
import random
import struct

import pytest

from wardgate.engines.postgres import codec, framing
from wardgate.engines.postgres.framing import Framer
from wardgate.engines.postgres.tracker import BACKEND_INSPECT, FRONTEND_INSPECT, StatementTracker


def q(text: str) -> bytes:
    return codec.message(b"Q", codec.cstr(text))


def test_startup_roundtrip() -> None:
    raw = codec.startup_message({"user": "alice", "database": "shop", "application_name": "x"})
    packet, used = codec.parse_startup_packet(raw)
    assert used == len(raw)
    assert packet == codec.StartupMessage(3, 0, {"user": "alice", "database": "shop", "application_name": "x"})


def test_startup_needs_more_bytes_at_every_cut() -> None:
    raw = codec.startup_message({"user": "alice"})
    for cut in range(len(raw)):
        assert codec.parse_startup_packet(raw[:cut]) is None


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("!I", 4) + b"\x00" * 4,
        struct.pack("!I", 100000) + b"\x00" * 8,
        struct.pack("!II", 9, codec.SSL_REQUEST_CODE) + b"x",
        struct.pack("!II", 12, 196608) + b"user",
        struct.pack("!II", 12, 196608) + b"\x00x\x00\x00",
    ],
)
def test_bad_startup_packets_raise(raw: bytes) -> None:
    with pytest.raises(codec.ProtocolViolation):
        codec.parse_startup_packet(raw)


def test_special_requests() -> None:
    assert codec.parse_startup_packet(codec.ssl_request())[0] == codec.SSLRequest()
    cancel, _ = codec.parse_startup_packet(codec.cancel_request(1234, b"\x01\x02\x03\x04"))
    assert cancel == codec.CancelRequest(1234, b"\x01\x02\x03\x04")


def test_random_startup_bytes_never_escape_as_other_errors() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40)))
        if rng.random() < 0.5 and len(raw) >= 4:
            raw = struct.pack("!I", len(raw)) + raw[4:]
        try:
            codec.parse_startup_packet(raw)
        except codec.ProtocolViolation:
            pass


def test_error_response_fields() -> None:
    msg = codec.error_response("28P01", "no", severity="FATAL", hint="do this")
    reader = codec.MessageReader()
    reader.feed(msg)
    mtype, body = reader.next()
    assert chr(mtype) == "E"
    assert codec.parse_error_fields(body) == {"S": "FATAL", "V": "FATAL", "C": "28P01", "M": "no", "H": "do this"}
    assert codec.is_fatal(body)


def test_message_reader_limits_length() -> None:
    reader = codec.MessageReader(max_length=100)
    reader.feed(b"Q" + struct.pack("!I", 1 << 30))
    with pytest.raises(codec.ProtocolViolation):
        reader.next()


def test_rows_from_tag() -> None:
    assert codec.rows_from_tag("INSERT 0 5") == 5
    assert codec.rows_from_tag("SELECT 12") == 12
    assert codec.rows_from_tag("CREATE TABLE") is None


# ------------------------------------------------------------------------------ framing


def client_framer(**kw) -> Framer:  # noqa: ANN003
    return Framer(FRONTEND_INSPECT + b"X", allowed=codec.FRONTEND_TYPES, small=codec.SMALL_FRONTEND_TYPES, **kw)


def test_framer_forwards_whole_reads_unchanged() -> None:
    data = q("select 1") + codec.message(b"S")
    fwd, msgs = client_framer().feed(data)
    assert fwd is data
    assert [(chr(t), b) for t, b, _ in msgs] == [("Q", b"select 1\x00"), ("S", b"")]


def test_framer_any_split_yields_same_bytes_and_messages() -> None:
    stream = q("select 1") + codec.message(b"d", os.urandom(3000)) + q("select 2") + codec.message(b"X")
    for cut in range(0, len(stream), 7):
        f = client_framer()
        a, ma = f.feed(stream[:cut])
        b, mb = f.feed(stream[cut:])
        assert a + b == stream
        assert [(t, body) for t, body, _ in ma + mb] == [(ord("Q"), b"select 1\x00"), (ord("Q"), b"select 2\x00"), (ord("X"), b"")]


def test_framer_streams_uninspected_messages_without_buffering() -> None:
    f = Framer(BACKEND_INSPECT)
    big = codec.message(b"D", b"x" * 1_000_000)
    fwd, msgs = f.feed(big[:1000])
    assert fwd == big[:1000] and msgs == [] and f.pending == 0


def test_framer_rejects_unknown_types_and_absurd_lengths() -> None:
    with pytest.raises(codec.ProtocolViolation, match="unexpected message type"):
        client_framer().feed(b"!" + struct.pack("!I", 4))
    with pytest.raises(codec.ProtocolViolation, match="over the gateway's limit"):
        client_framer(max_inspect=1 << 20, max_message=1 << 20).feed(b"Q" + struct.pack("!I", 1 << 30))
    with pytest.raises(codec.ProtocolViolation, match="invalid message length"):
        client_framer().feed(b"S" + struct.pack("!I", 1000))
    with pytest.raises(codec.ProtocolViolation):
        client_framer().feed(b"Q" + struct.pack("!I", 2))


def test_framer_random_bytes_raise_only_protocol_violations() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        f = client_framer(max_inspect=1 << 16, max_message=1 << 16)
        try:
            for _ in range(3):
                f.feed(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 30))))
        except codec.ProtocolViolation:
            pass


# ------------------------------------------------------------------------------ tracker


def parse(name: bytes, text: str) -> bytes:
    return name + b"\x00" + text.encode() + b"\x00" + struct.pack("!h", 0)


def bind(portal: bytes, stmt: bytes, nparams: int) -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!h", 0) + struct.pack("!h", nparams)
    for _ in range(nparams):
        body += struct.pack("!i", 1) + b"1"
    return body + struct.pack("!h", 0)


def execute(portal: bytes = b"") -> bytes:
    return portal + b"\x00" + struct.pack("!i", 0)


def cc(tag: str) -> bytes:
    return codec.cstr(tag)


def err(code: str) -> bytes:
    return b"SERROR\x00C" + code.encode() + b"\x00Mboom\x00\x00"


def test_tracker_simple_query_with_several_results() -> None:
    t = StatementTracker()
    started = t.frontend(ord("Q"), b"select 1; insert into x values (1)\x00")
    assert started.seq == 1 and started.kind == "simple"
    assert t.backend(ord("C"), cc("SELECT 1")) == []
    assert t.backend(ord("C"), cc("INSERT 0 1")) == []
    [fin] = t.backend(ord("Z"), b"I")
    assert (fin.status, fin.tag, fin.rows) == ("ok", "SELECT 1;INSERT 0 1", 2)


def test_tracker_extended_pipeline_error_skips_rest_until_sync() -> None:
    t = StatementTracker()
    t.frontend(ord("P"), parse(b"", "select $1"))
    t.frontend(ord("B"), bind(b"", b"", 1))
    s1 = t.frontend(ord("E"), execute())
    t.frontend(ord("P"), parse(b"", "select 1/0"))
    t.frontend(ord("B"), bind(b"", b"", 0))
    s2 = t.frontend(ord("E"), execute())
    t.frontend(ord("P"), parse(b"", "select 3"))
    t.frontend(ord("B"), bind(b"", b"", 0))
    s3 = t.frontend(ord("E"), execute())
    t.frontend(ord("S"), b"")
    s4 = t.frontend(ord("Q"), b"select 4\x00")
    assert (s1.text, s1.param_count, s2.text, s3.text) == ("select $1", 1, "select 1/0", "select 3")
    assert [f.status for f in t.backend(ord("C"), cc("SELECT 1"))] == ["ok"]
    fins = t.backend(ord("E"), err("22012"))
    assert [(f.seq, f.status, f.error_code) for f in fins] == [(s2.seq, "error", "22012"), (s3.seq, "skipped", "22012")]
    assert t.backend(ord("Z"), b"I") == []
    t.backend(ord("C"), cc("SELECT 1"))
    [fin] = t.backend(ord("Z"), b"I")
    assert fin.seq == s4.seq and fin.status == "ok"
    assert t.in_flight == 0


def test_tracker_named_statements_and_close() -> None:
    t = StatementTracker()
    t.frontend(ord("P"), parse(b"s1", "select 1"))
    t.frontend(ord("B"), bind(b"p1", b"s1", 0))
    assert t.frontend(ord("E"), execute(b"p1")).text == "select 1"
    t.frontend(ord("C"), b"Ss1\x00")
    t.frontend(ord("B"), bind(b"p2", b"s1", 0))
    assert t.frontend(ord("E"), execute(b"p2")).text == "<unknown prepared statement>"


def test_tracker_parse_error_without_execute() -> None:
    t = StatementTracker()
    t.frontend(ord("P"), parse(b"", "selec"))
    t.frontend(ord("S"), b"")
    assert t.backend(ord("E"), err("42601")) == []
    assert t.backend(ord("Z"), b"I") == []
    assert t.transaction_status == b"I"


def _feed_all(f: Framer, reads: list[bytes]) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Feed `reads` as a relay does: what follows a long message in a read is fed next (take_rest)."""
    out, msgs = [], []
    for read in reads:
        while read:
            fwd, got = f.feed(read)
            out.append(fwd)
            msgs += [(t, fwd[o:body] if t & framing.ROWS else body) for t, body, o in got]
            read = f.take_rest()
    return b"".join(out), msgs


@pytest.mark.parametrize("native", [True, False], ids=["C", "python"])
def test_a_long_message_is_filled_read_by_read_and_what_follows_it_comes_next(monkeypatch, native: bool) -> None:
    """A held message of LARGE bytes or more is copied into place as its reads arrive, never joined at its
    end; the bytes after it in its last read are left for the caller. Whatever the cuts, the bytes
    forwarded are the stream, and the messages are the ones sent."""
    if not native:
        monkeypatch.setattr(framing, "blank", framing.blank_py)
        monkeypatch.setattr(framing, "fill", framing.fill_py)
    text = b"select '" + bytes(range(97, 123)) * ((framing.LARGE // 26) + 10) + b"'"
    stream = q("select 1") + q(text.decode()) + codec.message(b"S") + q("select 2")
    rng = random.Random(7)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40)))
        reads = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        f = client_framer(max_inspect=1 << 22)
        fwd, msgs = _feed_all(f, reads)
        assert fwd == stream and f.pending == 0 and f.incomplete == 0
        assert msgs == [(ord("Q"), b"select 1\x00"), (ord("Q"), text + b"\x00"), (ord("S"), b""), (ord("Q"), b"select 2\x00")]
        assert all(type(body) is bytes for _, body in msgs)


def test_a_long_row_is_returned_as_a_run_of_one() -> None:
    row = codec.message(b"D", b"\x00\x01" + struct.pack("!i", framing.LARGE) + b"r" * framing.LARGE)
    stream = row + codec.message(b"C", b"SELECT 1\x00")
    f = Framer(BACKEND_INSPECT + b"D", max_inspect=1 << 22, rows=ord("D"))
    reads = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
    fwd, msgs = _feed_all(f, reads)
    assert fwd == stream
    assert msgs == [(ord("D") | framing.ROWS, row), (ord("C"), b"SELECT 1\x00")]


def test_a_long_message_held_counts_twice_against_the_budget() -> None:
    """Message and body are each filled: what the budget counts is what is held."""
    f = client_framer(max_inspect=1 << 22)
    msg = q("select '" + "a" * framing.LARGE + "'")
    assert f.feed(msg[:100_000]) == (b"", [])
    assert f.pending == 200_000 and f.incomplete == len(msg) - 100_000
    f.clear()
    assert f.pending == 0 and f.incomplete == 0
