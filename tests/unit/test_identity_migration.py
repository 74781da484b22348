"""The upgrade to identities keyed by id (migration 0014) on a SQLite store holding what an older
version recorded: every user gets a uid, service keys get their service account (svc:NAME), and
records are attached to the one who held the name; a session stays as sealed and is still found."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig

from wardgate.config import Settings
from wardgate.store import MIGRATIONS, Store


def test_an_older_store_upgrades_to_identities_by_id(tmp_path: Path) -> None:
    settings = Settings()
    settings.data_dir = tmp_path
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'wardgate.db'}")
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0013")
    engine.dispose()
    with sqlite3.connect(tmp_path / "wardgate.db") as db:
        for name, disabled, source in (("alice", 0, "local"), ("bob#removed-2", 1, "local"), ("ci", 0, "apikey"),
                                        ("Carol", 0, "local"), ("carol", 0, "local")):
            db.execute("INSERT INTO users (name, groups, scram_salt, disabled, created_at, source) "
                       "VALUES (?, '[]', x'00', ?, 1.0, ?)", (name, disabled, source))
        db.execute("INSERT INTO api_keys (id, name, kind, user_name, groups, secret_hash, created_at) "
                   "VALUES ('k1', 'ci', 'service', 'ci', '[]', x'00', 1.0)")
        db.execute("INSERT INTO api_keys (id, name, kind, user_name, agent, groups, secret_hash, created_at) "
                   "VALUES ('k2', 'bot for alice', 'agent', 'alice', 'bot', '[]', x'00', 1.0)")
        db.execute("INSERT INTO reviews (id, kind, status, requester, connection, statement, params, sha256, "
                   "policy_version, rules, approvers, min_approvals, created_at, expires_at) "
                   "VALUES ('r1', 'statement', 'pending', 'alice', 'shop', 'delete', '[]', 'x', 'v', '[]', '[]', 1, 2.0, 9e9)")
        db.execute("INSERT INTO sessions (id, user_name, connection, client_addr, started_at, status, tls) "
                   "VALUES ('s1', 'alice', 'shop', '127.0.0.1', 5.0, 'closed', 0)")
    store = Store.open(settings)
    users = {u.former_name or u.name: u for u in store.list_users(include_removed=True)}
    assert set(users) == {"alice", "bob", "svc:ci", "Carol", "carol"}  # the service key's caller became svc:ci
    assert len({u.uid for u in users.values()}) == len(users) and all(users[n].uid for n in users)
    assert users["svc:ci"].kind == "service" and users["bob"].removed_at is not None
    # 0016: a removed identity is named by its uid, and its name is kept beside; live names are keyed,
    # and two that already read alike both keep their names (the later one under a key of its own)
    assert users["bob"].name == f"#removed-{users['bob'].uid}" and users["bob"].name_key is None
    assert users["carol"].name_key == users["Carol"].name_key + "#" + users["carol"].uid
    assert store.restore_user("bob").name == "bob"
    keys = {k.id: k for k in store.list_api_keys(include_inactive=True)}
    assert (keys["k1"].user_name, keys["k1"].user_id) == ("svc:ci", users["svc:ci"].uid)
    assert keys["k2"].user_id == users["alice"].uid
    assert [r.id for r in store.list_reviews(requester_id=users["alice"].uid)] == ["r1"]
    # the session keeps its row as recorded; it is alice's as the one who had the name then
    assert store.session_row("s1").user_id is None
    assert [s.id for s, _ in store.list_sessions(uid=users["alice"].uid)] == ["s1"]
    assert store.session_owner(store.session_row("s1")) == users["alice"].uid
    # a later alice does not get it
    store.remove_user("alice")
    later = store.add_user("alice", [])
    assert store.list_sessions(uid=later.uid) == []
