"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers a client reaches before and after login.

    python soak/fuzz_targets.py startup|messages|scram [libFuzzer flags, e.g. -max_total_time=60]

The invariant: every input yields a clean error (ProtocolViolation, or ScramError in authentication)
or a correct parse; any other exception, a crash of the C scanner, or memory over the limit
(-rss_limit_mb) is a finding, and libFuzzer writes the input that caused it (the reproducer) to
-artifact_prefix. `messages` also holds the C message scanner to its Python reference."""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports(include=["wardgate"]):
    from wardgate.engines.postgres import codec
    from wardgate.engines.postgres.framing import Framer, scan, scan_py
    from wardgate.engines.postgres.scram import ScramError, ScramServer, make_verifier
    from wardgate.engines.postgres.tracker import FRONTEND_INSPECT, StatementTracker

MAX = 1 << 16
VERIFIER = make_verifier("wgc_x_secret", b"0123456789abcdef", 4096)


def startup(data: bytes) -> None:
    reader = codec.MessageReader(max_length=MAX)
    try:
        for cut in _cuts(data):
            reader.feed(cut)
            packet = reader.take_startup()
            if packet is not None:
                assert isinstance(packet, (codec.StartupMessage, codec.SSLRequest, codec.GSSENCRequest,
                                           codec.CancelRequest))
                if isinstance(packet, codec.StartupMessage):
                    assert all(isinstance(k, str) and isinstance(v, str) for k, v in packet.parameters.items())
                break
    except codec.ProtocolViolation:
        pass
    assert len(reader) <= MAX + 8


def messages(data: bytes) -> None:
    limits = [MAX] * 256
    inspect = bytes(1 if t in FRONTEND_INSPECT else 0 for t in range(256))
    import array

    raw_limits = array.array("I", limits).tobytes()
    assert scan(data, 0, raw_limits, inspect, 0) == scan_py(data, 0, raw_limits, inspect, 0)
    framer = Framer(FRONTEND_INSPECT + b"X", allowed=codec.FRONTEND_TYPES, small=codec.SMALL_FRONTEND_TYPES,
                    max_inspect=MAX, max_message=MAX)
    tracker = StatementTracker(track_describe=True)
    forwarded = b""
    try:
        for cut in _cuts(data):
            out, msgs = framer.feed(cut)
            forwarded += out
            assert framer.pending <= MAX + 5
            for mtype, body, _ in msgs:
                tracker.frontend(mtype, body)
    except codec.ProtocolViolation:
        return
    assert data[1:].startswith(forwarded)  # the first byte only says where to cut


def scram_exchange(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    first = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
    mechanism = fdp.PickValueInList([b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS", b"", b"x"])
    body = mechanism + b"\x00" + struct.pack("!i", len(first)) + first
    try:
        _, payload = codec.parse_sasl_initial_response(body)
        server = ScramServer(b"0123456789abcdef", 4096)
        server.client_first(payload)
        server.client_final(fdp.ConsumeBytes(300), [("x", VERIFIER)])
    except (codec.ProtocolViolation, ScramError):
        pass


def _cuts(data: bytes) -> list[bytes]:
    """The input in pieces, as a network delivers it: the first byte says where to cut."""
    if not data:
        return [b""]
    step = 1 + data[0] % 64
    rest = data[1:]
    return [rest[i:i + step] for i in range(0, len(rest), step)] or [b""]


TARGETS = {"startup": startup, "messages": messages, "scram": scram_exchange}

if __name__ == "__main__":
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()
