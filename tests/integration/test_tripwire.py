"""The tripwire end to end: a gateway whose classifier misreads a statement (tests/misread_gateway.py)
lets it through, the server runs a DROP the gateway did not predict, and the session ends at once with
the statement recorded as `differential` and a high-risk event in the audit chain. Real psql, real
PostgreSQL; the ground truth is read from the database and the store."""

from __future__ import annotations

import sys
import time

import pytest

from tests import conftest
from tests.conftest import make_gateway, psql
from tests.misread_gateway import MISREAD
from wardgate.recording import views
from wardgate.store import NotFound

POLICY = """
[[guardrails]]
preset = "standard"
connections = ["shop"]
"""


@pytest.fixture(scope="module")
def misread(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    pg.psql("DROP TABLE IF EXISTS tripwire_victim; CREATE TABLE tripwire_victim (id int); "
            "ALTER TABLE tripwire_victim OWNER TO app", database="shop")
    with pytest.MonkeyPatch.context() as mp:
        launcher = str(conftest.ROOT / "tests" / "misread_gateway.py")
        mp.setattr(conftest, "wardgate_cmd", lambda: [sys.executable, launcher])
        gw = make_gateway(tmp_path_factory.mktemp("misread"), pg, tail_toml=POLICY)
        gw.env["PYTHONPATH"] = str(conftest.ROOT)
        gw.start()
        yield gw
        gw.stop()


def test_a_statement_read_past_the_gateway_ends_the_session(misread, pg) -> None:  # noqa: ANN001
    dsn = misread.dsn(misread.credential("alice"))
    out = psql(dsn, "-c", "select 2 as before", "-c", MISREAD, "-c", "select 3 as after", check=False)
    assert out.returncode != 0
    assert "42501" in out.stderr or "other than the one the gateway classified" in out.stderr, out.stderr
    assert "after" not in out.stdout  # nothing ran after it
    # The server did run the DROP (the tripwire detects; the classification is what must prevent)
    assert pg.psql("SELECT count(*) FROM pg_class WHERE relname = 'tripwire_victim'", database="shop").strip() == "0"
    deadline = time.monotonic() + 15
    record = None
    while time.monotonic() < deadline and record is None:
        for s in misread.sessions(user="alice"):
            data = views.show_session(misread.store(), s["id"])
            hits = [st for st in data["statements"] if st["text"] == MISREAD]
            if hits and hits[0].get("status") == "differential" and data.get("status") != "active":
                record = data, hits[0]
        time.sleep(0.2)
    assert record is not None, "the misread statement was not recorded as differential"
    session, statement = record
    assert "read past" in (session.get("end_reason") or "")
    events = misread.store().list_events(kind="statement.differential")
    assert events and events[0].outcome == "high" and "DROP TABLE" in (events[0].detail or "")
    verify = misread.cli("audit", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_an_ordinary_session_is_not_tripped(misread) -> None:  # noqa: ANN001
    dsn = misread.dsn(misread.credential("alice"))
    out = psql(dsn, "-c", "create temp table x (id int)", "-c", "insert into x values (1), (2)",
               "-c", "update x set id = 3 where id = 1", "-c", "select * from x", "-c", "begin", "-c", "commit",
               "-c", "set statement_timeout = '5s'", "-c", "show statement_timeout", "-c", "create index on x (id)",
               "-c", "declare c cursor with hold for select * from x", "-c", "fetch 1 from c", "-c", "close c",
               "-c", "explain select 1", "-c", "copy x to stdout", "-c", "values (1), (2)")
    assert out.returncode == 0, out.stderr


def test_the_exec_door_trips_too(misread, pg) -> None:  # noqa: ANN001
    import httpx

    pg.psql("CREATE TABLE IF NOT EXISTS tripwire_victim (id int); ALTER TABLE tripwire_victim OWNER TO app",
            database="shop")
    key = misread.cli_json("apikeys", "create", "--for-agent", "tripwire", "--user", "alice")["key"]
    r = httpx.post(f"http://127.0.0.1:{misread.http_port}/api/exec", headers={"Authorization": f"Bearer {key}"},
                   json={"connection": "shop", "sql": MISREAD}, timeout=60)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["status"] == "failed" and answer["code"] == "42501", answer
    assert "other than the one the gateway classified" in answer["error"]
    deadline, statements = time.monotonic() + 15, []
    while time.monotonic() < deadline and (not statements or statements[0]["status"] == "running"):
        try:  # the recorder drains asynchronously: the statement first, then its outcome
            statements = views.show_session(misread.store(), answer["session_id"])["statements"]
        except NotFound:
            pass
        time.sleep(0.2)
    assert [st["status"] for st in statements] == ["differential"]
    events = misread.store().list_events(kind="statement.differential")
    assert any(e.source == f"session:{answer['session_id']}" and e.outcome == "high" for e in events), events
