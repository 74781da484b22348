"""Every recorded row is bound into the audit chain: an attacker with write access to the store edits
it in each way below, and `audit verify` names what was changed (which session, which statement,
which field). The tail cut together with its checkpoints is caught with an anchor kept outside the
store: the head file beside the journal, or what an audit sink received."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.conftest import make_gateway, psql

GUARD = """
[[guardrails]]
name = "no-deletes"
kinds = ["delete"]
connections = ["shop"]

[[audit_sinks]]
name = "trail"
type = "file"
path = "trail/events.jsonl"
"""


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("tamper"), pg, tail_toml=GUARD)
    gw.start()
    try:
        dsn = gw.dsn(gw.credential())
        psql(dsn, "-c", "select 1", "-c", "select 2", "-c", "select count(*) from customers")
        psql(dsn, "-c", "delete from orders", check=False)  # denied by the guardrail
        psql(dsn, "-c", "select * from no_such_table", check=False)  # an error from the server
        with psycopg.connect(dsn) as conn:  # bound values
            conn.execute("select %s::text", ["hello"])
        gw.wait_for_session(lambda s: s["status"] == "closed" and s["statements"] == 3)
        gw.wait_for_session(lambda s: s["status"] == "closed" and s["application_name"] != "psql")
        gw.wait_for_session(lambda s: s["status"] == "closed" and s["statements"] == 1
                            and _show(gw, s["id"])[0]["status"] == "denied")
        trail = gw.dir / "data" / "trail" / "events.jsonl"
        head = gw.store().audit_head()
        _until(lambda: trail.exists() and _anchor_seq(trail) >= head)
    finally:
        gw.stop()
    return gw


def _until(predicate, timeout: float = 30.0) -> None:  # noqa: ANN001
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _anchor_seq(path: Path) -> int:
    from wardgate.recording.anchors import read_anchor

    try:
        return int(read_anchor(path)["seq"])
    except ValueError:
        return 0


def _show(gw, sid: str) -> list[dict]:  # noqa: ANN001
    return gw.cli_json("sessions", "show", sid)["statements"]


def _db(gw) -> sqlite3.Connection:  # noqa: ANN001
    return sqlite3.connect(gw.dir / "data" / "wardgate.db")


def _find(gw, where: str) -> tuple[str, int]:  # noqa: ANN001
    """(session, number) of the statement matching `where`."""
    with _db(gw) as db:
        row = db.execute(f"SELECT session_id, seq FROM statements WHERE {where}").fetchone()
    assert row is not None, where
    return row[0], row[1]


def verify(gw, base: Path, *extra: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(base / "wardgate.toml"), "audit", "verify",
                           "--json", *extra], capture_output=True, text=True, env=gw.env, timeout=60)


def tamper(gw, tmp_path: Path, *sql: str) -> dict:  # noqa: ANN001
    """`audit verify` on a copy of the gateway's data after `sql`, as an attacker with write access to
    the store would run it; it must fail."""
    base = tmp_path / "copy"
    shutil.copytree(gw.dir, base, ignore=shutil.ignore_patterns("*.sock"))
    with sqlite3.connect(base / "data" / "wardgate.db") as db:
        for statement in sql:
            assert db.execute(statement).rowcount != 0, statement  # every edit changes something
    # In-process, as `audit verify --json` computes it (the CLI itself is run by the tests that
    # follow the anchors, and by test_audit.py): one process start less per edit.
    from wardgate.config import load
    from wardgate.store import Store

    verdict = Store(load(base / "wardgate.toml", env=gw.env)).audit_verify()
    assert not verdict.ok, verdict.public()
    return verdict.public()


def test_the_untouched_record_verifies_with_its_anchors(recorded) -> None:
    out = verify(recorded, recorded.dir, "--anchor", "trail",
                 "--anchor", str(recorded.dir / "data" / "journal" / "audit-head.json"))
    v = json.loads(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert v["ok"] and v["rows"] >= 6 and v["findings"] == [] and [a["from"] for a in v["anchors"]][0] == "trail"


def test_a_deleted_statement_is_named(recorded, tmp_path) -> None:
    sid, seq = _find(recorded, "text = 'select 2'")
    v = tamper(recorded, tmp_path, f"DELETE FROM statements WHERE session_id = '{sid}' AND seq = {seq}")
    assert f"statement {seq} of session {sid} was deleted" in v["problem"]


def test_a_deleted_session_is_named(recorded, tmp_path) -> None:
    sid, _ = _find(recorded, "text = 'select 2'")
    v = tamper(recorded, tmp_path, f"DELETE FROM statements WHERE session_id = '{sid}'",
               f"DELETE FROM sessions WHERE id = '{sid}'")
    assert f"session {sid} was deleted" in v["problem"]


@pytest.mark.parametrize(("column", "value", "where"), [
    ("status", "'ok'", "error_code = '42P01'"),
    ("rows", "0", "text = 'select count(*) from customers'"),
    ("error_code", "NULL", "error_code = '42P01'"),
    ("command_tag", "'SELECT 0'", "text = 'select 1'"),
    ("duration_ms", "duration_ms + 1", "text = 'select 1'"),
    ("decision", "'allow'", "text = 'delete from orders'"),
    ("rules", "'[]'", "text = 'delete from orders'"),
    ("text", "'select 1'", "text = 'delete from orders'"),  # the text of a denied statement
    ("params", """'["goodbye"]'""", "params IS NOT NULL"),
    ("started_at", "started_at - 3600", "text = 'select 1'"),
])
def test_an_edited_statement_field_is_named(recorded, tmp_path, column, value, where) -> None:  # noqa: ANN001
    sid, seq = _find(recorded, where)
    v = tamper(recorded, tmp_path, f"UPDATE statements SET {column} = {value} WHERE session_id = '{sid}' AND seq = {seq}")
    assert f"statement {seq} of session {sid}" in v["problem"] and column in v["findings"][0]["fields"], v


@pytest.mark.parametrize(("column", "value"), [
    ("user_name", "'mallory'"), ("client_addr", "'203.0.113.9:5432'"), ("agent", "'innocent-bot'"),
    ("tls", "1 - tls"), ("end_reason", "'client closed'"), ("ended_at", "ended_at + 60"), ("connection", "'shop_md5'"),
])
def test_an_edited_session_field_is_named(recorded, tmp_path, column, value) -> None:  # noqa: ANN001
    sid, _ = _find(recorded, "text = 'select 2'")
    if column == "end_reason":
        with _db(recorded) as db:
            (reason,) = db.execute(f"SELECT end_reason FROM sessions WHERE id = '{sid}'").fetchone()
        value = f"'{reason} (edited)'"
    v = tamper(recorded, tmp_path, f"UPDATE sessions SET {column} = {value} WHERE id = '{sid}'")
    assert f"session {sid}" in v["problem"] and v["findings"][0]["fields"] == [column], v


def test_two_swapped_statements_are_named(recorded, tmp_path) -> None:
    sid, one = _find(recorded, "text = 'select 1'")
    v = tamper(recorded, tmp_path,
               f"UPDATE statements SET seq = -1 WHERE session_id = '{sid}' AND seq = {one}",
               f"UPDATE statements SET seq = {one} WHERE session_id = '{sid}' AND seq = {one + 1}",
               f"UPDATE statements SET seq = {one + 1} WHERE session_id = '{sid}' AND seq = -1")
    assert f"statement {one} of session {sid}" in v["problem"] and "text" in v["findings"][0]["fields"]


def test_a_statement_moved_to_another_session_is_named(recorded, tmp_path) -> None:
    sid, seq = _find(recorded, "text = 'select 2'")
    other, _ = _find(recorded, "params IS NOT NULL")
    v = tamper(recorded, tmp_path, f"UPDATE statements SET session_id = '{other}', seq = 99 "
                                   f"WHERE session_id = '{sid}' AND seq = {seq}")
    problems = [f["problem"] for f in v["findings"]]
    assert any(f"statement {seq} of session {sid} was deleted" in p for p in problems)
    assert any(f"statement 99 of session {other} is not in the audit chain" in p for p in problems)


def test_an_added_statement_is_named(recorded, tmp_path) -> None:
    sid, _ = _find(recorded, "text = 'select 2'")
    v = tamper(recorded, tmp_path, "INSERT INTO statements (session_id, seq, kind, text, param_count, started_at, status) "
                                   f"VALUES ('{sid}', 50, 'simple', 'select 42', 0, 1, 'ok')")
    assert f"statement 50 of session {sid} is not in the audit chain" in v["problem"]


def test_a_session_added_with_an_old_date_is_named(recorded, tmp_path) -> None:
    """Rows from before the store sealed rows are not findings; the chain lists which sessions those
    are, so a session added with an old date is not one of them."""
    v = tamper(recorded, tmp_path, "INSERT INTO sessions (id, user_name, connection, client_addr, started_at, status, tls) "
                                   "VALUES ('feedfacefeedfacefeedfacefeedface', 'alice', 'shop', '10.0.0.1:1', 1, 'active', 0)")
    assert "session feedfacefeedfacefeedfacefeedface is not in the audit chain" in v["problem"], v


def test_a_statement_under_a_session_that_is_not_there_is_named(recorded, tmp_path) -> None:
    v = tamper(recorded, tmp_path, "INSERT INTO statements (session_id, seq, kind, text, param_count, started_at, status) "
                                   "VALUES ('0123456789abcdef0123456789abcdef', 1, 'simple', 'select 42', 0, 1, 'ok')")
    assert "statement 1 of session 0123456789abcdef0123456789abcdef is not in the audit chain" in v["problem"], v


def test_an_event_without_a_place_in_the_chain_is_named(recorded, tmp_path) -> None:
    v = tamper(recorded, tmp_path, "INSERT INTO events (id, at, kind, outcome, detail) VALUES ('x', 1, 'policy.change', "
                                   "'ok', 'nothing happened')")
    assert "an event without a place in the chain" in v["problem"], v


def test_a_session_reopened_or_marked_purged_is_named(recorded, tmp_path) -> None:
    sid, _ = _find(recorded, "text = 'select 2'")
    v = tamper(recorded, tmp_path, f"UPDATE sessions SET status = 'active', ended_at = NULL WHERE id = '{sid}'")
    assert f"session {sid}" in v["problem"] and {"status", "ended_at"} <= set(v["findings"][0]["fields"])
    # Claiming retention removed its statements does not hide their deletion: the chain lists the purges.
    v = tamper(recorded, tmp_path / "2", f"UPDATE sessions SET purged_at = 1 WHERE id = '{sid}'",
               f"DELETE FROM statements WHERE session_id = '{sid}'")
    problems = [f["problem"] for f in v["findings"]]
    assert any("marked purged, but no purge" in p for p in problems) and f"of session {sid} was deleted" in v["problem"]


def test_edited_seals_are_named(recorded, tmp_path) -> None:
    v = tamper(recorded, tmp_path, "UPDATE seals SET digest = '0' || substr(digest, 2) WHERE n = 0")
    assert "seals of audit event seq" in v["problem"]


def _cut_tail(n: int) -> list[str]:
    """Remove the last `n` events or more, back to a signed checkpoint, with every checkpoint, seal and
    row they covered, and set the head back: what is left is a whole, signed chain."""
    last = f"(SELECT max(seq) FROM audit_checkpoints WHERE seq <= (SELECT max(seq) - {n} FROM events))"
    return [
        f"DELETE FROM seals WHERE event_seq > {last}",
        f"DELETE FROM audit_checkpoints WHERE seq > {last}",
        "DELETE FROM statements WHERE NOT EXISTS (SELECT 1 FROM seals WHERE seals.session_id = statements.session_id "
        "AND seals.seq = statements.seq)",
        "DELETE FROM sessions WHERE NOT EXISTS (SELECT 1 FROM seals WHERE seals.session_id = sessions.id AND seals.seq = 0)",
        # What the cut left of a session or statement whose end it removed goes back to how it was then.
        "UPDATE sessions SET status = 'active', ended_at = NULL, end_reason = NULL, error_code = NULL, masked = NULL "
        "WHERE NOT EXISTS (SELECT 1 FROM seals WHERE seals.session_id = sessions.id AND seals.part IN "
        "('end', 'session+end'))",
        "UPDATE statements SET status = 'running', duration_ms = NULL, rows = NULL, command_tag = NULL, "
        "error_code = NULL, error_message = NULL, result = NULL WHERE NOT EXISTS (SELECT 1 FROM seals WHERE "
        "seals.session_id = statements.session_id AND seals.seq = statements.seq AND seals.part IN "
        "('outcome', 'statement+outcome'))",
        f"DELETE FROM events WHERE seq > {last}",
        "UPDATE audit_head SET seq = (SELECT max(seq) FROM events), "
        "hash = (SELECT hash FROM events WHERE seq = (SELECT max(seq) FROM events))",
    ]


def test_a_tail_cut_with_its_checkpoints_is_named_by_each_anchor(recorded, tmp_path) -> None:
    base = tmp_path / "cut"
    shutil.copytree(recorded.dir, base, ignore=shutil.ignore_patterns("*.sock"))
    with sqlite3.connect(base / "data" / "wardgate.db") as db:
        for statement in _cut_tail(4):
            db.execute(statement)
    # Without an anchor, the store alone cannot tell: this is what the anchors are for.
    alone = verify(recorded, base)
    assert alone.returncode == 0, alone.stdout + alone.stderr
    for anchor in ("trail", str(recorded.dir / "data" / "journal" / "audit-head.json")):
        out = verify(recorded, base, "--anchor", anchor)
        v = json.loads(out.stdout)
        assert out.returncode == 1 and "events were removed, with their checkpoints" in v["problem"], out.stdout
        assert anchor in v["problem"]


def test_an_anchor_that_was_edited_is_refused(recorded, tmp_path) -> None:
    head = json.loads((recorded.dir / "data" / "journal" / "audit-head.json").read_text())
    forged = tmp_path / "forged.json"
    forged.write_text(json.dumps({**head, "seq": head["seq"] + 10}))
    out = verify(recorded, recorded.dir, "--anchor", str(forged))
    assert out.returncode == 1 and "not signed with this gateway's audit key" in json.loads(out.stdout)["problem"]
    missing = verify(recorded, recorded.dir, "--anchor", str(tmp_path / "nothing.json"))
    assert missing.returncode == 2 and "cannot read the anchor" in missing.stderr


def _rechain(db: sqlite3.Connection, start: int) -> None:
    """Link the events from `start` on again, as an attacker who knows the (keyless) hash would."""
    from wardgate.recording import audit

    cols = (*audit.FIELDS, "seq", "prev_hash", "hash")
    prev = db.execute("SELECT hash FROM events WHERE seq = ?", (start - 1,)).fetchone()[0] if start > 1 else audit.GENESIS
    for row in db.execute(f"SELECT {', '.join(cols)} FROM events WHERE seq >= ? ORDER BY seq", (start,)).fetchall():
        e = dict(zip(cols, row, strict=True))
        h = audit.link(prev, e)
        db.execute("UPDATE events SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, e["seq"]))
        prev = h
    db.execute("DELETE FROM audit_checkpoints WHERE seq >= ?", (start,))
    db.execute("UPDATE audit_head SET seq = (SELECT max(seq) FROM events), hash = ?", (prev,))


def test_a_statement_rewritten_with_its_seals_and_chain_recomputed_is_found(recorded, tmp_path) -> None:
    """Seals and links need no key: rewriting a row, its seal, its batch's digest and every link after it
    leaves a head that no checkpoint signs, and only the key can sign one."""
    from wardgate.recording import seals

    base = tmp_path / "rw"
    shutil.copytree(recorded.dir, base, ignore=shutil.ignore_patterns("*.sock"))
    sid, seq = _find(recorded, "text = 'select 2'")
    with sqlite3.connect(base / "data" / "wardgate.db") as db:
        db.row_factory = sqlite3.Row
        db.execute("UPDATE statements SET text = 'select 3' WHERE session_id = ? AND seq = ?", (sid, seq))
        row = dict(db.execute("SELECT * FROM statements WHERE session_id = ? AND seq = ?", (sid, seq)).fetchone())
        for r in row:
            if r in ("rules", "params", "result") and row[r] is not None:
                row[r] = json.loads(row[r])
        event_seq, n, part = db.execute("SELECT event_seq, n, part FROM seals WHERE session_id = ? AND seq = ? "
                                        "AND part LIKE 'statement%'", (sid, seq)).fetchone()
        digest, tags = seals.seal(sid, seq, part, row)
        db.execute("UPDATE seals SET digest = ?, tags = ? WHERE event_seq = ? AND n = ?", (digest, tags, event_seq, n))
        batch = [tuple(r) for r in db.execute("SELECT session_id, seq, part, digest, tags FROM seals WHERE event_seq = ? "
                                              "ORDER BY n", (event_seq,))]
        detail = json.loads(db.execute("SELECT detail FROM events WHERE seq = ?", (event_seq,)).fetchone()[0])
        detail["sha256"] = seals.batch_digest(batch)
        db.execute("UPDATE events SET detail = ? WHERE seq = ?", (json.dumps(detail, separators=(",", ":")), event_seq))
        db.row_factory = None
        _rechain(db, event_seq)
    out = verify(recorded, base)
    v = json.loads(out.stdout)
    assert out.returncode == 1 and "not covered by a signed checkpoint" in v["problem"], out.stdout


def test_a_cut_tail_the_chain_has_grown_past_is_named_by_the_sinks_copy(recorded, tmp_path) -> None:
    """After the cut the gateway goes on and signs new heads over the shortened chain: every checkpoint
    the sink received is checked, not only the newest; and the head file is not overwritten."""
    from wardgate.config import load
    from wardgate.recording.anchors import read_anchor
    from wardgate.recording.recorder import anchor_head
    from wardgate.store import Actor, Store

    base = tmp_path / "grown"
    shutil.copytree(recorded.dir, base, ignore=shutil.ignore_patterns("*.sock"))
    with sqlite3.connect(base / "data" / "wardgate.db") as db:
        for statement in _cut_tail(4):
            db.execute(statement)
    store = Store(load(base / "wardgate.toml", env=recorded.env))
    head = read_anchor(base / "data" / "journal" / "audit-head.json")
    anchor_head(store, base / "data" / "journal")  # a recorder starting on the cut store keeps the file
    assert read_anchor(base / "data" / "journal" / "audit-head.json") == head
    with store.engine.begin() as conn:  # the chain grows past the old head again, signed by the gateway
        for i in range(head["seq"] + 5):
            store.record_change(conn, Actor.local("cli"), "policy.change", f"change {i}")
    assert store.audit_head() > head["seq"] and store.audit_verify().ok  # the store alone cannot tell
    # The sink's file rotated since: the checkpoints from before the cut are in the rotated one.
    trail = base / "data" / "trail" / "events.jsonl"
    trail.rename(trail.with_name("events.jsonl.1"))
    trail.write_text("")
    out = verify(recorded, base, "--anchor", "trail")
    v = json.loads(out.stdout)
    assert out.returncode == 1 and "differs from the anchor's signed checkpoint" in v["problem"], out.stdout
    journal = base / "data" / "journal"
    anchor_head(store, journal)  # the recorder keeps its head file as evidence
    assert read_anchor(journal / "audit-head.json") == head
    out = verify(recorded, base, "--anchor", str(journal / "audit-head.json"))
    assert out.returncode == 1 and "differs from the anchor's signed checkpoint" in json.loads(out.stdout)["problem"]
