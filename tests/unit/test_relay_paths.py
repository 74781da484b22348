"""The relay's one-pass handling of a whole simple-query answer against its general, message-by-message loop.

A simple Query's whole answer usually arrives in one read, which the relay handles in one pass
(`Relay._simple_answer`); split over several reads, the same answer goes through the general loop.
Both must forward the same bytes, write the same records and count the same masked values.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from wardgate.engines.postgres import codec
from wardgate.engines.postgres.session import Relay
from wardgate.masking.plan import MaskingPolicy, MaskRule
from wardgate.policy.guardrails import StatementPolicy, standard_rules


class _Transport:
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Peer:
    def __init__(self) -> None:
        self.transport = _Transport()
        self.closed = False
        self.close_exc = None

    def start_relay(self, on_data: Callable[[bytes], None]) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True


def _relay(masked: bool, results: str = "summary") -> tuple[Relay, list[str]]:
    lines: list[str] = []
    masking = MaskingPolicy([MaskRule("pii", columns=("email",), detectors=("card",))], b"s" * 16) if masked else None
    relay = Relay(session_id="a" * 32, connection="c", client=_Peer(), upstream=_Peer(), record=lines.extend,
                  defer=lines.extend, on_end=lambda *a: None, max_message=1 << 20,
                  policy=StatementPolicy(standard_rules({})), masking=masking, results=results)
    return relay, lines


def _field(name: str, type_oid: int = 25) -> bytes:
    return codec.cstr(name) + (0).to_bytes(4, "big") + (0).to_bytes(2, "big") + type_oid.to_bytes(4, "big") + \
        (-1).to_bytes(2, "big", signed=True) + (-1).to_bytes(4, "big", signed=True) + (0).to_bytes(2, "big")


def _answer(rows: list[tuple[str | None, ...]]) -> list[bytes]:
    """RowDescription (id int4, email text, note text), the rows, CommandComplete, ReadyForQuery."""
    desc = codec.message(b"T", (3).to_bytes(2, "big") + _field("id", 23) + _field("email") + _field("note"))
    out = [desc]
    for row in rows:
        body = len(row).to_bytes(2, "big")
        for v in row:
            body += (-1).to_bytes(4, "big", signed=True) if v is None else len(v.encode()).to_bytes(4, "big") + v.encode()
        out.append(codec.message(b"D", body))
    out.append(codec.message(b"C", codec.cstr(f"SELECT {len(rows)}")))
    out.append(codec.message(b"Z", b"I"))
    return out


ROWS = [("1", "ann@example.com", "card 4111 1111 1111 1111"), ("2", None, "nothing here"), ("3", "bob@example.org", "")]


def _run(relay: Relay, reads: list[list[bytes]], query: str = "select id, email, note from people where id < 10") -> bytes:
    relay.from_client(codec.message(b"Q", codec.cstr(query)))
    for read in reads:
        relay.from_upstream(b"".join(read))
    return b"".join(relay.client.transport.out)  # type: ignore[attr-defined]


def _records(lines: list[str]) -> list[dict]:
    out = []
    for line in "".join(lines).splitlines():
        r = json.loads(line)
        r.pop("at", None)
        r.pop("ms", None)
        out.append(r)
    return out


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rows", [ROWS, ROWS[:1], []])
def test_one_pass_and_general_loop_agree(masked, rows):
    answer = _answer(rows)
    one, one_lines = _relay(masked)
    split, split_lines = _relay(masked)
    calls = []
    original = one._simple_answer
    one._simple_answer = lambda msgs, fwd: calls.append(1) or original(msgs, fwd)  # type: ignore[method-assign]
    sent_one = _run(one, [answer])
    sent_split = _run(split, [answer[:-2], answer[-2:]])  # CommandComplete and ReadyForQuery in a later read
    assert calls and one.tracker.in_flight == 0 and split.tracker.in_flight == 0
    assert sent_one == sent_split
    assert _records(one_lines) == _records(split_lines)
    if masked:
        assert one.masking.totals == split.masking.totals  # type: ignore[union-attr]
        if rows:
            assert b"ann@example.com" not in sent_one and b"4111 1111 1111 1111" not in sent_one
            assert one.masking.totals["email"] == sum(r[1] is not None for r in rows)  # type: ignore[union-attr]
            assert one.masking.totals["note"] == 1  # type: ignore[union-attr]


def test_one_pass_records_a_sequence_of_queries_like_the_loop():
    """Several queries one after another: numbering, outcomes and masked counts stay in step."""
    one, one_lines = _relay(True)
    split, split_lines = _relay(True)
    for i in range(5):
        answer = _answer(ROWS[: i % 4])
        _run(one, [answer], f"select id, email, note from people where id < {i}")
        _run(split, [answer[:1], answer[1:]], f"select id, email, note from people where id < {i}")
    assert _records(one_lines) == _records(split_lines)
    assert [r["seq"] for r in _records(one_lines) if r["k"] == "done"] == [1, 2, 3, 4, 5]
    assert one.masking.totals == split.masking.totals  # type: ignore[union-attr]


def _spy(relay: Relay) -> list:
    seen: list = []
    original = relay._simple_answer
    relay._simple_answer = lambda msgs, fwd: seen.append(original(msgs, fwd)) or seen[-1]  # type: ignore[method-assign]
    return seen


def test_other_answers_go_through_the_general_loop():
    """A sampled result, a second statement in flight, or an error is not the one-pass case, and is
    still recorded in full."""
    relay, lines = _relay(True, results="sample")
    seen = _spy(relay)
    _run(relay, [_answer(ROWS)])
    assert seen == [None]  # sampling: the general loop keeps the first rows
    done = [r for r in _records(lines) if r["k"] == "done"][0]
    assert done["sample"][0][1] == "[email]"  # the rows as the client got them, masked

    relay, lines = _relay(True)
    seen = _spy(relay)
    relay.from_client(codec.message(b"Q", codec.cstr("select 1")) + codec.message(b"Q", codec.cstr("select 2")))
    relay.from_upstream(b"".join(_answer(ROWS[:1])))
    relay.from_upstream(b"".join(_answer(ROWS[1:2])))
    assert seen[0] is None  # two queries were in flight
    assert seen[1] is not None  # the second was then the only one
    assert [(r["seq"], r["rows"]) for r in _records(lines) if r["k"] == "done"] == [(1, 1), (2, 1)]

    relay, lines = _relay(True)
    seen = _spy(relay)
    error = codec.error_response("42P01", 'relation "people" does not exist')
    _run(relay, [[error, codec.message(b"Z", b"I")]])
    assert seen == [None]
    done = [r for r in _records(lines) if r["k"] == "done"][0]
    assert done["status"] == "error" and done["code"] == "42P01"
