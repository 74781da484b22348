"""Two gateway replicas on one PostgreSQL store, as behind a load balancer: a review approved on one
wakes the waiter on the other through the store's event channel; a credential revoked on one ends
its session on the other; the audit chain written by both verifies; a replica killed mid-traffic
loses no recorded statement."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psycopg
import pytest
from cryptography.fernet import Fernet

from tests.conftest import APP_PASSWORD, IDP_AUDIENCE, make_gateway, until_refused

TAIL = """
[[identity_providers]]
name = "corp"
issuer = "{issuer}"
audience = "{audience}"

[[guardrails]]
name = "deletes-need-review"
kinds = ["delete"]
action = "review"
approvers = ["dba"]
connections = ["shop"]
"""


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, pg, idp):  # noqa: ANN001, ANN201
    pg.psql("DROP DATABASE IF EXISTS wardgate_replicas")
    pg.psql("CREATE DATABASE wardgate_replicas OWNER app")
    url = pg.dsn("app", APP_PASSWORD, "wardgate_replicas")
    base = tmp_path_factory.mktemp("replicas")
    shared = {"WARDGATE_SECRET_KEY": Fernet.generate_key().decode()}  # every replica has the same secret key
    tail = TAIL.format(issuer=idp.issuer, audience=IDP_AUDIENCE)
    a = make_gateway(base / "a", pg, store_url=url, tail_toml=tail, env_extra=shared)
    b = make_gateway(base / "b", pg, store_url=url, tail_toml=tail, env_extra=shared, users=False)
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def token(idp, user: str, groups: list[str]) -> str:  # noqa: ANN001
    return idp.forge(idp.claims(sub=user, preferred_username=user, groups=groups, exp=int(time.time()) + 3600))


def call(gw, method: str, path: str, tok: str, **kw) -> httpx.Response:  # noqa: ANN001, ANN003
    return httpx.request(method, f"http://127.0.0.1:{gw.http_port}{path}", headers={"Authorization": f"Bearer {tok}"},
                         timeout=60, **kw)


def test_a_review_approved_on_one_replica_wakes_the_waiter_on_the_other(replicas, idp) -> None:
    a, b = replicas
    amy, olivia = token(idp, "amy", ["dev"]), token(idp, "olivia", ["dba"])
    out = call(a, "POST", "/api/exec", amy, json={"connection": "shop", "sql": "delete from orders where id = -42"}).json()
    assert out["status"] == "pending_approval", out
    rid = out["review_id"]
    waited: dict = {}
    # The waiter is on B. While B hears the store's event channel it looks again only every 30 s, so a
    # wait of 20 s that ends "approved" was woken by the approval on A, not by looking again.
    assert httpx.get(f"http://127.0.0.1:{b.http_port}/healthz").json()["events"] == "listening"
    waiter = threading.Thread(target=lambda: waited.update(call(b, "GET", f"/api/reviews/{rid}/wait?timeout=20", amy).json()))
    waiter.start()
    time.sleep(1.5)  # the waiter is parked on B
    assert call(a, "POST", f"/api/reviews/{rid}/approve", olivia).json()["status"] == "approved"
    waiter.join(30)
    assert waited["status"] == "approved" and waited["timed_out"] is False
    # and it runs on B, once
    ran = call(b, "POST", f"/api/reviews/{rid}/execute", amy).json()
    assert ran["status"] == "completed", ran
    assert call(a, "POST", f"/api/reviews/{rid}/execute", amy).status_code == 409


def test_an_exec_run_on_one_replica_is_answered_by_the_other(replicas, idp) -> None:
    a, b = replicas
    amy = token(idp, "amy", ["dev"])
    out = call(a, "POST", "/api/exec", amy, json={"connection": "shop", "wait": 0,
                                                  "sql": "select pg_sleep(2), count(*) as n from customers"}).json()
    assert out["status"] == "running", out
    sid = out["session_id"]
    deadline = time.time() + 10  # the session's record reaches the store within moments
    while call(b, "GET", f"/api/sessions/{sid}/wait?timeout=0", amy).status_code == 404 and time.time() < deadline:
        time.sleep(0.1)
    done = call(b, "GET", f"/api/sessions/{sid}/wait?timeout=20", amy).json()  # woken by A's result, through the store
    assert done["status"] == "completed" and done["columns"] == ["pg_sleep", "n"], done
    again = call(b, "GET", f"/api/sessions/{sid}", amy).json()
    assert again["result"] == done
    assert call(b, "GET", f"/api/sessions/{sid}/wait?timeout=1", token(idp, "dana", ["dev"])).status_code == 404


def test_mcp_is_stateless_so_any_replica_answers_an_agent(replicas, idp) -> None:
    """An agent's exec started on A is waited for through B's MCP server: no MCP session binds the agent
    to one replica, and the exec's result is in the store."""
    import asyncio

    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    a, b = replicas
    out = call(a, "POST", "/api/exec", token(idp, "amy", ["dev"]), json={
        "connection": "shop", "wait": 0, "sql": "select pg_sleep(1.5), 'from A' as what"}).json()
    assert out["status"] == "running", out
    url = f"http://127.0.0.1:{b.http_port}/mcp"
    agent = idp.forge(idp.claims(sub="amy", preferred_username="amy", groups=["dev"], aud=url, act={"sub": "claude-code"},
                                 exp=int(time.time()) + 3600))

    async def wait_on_b() -> dict:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {agent}"}, timeout=httpx2.Timeout(60)) as http:
            async with streamable_http_client(url, http_client=http) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    for _ in range(50):  # until the exec's record reaches the store
                        result = await session.call_tool("sessions_wait_result",
                                                         {"session_id": out["session_id"], "timeout_seconds": 20})
                        if not result.is_error:
                            return result.structured_content
                        await asyncio.sleep(0.2)
                    raise AssertionError(result.content)

    got = asyncio.run(wait_on_b())
    assert got["status"] == "completed" and got["rows"] == [["", "from A"]], got


def test_a_credential_revoked_on_one_replica_ends_its_session_on_the_other(replicas) -> None:
    a, b = replicas
    cred = a.credential("alice", ttl="1h")
    with psycopg.connect(b.dsn(cred, application_name="t_replica_revoke"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        a.cli("credentials", "revoke", cred["id"])  # any door, any replica: here the CLI beside A
        deadline = time.time() + 10
        with pytest.raises(psycopg.OperationalError):
            while time.time() < deadline:
                conn.execute("select 1")
                time.sleep(0.1)


def test_the_audit_chain_of_both_replicas_verifies(replicas) -> None:
    a, b = replicas
    creds = [a.credential("alice", ttl="1h") for _ in range(4)]

    def traffic(gw, cred) -> None:  # noqa: ANN001
        with psycopg.connect(gw.dsn(cred, application_name="t_replica_chain"), autocommit=True) as conn:
            for i in range(40):
                conn.execute("select %s::int", [i])

    threads = [threading.Thread(target=traffic, args=(gw, c)) for gw, c in zip((a, b, a, b), creds, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done = lambda s: s["application_name"] == "t_replica_chain" and s["status"] == "closed"  # noqa: E731
    deadline = time.time() + 20
    while time.time() < deadline and len([s for s in a.cli_json("sessions", "list") if done(s)]) < 4:
        time.sleep(0.3)
    sessions = [s for s in a.cli_json("sessions", "list") if done(s)]
    assert len(sessions) == 4
    for s in sessions:
        a.session(s["id"], until=lambda d: len(d["statements"]) == 40)
    for gw in (a, b):
        verdict = gw.cli_json("audit", "verify")
        assert verdict["ok"], verdict
        assert verdict["statements"] >= 160


def test_a_replica_killed_mid_traffic_loses_no_recorded_statement(replicas) -> None:
    a, b = replicas
    cred = a.credential("alice", ttl="1h")
    answered: list[int] = []

    def traffic() -> None:
        try:
            with psycopg.connect(b.dsn(cred, application_name="t_replica_kill"), autocommit=True) as conn:
                for i in range(1, 100_000):
                    conn.execute("select %s::int", [i])
                    answered.append(i)
        except psycopg.Error:
            pass  # the replica died under us, as the client of a real one would see

    t = threading.Thread(target=traffic)
    t.start()
    while len(answered) < 300:
        time.sleep(0.05)
    b.stop(sig=9)
    t.join(30)
    b.start()  # the replica comes back on its data directory (a StatefulSet's volume): its journal is applied
    s = a.wait_for_session(lambda s: s["application_name"] == "t_replica_kill" and s["status"] == "closed")
    recorded = a.session(s["id"], until=lambda d: len(d["statements"]) >= len(answered))["statements"]
    assert len(recorded) >= len(answered) > 300  # every answered statement, and any that reached PostgreSQL after
    assert [st["seq"] for st in recorded] == list(range(1, len(recorded) + 1))
    assert s["end_reason"] == "gateway restarted"
    assert a.cli_json("audit", "verify")["ok"]


def test_a_policy_reload_reaches_every_replica_and_live_sessions(replicas) -> None:
    a, b = replicas
    rule = '\n[[guardrails]]\nname = "orders-frozen"\nrelations = ["orders"]\nconnections = ["shop"]\n'
    originals = [gw.config.read_text() for gw in (a, b)]
    cred = a.credential("alice", ttl="1h")
    with psycopg.connect(a.dsn(cred, application_name="t_reload"), autocommit=True) as live:
        assert live.execute("select count(*) > 0 from orders").fetchone() == (True,)
        try:
            for gw, original in zip((a, b), originals, strict=True):
                gw.config.write_text(original + rule)
            a.cli("policy", "reload")  # beside one replica; every replica hears it through the store

            def on_b() -> None:  # B, a new session
                with psycopg.connect(b.dsn(cred), autocommit=True) as conn:
                    conn.execute("select count(*) from orders")

            until_refused(on_b, "orders-frozen", "replica B did not reload its policy")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # A, a session open since before the reload
                live.execute("select count(*) from orders")
        finally:
            for gw, original in zip((a, b), originals, strict=True):
                gw.config.write_text(original)
            a.cli("policy", "reload")
    # The audit log has the change once (not once per replica), and then its reversal
    deadline = time.time() + 10
    while True:
        changes = [e for e in a.cli_json("events", "--kind", "policy.change", "--limit", "50") if "orders-frozen" in e["detail"]]
        if len(changes) >= 2 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert len(changes) == 2, changes
    parts = [json.loads(e["detail"])["guardrails"] for e in sorted(changes, key=lambda e: e["at"])]
    assert [r["name"] for r in parts[0]["added"]] == ["orders-frozen"] and not parts[0]["removed"]
    assert [r["name"] for r in parts[1]["removed"]] == ["orders-frozen"] and not parts[1]["added"]


def test_replicas_starting_together_migrate_a_new_store_once(tmp_path, pg) -> None:
    """Eight processes open a new PostgreSQL store at the same moment: one migrates (under an advisory
    lock), the others wait and find it done; none fails."""
    import subprocess

    from tests.conftest import clean_env, wardgate_cmd

    pg.psql("DROP DATABASE IF EXISTS wardgate_fresh")
    pg.psql("CREATE DATABASE wardgate_fresh OWNER app")
    url = pg.dsn("app", APP_PASSWORD, "wardgate_fresh")
    secret = Fernet.generate_key().decode()
    procs = []
    for i in range(8):
        config = tmp_path / f"r{i}.toml"
        config.write_text(f'data_dir = "d{i}"\n')
        procs.append(subprocess.Popen([*wardgate_cmd(), "--config", str(config), "users", "list", "--json"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**clean_env(), "WARDGATE_STORE_URL": url, "WARDGATE_SECRET_KEY": secret}))
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    with psycopg.connect(url) as db:
        assert db.execute("select count(*) from alembic_version").fetchone() == (1,)
        assert db.execute("select count(*) from keys").fetchone()[0] <= 1


def test_each_session_is_analysed_once_though_every_replica_analyses(replicas) -> None:
    from tests.conftest import psql

    a, b = replicas
    cred = a.credential("alice", ttl="1h")
    script = "".join(f"delete from orders where id = -{i};\n" for i in range(1, 5))  # each held for review
    psql(b.dsn(cred, application_name="t_replica_risk"), "-v", "ON_ERROR_STOP=0", input=script, check=False)
    s = a.wait_for_session(lambda s: s["application_name"] == "t_replica_risk" and s["status"] == "closed")
    deadline = time.time() + 20
    while a.cli_json("sessions", "analysis", s["id"])["status"] != "ready" and time.time() < deadline:
        time.sleep(0.3)
    assert a.cli_json("sessions", "analysis", s["id"])["level"] == "medium"
    time.sleep(2)  # both replicas' analysts have had their turn
    notes = [e for e in a.cli_json("events", "--kind", "session.analysis", "--limit", "200")
             if e["source"] == f"session:{s['id']}"]
    assert len(notes) == 1, notes


def test_console_sign_in_works_on_any_replica_and_a_link_works_once_on_all(replicas) -> None:
    a, b = replicas
    link = a.cli("users", "login-link", "bob").stdout.strip()
    path = link.split(f":{a.http_port}", 1)[1]
    first = httpx.get(f"http://127.0.0.1:{a.http_port}{path}")
    assert first.status_code == 303 and "wardgate_console" in first.cookies
    cookie = {"wardgate_console": first.cookies["wardgate_console"]}
    page = httpx.get(f"http://127.0.0.1:{b.http_port}/console/dashboard", cookies=cookie)  # signed in on B too
    assert page.status_code == 200 and "bob" in page.text
    again = httpx.get(f"http://127.0.0.1:{b.http_port}{path}")  # used on A: refused on B
    assert again.status_code == 401 and "wardgate_console" not in again.cookies
