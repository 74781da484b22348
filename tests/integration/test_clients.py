"""Real clients through the gateway: psql, psycopg 3, asyncpg, pgbench. Every statement is recorded."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time

import asyncpg
import psycopg
import pytest

from tests.conftest import psql


def session_of(conn: psycopg.Connection, gateway) -> str:  # noqa: ANN001
    """The recorded session id of a live psycopg connection (matched by its unique application_name)."""
    app = conn.info.parameter_status("application_name")
    return gateway.wait_for_session(lambda s: s["application_name"] == app)["id"]


def test_psql_queries_are_recorded_with_identity(gateway, cred) -> None:
    out = psql(gateway.dsn(cred, application_name="t_psql"), "-At", "-c", "select count(*) from customers", "-c", "select current_user")
    assert out.stdout.split() == ["200", "app"]  # the gateway logs in upstream as the connection's role
    s = gateway.wait_for_session(lambda s: s["application_name"] == "t_psql" and s["status"] == "closed")
    assert s["user"] == "alice" and s["connection"] == "shop" and s["tls"] is True
    assert s["credential_id"] == cred["id"]
    detail = gateway.session(s["id"], until=lambda d: len(d["statements"]) == 2)
    texts = [st["text"] for st in detail["statements"]]
    assert texts == ["select count(*) from customers", "select current_user"]
    first = detail["statements"][0]
    assert first["status"] == "ok" and first["rows"] == 1 and first["command_tag"] == "SELECT 1"
    assert first["duration_ms"] is not None and first["started_at"]
    assert detail["end_reason"] == "client closed"


def test_errors_and_multi_statement_strings(gateway, cred) -> None:
    out = psql(gateway.dsn(cred, application_name="t_multi"), "-c", "select 1; select 1/0; select 2", check=False)
    assert "division by zero" in out.stderr
    s = gateway.wait_for_session(lambda s: s["application_name"] == "t_multi" and s["status"] == "closed")
    st = gateway.session(s["id"], until=lambda d: d["statements"] and d["statements"][0]["status"] != "running")["statements"]
    assert len(st) == 1 and st[0]["status"] == "error" and st[0]["error_code"] == "22012"
    assert st[0]["command_tag"] == "SELECT 1"


def test_psycopg_extended_protocol_binary_and_transactions(gateway, cred) -> None:
    with psycopg.connect(gateway.dsn(cred, application_name="t_psycopg"), autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        cur.execute("select id, email from customers where id = %s", (7,))
        assert cur.fetchone() == (7, "customer7@example.com")
        cur.execute("select id from customers where id = any(%s) order by id", ([1, 2, 3],), prepare=True)
        assert [r[0] for r in cur.fetchall()] == [1, 2, 3]
        for i in range(3):  # a prepared statement executed several times: each execution is recorded
            cur.execute("select %s::int + 1", (i,), prepare=True)
        # transaction status mirrors upstream, including the failed state and recovery
        conn.autocommit = False
        conn.execute("create temp table t (a int)")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("select * from nope")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.autocommit = True
        sid = session_of(conn, gateway)
    detail = gateway.session(sid, until=lambda d: d["status"] == "closed")
    texts = [s["text"] for s in detail["statements"]]
    assert "select id, email from customers where id = $1" in texts
    assert texts.count("select $1::int + 1") == 3
    by_text = {s["text"]: s for s in detail["statements"]}
    assert by_text["select id, email from customers where id = $1"]["param_count"] == 1
    assert by_text["select * from nope"]["error_code"] == "42P01"


def test_psycopg_pipeline_mode(gateway, cred) -> None:
    with psycopg.connect(gateway.dsn(cred, application_name="t_pipeline"), autocommit=True) as conn:
        with conn.pipeline():
            curs = [conn.execute("select %s::int * 2", (i,)) for i in range(20)]
        assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(20)]
        # an error in the middle of a pipeline: later statements are skipped, the session goes on
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("select 1")
                conn.execute("select 1/0")
                conn.execute("select 3")
        assert conn.execute("select 42").fetchone() == (42,)
        sid = session_of(conn, gateway)
    statements = gateway.session(sid, until=lambda d: d["status"] == "closed")["statements"]
    assert len([s for s in statements if s["text"] == "select $1::int * 2"]) == 20
    statuses = {s["text"]: s["status"] for s in statements}
    assert statuses["select 1/0"] == "error"
    assert statuses["select 3"] == "skipped"
    assert statuses["select 42"] == "ok"


def test_copy_in_and_out(gateway, cred) -> None:
    with psycopg.connect(gateway.dsn(cred)) as conn:
        conn.execute("create temp table c (id int, note text)")
        with conn.cursor().copy("copy c from stdin") as copy:
            for i in range(5000):
                copy.write_row((i, f"note {i}"))
        assert conn.execute("select count(*), sum(id) from c").fetchone() == (5000, sum(range(5000)))
        rows = []
        with conn.cursor().copy("copy (select id from c where id < 10 order by id) to stdout") as copy:
            for row in copy.rows():
                rows.append(int(row[0]))
        assert rows == list(range(10))
    out = psql(gateway.dsn(cred), "-c", "\\copy (select email from customers order by id limit 3) to stdout")
    assert out.stdout.split() == ["customer1@example.com", "customer2@example.com", "customer3@example.com"]


def test_notice_and_notify_pass_through(gateway, cred) -> None:
    notices = []
    with psycopg.connect(gateway.dsn(cred), autocommit=True) as listener, psycopg.connect(gateway.dsn(cred), autocommit=True) as sender:
        listener.add_notice_handler(lambda d: notices.append(d.message_primary))
        listener.execute("do $$ begin raise notice 'hello from upstream'; end $$")
        assert notices == ["hello from upstream"]
        listener.execute("listen wardgate_test")
        sender.execute("notify wardgate_test, 'payload-1'")
        got = next(listener.notifies(timeout=5, stop_after=1))
        assert (got.channel, got.payload) == ("wardgate_test", "payload-1")


def test_asyncpg_prepared_statements_and_copy(gateway, cred) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(gateway.dsn(cred, application_name="t_asyncpg"))
        try:
            stmt = await conn.prepare("select id, email from customers where id = $1")
            assert (await stmt.fetchrow(3))["email"] == "customer3@example.com"
            rows = await conn.fetch("select id from customers where id <= $1 order by id", 4)
            assert [r["id"] for r in rows] == [1, 2, 3, 4]
            await conn.execute("create temp table a (id int, v text)")
            await conn.copy_records_to_table("a", records=[(i, f"v{i}") for i in range(1000)])
            assert await conn.fetchval("select count(*) from a") == 1000
            async with conn.transaction():
                await conn.execute("insert into a values (-1, 'x')")
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.fetch("select * from missing_table")
            assert await conn.fetchval("select 7") == 7
        finally:
            await conn.close()

    asyncio.run(main())
    s = gateway.wait_for_session(lambda s: s["application_name"] == "t_asyncpg" and s["status"] == "closed")
    texts = [st["text"] for st in gateway.session(s["id"])["statements"]]
    assert "select id, email from customers where id = $1" in texts
    assert any(t.startswith("COPY") for t in texts)


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench(gateway, cred, pg, mode) -> None:
    assert shutil.which("pgbench")
    env = {"PGPASSWORD": cred["credential"], "PGSSLMODE": "require"}
    base = ["pgbench", "-h", "127.0.0.1", "-p", str(gateway.port), "-U", "alice", "shop"]
    if mode == "simple":
        init = subprocess.run([*base[:-1], "-i", "-s", "1", "-q", "shop"], capture_output=True, text=True, env={**_env(), **env})
        assert init.returncode == 0, init.stderr
    out = subprocess.run(
        [*base[:-1], "-S", "-M", mode, "-c", "4", "-j", "2", "-t", "200", "shop"], capture_output=True, text=True, env={**_env(), **env}
    )
    assert out.returncode == 0, out.stderr
    assert "number of transactions actually processed: 800/800" in out.stdout


def _env() -> dict:
    import os

    return dict(os.environ)


def test_cancel_request_reaches_the_right_backend(gateway, cred) -> None:
    with psycopg.connect(gateway.dsn(cred), autocommit=True) as conn, psycopg.connect(gateway.dsn(cred), autocommit=True) as other:
        timer = threading.Timer(0.5, conn.cancel)
        timer.start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(30)")
        assert time.monotonic() - t0 < 3  # cancelled at once, not run to the end
        assert conn.execute("select 1").fetchone() == (1,)
        assert other.execute("select 2").fetchone() == (2,)  # the other session was not cancelled


def test_psql_cancel_with_sigint(gateway, cred) -> None:
    import signal

    proc = subprocess.Popen(["psql", "-X", gateway.dsn(cred), "-c", "select pg_sleep(30)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert "canceling statement due to user request" in err
    assert time.monotonic() - t0 < 10
