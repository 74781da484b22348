"""Upstream restarts, gateway crashes: clear errors, recovery, and no lost records."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

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
    server.psql(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
    server.psql("CREATE DATABASE shop OWNER app")
    server.psql_file(SHOP_SQL, "shop", role="app")
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
    assert s["end_reason"] == "upstream closed the connection"


def test_upstream_down_at_connect(own_gateway, own_pg) -> None:
    gw = own_gateway
    cred = gw.credential()
    own_pg.stop()
    try:
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(gw.dsn(cred, application_name="t_down"), connect_timeout=15)
        assert "cannot reach connection 'shop'" in str(info.value)
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_down")
        assert s["status"] == "rejected" and s["error_code"] == "08001"
    finally:
        own_pg.start()
    with psycopg.connect(gw.dsn(cred)) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_kill_9_loses_no_statement_that_ran(tmp_path, own_pg) -> None:
    gw = make_gateway(tmp_path / "gw", own_pg)
    gw.start()
    conn = psycopg.connect(gw.dsn(gw.credential(), application_name="t_kill9"), autocommit=True)
    conn.execute("create table if not exists kill9 (n int)")
    conn.execute("truncate kill9")
    for n in range(300):
        conn.execute(f"insert into kill9 values ({n})")
    gw.proc.send_signal(signal.SIGKILL)
    gw.proc.wait()
    conn.close()
    gw.start()  # recovers the journal the killed process left
    try:
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_kill9" and s["status"] == "closed")
        assert s["end_reason"] == "the gateway process ended unexpectedly"
        recorded = {st["text"] for st in gw.session(s["id"])["statements"]}
        with psycopg.connect(own_pg.dsn("app", APP_PASSWORD, "shop")) as direct:
            ran = [r[0] for r in direct.execute("select n from kill9 order by n")]
        assert ran == list(range(300))
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
