"""The relay masks rows by what the server says of them, on a catalog that follows DDL.

An Execute's rows are masked by what the server says of that very portal just before it runs. A plan
kept by name would describe whatever ran under the name before (the unnamed portal of an earlier
statement, a cursor redeclared in SQL). So unless the client's own Describe of the portal comes right
before its Execute, the relay sends one itself and consumes the answer. After DDL, the catalog that
column rules follow is read again before the next statement is decided.
"""

from __future__ import annotations

from wardgate.engines.postgres import codec
from wardgate.engines.postgres.session import Relay

from .test_relay_paths import _field, _relay


def _messages(data: bytes) -> list[tuple[str, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos + 1:pos + 5], "big")
        out.append((chr(data[pos]), data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def _sent(relay: Relay, peer: str) -> list[tuple[str, bytes]]:
    transport = getattr(relay, peer).transport
    data = b"".join(transport.out)
    transport.out.clear()
    return _messages(data)


def _parse(text: str, name: str = "") -> bytes:
    return codec.message(b"P", codec.cstr(name) + codec.cstr(text) + b"\x00\x00")


def _bind(portal: str = "", stmt: str = "") -> bytes:
    return codec.message(b"B", codec.cstr(portal) + codec.cstr(stmt) + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")


def _describe(portal: str = "") -> bytes:
    return codec.message(b"D", b"P" + codec.cstr(portal))


def _execute(portal: str = "") -> bytes:
    return codec.message(b"E", codec.cstr(portal) + b"\x00\x00\x00\x00")


SYNC = codec.message(b"S")
EMAIL_DESC = codec.message(b"T", (1).to_bytes(2, "big") + _field("email"))
ROW = codec.message(b"D", (1).to_bytes(2, "big") + (17).to_bytes(4, "big") + b"ada@example.com!!")


def _answer(*middle: bytes) -> bytes:
    return b"".join((codec.message(b"1"), codec.message(b"2"), *middle, codec.message(b"C", codec.cstr("SELECT 1")),
                     codec.message(b"Z", b"I")))


def test_an_execute_without_describe_is_described_by_the_gateway_and_masked():
    relay, _ = _relay(masked=True)
    relay.from_client(_parse("select email from people") + _bind() + _execute() + SYNC)
    assert [t for t, _ in _sent(relay, "upstream")] == ["P", "B", "D", "E", "S"]
    relay.from_upstream(_answer(EMAIL_DESC, ROW))
    got = _sent(relay, "client")
    assert [t for t, _ in got] == ["1", "2", "D", "C", "Z"]  # the gateway's own RowDescription is not forwarded
    assert b"ada@example.com" not in b"".join(b for _, b in got)


def test_the_clients_describe_right_before_execute_is_used_and_forwarded():
    relay, _ = _relay(masked=True)
    relay.from_client(_parse("select email from people") + _bind() + _describe() + _execute() + SYNC)
    assert [t for t, _ in _sent(relay, "upstream")] == ["P", "B", "D", "E", "S"]
    relay.from_upstream(_answer(EMAIL_DESC, ROW))
    got = _sent(relay, "client")
    assert [t for t, _ in got] == ["1", "2", "T", "D", "C", "Z"]
    assert b"ada@example.com" not in b"".join(b for _, b in got)


def test_a_describe_before_a_new_bind_says_nothing_of_the_rows():
    relay, _ = _relay(masked=True)
    # Describe the unnamed portal of `select 1`, then bind it again to the email query and execute it.
    relay.from_client(_parse("select 1") + _bind() + _describe() + _parse("select email from people") + _bind()
                      + _execute() + SYNC)
    assert [t for t, _ in _sent(relay, "upstream")] == ["P", "B", "D", "P", "B", "D", "E", "S"]
    one = codec.message(b"T", (1).to_bytes(2, "big") + _field("?column?", 23))
    relay.from_upstream(codec.message(b"1") + codec.message(b"2") + one + _answer(EMAIL_DESC, ROW))
    got = _sent(relay, "client")
    assert [t for t, _ in got] == ["1", "2", "T", "1", "2", "D", "C", "Z"]
    assert b"ada@example.com" not in b"".join(b for _, b in got)


def test_executes_of_one_portal_in_a_row_share_its_describe_across_reads():
    relay, _ = _relay(masked=True)
    relay.from_client(_parse("select email from people") + _bind("c") + _describe("c") + codec.message(b"H"))
    relay.from_client(_execute("c") + _execute("c") + SYNC)
    assert [t for t, _ in _sent(relay, "upstream")] == ["P", "B", "D", "H", "E", "E", "S"]
    suspended = codec.message(b"s")
    relay.from_upstream(codec.message(b"1") + codec.message(b"2") + EMAIL_DESC + ROW + suspended + ROW
                        + codec.message(b"C", codec.cstr("SELECT 1")) + codec.message(b"Z", b"I"))
    got = _sent(relay, "client")
    assert [t for t, _ in got] == ["1", "2", "T", "D", "s", "D", "C", "Z"]
    assert b"ada@example.com" not in b"".join(b for _, b in got)


def test_an_execute_of_another_portal_between_voids_the_describe():
    relay, _ = _relay(masked=True)
    relay.from_client(_bind("a") + _describe("a") + _bind("b") + _execute("b") + _execute("a") + SYNC)
    assert [t for t, _ in _sent(relay, "upstream")] == ["B", "D", "B", "D", "E", "D", "E", "S"]


def test_rows_of_a_query_statement_need_its_own_row_description():
    relay, _ = _relay(masked=True)
    relay.from_client(codec.message(b"Q", codec.cstr("select email from people; select 2")))
    # A server that sent rows for the second statement without describing them: refused, not guessed at.
    relay.from_upstream(EMAIL_DESC + ROW + codec.message(b"C", codec.cstr("SELECT 1")) + ROW)
    got = _sent(relay, "client")
    assert relay.ended
    assert b"ada@example.com" not in b"".join(b for _, b in got)


def test_after_ddl_the_catalog_is_read_again_before_the_next_statement():
    from wardgate.masking.plan import MaskingPolicy, MaskRule
    from wardgate.policy.guardrails import StatementPolicy

    from .test_relay_paths import _Peer

    masking = MaskingPolicy([MaskRule("cards", columns=("card_number",))], b"s" * 16)
    masking.load_catalog([("a", "100", "1", "public", "people", "card_number")])
    relay = Relay(session_id="a" * 32, connection="c", client=_Peer(), upstream=_Peer(), record=lambda _: None,
                  defer=lambda _: None, on_end=lambda *a: None, max_message=1 << 20, policy=StatementPolicy([]),
                  masking=masking, on_ddl=masking.catalog.shared.changed)
    relay.from_client(codec.message(b"Q", codec.cstr("alter table people rename card_number to cn")))
    _sent(relay, "upstream")
    relay.from_upstream(codec.message(b"C", codec.cstr("ALTER TABLE")) + codec.message(b"Z", b"I"))
    _sent(relay, "client")
    assert masking.catalog.stale
    # The next statement waits: the gateway's own catalog query goes first, and its answer is consumed.
    relay.from_client(codec.message(b"Q", codec.cstr("select cn from people")))
    first = _sent(relay, "upstream")
    assert len(first) == 1 and first[0][0] == "Q" and b"pg_attribute" in first[0][1]
    row = codec.message(b"D", (6).to_bytes(2, "big") + b"".join(
        len(v).to_bytes(4, "big") + v for v in (b"a", b"100", b"1", b"public", b"people", b"cn")))
    other = codec.message(b"D", (6).to_bytes(2, "big") + b"".join(
        len(v).to_bytes(4, "big") + v for v in (b"a", b"100", b"2", b"public", b"people", b"id")))
    answer = codec.message(b"T", b"\x00\x00") + row + other + codec.message(b"C", codec.cstr("SELECT 2")) \
        + codec.message(b"Z", b"I")
    cut = len(codec.message(b"T", b"\x00\x00")) + len(row) + 7  # the answer comes in reads cut anywhere
    relay.from_upstream(answer[:cut])
    relay.from_upstream(answer[cut:])
    assert _sent(relay, "client") == []
    assert [t for t, _ in _sent(relay, "upstream")] == ["Q"]  # the held statement, now sent
    assert not masking.catalog.stale
    assert masking.catalog.rule_of(100, 1) is not None  # renamed, still masked by its identity
    assert masking.catalog.names[(100, 2)][2] == "id"  # rows from every read of the answer


def test_create_table_as_is_ddl_though_its_tag_says_select():
    seen: list[bytes] = []
    relay = Relay(session_id="a" * 32, connection="c", client=_peer(), upstream=_peer(), record=lambda _: None,
                  defer=lambda _: None, on_end=lambda *a: None, max_message=1 << 20, on_ddl=lambda: seen.append(b""))
    relay.from_client(codec.message(b"Q", codec.cstr("create table t as select 1 as x")))
    relay.from_upstream(codec.message(b"C", codec.cstr("SELECT 1")) + codec.message(b"Z", b"I"))
    assert len(seen) == 1
    relay.from_client(codec.message(b"Q", codec.cstr("select 1")))
    relay.from_upstream(codec.message(b"C", codec.cstr("SELECT 1")) + codec.message(b"Z", b"I"))
    assert len(seen) == 1


def _peer():  # noqa: ANN202
    from .test_relay_paths import _Peer

    return _Peer()


def test_the_commit_of_a_transaction_that_ran_ddl_is_told_too():
    # Other sessions see the DDL only once it commits: they read their catalogs again after the COMMIT.
    seen: list[str] = []
    relay = Relay(session_id="a" * 32, connection="c", client=_peer(), upstream=_peer(), record=lambda _: None,
                  defer=lambda _: None, on_end=lambda *a: None, max_message=1 << 20, on_ddl=lambda: seen.append("x"))
    for sql, tag, told in (("begin", "BEGIN", 0), ("alter table t rename a to b", "ALTER TABLE", 1),
                           ("select 1", "SELECT 1", 1), ("commit", "COMMIT", 2), ("commit", "COMMIT", 3)):
        relay.from_client(codec.message(b"Q", codec.cstr(sql)))
        relay.from_upstream(codec.message(b"C", codec.cstr(tag)) + codec.message(b"Z", b"T" if told < 2 else b"I"))
        assert len(seen) == told, sql
