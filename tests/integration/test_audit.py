"""The audit log's hash chain and signed checkpoints: intact after real traffic, and every kind of
tampering with the store's rows is detected and located."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import time

import httpx
import psycopg
import pytest

from tests.conftest import APP_PASSWORD, make_gateway, psql
from wardgate.recording.audit import statement_digest


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("audit"), pg)
    gw.start()
    try:
        for i in range(8):  # each refused sign-in is a security event
            httpx.get(f"http://127.0.0.1:{gw.http_port}/api/me", headers={"Authorization": f"Bearer not-a-token-{i}"})
        dsn = gw.dsn(gw.credential())
        psql(dsn, "-c", "select 1")
        psql(dsn, "-c", "selec 1", check=False)  # refused: it does not parse
        with psycopg.connect(dsn) as conn:  # extended protocol: the bound values are recorded too
            conn.execute("select %s::text, %s::int", ["hello", None])
        deadline = time.time() + 20
        while time.time() < deadline and not any(e["kind"] == "statement.refused" for e in gw.cli_json("events", "--limit", "100")):
            time.sleep(0.2)
        gw.wait_for_session(lambda s: s["status"] == "closed" and s["statements"] == 1 and s["user"] == "alice")
        gw.wait_for_session(lambda s: s["status"] == "closed" and s["application_name"] != "psql")
    finally:
        gw.stop()
    return gw


def verify(gw, base) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    return subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(base / "wardgate.toml"), "audit", "verify",
                           "--json"], capture_output=True, text=True, env=gw.env, timeout=60)


def tampered_run(gw, tmp_path, *sql: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    """`audit verify` on a copy of the gateway's data, changed with `sql` as an attacker with write
    access to the store would."""
    base = tmp_path / "copy"
    shutil.copytree(gw.dir, base, ignore=shutil.ignore_patterns("*.sock", "journal"))
    with sqlite3.connect(base / "data" / "wardgate.db") as db:
        for statement in sql:
            db.execute(statement)
    return verify(gw, base)


def tampered(gw, tmp_path, *sql: str) -> dict:  # noqa: ANN001
    out = tampered_run(gw, tmp_path, *sql)
    assert out.returncode == 1, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_intact_log_verifies(recorded, tmp_path) -> None:
    out = verify(recorded, recorded.dir)
    verdict = json.loads(out.stdout)
    assert out.returncode == 0 and verdict["ok"] and verdict["events"] >= 8 and verdict["checkpoints"] >= 1
    assert verdict["statements"] >= 3  # every allowed statement checked against its digest in the chain
    assert verdict["head_seq"] == verdict["events"]
    pem = subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(recorded.config), "audit", "pubkey"],
                         capture_output=True, text=True, env=recorded.env).stdout
    assert pem.startswith("-----BEGIN PUBLIC KEY-----")
    # The signing key is in the store, encrypted with the secret key (every replica shares it), never in clear
    with sqlite3.connect(recorded.dir / "data" / "wardgate.db") as db:
        (enc,) = db.execute("SELECT value_enc FROM keys WHERE name = 'audit-signing'").fetchone()
    assert b"PRIVATE KEY" not in bytes(enc) and not (recorded.dir / "data" / "audit-ed25519.pem").exists()


def test_a_swapped_signing_key_is_refused(recorded, tmp_path) -> None:
    """Write access to the store is not enough to sign: a key put there without the secret key is refused."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    mine = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).hex()
    out = tampered_run(recorded, tmp_path, f"UPDATE keys SET value_enc = x'{mine}' WHERE name = 'audit-signing'")
    assert out.returncode != 0 and "signing key" in (out.stdout + out.stderr)


def test_an_edited_event_is_found(recorded, tmp_path) -> None:
    v = tampered(recorded, tmp_path, "UPDATE events SET detail = 'nothing happened' WHERE seq = 3")
    assert (v["ok"], v["seq"]) == (False, 3) and "content was changed" in v["problem"]


def test_an_edited_event_with_a_recomputed_hash_is_found(recorded, tmp_path) -> None:
    """Editing the row and its own hash breaks the link to the next event."""
    # Always a change: flip the outcome and the hash's first digit (a fixed 'f' was no change one time in 16).
    v = tampered(recorded, tmp_path, "UPDATE events SET outcome = CASE WHEN outcome = 'ok' THEN 'denied' ELSE 'ok' END, "
                 "hash = CASE WHEN substr(hash, 1, 1) = 'f' THEN 'e' ELSE 'f' END || substr(hash, 2) WHERE seq = 3")
    assert v["ok"] is False and v["seq"] in (3, 4)


def test_a_deleted_event_is_found(recorded, tmp_path) -> None:
    v = tampered(recorded, tmp_path, "DELETE FROM events WHERE seq = 4")
    assert v["ok"] is False and "seq 4 is missing" in v["problem"]


def test_reordered_events_are_found(recorded, tmp_path) -> None:
    v = tampered(recorded, tmp_path,
                 "UPDATE events SET seq = -1 WHERE seq = 2", "UPDATE events SET seq = 2 WHERE seq = 3",
                 "UPDATE events SET seq = 3 WHERE seq = -1")
    assert v["ok"] is False and v["seq"] == 2 and "does not follow" in v["problem"]


def test_a_cut_off_tail_is_found(recorded, tmp_path) -> None:
    """Removing the newest events and rewinding the head is caught by the signed checkpoint."""
    v = tampered(recorded, tmp_path,
                 "DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)",
                 "UPDATE audit_head SET seq = (SELECT max(seq) FROM events), "
                 "hash = (SELECT hash FROM events WHERE seq = (SELECT max(seq) FROM events))")
    assert v["ok"] is False and "events were removed" in v["problem"]


def test_an_edited_statement_is_found(recorded, tmp_path) -> None:
    """The chain holds a digest of every allowed statement, so the session record cannot be rewritten either."""
    v = tampered(recorded, tmp_path, "UPDATE statements SET text = 'select 2' WHERE text = 'select 1'")
    assert v["ok"] is False and "text changed after it was recorded" in v["problem"] and "statement 1" in v["problem"]


def test_edited_bound_values_are_found(recorded, tmp_path) -> None:
    v = tampered(recorded, tmp_path, """UPDATE statements SET params = '["goodbye",null]' WHERE params IS NOT NULL""")
    assert v["ok"] is False and "params changed after it was recorded" in v["problem"]


def test_a_forged_checkpoint_is_found(recorded, tmp_path) -> None:
    v = tampered(recorded, tmp_path, "UPDATE audit_checkpoints SET hash = CASE WHEN substr(hash, 1, 1) = 'f' THEN 'e' ELSE 'f' END || substr(hash, 2)")
    assert v["ok"] is False and "invalid signature" in v["problem"]


def test_sessions_and_refusals_are_audit_events(recorded) -> None:
    events = recorded.cli_json("events", "--limit", "1000")
    kinds = {(e["kind"], e["outcome"]) for e in events}
    assert {("session.start", "ok"), ("session.end", "ok"), ("statement.refused", "denied"),
            ("api.authenticate", "denied")} <= kinds
    refused = next(e for e in events if e["kind"] == "statement.refused")
    assert refused["user"] == "alice" and "selec 1" in refused["detail"] and refused["source"].startswith("session:")


def test_export_jsonl_and_cef(recorded) -> None:
    lines = recorded.cli("audit", "export").stdout.splitlines()
    events = [json.loads(x) for x in lines]
    assert [e["event"]["sequence"] for e in events] == list(range(1, len(events) + 1)) and len(events) >= 8
    assert all(len(e["wardgate"]["hash"]) == 64 for e in events)
    refused = next(e for e in events if e["event"]["action"] == "statement.refused")
    assert refused["user"]["name"] == "alice" and refused["event"]["outcome"] == "failure"
    assert refused["event"]["category"] == ["database"] and "selec 1" in refused["message"]
    assert recorded.cli("audit", "export", "--since", "1h").stdout.splitlines() == lines
    assert recorded.cli("audit", "export", "--since", "2999-01-01T00:00").stdout == ""
    cef = recorded.cli("audit", "export", "--format", "cef").stdout.splitlines()
    assert len(cef) == len(lines) and all(x.startswith("CEF:0|Wardgate|Wardgate|") for x in cef)
    refused = next(x for x in cef if "|statement.refused|" in x)
    assert "suser=alice" in refused and "outcome=denied" in refused and "|7|" in refused
    bad = recorded.cli("audit", "export", "--format", "xml", check=False)
    assert bad.returncode == 2


def test_replay_shows_the_timeline(recorded) -> None:
    refused = next(e for e in recorded.cli_json("events", "--limit", "1000") if e["kind"] == "statement.refused")
    sid = refused["source"].split(":", 1)[1]
    out = recorded.cli("sessions", "replay", sid, "--no-wait").stdout
    assert "alice -> shop" in out and "selec 1" in out and "denied 42501" in out and "ended:" in out
    assert "deny: parser (deny)" in out
    ok = next(s for s in recorded.sessions(user="alice") if s["application_name"] != "psql")
    extended = recorded.cli("sessions", "replay", ok["id"], "--no-wait").stdout
    assert "values: 'hello', NULL" in extended and "columns: text, int4" in extended
    timed = recorded.cli("sessions", "replay", sid, "--speed", "1000").stdout
    assert "selec 1" in timed


def test_every_statement_decision_is_an_audit_event(recorded) -> None:
    """Allowed statements join the chain by their SHA-256 (their text stays in the session record,
    which retention may purge); refusals carry their reason."""
    events = recorded.cli_json("events", "--limit", "1000")
    digest = statement_digest("select 1", None)
    allowed = [e for e in events if e["kind"] == "statement.allow" and digest in e["detail"]]
    assert allowed and allowed[0]["user"] == "alice" and allowed[0]["outcome"] == "allow"
    assert json.loads(allowed[0]["detail"]) == {"statements": [[1, digest, "allow"]]}
    assert allowed[0]["source"].startswith("session:")
    session = recorded.cli_json("sessions", "show", allowed[0]["source"].split(":", 1)[1])
    assert session["statements"][0]["decision"] == "allow" and session["statements"][0]["rules"] == []
    # results are summarised by default: columns and row count, no values
    assert session["statements"][0]["result"] == {"columns": ["?column?"]} and session["statements"][0]["rows"] == 1
    refused_sid = next(e for e in events if e["kind"] == "statement.refused")["source"].split(":", 1)[1]
    refused = recorded.cli_json("sessions", "show", refused_sid)["statements"][0]
    assert refused["decision"] == "deny" and refused["rules"][0]["rule"] and refused["status"] == "denied"
    assert not any(e["kind"] == "statement.allow" and e["source"] == f"session:{refused_sid}" for e in events)


def test_bound_values_are_recorded(recorded) -> None:
    s = next(s for s in recorded.sessions(user="alice") if s["application_name"] != "psql")
    stmt = next(st for st in recorded.cli_json("sessions", "show", s["id"])["statements"] if "%s" not in st["text"]
                and "$1" in st["text"])
    assert stmt["params"] == ["hello", None] and stmt["param_count"] == 2


def test_policy_changes_are_recorded_with_what_changed(tmp_path, pg) -> None:  # noqa: ANN001
    gw = make_gateway(tmp_path, pg)
    gw.start()
    gw.stop()
    gw.start()  # the same policy again: nothing to record
    gw.stop()
    with gw.config.open("a") as f:
        f.write('[[guardrails]]\nname = "no-truncate"\nkinds = ["truncate"]\nmessage = "no"\n')
    gw.start()
    gw.stop()
    changes = [e for e in gw.cli_json("events", "--kind", "policy.change") if e["kind"] == "policy.change"]
    assert len(changes) == 2
    first, latest = changes[-1], changes[0]
    assert first["detail"].startswith("first policy seen") and first["source"].startswith("config:")
    diff = json.loads(latest["detail"])
    assert list(diff) == ["guardrails"] and diff["guardrails"]["added"][0]["name"] == "no-truncate"
    assert diff["guardrails"]["removed"] == [] and "@" in latest["user"]
    assert APP_PASSWORD not in json.dumps(changes)


def test_session_filters(recorded) -> None:
    def ids(*args: str) -> set[str]:
        return {s["id"] for s in recorded.cli_json("sessions", "list", *args)}

    everything = ids()
    denied = ids("--outcome", "denied")
    refused = next(e for e in recorded.cli_json("events", "--limit", "1000") if e["kind"] == "statement.refused")
    sid = refused["source"].split(":", 1)[1]
    assert denied == {sid}
    rule = recorded.cli_json("sessions", "show", sid)["statements"][0]["rules"][0]["rule"]
    assert ids("--rule", rule) == {sid} and ids("--rule", "no-such-rule") == set()
    assert ids("--since", "1h") == everything and ids("--since", "2999-01-01T00:00") == set()
    assert ids("--until", "1h") == set() and ids("--outcome", "ok", "--user", "alice") <= everything
    assert sid not in ids("--outcome", "ok")
    bad = recorded.cli("sessions", "list", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and "ISO time" in bad.stderr


def test_retention_purges_content_and_the_chain_says_so(recorded, tmp_path) -> None:
    base = tmp_path / "copy"
    shutil.copytree(recorded.dir, base, ignore=shutil.ignore_patterns("*.sock", "journal"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(base / "wardgate.toml"), *args],
                              capture_output=True, text=True, env=recorded.env, timeout=60, check=True)

    sessions = json.loads(cli("sessions", "list", "--status", "closed", "--json").stdout)
    assert sessions and all(s["purged_at"] is None for s in sessions)
    dry = json.loads(cli("sessions", "purge", "--older-than", "0s", "--dry-run", "--json").stdout)
    assert dry["sessions"] == len(sessions) and dry["statements"] >= 3
    assert json.loads(cli("sessions", "show", sessions[0]["id"], "--json").stdout)["statements"]
    done = json.loads(cli("sessions", "purge", "--older-than", "0s", "--json").stdout)
    assert done["sessions"] == len(sessions)
    shown = json.loads(cli("sessions", "show", sessions[0]["id"], "--json").stdout)
    assert shown["statements"] == [] and shown["purged_at"] and shown["user"] == "alice"
    verdict = json.loads(cli("audit", "verify", "--json").stdout)
    assert verdict["ok"]
    purge = [e for e in json.loads(cli("events", "--kind", "retention.purge", "--json").stdout)]
    assert len(purge) == 1 and f"content of {len(sessions)} session(s)" in purge[0]["detail"]
    assert all(s["id"] in purge[0]["detail"] for s in sessions) and purge[0]["source"] == "cli"
    again = json.loads(cli("sessions", "purge", "--older-than", "0s", "--json").stdout)
    assert again["sessions"] == 0
