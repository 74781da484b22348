"""Seals of recorded rows (recording/seals.py), and the store's check of them, on a SQLite store: the
canonical form is the same from a journal record and from the store, a store upgraded from before
seals verifies, and rows added among its older ones are still found."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from wardgate.config import Settings
from wardgate.recording import seals
from wardgate.store import Store


def test_a_field_reads_the_same_from_a_record_and_from_the_store() -> None:
    record = {"kind": "exec", "text": "select 1", "param_count": 1, "started_at": 1700000000123456e-6,
              "decision": "allow", "rules": '[{"rule":"x"}]', "params": '["a",null]'}
    stored = {**record, "started_at": 1700000000.123456, "rules": [{"rule": "x"}], "params": ["a", None]}
    assert seals.seal("s", 1, "statement", record) == seals.seal("s", 1, "statement", stored)
    done = {"status": "ok", "duration_ms": "12.500", "rows": 1, "result": '{"columns":[["a",23]]}'}
    assert seals.seal("s", 1, "outcome", done) == seals.seal("s", 1, "outcome", {**done, "duration_ms": 12.5,
                                                                                "result": {"columns": [["a", 23]]}})
    digest, tags = seals.seal("s", 1, "outcome", done)
    assert seals.changed_fields("outcome", {**done, "rows": 2}, tags) == ["rows"]
    assert seals.seal("s", 2, "outcome", done)[0] != digest  # the row's place is sealed too


def test_a_field_added_later_is_sealed_when_set_and_its_change_found() -> None:
    """user_id came after the first seals: rows sealed without it still verify; one sealed with it names
    it when it is changed or cleared, and one sealed without it names it when it is set later."""
    row = {"user_name": "alice", "connection": "shop", "client_addr": "127.0.0.1", "started_at": 1.0, "tls": True}
    before_digest, before_tags = seals.seal("s", 0, "session", row)
    assert seals.seal("s", 0, "session", {**row, "user_id": None}) == (before_digest, before_tags)
    assert seals.changed_fields("session", {**row, "user_id": "u1"}, before_tags) == ["user_id"]
    digest, tags = seals.seal("s", 0, "session", {**row, "user_id": "u1"})
    assert digest != before_digest
    assert seals.changed_fields("session", {**row, "user_id": "u2"}, tags) == ["user_id"]
    assert seals.changed_fields("session", row, tags) == ["user_id"]
    assert seals.changed_fields("session", {**row, "user_id": "u1"}, tags) == []


def _store(tmp_path: Path) -> Store:
    settings = Settings()
    settings.data_dir = tmp_path
    return Store.open(settings)


def test_a_store_from_before_seals_verifies_and_keeps_its_list_of_older_sessions(tmp_path) -> None:
    store = _store(tmp_path)
    t = time.time()
    with sqlite3.connect(tmp_path / "wardgate.db") as db:  # as an older version recorded them: no seals
        for sid in ("old1", "old2"):
            db.execute("INSERT INTO sessions (id, user_name, connection, client_addr, started_at, status, tls, gateway) "
                       "VALUES (?, 'alice', 'shop', '10.0.0.1:1', ?, 'active', 0, 'g0')", (sid, t - 100))
            db.execute("INSERT INTO statements (session_id, seq, kind, text, param_count, started_at, status) "
                       "VALUES (?, 1, 'simple', 'select 1', 0, ?, 'ok')", (sid, t - 99))
    store.apply_records([  # the upgraded recorder: a new session, and the end of an old one with a statement more
        {"k": "session", "sid": "new", "user": "bob", "conn": "shop", "addr": "10.0.0.2:2", "at": t, "gw": "g1"},
        {"k": "stmt", "sid": "new", "seq": 1, "kind": "simple", "np": 0, "at": t, "text": "select 2"},
        {"k": "stmt", "sid": "old1", "seq": 2, "kind": "simple", "np": 0, "at": t, "text": "select 3"},
        {"k": "end", "sid": "old1", "at": t + 1, "reason": "client closed"},
    ])
    v = store.audit_verify()
    assert v.ok, v.public()
    with sqlite3.connect(tmp_path / "wardgate.db") as db:  # a session added among the older ones
        db.execute("INSERT INTO sessions (id, user_name, connection, client_addr, started_at, status, tls) "
                   "VALUES ('fake', 'alice', 'shop', '10.0.0.9:1', ?, 'closed', 0)", (t - 200,))
    v = store.audit_verify()
    assert not v.ok and "not the 2 the audit chain lists (3 now)" in (v.problem or ""), v.public()
