"""The C loops of the relay (_wire.c) against their Python references, on valid, random and hostile bytes.

Both must give the same answer for every input: the same frames, the same masked rows, the same
error for a malformed row. A crash or a disagreement here is a bug in the C code.
"""

from __future__ import annotations

import struct
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wardgate.engines.postgres import _wire, codec
from wardgate.engines.postgres.framing import BAD, DONE, HOLD, ROWS, SKIP, Framer, scan_py
from wardgate.masking.plan import NULL_VALUE, MaskingPolicy, mask_rows_py, parse_rules

FAST = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_c_part_is_built():
    """The package was built with its C part: the relay does not silently run the slow reference."""
    from wardgate.engines.postgres import framing
    from wardgate.masking import plan

    assert framing.scan is _wire.scan
    assert plan.mask_rows is _wire.mask_rows


def _limits(cap: int = 1 << 20, allowed: bytes | None = None) -> bytes:
    import array

    return array.array("I", [cap if allowed is None or t in allowed else 0 for t in range(256)]).tobytes()


def _inspect(types: bytes) -> bytes:
    return bytes(1 if t in types else 0 for t in range(256))


def data_row(*values: bytes | None) -> bytes:
    body = struct.pack("!h", len(values))
    for v in values:
        body += b"\xff\xff\xff\xff" if v is None else struct.pack("!i", len(v)) + v
    return codec.message(b"D", body)


messages = st.builds(
    lambda t, body: bytes([t]) + struct.pack("!I", len(body) + 4) + body,
    st.sampled_from(b"DCZTEdn"),
    st.binary(max_size=40),
)


@FAST
@given(st.lists(messages, max_size=12), st.binary(max_size=12), st.integers(0, 60), st.sampled_from([0, ord("D")]),
       st.sampled_from([b"CZE", b"CZEDT", b"D", b""]))
def test_scan_agrees_with_the_reference(msgs, tail, cut, rows, inspect):
    data = b"".join(msgs) + tail
    data = data[: max(len(data) - cut, 0)]
    args = (data, 0, _limits(64), _inspect(inspect), rows)
    assert _wire.scan(*args) == scan_py(*args)


@FAST
@given(st.binary(max_size=200), st.integers(0, 10))
def test_scan_of_random_bytes_agrees(data, start):
    start = min(start, len(data))
    for rows in (0, ord("D")):
        args = (data, start, _limits(50, allowed=b"DCZTE"), _inspect(b"DCZ"), rows)
        assert _wire.scan(*args) == scan_py(*args)


def test_scan_groups_consecutive_rows_into_runs():
    rows = data_row(b"a") + data_row(b"bb")
    data = codec.message(b"T", b"x") + rows + codec.message(b"C", b"SELECT 2\x00") + data_row(b"c")
    pos, state, _, msgs = _wire.scan(data, 0, _limits(), _inspect(b"TDC"), ord("D"))
    t_len = 6
    assert (pos, state) == (len(data), DONE)
    assert msgs == [
        (ord("T"), b"x", 0),
        (ord("D") | ROWS, t_len + len(rows), t_len),
        (ord("C"), b"SELECT 2\x00", t_len + len(rows)),
        (ord("D") | ROWS, len(data), len(data) - len(data_row(b"c"))),
    ]


def test_scan_states():
    row = data_row(b"abc")
    assert _wire.scan(row[:3], 0, _limits(), _inspect(b"D"), 0)[:2] == (0, HOLD)
    assert _wire.scan(row[:-1], 0, _limits(), _inspect(b"D"), 0)[:2] == (0, HOLD)
    # not inspected: streams, and says how much of it is still to come
    assert _wire.scan(row[:-1], 0, _limits(), _inspect(b""), 0)[:3] == (len(row) - 1, SKIP, 1)
    assert _wire.scan(b"D\x00\x00\x00\x02", 0, _limits(), _inspect(b"D"), 0)[:3] == (0, BAD, 2)
    assert _wire.scan(row, 0, _limits(allowed=b"C"), _inspect(b"D"), 0)[:2] == (0, BAD)


def test_framer_rejects_what_it_rejected_before():
    f = Framer(b"Q", allowed=frozenset(b"QX"), max_inspect=100, max_message=100)
    with pytest.raises(codec.ProtocolViolation, match="unexpected message type"):
        f.feed(b"Z\x00\x00\x00\x04")
    with pytest.raises(codec.ProtocolViolation, match="over the gateway's limit"):
        Framer(b"Q", max_inspect=100, max_message=100).feed(b"Q\x00\x01\x00\x00")


# -- masking


def _plan(rules: list[dict], columns: list[tuple[str, int]]) -> object:
    desc = struct.pack("!h", len(columns))
    for name, oid in columns:
        desc += name.encode() + b"\x00" + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0)
    return MaskingPolicy(parse_rules(rules), b"salt").plan(desc)


RULES = [
    {"name": "emails", "columns": ["email"], "strategy": "redact"},
    {"name": "cards", "columns": ["card"], "strategy": "partial"},
    {"name": "ids", "columns": ["n"], "strategy": "hash"},
    {"name": "pii", "detectors": ["email", "card", "ssn", "phone", "iban", "ip"], "strategy": "redact"},
]
COLUMNS = [("id", 23), ("email", 25), ("card", 25), ("note", 25), ("n", 1043), ("amount", 23)]
values = st.one_of(
    st.none(),
    st.binary(max_size=30),
    st.sampled_from([b"ann@example.com", b"4111 1111 1111 1111", b"123-45-6789", b"+44 20 7946 0958",
                     b"GB82 WEST 1234 5698 7654 32", b"10.0.0.1", b"::1", b"x"]),
)


@FAST
@given(st.lists(st.lists(values, min_size=6, max_size=6), max_size=8))
def test_masking_agrees_with_the_reference(rows):
    plan = _plan(RULES, COLUMNS)
    data = b"Zpre" + b"".join(data_row(*r) for r in rows) + b"post"
    end = len(data) - 4
    got = _wire.mask_rows(data, 4, end, plan.actions, plan.hits)
    c_hits = list(plan.hits)
    plan.hits[:] = [0] * len(plan.hits)
    want = mask_rows_py(data, 4, end, plan.actions, plan.hits)
    assert got == want
    assert c_hits == plan.hits


@FAST
@given(st.binary(max_size=120), st.integers(0, 8))
def test_masking_of_hostile_rows_agrees(data, start):
    """Random bytes as a 'run': both refuse it the same way, or both mask it the same way."""
    plan = _plan(RULES, COLUMNS)
    data = b"D" + data
    start = min(start, len(data))
    results = []
    for fn in (_wire.mask_rows, mask_rows_py):
        plan.hits[:] = [0] * len(plan.hits)
        try:
            results.append(("ok", fn(data, start, len(data), plan.actions, plan.hits), list(plan.hits)))
        except ValueError as exc:
            results.append(("error", str(exc)))
    assert results[0] == results[1]


def test_masking_rewrites_only_planned_columns_and_fixes_lengths():
    plan = _plan(RULES, COLUMNS)
    row = data_row(b"1", b"ann@example.com", b"4111111111111111", b"call +44 20 7946 0958 now", b"7", b"12")
    out = _wire.mask_rows(row, 0, len(row), plan.actions, plan.hits)
    (length,) = struct.unpack_from("!I", out, 1)
    assert length == len(out) - 1
    assert b"ann@example.com" not in out and b"[email]" in out
    assert b"************1111" in out
    assert b"call [phone] now" in out
    assert b"n:" in out  # hashed
    assert out.endswith(struct.pack("!i", 2) + b"12")
    counts: Counter[str] = Counter()
    plan.take_counts(counts)
    assert dict(counts) == {"email": 1, "card": 1, "note": 1, "n": 1}
    plan.take_counts(counts)
    assert dict(counts) == {"email": 1, "card": 1, "note": 1, "n": 1}


def test_masking_keeps_nulls_and_unchanged_runs():
    plan = _plan(RULES, COLUMNS)
    row = data_row(b"1", None, None, b"nothing here", None, b"3")
    assert _wire.mask_rows(row * 3, 0, 3 * len(row), plan.actions, plan.hits) is None
    assert sum(plan.hits) == 0


def test_masking_refuses_malformed_rows():
    plan = _plan(RULES, COLUMNS)
    row = data_row(b"1", b"a@b.co")
    for bad in (row[:-1], row + b"x", b"C" + row[1:], row[:5] + b"\xff\xff" + row[7:],
                row[:7] + struct.pack("!i", 1000) + row[11:], row[:7] + struct.pack("!i", -2) + row[11:]):
        for fn in (_wire.mask_rows, mask_rows_py):
            with pytest.raises(ValueError):
                fn(bad, 0, len(bad), plan.actions, plan.hits)


def test_a_masking_function_must_return_a_valid_value():
    bad = (lambda raw: b"\x00\x00\x00\x09abc", False, 0, False, True)
    row = data_row(b"x")
    for fn in (_wire.mask_rows, mask_rows_py):
        with pytest.raises(ValueError, match="length-prefixed"):
            fn(row, 0, len(row), (bad,), [0])
    assert _wire.mask_rows(row, 0, len(row), (NULL_VALUE,), [0]) == data_row(None)




def test_the_values_of_a_row_are_searched_up_to_the_scan_limit_in_all() -> None:
    """Searching each value of a wide row up to the limit would hold the loop for all of them at once: the
    values of one row are searched up to the limit in all, and those past it masked whole, as a value
    longer than the limit is. Rows that fit are searched as ever, in the same run."""
    plan = _plan([{"name": "pii", "detectors": ["email"], "strategy": "redact"}], [("a", 25), ("b", 25), ("c", 25)])
    pad = b"x" * (plan.scan_limit * 2 // 3)
    wide = data_row(b"ann@example.com " + pad, b"bob@example.com " + pad, b"and carl@example.com")
    small = data_row(b"dan@example.com", None, b"x")
    data = small + wide + small
    got = plan.mask_run(data, 0, len(data))
    rows = []
    pos = 0
    while pos < len(got):
        (length,) = struct.unpack_from("!I", got, pos + 1)
        rows.append(codec.data_row_raw(got[pos + 5:pos + 1 + length]))
        pos += 1 + length
    assert rows[0] == rows[2] == [b"[email]", None, b"x"]
    assert rows[1] == [b"[email] " + pad, b"[unscanned]", b"and [email]"]
