"""The store on PostgreSQL (by URL) works like the embedded SQLite one, and keeps secrets encrypted."""

from __future__ import annotations

import psycopg

from tests.conftest import APP_PASSWORD, make_gateway


def test_gateway_on_a_postgresql_store(tmp_path, pg) -> None:
    pg.psql("DROP DATABASE IF EXISTS wardgate_store")
    pg.psql("CREATE DATABASE wardgate_store OWNER app")
    url = pg.dsn("app", APP_PASSWORD, "wardgate_store")
    gw = make_gateway(tmp_path / "gw", pg, store_url=url)
    gw.cli("connections", "add", "shop_stored", "--port", str(pg.port), "-d", "shop", "-U", "app", "--password-stdin",
           "--sslmode", "disable", input=APP_PASSWORD + "\n")
    gw.start()
    try:
        cred = gw.credential(connection="shop_stored")
        with psycopg.connect(gw.dsn(cred, application_name="t_pgstore"), autocommit=True) as conn:
            assert conn.execute("select count(*) from orders").fetchone() == (1000,)
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_pgstore" and s["status"] == "closed")
        detail = gw.session(s["id"], until=lambda d: d["statements"] and d["statements"][0]["status"] == "ok")
        assert detail["statements"][0]["text"] == "select count(*) from orders"
        assert detail["statements"][0]["rows"] == 1
        with psycopg.connect(url) as db:
            (enc,) = db.execute("select password_enc from connections where name = 'shop_stored'").fetchone()
            tables = {r[0] for r in db.execute("select tablename from pg_tables where schemaname = 'public'")}
        assert APP_PASSWORD.encode() not in bytes(enc)
        assert {"users", "connections", "credentials", "sessions", "statements", "alembic_version"} <= tables
    finally:
        gw.stop()
