"""Errors of the one-shot doors quote stored values; what the caller gets and what is recorded is masked.

Against real PostgreSQL through a running gateway: POST /api/exec, `wardgate exec` and the MCP `exec` tool.
dana (deployers) is under the content detectors only; alice (dev) is under column rules too (card numbers,
national ids); bob (ops) is under none, and the database itself, read directly, is the ground truth.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import httpx2
import psycopg
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import APP_PASSWORD, make_gateway
from tests.integration.test_masking import MASKING

CAST = "select email::int from customers order by id limit 1"
NOT_NULL = "update customers set name = null where id = 1"


@pytest.fixture(scope="module")
def egw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("exec-messages"), pg, tail_toml=MASKING)
    gw.cli("users", "add", "dana", "--group", "deployers")
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def truth(pg) -> dict[str, str]:  # noqa: ANN001
    """Customer 1 as stored, read directly from the database."""
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop")) as conn:
        email, card, national_id, phone = conn.execute(
            "select email, card_number, national_id, phone from customers where id = 1").fetchone()
    return {"email": email, "card": card, "national_id": national_id, "phone": phone}


@pytest.fixture(scope="module")
def key(egw):  # noqa: ANN001, ANN201
    made: dict[str, str] = {}

    def for_user(user: str) -> str:
        if user not in made:
            made[user] = egw.store().create_api_key(name=f"messages for {user}", kind="agent", user_name=user,
                                                    agent="test-agent", groups=[], ttl=None,
                                                    created_by="test_exec_messages").secret
        return made[user]
    return for_user


def api(egw, key: str, method: str, path: str, **kw) -> httpx.Response:  # noqa: ANN001, ANN003
    return httpx.request(method, f"http://127.0.0.1:{egw.http_port}{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=60, **kw)


def exec_api(egw, key: str, sql: str) -> dict:  # noqa: ANN001
    r = api(egw, key, "POST", "/api/exec", json={"connection": "shop", "sql": sql})
    assert r.status_code == 200, r.text
    return r.json()


def recorded(egw, sid: str) -> tuple[dict, str]:  # noqa: ANN001
    """The session as the store keeps it, once its outcome is in, and all of it as text."""
    egw.wait_for_session(lambda s: s["id"] == sid and s["status"] == "closed")
    data = egw.session(sid, until=lambda d: d["status"] == "closed" and d["statements"]
                       and d["statements"][0]["status"] == "error")
    return data, json.dumps(data)


def leaks(text: str, truth: dict[str, str], *kinds: str) -> list[str]:
    return [k for k in kinds if truth[k] in text]


def test_the_database_says_it_in_clear(egw, key, truth) -> None:  # noqa: ANN001
    """bob (no masking) sees what PostgreSQL says: the values the other tests must not find."""
    out = exec_api(egw, key("bob"), CAST)
    assert out["status"] == "failed" and out["code"] == "22P02" and truth["email"] in out["error"], out
    out = exec_api(egw, key("bob"), NOT_NULL)
    assert out["status"] == "failed" and out["code"] == "23502", out
    assert truth["card"] in out["detail"] and truth["national_id"] in out["detail"]


def test_a_cast_error_is_masked_by_content(egw, key, truth) -> None:  # noqa: ANN001
    out = exec_api(egw, key("dana"), CAST)
    assert out["status"] == "failed" and out["code"] == "22P02", out
    assert out["error"] == 'invalid input syntax for type integer: "[email]"'
    data, text = recorded(egw, out["session_id"])
    assert (data["statements"][0]["error_code"], data["statements"][0]["error_message"]) == ("22P02", out["error"])
    assert "[email]" in text and not leaks(text, truth, "email")
    kept = api(egw, key("dana"), "GET", f"/api/sessions/{out['session_id']}").json()  # with the envelope kept
    assert kept["result"]["error"] == out["error"] and not leaks(json.dumps(kept), truth, "email")
    # under column rules the quoted value goes whole
    out = exec_api(egw, key("alice"), CAST)
    assert out["error"] == 'invalid input syntax for type integer: "[masked]"'


def test_failing_row_detail_is_withheld_under_column_rules(egw, key, pg, truth) -> None:  # noqa: ANN001
    out = exec_api(egw, key("alice"), NOT_NULL)
    assert out["status"] == "failed" and out["code"] == "23502", out
    assert "null value in column \"name\"" in out["error"] and "detail" not in out
    assert not leaks(json.dumps(out), truth, "card", "national_id", "email", "phone")
    data, text = recorded(egw, out["session_id"])
    assert (data["statements"][0]["error_code"], data["statements"][0]["error_message"]) == ("23502", out["error"])
    assert not leaks(text, truth, "card", "national_id", "email", "phone")
    # dana's detectors see the email and the phone number in the row; the rest is not hers to have masked
    out = exec_api(egw, key("dana"), NOT_NULL)
    assert "[email]" in out["detail"] and not leaks(json.dumps(out), truth, "email", "phone")
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop")) as conn:
        assert conn.execute("select name from customers where id = 1").fetchone()[0]  # nothing changed


def test_cli_exec_answers_the_masked_error(egw, key, truth) -> None:  # noqa: ANN001
    env = {k: v for k, v in egw.env.items() if k not in ("WARDGATE_API_KEY", "WARDGATE_TOKEN")}
    env.update(WARDGATE_API_KEY=key("alice"), COLUMNS="200")
    for sql in (CAST, NOT_NULL):
        for extra in ((), ("--json",)):
            out = subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(egw.config), "exec", "shop",
                                  "-c", sql, *extra], capture_output=True, text=True, env=env, timeout=120)
            assert out.returncode == 1, (out.stdout, out.stderr)
            assert not leaks(out.stdout + out.stderr, truth, "email", "card", "national_id", "phone")
    assert json.loads(out.stdout)["code"] == "23502"


def test_mcp_exec_answers_the_masked_error(egw, key, truth) -> None:  # noqa: ANN001
    async def steps() -> list:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {key('alice')}"}, timeout=httpx2.Timeout(120)) as http, \
                streamable_http_client(f"http://127.0.0.1:{egw.http_port}/mcp", http_client=http) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            return [await session.call_tool("exec", {"connection": "shop", "sql": sql}) for sql in (CAST, NOT_NULL)]

    for result in asyncio.run(steps()):
        text = json.dumps(result.structured_content) + " ".join(getattr(c, "text", "") for c in result.content)
        assert "failed" in text and not leaks(text, truth, "email", "card", "national_id", "phone"), text
