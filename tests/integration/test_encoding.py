"""Statements are read in the session's client_encoding, as the server converts them, and settings that
change how the server reads them cannot be changed out of the gateway's sight.

In SJIS (and BIG5, GBK, GB18030, UHC, JOHAB, SHIFT_JIS_2004) a character's second byte can be `\\`,
so `select E'<0x81>\\'; delete from ...; -- '` is one string to a UTF-8 reader and a DELETE to the
server. Every way of reaching such an encoding is tried, as bytes no driver would send; the ground
truth is the table's rows, read directly from the database.
"""

from __future__ import annotations

import struct
import time

import psycopg
import pytest

from tests.conftest import APP_PASSWORD, make_gateway
from tests.pgwire import RawClient
from wardgate.engines.postgres import codec
from wardgate.engines.postgres.scram import MECHANISM, ScramClient
from wardgate.recording import views

POLICY = """
[[guardrails]]
preset = "standard"
connections = ["shop"]
"""
TABLE = "encoding_victims"
# 0x81 0x5C is one SJIS character; read as UTF-8, 0x81 is a stray byte and 0x5C a backslash
INJECTION = b"select E'\x81\\'; delete from " + TABLE.encode() + b"; -- '"


@pytest.fixture(scope="module")
def egw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    pg.psql(f"DROP TABLE IF EXISTS {TABLE}; CREATE TABLE {TABLE} (id int); INSERT INTO {TABLE} VALUES (1), (2), (3);"
            f"GRANT ALL ON {TABLE} TO app", database="shop")
    gw = make_gateway(tmp_path_factory.mktemp("encoding"), pg, tail_toml=POLICY)
    gw.start()
    yield gw
    gw.stop()


def count(pg) -> int:  # noqa: ANN001
    with psycopg.connect(host="127.0.0.1", port=pg.port, dbname="shop", user="app", password=APP_PASSWORD) as conn:
        return conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]


def login(gw, params: dict[str, str] | None = None) -> tuple[RawClient, list[tuple[str, bytes]]]:  # noqa: ANN001
    """A raw client through the gateway as alice; the startup answer (or the error that ended it)."""
    cred = gw.credential("alice", ttl="15m")
    client = RawClient(gw.port)
    client.send(codec.startup_message({"user": "alice", "database": "shop", **(params or {})}))
    mtype, body = client.read()
    assert mtype == "R" and struct.unpack("!i", body[:4])[0] == 10, (mtype, body)
    scram = ScramClient(cred["credential"])
    client.send(codec.sasl_initial_response(MECHANISM, scram.client_first()))
    mtype, body = client.read()
    assert mtype == "R", codec.parse_error_fields(body)
    client.send(codec.password_message(scram.server_first(body[4:])))
    out = []
    while True:
        m = client.read()
        out.append(m)
        if m[0] in "ZE":
            return client, out


def query(client: RawClient, *texts: bytes) -> list[tuple[str, bytes]]:
    """Send the Queries in one write (pipelined), read every answer up to the last ReadyForQuery."""
    client.send(b"".join(codec.message(b"Q", t + b"\x00") for t in texts))
    out, ready = [], 0
    while ready < len(texts):
        try:
            m = client.read()
        except ConnectionError:
            break
        out.append(m)
        ready += m[0] == "Z"
    return out


def errors(msgs: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    return [codec.parse_error_fields(b) for t, b in msgs if t == "E"]


def test_the_injection_is_real_against_the_server(egw, pg) -> None:  # noqa: ANN001
    """The attack works on PostgreSQL itself (so the tests below test something): direct, in SJIS, it deletes."""
    with psycopg.connect(host="127.0.0.1", port=pg.port, dbname="shop", user="app", password=APP_PASSWORD,
                         autocommit=False) as conn:
        conn.execute("SET client_encoding = 'SJIS'")
        before = conn.pgconn.exec_(b"select count(*) from " + TABLE.encode())
        assert before.status == psycopg.pq.ExecStatus.TUPLES_OK
        res = conn.pgconn.exec_(INJECTION)
        assert res.status == psycopg.pq.ExecStatus.COMMAND_OK  # libpq keeps the last result: the DELETE
        after = conn.pgconn.exec_(b"select count(*) from " + TABLE.encode())
        assert int(after.get_value(0, 0)) == 0
        conn.rollback()


@pytest.mark.parametrize("encoding", ["SJIS", "BIG5", "GBK", "GB18030", "UHC", "JOHAB", "SHIFT_JIS_2004", "EUC_JP", "WIN1252"])
def test_a_startup_encoding_the_gateway_cannot_read_is_refused(egw, pg, encoding: str) -> None:  # noqa: ANN001
    client, out = login(egw, {"client_encoding": encoding})
    err = errors(out)
    assert err and err[0]["C"] == "42501" and "client_encoding" in err[0]["M"] and encoding in err[0]["M"], out
    client.close()
    assert count(pg) == 3


def test_options_and_role_defaults_reach_the_same_check(egw, pg) -> None:  # noqa: ANN001
    client, out = login(egw, {"options": "-c client_encoding=SJIS"})
    assert errors(out) and errors(out)[0]["C"] == "42501", out
    client.close()
    pg.psql("ALTER ROLE app IN DATABASE shop SET client_encoding = 'SJIS'")
    try:
        client, out = login(egw)
        err = errors(out)
        assert err and err[0]["C"] == "42501" and "SJIS" in err[0]["M"], out
        client.close()
    finally:
        pg.psql("ALTER ROLE app IN DATABASE shop RESET client_encoding")
    assert count(pg) == 3


@pytest.mark.parametrize("change", [
    b"set client_encoding = 'SJIS'",
    b"set names 'SJIS'",
    b"set client_encoding to sjis",
    b"select 1 from (select set_config('client_encoding', 'SJIS', false)) s",  # refused (set_config), tried anyway
])
def test_changing_to_such_an_encoding_ends_the_session(egw, pg, change: bytes) -> None:  # noqa: ANN001
    """The change and the injection sent together, as one write: neither a read past the gateway."""
    client, out = login(egw)
    assert not errors(out)
    answers = query(client, change, INJECTION)
    fatal = [e for e in errors(answers) if e.get("S") == "FATAL" or e.get("V") == "FATAL"]
    refused = [e for e in errors(answers) if e["C"] == "42501"]
    assert refused, answers
    if b"set_config" not in change:
        assert fatal and "client_encoding" in fatal[-1]["M"], answers
        assert client.closed()
    client.close()
    assert count(pg) == 3


def test_bytes_that_are_not_the_sessions_encoding_are_refused(egw, pg) -> None:  # noqa: ANN001
    client, out = login(egw)
    answers = query(client, INJECTION)
    err = errors(answers)
    assert err and err[0]["C"] == "42501" and "gateway:encoding" in err[0]["M"] and "UTF8" in err[0]["M"], answers
    # the session goes on
    assert not errors(query(client, b"select 1"))
    client.close()
    assert count(pg) == 3


def test_latin1_is_read_as_the_server_reads_it(egw, pg) -> None:  # noqa: ANN001
    """A LATIN1 session works, and the record holds the characters the server saw."""
    client, out = login(egw, {"client_encoding": "LATIN1"})
    assert not errors(out), out
    answers = query(client, "select 'caf\u00e9' as word".encode("latin-1"))
    assert not errors(answers), answers
    values = [codec.data_row_raw(b) for t, b in answers if t == "D"]
    assert values == [["caf\u00e9".encode("latin-1")]], values
    # a LATIN1 byte sequence that is a backslash-free string to both: one statement, as the server sees
    answers = query(client, b"select E'\xe9\\'; delete from " + TABLE.encode() + b"; -- '")
    assert not errors(answers), answers  # one string literal: nothing deleted
    client.close()
    assert count(pg) == 3
    assert recorded(egw, "select 'caf\u00e9' as word")


def recorded(gw, text: str, timeout: float = 15.0) -> bool:  # noqa: ANN001
    """Whether a statement with exactly `text` reached the record (the recorder drains asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in gw.sessions(user="alice"):
            if any(st["text"] == text for st in views.show_session(gw.store(), s["id"])["statements"]):
                return True
        time.sleep(0.2)
    return False


def test_non_ascii_behind_a_running_statement_waits_its_turn(egw, pg) -> None:  # noqa: ANN001
    """Pipelined behind another statement, non-ASCII text is refused (that statement could change the
    encoding); sent on its own, it runs."""
    client, _ = login(egw)
    answers = query(client, b"select pg_sleep(0)", "select 'caf\u00e9'".encode())
    err = errors(answers)
    assert err and "gateway:encoding" in err[0]["M"] and "before the server had answered" in err[0]["M"], answers
    assert not errors(query(client, "select 'caf\u00e9'".encode()))
    client.close()


VIEW = "encoding_settings_view"


def test_a_setting_changed_out_of_sight_cannot_change_how_a_pipelined_statement_is_read(egw, pg) -> None:  # noqa: ANN001
    """A view over pg_settings reaches set_config with no call in the statement: an UPDATE of it turns
    standard_conforming_strings off, and the server says so only with its ReadyForQuery. A statement with
    a backslash pipelined behind it (one write, extended protocol, one Sync) would be read by the server
    with the setting off: `'a\\'` no longer ends the string, so `$x$` hides nothing and the DELETE runs."""
    pg.psql(f"CREATE OR REPLACE VIEW {VIEW} AS SELECT name, setting FROM pg_settings; GRANT ALL ON {VIEW} TO app",
            database="shop")
    client, _ = login(egw)
    change = b"UPDATE " + VIEW.encode() + b" SET setting = 'off' WHERE name = 'standard_conforming_strings'"
    payload = b"DELETE FROM " + TABLE.encode() + b" WHERE id::text = 'a\\' || $x$' OR true -- $x$"

    def execute(sql: bytes) -> bytes:
        return (codec.message(b"P", b"\x00" + sql + b"\x00\x00\x00") + codec.message(b"B", b"\x00\x00" + b"\x00" * 6)
                + codec.message(b"E", b"\x00" + b"\x00" * 4))

    client.send(execute(change) + execute(payload) + codec.message(b"S", b""))
    out = []
    try:
        out = client.read_until("Z")
    except ConnectionError:
        pass
    err = errors(out)
    assert any("gateway:encoding" in e["M"] and "backslash" in e["M"] for e in err) or client.closed(), out
    client.close()
    assert count(pg) == 3
    # sent on its own, after the answer, the session has ended (the server reported the change)
    client, _ = login(egw)
    answers = query(client, change)
    assert any("standard_conforming_strings" in e["M"] for e in errors(answers)), answers
    client.close()
    assert count(pg) == 3
    pg.psql(f"DROP VIEW {VIEW}", database="shop")


def test_a_setting_the_server_does_not_report_cannot_turn_a_condition_into_none(egw, pg) -> None:  # noqa: ANN001
    """transform_null_equals is not reported by the server, and a view over pg_settings made outside the
    gateway turns it on out of sight; then `NOT (id = NULL)` holds for every row. Conditions are read
    under both meanings of `= NULL`, so the DELETE is refused either way."""
    pg.psql(f"CREATE OR REPLACE VIEW {VIEW} AS SELECT name, setting FROM pg_settings; GRANT ALL ON {VIEW} TO app",
            database="shop")
    client, _ = login(egw)
    answers = query(client, b"UPDATE " + VIEW.encode() + b" SET setting = 'on' WHERE name = 'transform_null_equals'")
    assert not errors(answers), answers  # the server turned it on, and said nothing
    for delete in (b"delete from ", b"update "):
        sql = delete + TABLE.encode() + (b" where not (id = null)" if delete.startswith(b"delete")
                                         else b" set id = id where id = null or not id = null")
        err = errors(query(client, sql))
        assert err and "standard:unconditional-writes" in err[0]["M"], (sql, err)
    client.close()
    assert count(pg) == 3
    pg.psql(f"DROP VIEW {VIEW}", database="shop")
