"""The record says what happened. How a session ended: a client's Terminate is `client closed`
whichever socket closes first, a dropped client is `client disconnected`, a server that ends the
session (57P01) is recorded with its SQLSTATE on the session and on the statement it cut short, and
no end is lost to a full journal disk. Which statement ran: a prepared statement's name means what
the server holds, not what a refused Parse asked for. What the values were: bound values are masked
by their type, before they are cut."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import threading
import time

import asyncpg
import httpx
import psycopg
import pytest

from tests.conftest import make_gateway, psql
from tests.pgwire import RawClient

CARDS = '[[masking]]\nname = "cards"\ndetectors = ["card"]\nconnections = ["shop"]\n'


@pytest.fixture(scope="module")
def gw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    g = make_gateway(tmp_path_factory.mktemp("ends"), pg, tail_toml=CARDS)
    g.start()
    yield g
    g.stop()


def _ended(gw, app: str, n: int = 1) -> list[dict]:  # noqa: ANN001
    return gw.wait_for_session(lambda s: len([x for x in gw.sessions() if x["application_name"] == app
                                             and x["status"] == "closed"]) >= n, timeout=30) and \
        [x for x in gw.sessions() if x["application_name"] == app and x["status"] == "closed"]


def test_every_asyncpg_close_is_client_closed(gw) -> None:  # noqa: ANN001
    cred = gw.credential()

    async def one(i: int) -> None:
        conn = await asyncpg.connect(gw.dsn(cred, sslmode="require" if i % 2 else "disable"),
                                     server_settings={"application_name": "ends-asyncpg"})
        await conn.fetchval("select 1")
        await conn.close()

    async def many() -> None:
        await asyncio.gather(*(one(i) for i in range(16)))

    asyncio.run(many())
    ended = _ended(gw, "ends-asyncpg", 16)
    assert [s["end_reason"] for s in ended] == ["client closed"] * 16


def test_psycopg_and_psql_close_is_client_closed(gw) -> None:  # noqa: ANN001
    cred = gw.credential()
    with psycopg.connect(gw.dsn(cred, application_name="ends-psycopg")) as conn:
        conn.execute("select 1")
    psql(gw.dsn(cred, application_name="ends-psql"), "-c", "select 1")
    assert _ended(gw, "ends-psycopg")[0]["end_reason"] == "client closed"
    assert _ended(gw, "ends-psql")[0]["end_reason"] == "client closed"


def _raw_session(gw, app: str) -> RawClient:  # noqa: ANN001
    """A session over a plain socket, signed in, up to its first ReadyForQuery."""
    c = RawClient(gw.port)
    c.login("alice", gw.credential()["credential"], "shop", application_name=app)
    return c


def test_terminate_then_close_at_once_is_client_closed(gw) -> None:  # noqa: ANN001
    """The client sends Terminate and closes in the same instant: its socket may be seen closed before,
    with, or after the server's."""
    for i in range(6):
        c = _raw_session(gw, f"ends-raw-{i}")
        c.send(b"X" + struct.pack("!i", 4))
        c.close()
    for i in range(6):
        assert _ended(gw, f"ends-raw-{i}")[0]["end_reason"] == "client closed"


def test_a_dropped_client_is_client_disconnected(gw) -> None:  # noqa: ANN001
    c = _raw_session(gw, "ends-dropped")
    c.close()
    assert _ended(gw, "ends-dropped")[0]["end_reason"] == "client disconnected"


def test_a_server_shutdown_is_recorded_with_its_sqlstate(gw, pg) -> None:  # noqa: ANN001
    """The server ends the session (57P01, as a shutdown or pg_terminate_backend does) while a statement
    runs: the client gets 57P01, and so do the record's session and statement."""
    cred = gw.credential()
    conn = psycopg.connect(gw.dsn(cred, application_name="ends-57p01"))
    pid = conn.execute("select pg_backend_pid()").fetchone()[0]
    got: list[BaseException] = []

    def sleeper() -> None:
        try:
            conn.execute("select pg_sleep(30)")
        except psycopg.Error as exc:
            got.append(exc)

    t = threading.Thread(target=sleeper)
    t.start()
    with psycopg.connect(pg.dsn(database="shop"), autocommit=True) as admin:
        while not admin.execute("select count(*) from pg_stat_activity where pid = %s and query like 'select pg_sleep%%'",
                                [pid]).fetchone()[0]:
            pass
        admin.execute("select pg_terminate_backend(%s)", [pid])
    t.join(30)
    assert got and got[0].sqlstate == "57P01"
    s = _ended(gw, "ends-57p01")[0]
    assert s["error_code"] == "57P01" and "57P01" in s["end_reason"], s
    st = next(x for x in gw.cli_json("sessions", "show", s["id"])["statements"] if x["text"] == "select pg_sleep(30)")
    assert (st["status"], st["error_code"]) == ("error", "57P01"), st


def _readyz(gw) -> tuple[int, list[str]]:  # noqa: ANN001
    r = httpx.get(f"http://127.0.0.1:{gw.http_port}/readyz", timeout=10)
    return r.status_code, r.json()["problems"]


def _until(predicate, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _ends_in_chain(gw, sids: list[str]) -> dict[str, str]:  # noqa: ANN001
    """session id -> the detail of its session.end event."""
    events = gw.cli_json("events", "--kind", "session.end", "--limit", "1000")
    return {e["source"].split(":", 1)[1]: e["detail"] for e in events if e["source"].split(":", 1)[1] in sids}


def _fill(gw, full: bool) -> None:  # noqa: ANN001
    """The journal's disk is full (no file of the gateway process may grow), or has room again."""
    subprocess.run(["prlimit", f"--pid={gw.proc.pid}", "--fsize=1:unlimited" if full else "--fsize=unlimited:unlimited"],
                   check=True)


def _open_sessions(gw, prefix: str, n: int) -> tuple[list[psycopg.Connection], list[str]]:  # noqa: ANN001
    """`n` sessions that each ran a statement, and their ids once recorded."""
    cred = gw.credential()
    conns = [psycopg.connect(gw.dsn(cred, application_name=f"{prefix}-{i}"), autocommit=True) for i in range(n)]
    for c in conns:
        c.execute("select 1")
    return conns, [gw.wait_for_session(lambda s, i=i: s["application_name"] == f"{prefix}-{i}")["id"] for i in range(n)]


def test_a_full_journal_loses_no_session_end_and_readyz_says_so(tmp_path, pg) -> None:  # noqa: ANN001
    gw = make_gateway(tmp_path / "gw", pg)
    gw.start()
    try:
        conns, sids = _open_sessions(gw, "full", 6)
        assert _readyz(gw)[0] == 200
        _fill(gw, True)
        for c in conns[:4]:  # statements cannot be recorded: each session ends, 58030
            with pytest.raises(psycopg.Error) as exc:
                c.execute("select 2")
            assert exc.value.sqlstate == "58030"
        conns[4].close()  # a client that closes meanwhile
        conns[5].close()
        code, problems = _readyz(gw)
        assert code == 503 and any("recording journal" in p and "cannot be written" in p for p in problems), problems
        _fill(gw, False)
        _until(lambda: _readyz(gw)[0] == 200)  # ready again once a write succeeds
        for sid in sids:
            s = gw.wait_for_session(lambda s, sid=sid: s["id"] == sid and s["status"] == "closed", timeout=30)
            assert s["end_reason"], s
        ended = {s["id"]: s for s in gw.sessions() if s["id"] in sids}
        assert all("58030" in ended[sid]["end_reason"] for sid in sids[:4]), ended
        assert all(ended[sid]["end_reason"] == "client closed" for sid in sids[4:]), ended
        _until(lambda: len(_ends_in_chain(gw, sids)) == 6)
    finally:
        gw.stop()


def test_a_gateway_stopped_with_the_journal_full_ends_its_sessions_at_the_next_start(tmp_path, pg) -> None:  # noqa: ANN001
    gw = make_gateway(tmp_path / "gw", pg)
    gw.start()
    try:
        conns, sids = _open_sessions(gw, "stopfull", 3)
        _fill(gw, True)
        for c in conns:  # their ends cannot be written: kept in memory, until the process stops
            c.close()
        gw.stop()
        gw.start()
        for sid in sids:
            s = gw.wait_for_session(lambda s, sid=sid: s["id"] == sid and s["status"] == "closed", timeout=30)
            assert s["end_reason"] == "gateway restarted", s
        _until(lambda: set(_ends_in_chain(gw, sids).values()) == {"gateway restarted"} and len(_ends_in_chain(gw, sids)) == 3)
        assert json.loads(gw.cli("audit", "verify", "--json").stdout)["ok"]
    finally:
        gw.stop()


def _luhn(prefix: str) -> str:
    """`prefix` with the check digit that makes it pass Luhn."""
    from wardgate.masking.detectors import luhn_ok

    return next(prefix + d for d in "0123456789" if luhn_ok(prefix + d))


def test_the_record_masks_bound_values_by_their_type(gw) -> None:  # noqa: ANN001
    """Detectors read text-like bound values; one the Parse typed as an integer is an id, recorded as it
    is, even when its 19 digits pass Luhn as a card number's would."""
    number = _luhn("411111111111111111")
    assert len(number) == 19 and int(number) < 2**63
    with psycopg.connect(gw.dsn(gw.credential(), application_name="typed-params")) as conn:
        # In text format (%t), psycopg declares an int as int8 and a str as text in its Parse; the third
        # is a long text whose card number straddles where the record cuts a value (1,000 characters).
        conn.execute("select %t, %t::text, %t::text", [int(number), number, "x" * 988 + " 4111111111111111 z"]).fetchone()
    s = gw.wait_for_session(lambda s: s["application_name"] == "typed-params" and s["status"] == "closed")
    (stmt,) = [st for st in gw.cli_json("sessions", "show", s["id"])["statements"] if st["params"]]
    assert stmt["params"][0] == number, stmt  # an integer: not a card number
    assert stmt["params"][1] == "[card]", stmt  # text: the detector masks it
    assert stmt["params"][2] == "x" * 988 + " [card] z", stmt  # masked whole, then cut (it is shorter now)


def _parse(name: bytes, sql: str) -> bytes:
    from wardgate.engines.postgres import codec

    return codec.message(b"P", codec.cstr(name) + codec.cstr(sql.encode()) + b"\x00\x00")


def _bind_execute_sync(name: bytes, values: list[bytes]) -> bytes:
    from wardgate.engines.postgres import codec

    params = b"".join(struct.pack("!i", len(v)) + v for v in values)
    bind = codec.cstr(b"") + codec.cstr(name) + b"\x00\x00" + struct.pack("!h", len(values)) + params + b"\x00\x00"
    return codec.message(b"B", bind) + codec.message(b"E", codec.cstr(b"") + b"\x00\x00\x00\x00") + codec.message(b"S", b"")


@pytest.mark.parametrize("pipelined", [False, True])
def test_a_prepared_statement_the_server_refused_to_redefine_keeps_its_text_in_the_record(gw, pg, pipelined) -> None:  # noqa: ANN001
    """A Parse of a name in use would fail at the server (42P05), which runs the statement defined first;
    the gateway refuses it itself (it cannot always know, when batches are pipelined, which of the two a
    later Bind will find). The record says which statement ran, whether the messages are sent one
    batch at a time or all at once."""
    from wardgate.engines.postgres import codec

    table = f"redefine_{int(pipelined)}"
    with psycopg.connect(gw.dsn(gw.credential()), autocommit=True) as conn:
        conn.execute(f"create table if not exists {table} (id int, v text)")
        conn.execute(f"create table if not exists {table}_other (id int, v text)")
        conn.execute(f"truncate {table}; truncate {table}_other")
        conn.execute(f"insert into {table} values (1, 'a'); insert into {table}_other values (1, 'a')")
    c = _raw_session(gw, f"redefine-{int(pipelined)}")
    sync = codec.message(b"S", b"")
    first = _parse(b"w", f"update {table} set v = $1 where id = $2::int4") + sync
    second = _parse(b"w", f"update {table}_other set v = $1 where id = $2::int4") + sync
    run = _bind_execute_sync(b"w", [b"x", b"1"])
    if pipelined:
        c.send(first + second + run)
    else:
        c.send(first)
        c.read_until("Z")
        c.send(second)
    answers = c.read_until("Z") if not pipelined else c.read_until("Z") + c.read_until("Z")
    errors = [codec.parse_error_fields(b) for t, b in answers if t == "E"]
    assert [e["C"] for e in errors] == ["42501"] and "gateway:prepared-name" in errors[0]["M"], errors
    if not pipelined:
        c.send(run)
    assert any(t == "C" and b.startswith(b"UPDATE 1") for t, b in c.read_until("Z"))
    c.send(b"X\x00\x00\x00\x04")
    c.close()
    with psycopg.connect(gw.dsn(gw.credential()), autocommit=True) as conn:
        assert conn.execute(f"select v from {table}").fetchone() == ("x",)  # the first definition ran
        assert conn.execute(f"select v from {table}_other").fetchone() == ("a",)
    s = _ended(gw, f"redefine-{int(pipelined)}")[0]
    ran = [st for st in gw.cli_json("sessions", "show", s["id"])["statements"] if st["params"] == ["x", "1"]]
    assert [st["text"] for st in ran] == [f"update {table} set v = $1 where id = $2::int4"], ran


def test_sql_prepare_and_deallocate_by_execute_leave_no_name_to_the_old_statement(gw) -> None:  # noqa: ANN001
    """DEALLOCATE and PREPARE sent through Parse/Bind/Execute change the server's prepared statements as
    they do by Query: a Bind of the name afterwards is not recorded as the statement the name had before."""
    from wardgate.engines.postgres import codec

    c = _raw_session(gw, "renamed-by-execute")
    sync = codec.message(b"S", b"")
    c.send(_parse(b"s2", "select 'benign'::text as v") + sync)
    c.read_until("Z")
    for sql in ("DEALLOCATE s2", "PREPARE s2 AS select email::text as v from customers limit 3"):
        c.send(_parse(b"", sql) + _bind_execute_sync(b"", []))
        c.read_until("Z")
    c.send(_bind_execute_sync(b"s2", []))
    answers = c.read_until("Z")
    assert any(t == "C" and b.startswith(b"SELECT 3") for t, b in answers)
    c.send(b"X\x00\x00\x00\x04")
    c.close()
    s = _ended(gw, "renamed-by-execute")[0]
    texts = [st["text"] for st in gw.cli_json("sessions", "show", s["id"])["statements"]]
    assert texts[-1] != "select 'benign'::text as v", texts
