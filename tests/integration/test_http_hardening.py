"""What the HTTP listener gives away, through a running gateway: the client address it believes
(X-Forwarded-For only from [gateway] trusted_proxies), the headers on every answer, no CDN-backed
docs page, and no database host or port in an exec failure told to someone who is not an admin."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import make_gateway
from wardgate.localpg import free_port

FORGED = "203.0.113.9"
DOWN_PORT = free_port()  # nothing listens here
TAIL = f"""
[roles]
admins = ["wardgate-admins"]

[[connections]]
name = "shop_down"
host = "127.0.0.1"
port = {DOWN_PORT}
database = "shop"
user = "app"
sslmode = "disable"
"""


@pytest.fixture(scope="module")
def hgw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("hardening"), pg, tail_toml=TAIL)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def keys(hgw):  # noqa: ANN001, ANN201
    return {
        "user": hgw.cli_json("apikeys", "create", "--name", "hardening-user", "--group", "deployers")["key"],
        "admin": hgw.cli_json("apikeys", "create", "--name", "hardening-admin", "--group", "deployers",
                              "--group", "wardgate-admins")["key"],
    }


def url(gw, path: str) -> str:  # noqa: ANN001
    return f"http://127.0.0.1:{gw.http_port}{path}"


def events(gw, kind: str, after: float) -> list:  # noqa: ANN001
    """The recorded events of `kind` since `after`, once the recorder has drained them."""
    deadline = time.time() + 10
    while True:
        found = [e for e in gw.store().list_events(kind=kind, limit=1000) if e.at >= after]
        if found or time.time() > deadline:
            return found
        time.sleep(0.2)


def bad_key(key: str) -> str:
    return key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")


# --- client addresses --------------------------------------------------------------------------------

def test_forwarded_for_from_loopback_is_not_believed_by_default(hgw, keys) -> None:
    since = time.time()
    r = httpx.get(url(hgw, "/api/me"), headers={"Authorization": "Bearer wgk_nope_nope", "X-Forwarded-For": FORGED})
    assert r.status_code == 401
    addrs = {e.client_addr for e in events(hgw, "api.authenticate", since)}
    assert addrs == {"127.0.0.1"}, addrs


def test_a_guesser_varying_forwarded_for_is_still_locked_out(hgw) -> None:
    guess = bad_key(hgw.cli_json("apikeys", "create", "--name", "guessed", "--group", "deployers")["key"])

    def me(secret: str, i: int) -> httpx.Response:
        return httpx.get(url(hgw, "/api/me"), timeout=30,
                         headers={"Authorization": f"Bearer {secret}", "X-Forwarded-For": f"198.51.100.{i}"})

    assert [me(guess, i).status_code for i in range(5)] == [401] * 5
    locked = me(guess, 99)
    assert locked.status_code == 429 and "too many failed sign-ins" in locked.json()["detail"]


def test_forwarded_for_from_a_trusted_proxy_is_used(tmp_path, pg) -> None:
    # Set from the environment, as every [gateway] setting can be.
    gw = make_gateway(tmp_path / "gw", pg, users=False, env_extra={"WARDGATE_GATEWAY_TRUSTED_PROXIES": "127.0.0.1"})
    assert gw.settings().gateway.trusted_proxies == ["127.0.0.1"]
    gw.start()
    try:
        since = time.time()
        r = httpx.get(url(gw, "/api/me"), headers={"Authorization": "Bearer wgk_nope_nope", "X-Forwarded-For": FORGED})
        assert r.status_code == 401
        assert {e.client_addr for e in events(gw, "api.authenticate", since)} == {FORGED}
    finally:
        gw.stop()


def test_trusted_proxies_must_be_addresses(tmp_path, pg) -> None:
    from wardgate.config import ConfigError

    gw = make_gateway(tmp_path / "gw", pg, users=False, extra_toml='trusted_proxies = ["10.0.0.0/8", "::1"]')
    assert gw.settings().gateway.trusted_proxies == ["10.0.0.0/8", "::1"]
    gw.env["WARDGATE_GATEWAY_TRUSTED_PROXIES"] = "proxy.internal"
    with pytest.raises(ConfigError, match="trusted_proxies"):
        gw.settings()


# --- headers and docs --------------------------------------------------------------------------------

def test_every_answer_says_nosniff(hgw, keys) -> None:
    auth = {"Authorization": f"Bearer {keys['user']}"}
    answers = {
        "api": httpx.get(url(hgw, "/api/me"), headers=auth),
        "health": httpx.get(url(hgw, "/healthz")),
        "unauthenticated": httpx.get(url(hgw, "/api/me")),
        "not found": httpx.get(url(hgw, "/api/nope"), headers=auth),
        "nowhere": httpx.get(url(hgw, "/nope")),
        "console": httpx.get(url(hgw, "/console/login")),
        "console static": httpx.get(url(hgw, "/console/static/console.css")),
        "mcp unauthenticated": httpx.post(url(hgw, "/mcp"), json={}),
        "mcp": httpx.post(url(hgw, "/mcp"), headers={**auth, "Accept": "application/json, text/event-stream"}, json={
            "jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}),
    }
    assert answers["api"].status_code == 200 and answers["unauthenticated"].status_code == 401
    assert answers["not found"].status_code == 404 and answers["mcp unauthenticated"].status_code == 401
    assert answers["mcp"].status_code == 200, answers["mcp"].text
    for name, r in answers.items():
        assert r.headers.get("x-content-type-options") == "nosniff", (name, r.status_code, dict(r.headers))


def test_console_csp_limits_forms_and_base(hgw) -> None:
    csp = httpx.get(url(hgw, "/console/login")).headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split(";") if d.strip()}
    assert directives["form-action"] == ["'self'"] and directives["base-uri"] == ["'none'"]
    assert directives["default-src"] == ["'self'"] and directives["frame-ancestors"] == ["'none'"]


def test_no_cdn_backed_docs_pages_and_the_schema_stays(hgw) -> None:
    for path in ("/docs", "/redoc"):
        r = httpx.get(url(hgw, path))
        assert r.status_code == 404, (path, r.status_code)
        assert "cdn" not in r.text.lower() and "swagger" not in r.text.lower()
    spec = httpx.get(url(hgw, "/openapi.json"))
    assert spec.status_code == 200 and "/api/exec" in spec.json()["paths"]


# --- exec failures -----------------------------------------------------------------------------------

def _reveals(text: str) -> list[str]:
    """Where the database is, as connect errors put it ("at 127.0.0.1:PORT", "('127.0.0.1', PORT)")."""
    return [s for s in (f"127.0.0.1:{DOWN_PORT}", f"'127.0.0.1', {DOWN_PORT}", "Connect call failed") if s in text]


def exec_api(gw, key: str) -> dict:  # noqa: ANN001
    r = httpx.post(url(gw, "/api/exec"), headers={"Authorization": f"Bearer {key}"}, timeout=60,
                   json={"connection": "shop_down", "sql": "select 1"})
    assert r.status_code == 200, r.text
    return r.json()


def test_exec_on_an_unreachable_database_over_the_api(hgw, keys) -> None:
    since = time.time()
    mine = exec_api(hgw, keys["user"])
    assert mine["status"] == "failed" and mine["code"] == "08001", mine
    assert "cannot reach the database of connection 'shop_down'" in mine["error"]
    assert not _reveals(json.dumps(mine)), mine
    # What the caller may read of their own session later says no more.
    hgw.wait_for_session(lambda s: s["id"] == mine["session_id"] and s["status"] == "closed")
    auth = {"Authorization": f"Bearer {keys['user']}"}
    record = httpx.get(url(hgw, f"/api/sessions/{mine['session_id']}"), headers=auth)
    assert record.status_code == 200 and not _reveals(record.text), record.text
    waited = httpx.get(url(hgw, f"/api/sessions/{mine['session_id']}/wait?timeout=1"), headers=auth)
    assert waited.status_code == 200 and not _reveals(waited.text), waited.text

    admins = exec_api(hgw, keys["admin"])
    assert admins["status"] == "failed" and f"127.0.0.1:{DOWN_PORT}" in admins["error"], admins
    # The reason is in the audit log for both, where admins and auditors read it (once the recorder drained it).
    sources = {f"session:{mine['session_id']}", f"session:{admins['session_id']}"}
    deadline = time.time() + 10
    while True:
        audit = httpx.get(url(hgw, "/api/events?kind=exec.upstream"), headers={"Authorization": f"Bearer {keys['admin']}"})
        details = [e["detail"] for e in audit.json() if e["source"] in sources]
        if len(details) == 2 or time.time() > deadline:
            break
        time.sleep(0.2)
    assert len(details) == 2 and all(f"127.0.0.1:{DOWN_PORT}" in d for d in details), audit.json()
    assert len(events(hgw, "exec.upstream", since)) >= 2
    assert f"127.0.0.1:{DOWN_PORT}" in hgw.log.read_text()


def test_exec_on_an_unreachable_database_over_mcp(hgw, keys) -> None:
    async def steps(key: str) -> str:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=httpx2.Timeout(120)) as http, \
                streamable_http_client(url(hgw, "/mcp"), http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("exec", {"connection": "shop_down", "sql": "select 1"})
            return json.dumps(result.structured_content) + " ".join(getattr(c, "text", "") for c in result.content)

    mine = asyncio.run(steps(keys["user"]))
    assert "failed" in mine and "cannot reach the database" in mine and not _reveals(mine), mine
    admins = asyncio.run(steps(keys["admin"]))
    assert "failed" in admins and f"127.0.0.1:{DOWN_PORT}" in admins, admins


def test_a_native_client_is_told_as_little_as_an_exec_caller(hgw) -> None:
    """psql on a connection whose database is down: a person without the admin role reads that the gateway
    cannot reach it, not where it is; an admin reads the reason; both reasons go to the audit log."""
    from tests.conftest import psql

    hgw.cli("users", "add", "nat", "--group", "deployers")
    hgw.cli("users", "add", "ada", "--group", "deployers", "--group", "wardgate-admins")
    told = {}
    for user in ("nat", "ada"):
        cred = hgw.credential(user, "shop_down")
        out = psql(hgw.dsn(cred), "-c", "select 1", check=False)
        assert out.returncode != 0
        told[user] = out.stderr
    assert "cannot reach the database of connection 'shop_down'" in told["nat"] and not _reveals(told["nat"]), told
    assert f"127.0.0.1:{DOWN_PORT}" in told["ada"] or str(DOWN_PORT) in told["ada"], told
    rejected = hgw.wait_for_session(lambda s: s["user"] == "nat" and s["connection"] == "shop_down")
    assert not _reveals(str(rejected)), rejected  # what nat may read of the attempt says no more
