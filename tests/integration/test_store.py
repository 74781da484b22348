"""The store on PostgreSQL (by URL) works like the embedded SQLite one, and keeps secrets encrypted."""

from __future__ import annotations

import struct
import time

import httpx
import psycopg

from tests.conftest import APP_PASSWORD, make_gateway
from tests.pgwire import RawClient
from wardgate.engines.postgres import codec
from wardgate.recording.journal import encode, event
from wardgate.recording.recorder import apply_ready


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



def test_text_postgresql_cannot_hold_never_stops_the_recording(tmp_path, pg) -> None:
    """A NUL character or a lone surrogate from a client is refused where it arrives over HTTP; a NUL in a
    native Bind value, which PostgreSQL refuses itself, is recorded (as U+FFFD): no record the store would
    reject holds the ones behind it, and the gateway stays ready."""
    pg.psql("DROP DATABASE IF EXISTS wardgate_nul")
    pg.psql("CREATE DATABASE wardgate_nul OWNER app")
    url = pg.dsn("app", APP_PASSWORD, "wardgate_nul")
    gw = make_gateway(tmp_path / "gw", pg, store_url=url)
    gw.start()
    try:
        key = gw.cli_json("apikeys", "create", "--for-agent", "fuzzer", "--user", "alice")["key"]
        auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        for body in (b'{"connection": "shop", "sql": "select 1\\u0000; delete from orders"}',
                     b'{"connection": "shop", "sql": "select $1::text", "params": ["a\\u0000b"]}',
                     b'{"connection": "sh\\u0000op", "sql": "select 1"}',
                     b'{"connection": "shop", "sql": "select \'\\ud800\'"}'):
            r = httpx.post(f"http://127.0.0.1:{gw.http_port}/api/exec", content=body, headers=auth, timeout=60)
            assert r.status_code == 422, (body, r.status_code, r.text)
        r = httpx.get(f"http://127.0.0.1:{gw.http_port}/api/sessions/x%00y", headers=auth, timeout=60)
        assert r.status_code == 400 and "NUL" in r.json()["detail"]

        cred = gw.credential()
        c = RawClient(gw.port)
        c.login("alice", cred["credential"], "shop", application_name="t_nul")
        c.send(codec.message(b"P", codec.cstr("") + codec.cstr("select $1::text") + b"\x00\x00")
               + codec.message(b"B", b"\x00\x00" + b"\x00\x00" + b"\x00\x01" + struct.pack("!i", 3) + b"a\x00b"
                               + b"\x00\x00")
               + codec.message(b"E", b"\x00" + b"\x00\x00\x00\x00") + codec.message(b"S", b""))
        replies = c.read_until("Z")
        errors = [body for kind, body in replies if kind == "E"]
        assert errors and b"22021" in errors[0]  # PostgreSQL's own refusal of the value
        c.send(codec.message(b"Q", codec.cstr("select 41 + 1")))
        assert any(kind == "D" for kind, _ in c.read_until("Z"))
        c.close()
        s = gw.wait_for_session(lambda s: s["application_name"] == "t_nul" and s["status"] == "closed")
        stmts = gw.session(s["id"], until=lambda d: len(d["statements"]) == 2)["statements"]
        assert stmts[0]["params"] == ["a\ufffdb"] and stmts[1]["text"] == "select 41 + 1"
        assert httpx.get(f"http://127.0.0.1:{gw.http_port}/readyz", timeout=10).status_code == 200
        assert gw.cli_json("audit", "verify", "--json")["ok"]
    finally:
        gw.stop()
    # Whatever door a NUL comes through next, its record is stored, and the records behind it are too.
    journal = tmp_path / "journal"
    journal.mkdir()
    t = time.time()
    (journal / "0001.ready").write_text(encode([
        {"k": "session", "sid": "nul", "user": "mallory\x00", "conn": "shop", "addr": "10.0.0.9:1", "at": t, "gw": "g1"},
        {"k": "stmt", "sid": "nul", "seq": 1, "kind": "simple", "np": 0, "at": t, "text": "select 1\x00; drop table x"},
        event("statement.refused", "denied", user="mallory", detail="\x00 in the detail"),
        {"k": "stmt", "sid": "nul", "seq": 2, "kind": "simple", "np": 0, "at": t, "text": "select 2"},
    ]))
    assert apply_ready(gw.store(), journal) == 1
    with psycopg.connect(url) as db:
        texts = [r[0] for r in db.execute("select text from statements where session_id = 'nul' order by seq")]
        (user,) = db.execute("select user_name from sessions where id = 'nul'").fetchone()
    assert texts == ["select 1\ufffd; drop table x", "select 2"] and user == "mallory\ufffd"
    assert gw.store().audit_verify().ok
