"""Property-based fuzzing of the sans-IO PostgreSQL codec: random, truncated, oversized and reordered
messages from clients (and from a misbehaving server), in random chunks. Every input yields a clean
error (ProtocolViolation, or ScramError in authentication) or a correct parse; no other exception
escapes, and what the framer holds back stays bounded. `make soak` runs the same properties with a
far larger budget (the hypothesis profile `soak`)."""

from __future__ import annotations

import os
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wardgate.engines.postgres import codec
from wardgate.engines.postgres.framing import ROWS, Framer
from wardgate.engines.postgres.scram import ScramError, ScramServer, make_verifier
from wardgate.engines.postgres.tracker import BACKEND_INSPECT, FRONTEND_INSPECT, StatementTracker
from wardgate.masking.plan import MaskingPolicy, parse_rules

MAX = 1 << 16
CLEAN = (codec.ProtocolViolation,)
names = st.binary(max_size=12).map(lambda b: b.replace(b"\x00", b""))
texts = st.text(max_size=60).map(lambda s: s.replace("\x00", "").encode())
i16 = st.integers(-(1 << 15), (1 << 15) - 1)


def msg(t: bytes, body: bytes) -> bytes:
    return t + struct.pack("!I", len(body) + 4) + body


@st.composite
def frontend_messages(draw) -> bytes:  # noqa: ANN001
    kind = draw(st.sampled_from("QPBEDCSHFXdcf"))
    if kind == "Q":
        return msg(b"Q", draw(texts) + b"\x00")
    if kind == "P":
        types = draw(st.lists(st.integers(0, 1 << 31), max_size=4))
        return msg(b"P", draw(names) + b"\x00" + draw(texts) + b"\x00" + struct.pack(f"!h{len(types)}I", len(types), *types))
    if kind == "B":
        fmts = draw(st.lists(st.integers(0, 1), max_size=3))
        params = draw(st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=4))
        body = draw(names) + b"\x00" + draw(names) + b"\x00" + struct.pack(f"!h{len(fmts)}h", len(fmts), *fmts)
        body += struct.pack("!h", len(params))
        for p in params:
            body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
        res = draw(st.lists(st.integers(0, 1), max_size=3))
        return msg(b"B", body + struct.pack(f"!h{len(res)}h", len(res), *res))
    if kind == "E":
        return msg(b"E", draw(names) + b"\x00" + struct.pack("!i", draw(st.integers(0, 100))))
    if kind in "DC":
        return msg(kind.encode(), draw(st.sampled_from([b"S", b"P"])) + draw(names) + b"\x00")
    if kind == "F":
        return msg(b"F", struct.pack("!I", draw(st.integers(0, 1 << 32 - 1))) + draw(st.binary(max_size=20)))
    if kind == "d":
        return msg(b"d", draw(st.binary(max_size=100)))
    if kind == "f":
        return msg(b"f", draw(texts) + b"\x00")
    return msg(kind.encode(), b"")  # S H X c


@st.composite
def hostile(draw, messages) -> bytes:  # noqa: ANN001
    """A stream of messages, then damaged: truncated, a length made absurd, reordered, bytes flipped or spliced."""
    parts = draw(st.lists(messages, min_size=1, max_size=8))
    damage = draw(st.sampled_from(["none", "truncate", "oversize", "reorder", "flip", "splice", "undersize"]))
    if damage == "reorder":
        parts = draw(st.permutations(parts))
    data = b"".join(parts)
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage in ("oversize", "undersize"):
        at = draw(st.sampled_from([i for i, _ in enumerate(parts)]))
        off = sum(len(p) for p in parts[:at])
        length = draw(st.integers(1 << 20, (1 << 32) - 1)) if damage == "oversize" else draw(st.integers(0, 3))
        data = data[: off + 1] + struct.pack("!I", length) + data[off + 5:]
    elif damage == "flip" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + bytes([data[at] ^ draw(st.integers(1, 255))]) + data[at + 1:]
    elif damage == "splice":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=40)) + data[at:]
    return data


def chunks(draw, data: bytes) -> list[bytes]:  # noqa: ANN001
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


# `make soak` sets WARDGATE_FUZZ_EXAMPLES far higher
EXAMPLES = int(os.environ.get("WARDGATE_FUZZ_EXAMPLES", "300"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(data=st.data(), stream=hostile(frontend_messages()))
def test_client_streams_parse_or_fail_cleanly(data, stream) -> None:  # noqa: ANN001
    framer = Framer(FRONTEND_INSPECT + b"X", allowed=codec.FRONTEND_TYPES, small=codec.SMALL_FRONTEND_TYPES,
                    max_inspect=MAX, max_message=MAX)
    tracker = StatementTracker(track_describe=True)
    forwarded = b""
    try:
        for chunk in chunks(data.draw, stream):
            out, msgs = framer.feed(chunk)
            forwarded += out
            assert framer.pending <= MAX + 5  # bounded: at most one message held back
            for mtype, body, _ in msgs:
                tracker.frontend(mtype, body)
    except CLEAN:
        return
    # whatever was accepted is forwarded unchanged, in order, and only whole messages are held back
    assert forwarded + b"".join(framer._buf) == stream or forwarded == stream


@st.composite
def backend_messages(draw) -> bytes:  # noqa: ANN001
    kind = draw(st.sampled_from("TDCZEIsn1231"))
    if kind == "T":
        cols = draw(st.lists(st.tuples(names, st.integers(0, 1 << 20), i16, st.sampled_from([23, 25, 20, 1700, 2249, 16]),
                                       st.integers(0, 1)), max_size=4))
        body = struct.pack("!h", len(cols)) + b"".join(
            n + b"\x00" + struct.pack("!IhIhih", t, a, ty, -1, -1, f) for n, t, a, ty, f in cols)
        return msg(b"T", body)
    if kind == "D":
        vals = draw(st.lists(st.one_of(st.none(), st.binary(max_size=30), st.just(b"customer1@example.com")), max_size=4))
        body = struct.pack("!h", len(vals)) + b"".join(
            struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v for v in vals)
        return msg(b"D", body)
    if kind == "C":
        return msg(b"C", draw(st.sampled_from([b"SELECT 1", b"INSERT 0 3", b"UPDATE x", b"", b"COPY 99999999999999999999"]))
                   + b"\x00")
    if kind == "Z":
        return msg(b"Z", draw(st.sampled_from([b"I", b"T", b"E", b"?"])))
    if kind == "E":
        return msg(b"E", b"SERROR\x00C" + draw(st.sampled_from([b"42501", b"XX000", b""])) + b"\x00Mboom\x00\x00")
    return msg(kind.encode(), b"")


POLICY = MaskingPolicy(parse_rules([{"name": "pii", "detectors": ["email", "card"]}, {"name": "c", "columns": ["x*"]}]),
                       b"salt" * 8)


@FAST
@given(data=st.data(), stream=hostile(backend_messages()))
def test_server_streams_parse_or_fail_cleanly(data, stream) -> None:  # noqa: ANN001
    """A misbehaving server: the relay's parsing of its answers fails cleanly too."""
    framer = Framer(BACKEND_INSPECT, max_inspect=MAX, max_message=MAX, rows=ord("D"))
    tracker = StatementTracker(track_describe=True)
    tracker.frontend(ord("Q"), b"select 1\x00")
    masker = None
    try:
        for chunk in chunks(data.draw, stream):
            out, msgs = framer.feed(chunk)
            for mtype, body, off in msgs:
                if mtype & ROWS:
                    if masker is not None:
                        masker.mask_run(out, off, body)
                    continue
                if mtype == ord("T"):
                    masker = POLICY.plan(body)
                elif mtype == ord("D") and masker is not None:
                    masker.rewrite(body)
                tracker.backend(mtype, body)
    except CLEAN:
        pass


@FAST
@given(data=st.data(), params=st.dictionaries(texts, texts, max_size=5), minor=st.integers(0, 70000),
       damage=st.sampled_from(["none", "truncate", "flip", "length", "splice"]))
def test_startup_packets_parse_or_fail_cleanly(data, params, minor, damage) -> None:  # noqa: ANN001
    body = struct.pack("!I", (3 << 16) | (minor & 0xFFFF)) + b"".join(k + b"\x00" + v + b"\x00" for k, v in params.items()) + b"\x00"
    packet = struct.pack("!I", len(body) + 4) + body
    if damage == "truncate":
        packet = packet[: data.draw(st.integers(0, len(packet)))]
    elif damage == "flip":
        at = data.draw(st.integers(0, len(packet) - 1))
        packet = packet[:at] + bytes([packet[at] ^ data.draw(st.integers(1, 255))]) + packet[at + 1:]
    elif damage == "length":
        packet = struct.pack("!I", data.draw(st.integers(0, (1 << 32) - 1))) + packet[4:]
    elif damage == "splice":
        at = data.draw(st.integers(0, len(packet)))
        packet = packet[:at] + data.draw(st.binary(min_size=1, max_size=20)) + packet[at:]
    reader = codec.MessageReader(max_length=1 << 16)
    try:
        for chunk in chunks(data.draw, packet):
            reader.feed(chunk)
            got = reader.take_startup()
            if got is not None:
                assert isinstance(got, (codec.StartupMessage, codec.SSLRequest, codec.GSSENCRequest, codec.CancelRequest))
                if damage == "none" and isinstance(got, codec.StartupMessage):  # an intact packet parses exactly
                    assert got.parameters == {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                                              for k, v in params.items()} or not all(params)
                break
    except CLEAN:
        pass


VERIFIER = make_verifier("wgc_x_secret", b"0123456789abcdef", 4096)


scram_attr = st.tuples(st.sampled_from("nrcpeimx,="), st.text(max_size=30)).map(lambda kv: f"{kv[0]}={kv[1]}")


@st.composite
def scram_first(draw) -> bytes:  # noqa: ANN001
    gs2 = draw(st.sampled_from(["n,,", "y,,", "p=tls-server-end-point,,", "n,a=alice,", "", "x,,"]))
    attrs = draw(st.lists(scram_attr, max_size=4)) if draw(st.booleans()) else ["n=", f"r={draw(st.text(max_size=24))}"]
    return (gs2 + ",".join(attrs)).encode("utf-8", "surrogatepass") if draw(st.booleans()) else draw(st.binary(max_size=80))


@FAST
@given(first=scram_first(), final=st.one_of(st.lists(scram_attr, max_size=4).map(lambda a: ",".join(a).encode()),
                                            st.binary(max_size=120)),
       mech=st.sampled_from([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"", b"PLAIN"]), cut=st.integers(-1, 300))
def test_sasl_messages_parse_or_fail_cleanly(first, final, mech, cut) -> None:  # noqa: ANN001
    body = mech + b"\x00" + struct.pack("!i", len(first)) + first
    body = body[:cut] if cut >= 0 else body
    try:
        mechanism, data = codec.parse_sasl_initial_response(body)
        server = ScramServer(b"0123456789abcdef", 4096)
        server.client_first(data)
        server.client_final(final, [("x", VERIFIER)])
    except (*CLEAN, ScramError):
        pass
