"""Upstream restarts, gateway crashes: clear errors, recovery, and no lost records."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.conftest import APP_PASSWORD, SHOP_SQL, make_gateway
from wardgate.localpg import LocalPostgres


@pytest.fixture(scope="module")
def own_pg():  # noqa: ANN201
    """An upstream of this module's own, since these tests restart it."""
    server = LocalPostgres(Path(tempfile.mkdtemp(prefix="wardgate-pg-")))
    server.initdb()
    server.start()
    server.ca = None  # type: ignore[attr-defined]
    server.create_database("app", APP_PASSWORD, "shop", SHOP_SQL)
    yield server
    server.stop()
    shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture
def own_gateway(tmp_path, own_pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path / "gw", own_pg)
    gw.start()
    yield gw
    gw.stop()


def test_upstream_restart_mid_session(own_gateway, own_pg) -> None:
    gw = own_gateway
    conn = psycopg.connect(gw.dsn(gw.credential(), application_name="t_restart"), autocommit=True)
    conn.execute("begin")
    conn.execute("create temp table t (a int)")
    own_pg.restart()
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("insert into t values (1)")
    assert "connection 'shop'" in str(info.value)
    conn.close()
    # new sessions work once the database is back
    with psycopg.connect(gw.dsn(gw.credential())) as again:
        assert again.execute("select count(*) from customers").fetchone() == (200,)
    s = gw.wait_for_session(lambda s: s["application_name"] == "t_restart" and s["status"] == "closed")
    # The server's shutdown told the session why (57P01): the record says so too.
    assert (s["end_reason"], s["error_code"]) == ("upstream closed the connection (57P01)", "57P01")


def test_upstream_down_at_connect(own_gateway, own_pg) -> None:
    gw = own_gateway
    cred = gw.credential()
    own_pg.stop()
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(cred, application_name="t_down"), connect_timeout=15)
        # A non-admin is told only that the database cannot be reached; where it is stays with the operator.
        assert "the gateway cannot reach the database" in str(info.value)
        assert str(own_pg.port) not in str(info.value)
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_down")
        assert s["status"] == "rejected" and s["error_code"] == "08001"
        deadline = time.time() + 10
        while not (found := gw.store().list_events(kind="session.upstream", limit=100)) and time.time() < deadline:
            time.sleep(0.2)
        assert any("cannot reach connection 'shop'" in e.detail for e in found)
    finally:
        own_pg.start()
    with psycopg.connect(gw.dsn(cred)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


@pytest.mark.parametrize("durability", ["os", "fsync"])
def test_kill_9_loses_no_statement_that_ran(tmp_path, own_pg, durability) -> None:  # noqa: ANN001
    gw = make_gateway(tmp_path / "gw", own_pg, env_extra={"WARDGATE_RECORDING_DURABILITY": durability})
    gw.start()
    conn = psycopg.connect(gw.dsn(gw.credential(), application_name="t_kill9"), autocommit=True)
    conn.execute("create table if not exists kill9 (n int)")
    conn.execute("truncate kill9")
    for n in range(150):
        conn.execute(f"insert into kill9 values ({n})")
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    conn.close()
    gw.start()  # recovers the journal the killed process left
    try:
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_kill9" and s["status"] == "closed")
        assert s["end_reason"] == "gateway restarted"
        ends = [e for e in gw.cli_json("events", "--kind", "session.end", "--limit", "100")
                if e["source"] == f"session:{s['id']}"]
        assert [e["detail"] for e in ends] == ["gateway restarted"]  # the end is in the audit chain too
        recorded = {st["text"] for st in gw.session(s["id"])["statements"]}
        with psycopg.connect(own_pg.dsn("app", APP_PASSWORD, "shop")) as direct:
            ran = [r[0] for r in direct.execute("select n from kill9 order by n")]
        assert ran == list(range(150))
        missing = [n for n in ran if f"insert into kill9 values ({n})" not in recorded]
        assert missing == []
    finally:
        gw.stop()


def test_graceful_stop_tells_clients_and_records_the_end(tmp_path, own_pg) -> None:
    gw = make_gateway(tmp_path / "gw", own_pg)
    gw.start()
    conn = psycopg.connect(gw.dsn(gw.credential(), application_name="t_stop"), autocommit=True)
    conn.execute("select 1")
    gw.stop(signal.SIGTERM)
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("select 1")
    assert "shutting down" in str(info.value)
    gw.start()
    try:
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_stop")
        assert s["status"] == "closed" and s["end_reason"].startswith("gateway shutdown")
    finally:
        gw.stop()


def _backends(pg) -> int:  # noqa: ANN001
    return int(pg.psql("select count(*) from pg_stat_activity where usename = 'app' and datname = 'shop'").strip())


def test_client_vanishing_mid_query_frees_the_upstream_backend(own_gateway, own_pg) -> None:
    import socket as socketlib

    from tests.pgwire import RawClient
    from wardgate.engines.postgres import codec

    gw = own_gateway
    baseline = _backends(own_pg)
    c = RawClient(gw.port)
    c.login("alice", gw.credential()["credential"], "shop")
    c.send(codec.message(b"Q", codec.cstr("select pg_sleep(60)")))
    time.sleep(0.5)
    assert _backends(own_pg) == baseline + 1
    c.sock.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    c.close()  # reset, mid-statement
    s = gw.wait_for_session(lambda s: s["status"] == "closed" and s["end_reason"] == "client disconnected")
    st = gw.session(s["id"], until=lambda d: d["statements"] and d["statements"][0]["status"] != "running")["statements"][0]
    assert st["text"] == "select pg_sleep(60)" and st["status"] == "aborted"
    deadline = time.time() + 10  # the gateway cancels the abandoned statement; the backend then ends
    while _backends(own_pg) > baseline and time.time() < deadline:
        time.sleep(0.2)
    assert _backends(own_pg) == baseline


def test_client_vanishing_mid_copy(own_gateway, own_pg) -> None:
    from tests.pgwire import RawClient
    from wardgate.engines.postgres import codec

    gw = own_gateway
    with psycopg.connect(gw.dsn(gw.credential()), autocommit=True) as conn:
        conn.execute("create table if not exists copy_target (n int)")
        conn.execute("truncate copy_target")
    c = RawClient(gw.port)
    c.login("alice", gw.credential()["credential"], "shop")
    c.send(codec.message(b"Q", codec.cstr("copy copy_target from stdin")))
    assert c.read()[0] == "G"
    c.send(b"".join(codec.message(b"d", f"{i}\n".encode()) for i in range(1000)))
    c.close()  # gone before CopyDone: the COPY must not commit
    time.sleep(1)
    with psycopg.connect(gw.dsn(gw.credential())) as conn:
        assert conn.execute("select count(*) from copy_target").fetchone() == (0,)


def _drainers(gw) -> list[int]:  # noqa: ANN001
    import subprocess

    out = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "spawn_main"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_recorder_process_killed_is_restarted_and_stop_does_not_hang(tmp_path, own_pg) -> None:
    """The recorder process dies (SIGKILL, or a SIGTERM to the whole process group): the gateway starts
    a new one, records still arrive, and stopping the gateway does not wait on the dead one."""
    import os

    gw = make_gateway(tmp_path / "gw", own_pg)
    gw.start()
    try:
        first = _drainers(gw)
        assert len(first) == 1
        os.kill(first[0], signal.SIGKILL)
        deadline = time.time() + 10
        while time.time() < deadline and (not _drainers(gw) or _drainers(gw) == first):
            time.sleep(0.1)
        assert _drainers(gw) and _drainers(gw) != first
        with psycopg.connect(gw.dsn(gw.credential(), application_name="t_after_kill"), autocommit=True) as conn:
            conn.execute("select 1")
        gw.wait_for_session(lambda s: s["application_name"] == "t_after_kill" and s["status"] == "closed")
        pid = _drainers(gw)[0]
        os.kill(pid, signal.SIGTERM)
        time.sleep(0.5)
        assert _drainers(gw) == [pid], "the recorder process ignores SIGTERM: the gateway decides when it stops"
        # the recorder dies just as the gateway is told to stop: the stop must not wait on it
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        gw.stop(signal.SIGTERM)
        assert time.time() - t0 < 20
    finally:
        gw.stop()


def test_a_journal_that_cannot_be_written_refuses_statements_and_recovers(own_gateway, own_pg) -> None:
    """The disk under the recording journal is full (no file of the gateway process may grow, as a file
    size limit makes it): the open session is ended and new ones are refused, each with SQLSTATE 58030
    and a message that says why; nothing runs unrecorded; once the journal can be written, all is as before."""
    gw = own_gateway
    with psycopg.connect(own_pg.dsn("app", APP_PASSWORD, "shop")) as direct:
        direct.execute("create table if not exists journal_full (n int)")
        direct.execute("truncate journal_full")
    dsn = gw.dsn(gw.credential(), application_name="t_journal_full")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into journal_full values (1)")
        subprocess.run(["prlimit", f"--pid={gw.proc.pid}", "--fsize=1:unlimited"], check=True)
        with pytest.raises(psycopg.Error, match="cannot record this session") as exc:
            conn.execute("insert into journal_full values (2)")
        assert exc.value.sqlstate == "58030"
    for n in (3, 4):  # a new session is refused before it can run anything (this was an internal error)
        with pytest.raises(psycopg.OperationalError, match="cannot record sessions now"):
            psycopg.connect(dsn, autocommit=True).execute(f"insert into journal_full values ({n})")
    subprocess.run(["prlimit", f"--pid={gw.proc.pid}", "--fsize=unlimited:unlimited"], check=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("insert into journal_full values (5)")
    with psycopg.connect(own_pg.dsn("app", APP_PASSWORD, "shop")) as direct:
        assert [r[0] for r in direct.execute("select n from journal_full order by n")] == [1, 5]
    s = gw.wait_for_session(lambda s: s["application_name"] == "t_journal_full" and s["status"] == "closed"
                            and any(st["text"] == "insert into journal_full values (5)"
                                    for st in gw.session(s["id"])["statements"]))
    assert s["user"] == "alice"


def test_a_store_outage_refuses_new_sign_ins_clearly_and_loses_no_record(tmp_path, own_pg) -> None:
    """The gateway's PostgreSQL store goes away for a while: live sessions go on (their rules are in memory,
    their records in the local journal); a new sign-in, which needs the store, is refused with a message
    that says so; when the store is back, sign-ins work and the records made meanwhile reach it."""
    store_pg = LocalPostgres(Path(tempfile.mkdtemp(prefix="wardgate-store-")))
    store_pg.initdb()
    store_pg.start()
    gw = None
    try:
        store_pg.create_database("app", APP_PASSWORD, "wardgate_store")
        gw = make_gateway(tmp_path / "gw", own_pg, store_url=store_pg.dsn("app", APP_PASSWORD, "wardgate_store"))
        gw.start()
        cred = gw.credential()
        key = gw.cli_json("apikeys", "create", "--name", "outage-bot", "--group", "dev")["key"]
        conn = psycopg.connect(gw.dsn(cred, application_name="t_store_outage"), autocommit=True)
        conn.execute("select 0")
        store_pg.stop()
        for i in range(1, 6):
            assert conn.execute(f"select {i}").fetchone() == (i,)
        with pytest.raises(psycopg.OperationalError, match="store is unavailable") as refused:
            psycopg.connect(gw.dsn(cred), connect_timeout=30)
        assert "internal gateway error" not in str(refused.value)
        api = httpx.get(f"http://127.0.0.1:{gw.http_port}/api/me", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert api.status_code == 503 and "store is unavailable" in api.json()["detail"]
        store_pg.start()
        deadline = time.time() + 30
        while True:
            try:
                with psycopg.connect(gw.dsn(cred), connect_timeout=30) as again:
                    assert again.execute("select 42").fetchone() == (42,)
                break
            except psycopg.OperationalError:
                assert time.time() < deadline, "sign-ins did not come back with the store"
                time.sleep(0.5)
        conn.close()
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_store_outage" and s["status"] == "closed",
                                timeout=60)
        texts = [st["text"] for st in gw.session(s["id"], until=lambda d: len(d["statements"]) == 6)["statements"]]
        assert texts == [f"select {i}" for i in range(6)]
    finally:
        if gw is not None:
            gw.stop()
        store_pg.stop()
        shutil.rmtree(store_pg.dir, ignore_errors=True)
