"""The tripwire: the server's CommandComplete tags against what the classification predicted.

A classifier that misreads a statement is injected (a policy that classifies a DROP as the SELECT it
pretends to be); the server's answer then disagrees with the prediction, and the session must end,
with the statement recorded as `differential` and a high-risk audit event.
"""

from __future__ import annotations

import dataclasses
import json

from tests.unit.test_relay_paths import _answer, _Peer
from wardgate.engines.postgres import codec
from wardgate.engines.postgres.session import Relay
from wardgate.policy.guardrails import Decision, StatementPolicy, standard_rules
from wardgate.sql.classify import Classification, classify


class Misreading(StatementPolicy):
    """Classifies `text` as if it were `pretend`: what a gateway read past would do."""

    def __init__(self, text: str, pretend: str) -> None:
        super().__init__(standard_rules({}))
        self.text, self.pretend = text, pretend

    def _decide(self, text: str, c: Classification | None = None) -> Decision:
        if text == self.text:
            return dataclasses.replace(super()._decide(self.pretend), classification=classify(self.pretend))
        return super()._decide(text, c)


def _relay(policy: StatementPolicy) -> tuple[Relay, list[str], list[str]]:
    lines: list[str] = []
    ended: list[str] = []
    relay = Relay(session_id="b" * 32, connection="c", client=_Peer(), upstream=_Peer(), record=lines.extend,
                  defer=lines.extend, on_end=lambda _r, reason, _code: ended.append(reason), max_message=1 << 20, policy=policy)
    return relay, lines, ended


def _records(lines: list[str]) -> list[dict]:
    return [json.loads(line) for line in "".join(lines).splitlines()]


def _done(tag: str) -> bytes:
    return codec.message(b"C", codec.cstr(tag))


READY = codec.message(b"Z", b"I")


def test_a_query_answered_as_classified_goes_on() -> None:
    relay, lines, ended = _relay(StatementPolicy(standard_rules({})))
    relay.from_client(codec.message(b"Q", codec.cstr("select 1; insert into t values (1)")))
    relay.from_upstream(b"".join(_answer([("1", "a", "b")])[:-2]) + _done("SELECT 1") + _done("INSERT 0 1") + READY)
    assert not ended and not relay.ended
    assert [r["status"] for r in _records(lines) if r["k"] == "done"] == ["ok"]


def test_a_misread_query_ends_the_session() -> None:
    text = "select 1; drop table t"
    relay, lines, ended = _relay(Misreading(text, "select 1"))
    relay.from_client(codec.message(b"Q", codec.cstr(text)))
    assert relay.upstream.transport.out  # forwarded: the misreading classifier let it through
    relay.from_upstream(b"".join(_answer([("1", "a", "b")])[:-2]) + _done("SELECT 1") + _done("DROP TABLE") + READY)
    assert relay.ended and ended and "read past" in ended[0]
    records = _records(lines)
    done = [r for r in records if r["k"] == "done"]
    assert done[-1]["status"] == "differential" and "DROP TABLE" in done[-1]["msg"]
    alarm = [r for r in records if r["k"] == "event" and r["kind"] == "statement.differential"]
    assert alarm and alarm[0]["outcome"] == "high" and "DROP TABLE" in alarm[0]["detail"]
    sent = b"".join(relay.client.transport.out)  # type: ignore[attr-defined]
    assert b"FATAL" in sent and b"42501" in sent and b"SELECT 1" not in sent.split(b"FATAL")[-1]


def test_a_misread_kind_in_one_pass_ends_the_session() -> None:
    """The one-pass path (the whole answer in one read) holds the same check."""
    text = "delete from t"
    relay, lines, ended = _relay(Misreading(text, "select 1 from t"))
    relay.from_client(codec.message(b"Q", codec.cstr(text)))
    relay.from_upstream(b"".join(_answer([])[:1]) + _done("DELETE 3") + READY)
    assert relay.ended and "read past" in ended[0]


def test_a_misread_execute_ends_the_session() -> None:
    text = "delete from t"
    relay, lines, ended = _relay(Misreading(text, "select * from t where id = 1"))
    relay.from_client(codec.message(b"P", codec.cstr("s1") + codec.cstr(text) + b"\x00\x00")
                      + codec.message(b"B", codec.cstr("") + codec.cstr("s1") + b"\x00\x00\x00\x00\x00\x00")
                      + codec.message(b"E", codec.cstr("") + b"\x00\x00\x00\x00") + codec.message(b"S", b""))
    relay.from_upstream(codec.message(b"1", b"") + codec.message(b"2", b"") + _done("DELETE 3") + READY)
    assert relay.ended and "read past" in ended[0]
    assert [r["status"] for r in _records(lines) if r["k"] == "done"] == ["differential"]


def test_an_error_part_way_is_not_a_differential() -> None:
    """A Query whose second statement failed answered one tag: fewer than predicted, all as predicted."""
    relay, lines, ended = _relay(StatementPolicy(standard_rules({})))
    relay.from_client(codec.message(b"Q", codec.cstr("insert into t values (1); insert into t values ('x')")))
    relay.from_upstream(_done("INSERT 0 1") + codec.error_response("22P02", "invalid input") + READY)
    assert not relay.ended and not ended


def test_sql_prepare_forgets_what_protocol_names_were_bound_to() -> None:
    """`PREPARE s1` in SQL shares the protocol's namespace: a later Execute of s1 is not held to the old Parse."""
    relay, lines, ended = _relay(StatementPolicy(standard_rules({})))
    relay.from_client(codec.message(b"P", codec.cstr("s1") + codec.cstr("select 1") + b"\x00\x00")
                      + codec.message(b"S", b""))
    relay.from_upstream(codec.message(b"1", b"") + READY)
    relay.from_client(codec.message(b"Q", codec.cstr("deallocate s1; prepare s1 as insert into t values (1)")))
    relay.from_upstream(_done("DEALLOCATE") + _done("PREPARE") + READY)
    relay.from_client(codec.message(b"B", codec.cstr("") + codec.cstr("s1") + b"\x00\x00\x00\x00\x00\x00")
                      + codec.message(b"E", codec.cstr("") + b"\x00\x00\x00\x00") + codec.message(b"S", b""))
    relay.from_upstream(codec.message(b"2", b"") + _done("INSERT 0 1") + READY)
    assert not relay.ended and not ended


def test_what_counts_as_predicted() -> None:
    from wardgate.sql.tags import as_predicted

    select, drop = frozenset({"SELECT"}), frozenset({"DROP TABLE"})
    assert as_predicted((select, drop), ["SELECT 1", "DROP TABLE"], True)
    assert as_predicted((select, drop), ["SELECT 1"], False)  # an error stopped it part way
    assert not as_predicted((select, drop), ["SELECT 1"], True)  # ran to the end, one statement short
    assert not as_predicted((select,), ["SELECT 1", "DROP TABLE"], True)
    assert not as_predicted((select,), ["EMPTY"], True)  # the server saw no statement where one was read
    assert as_predicted((select,), ["SUSPENDED"], True)  # a row limit: the portal goes on later
    assert as_predicted((), ["EMPTY"], True)
    assert as_predicted((None,), ["DROP TABLE"], True)  # no prediction for it (EXECUTE)
