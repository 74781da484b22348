"""Guardrails on every path: the corpus decides the same through `policy check`, psql, psycopg and asyncpg."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tomllib
from pathlib import Path

import asyncpg
import httpx
import psycopg
import pytest

from tests.conftest import make_gateway, psql, until_refused
from wardgate.domain import Identity
from wardgate.policy.gatekeeper import Gatekeeper

CASES = tomllib.loads((Path(__file__).parent.parent / "corpus" / "guardrails.toml").read_text())["case"]
IDS = [c["sql"][:50] for c in CASES]
EXTENDED = [c for c in CASES if not c.get("simple_only")]  # one statement: what the extended protocol can carry
EXTENDED_IDS = [c["sql"][:50] for c in EXTENDED]
GUARDRAILS = """
[[guardrails]]
preset = "standard"
connections = ["shop"]

[[guardrails]]
name = "no-secret-tables"
relations = ["secret_*"]
connections = ["shop"]

[[guardrails]]
name = "watch-customers"
relations = ["customers"]
shadow = true
"""


@pytest.fixture(scope="module")
def ggw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("guarded"), pg, tail_toml=GUARDRAILS)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def gcred(ggw) -> dict:  # noqa: ANN001
    return ggw.credential(ttl="1h")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_policy_check(ggw, case) -> None:
    decision = Gatekeeper(ggw.settings()).decide(Identity("alice", ("dev",)), "shop", case["sql"])
    assert decision.action == case["action"], decision.public()
    if "rule" in case:
        assert case["rule"] in [m.rule for m in decision.enforced]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_psql(ggw, gcred, case) -> None:
    out = subprocess.run(["psql", "-X", "-v", "VERBOSITY=verbose", ggw.dsn(gcred), "-c", case["sql"]],
                         capture_output=True, text=True, timeout=30)
    denied = "42501" in out.stderr and "refused by the Wardgate gateway" in out.stderr
    assert denied == (case["action"] == "deny"), out.stderr
    if denied:
        assert case["rule"] in out.stderr


@pytest.mark.parametrize("case", EXTENDED, ids=EXTENDED_IDS)
def test_psycopg_extended_protocol(ggw, gcred, case) -> None:
    with psycopg.connect(ggw.dsn(gcred), autocommit=True) as conn:
        try:
            conn.execute(case["sql"], prepare=True)
            refused = None
        except psycopg.Error as exc:
            refused = exc if exc.sqlstate == "42501" else None
        assert (refused is not None) == (case["action"] == "deny"), refused
        if refused is not None:
            assert case["rule"] in str(refused)
        assert conn.execute("select 1").fetchone() == (1,)  # the session carries on


@pytest.mark.parametrize("case", EXTENDED, ids=EXTENDED_IDS)
def test_asyncpg_extended_protocol(ggw, gcred, case) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(ggw.dsn(gcred))
        try:
            try:
                await conn.fetch(case["sql"])
                refused = None
            except asyncpg.PostgresError as exc:
                refused = exc if exc.sqlstate == "42501" else None
            assert (refused is not None) == (case["action"] == "deny"), refused
            assert await conn.fetchval("select 2") == 2
        finally:
            await conn.close()

    asyncio.run(main())


def test_policy_check_cli(ggw) -> None:
    out = ggw.cli("policy", "check", "--user", "alice", "--connection", "shop", "--sql", "delete from orders", "--json")
    decision = json.loads(out.stdout)
    assert decision["action"] == "deny"
    assert decision["matches"][0]["rule"] == "standard:unconditional-writes"
    shadow = json.loads(ggw.cli("policy", "check", "-u", "alice", "-C", "shop", "--sql", "select * from customers", "--json").stdout)
    assert shadow["masking"] == []
    assert shadow["action"] == "allow" and shadow["matches"][0] == {
        "rule": "watch-customers", "action": "deny", "reason": "relation customers", "message": "", "shadow": True}


def test_denied_statements_are_recorded_and_transactions_behave(ggw, gcred) -> None:
    with psycopg.connect(ggw.dsn(gcred, application_name="t_guard"), autocommit=True) as conn:
        conn.execute("begin")
        conn.execute("select 1")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("truncate orders")
        # like any failed statement, a refused one aborts the transaction (simple and extended alike)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.execute("rollback")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            with conn.pipeline():
                conn.execute("select 10")
                conn.execute("delete from orders")
                conn.execute("select 30")  # in the refused statement's batch: skipped, as after any error
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("select 40").fetchone() == (40,)
    s = ggw.wait_for_session(lambda s: s["application_name"] == "t_guard" and s["status"] == "closed")
    statements = ggw.session(s["id"])["statements"]
    denied = [st for st in statements if st["status"] == "denied"]
    assert {st["text"] for st in denied} == {"truncate orders", "delete from orders"}
    assert all(st["error_code"] == "42501" and "standard:" in st["error_message"] for st in denied)
    by_text = {st["text"]: st["status"] for st in statements}
    assert by_text["select 10"] == "ok" and by_text["select 30"] == "skipped" and by_text["select 40"] == "ok"


def test_fast_path_function_calls_are_refused(ggw, gcred) -> None:
    import struct

    from tests.pgwire import RawClient
    from wardgate.engines.postgres import codec

    c = RawClient(ggw.port)
    c.login("alice", gcred["credential"], "shop")
    # FunctionCall for oid 1 (whatever it is): no SQL to inspect, so refused
    c.send(codec.message(b"F", struct.pack("!IhhIhh", 1, 0, 1, 0, 0, 0)[:16]))
    msgs = c.read_until("Z")
    errors = [codec.parse_error_fields(b) for t, b in msgs if t == "E"]
    assert errors and errors[0]["C"] == "42501" and "fast-path" in errors[0]["M"]


def test_shadow_rules_are_recorded_not_enforced(ggw, gcred) -> None:
    import time

    with psycopg.connect(ggw.dsn(gcred), autocommit=True) as conn:
        assert conn.execute("select count(*) from customers where id < 5").fetchone() == (4,)
    deadline = time.time() + 10
    while time.time() < deadline:
        shadows = ggw.cli_json("events", "--kind", "guardrail.shadow")
        if any("customers where id < 5" in (e["detail"] or "") for e in shadows):
            break
        time.sleep(0.3)
    else:
        raise AssertionError("the shadow match was not recorded")
    hit = next(e for e in shadows if "customers where id < 5" in (e["detail"] or ""))
    assert hit["outcome"] == "would deny" and hit["user"] == "alice" and hit["detail"].startswith("watch-customers:")


def test_standard_conforming_strings_stays_on(ggw, gcred, pg) -> None:
    """With it off, PostgreSQL would read `'a\\' , '` as one literal and run the DROP after it, where the
    gateway's parser sees a SELECT of two strings: the gateway keeps it on wherever a rule applies."""
    from tests.conftest import APP_PASSWORD

    script = "set standard_conforming_strings = off;\nselect 'a\\' , ' ; drop table orders; -- ';\n"
    out = psql(ggw.dsn(gcred), "-v", "ON_ERROR_STOP=0", "-At", input=script, check=False)
    assert "gateway:string-escapes" in out.stderr and "a\\| ; drop table orders; -- " in out.stdout
    assert psql(ggw.dsn(gcred), "-Atc", "select count(*) >= 0 from orders").stdout.strip() == "t"
    # ... nor from the client's startup options
    refused = psql(ggw.dsn(gcred), "-Atc", "select 1", check=False, env={"PGOPTIONS": "-c standard_conforming_strings=off"})
    assert refused.returncode != 0 and "standard_conforming_strings is off" in refused.stderr
    # ... and should server code turn it off, the session ends before anything else runs in it
    direct = pg.dsn("app", APP_PASSWORD, "shop")
    psql(direct, "-c", "create or replace function escapes_off() returns text language sql as "
                       "$$ select set_config('standard_conforming_strings', 'off', false) $$")
    try:
        out = psql(ggw.dsn(gcred, application_name="t_escapes"), "-v", "ON_ERROR_STOP=0", "-At",
                   input="select escapes_off();\nselect 'still here';\n", check=False)
        assert "turned standard_conforming_strings off" in out.stderr and "still here" not in out.stdout
    finally:
        psql(direct, "-c", "drop function escapes_off()")
    s = ggw.wait_for_session(lambda s: s["application_name"] == "t_escapes" and s["status"] == "closed")
    assert "standard_conforming_strings" in s["end_reason"]
    # ... nor from the database role's own settings, on any door: native sessions and exec alike
    key = ggw.cli_json("apikeys", "create", "--name", "escapes-exec", "--group", "dev")["key"]
    psql(direct, "-c", "alter role app set standard_conforming_strings = off")
    try:
        native = psql(ggw.dsn(gcred), "-Atc", "select 1", check=False)
        assert native.returncode != 0 and "standard_conforming_strings is off" in native.stderr
        out = httpx.post(f"http://127.0.0.1:{ggw.http_port}/api/exec", headers={"authorization": f"Bearer {key}"},
                         json={"connection": "shop", "sql": "select 'a\\' , ' ; drop table orders; -- '"}, timeout=30).json()
        assert out["status"] == "failed" and out["code"] == "42501" and "standard_conforming_strings" in out["error"], out
    finally:
        psql(direct, "-c", "alter role app reset standard_conforming_strings")
    assert psql(ggw.dsn(gcred), "-Atc", "select count(*) >= 0 from orders").stdout.strip() == "t"


def test_a_policy_reload_applies_at_once_and_a_broken_file_changes_nothing(tmp_path, pg) -> None:
    """SIGHUP (or POST /api/admin/policy/reload) reads the config file's policy again; new and live
    sessions get it. A file that does not load keeps the policy in force."""
    import signal

    import httpx

    gw = make_gateway(tmp_path / "reload", pg, tail_toml='[roles]\nadmins = ["wardgate-admins"]\n')
    original = gw.config.read_text()
    gw.start()
    try:
        cred = gw.credential(ttl="1h")
        admin = gw.cli_json("apikeys", "create", "--name", "policy-admin", "--group", "wardgate-admins")["key"]
        dev = gw.cli_json("apikeys", "create", "--name", "not-admin", "--group", "dev")["key"]
        url = f"http://127.0.0.1:{gw.http_port}/api/admin/policy/reload"
        with psycopg.connect(gw.dsn(cred), autocommit=True) as live:
            assert live.execute("select count(*) > 0 from orders").fetchone() == (True,)
            gw.config.write_text(original + '\n[[guardrails]]\nname = "orders-frozen"\nrelations = ["orders"]\n')
            gw.proc.send_signal(signal.SIGHUP)
            until_refused(lambda: live.execute("select count(*) from orders"), "orders-frozen",
                          "SIGHUP did not reload the policy")
            gw.config.write_text(original + '\n[[guardrails]]\nname = "broken"\nkinds = ["no_such_kind"]\n')
            assert httpx.post(url, headers={"authorization": f"Bearer {dev}"}).status_code == 403
            refused = httpx.post(url, headers={"authorization": f"Bearer {admin}"})
            assert refused.status_code == 422 and "no_such_kind" in refused.text
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # the rule in force stays
                live.execute("select count(*) from orders")
            gw.config.write_text(original)
            done = httpx.post(url, headers={"authorization": f"Bearer {admin}"}).json()
            assert done["reloaded"] and done["changed"] == ["guardrails"] and done["replicas_told"] is False
            assert live.execute("select count(*) > 0 from orders").fetchone() == (True,)
        out = gw.cli("policy", "reload", check=False)  # no event channel on the embedded store: it says what to do
        assert out.returncode == 1 and "SIGHUP" in out.stderr
    finally:
        gw.stop()
