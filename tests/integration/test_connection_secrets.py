"""An admin cannot have the gateway hand a stored upstream secret to a server of their choosing: not by
pointing a stored connection elsewhere (MCP, console), not by naming another environment variable of the
gateway (config file, CLI, MCP, console), and not by a server asking for a cleartext or md5 password.
The fake server (tests/fake_upstream.py) records every password message it gets."""

from __future__ import annotations

import html
import re
import time

import httpx
import pytest
from mcp.client.session import ClientSession

from tests.conftest import APP_PASSWORD, IDP_AUDIENCE, make_gateway
from tests.fake_upstream import FakeUpstream
from tests.integration.test_mcp import data, mcp_url, run

TAIL = """
[[identity_providers]]
name = "corp"
issuer = "{issuer}"
audience = "{audience}"

[roles]
admins = ["wardgate-admins"]

[exec]
wait = "20s"

[[access]]
name = "admins-try-their-connections"
groups = ["wardgate-admins"]
connections = ["moved*", "fake*"]
"""


@pytest.fixture(scope="module")
def sgw(tmp_path_factory, pg, idp):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("secrets"), pg,
                      tail_toml=TAIL.format(issuer=idp.issuer, audience=IDP_AUDIENCE))
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def admin(sgw, idp):  # noqa: ANN001, ANN201
    return idp.forge(idp.claims(sub="root", preferred_username="root", groups=["wardgate-admins"], aud=mcp_url(sgw),
                                exp=int(time.time()) + 3600))


def tool(gw, token: str, name: str, args: dict):  # noqa: ANN001, ANN201
    async def steps(s: ClientSession):  # noqa: ANN202
        return await s.call_tool(name, args)
    return run(gw, token, steps)


def exec_sql(gw, token: str, connection: str) -> dict:  # noqa: ANN001
    return data(tool(gw, token, "exec", {"connection": connection, "sql": "select 1"}))


def test_a_stored_password_is_not_sent_to_the_server_a_connection_is_moved_to(sgw, pg, admin) -> None:
    with FakeUpstream(3) as fake:
        for name, secret in (("moved", {"password": APP_PASSWORD}),
                             ("moved_env", {"password_env": "WARDGATE_CONN_SHOP_PASSWORD"})):
            made = data(tool(sgw, admin, "connections_create", {
                "name": name, "host": "127.0.0.1", "port": pg.port, "database": "shop", "user": "app",
                "sslmode": "disable", "password_auth": "any", **secret}))  # so only the drop keeps it back
            assert made["password"] != "none"
            assert exec_sql(sgw, admin, name)["status"] == "completed"  # the secret works where it was entered for

            # Only the port changes, to a server of the admin's own that asks for a cleartext password.
            moved = data(tool(sgw, admin, "connections_update", {"name": name, "port": fake.port}))
            assert moved["password"] == "none" and "dropped" in moved["note"]
            failed = exec_sql(sgw, admin, name)
            fake.settle()
            assert failed["status"] == "failed", failed
            assert "none is configured" in failed["error"] and "give the password (or password_env) again" in failed["error"]
        assert fake.connections == 2 and fake.received == []  # the gateway went there, and sent nothing

    events = sgw.cli_json("events", "--kind", "connection.update", "--limit", "100")
    moves = {e["detail"].split(":")[0]: e for e in events if "dropped" in e["detail"]}
    assert set(moves) == {"moved", "moved_env"}
    assert all(e["user"] == "root" and e["source"] == "mcp" for e in moves.values())
    assert '"password":["set",null]' in moves["moved"]["detail"]
    assert '"password_env":["WARDGATE_CONN_SHOP_PASSWORD",null]' in moves["moved_env"]["detail"]
    assert APP_PASSWORD not in str(sgw.cli_json("events", "--limit", "1000"))


def test_a_server_asking_for_cleartext_or_md5_gets_nothing_without_the_opt_in(sgw, admin) -> None:
    for method in (3, 5):
        with FakeUpstream(method) as fake:
            name = f"fake_{method}"
            data(tool(sgw, admin, "connections_create", {
                "name": name, "host": "127.0.0.1", "port": fake.port, "database": "shop", "user": "app",
                "password": "entered-for-this-server", "sslmode": "disable"}))
            failed = exec_sql(sgw, admin, name)
            fake.settle()
            assert fake.connections == 1 and fake.received == []
            kind = "cleartext" if method == 3 else "md5"
            assert failed["status"] == "failed" and f"connection {name!r}" in failed["error"]
            assert f"asks for {kind} password authentication" in failed["error"] and "password_auth" in failed["error"]

            # With the opt-in and sslmode disable, the password goes: the assertions above can fail.
            opted = data(tool(sgw, admin, "connections_update", {"name": name, "password_auth": "any"}))
            assert opted["password_auth"] == "any" and opted["password"] == "set" and "note" not in opted
            failed = exec_sql(sgw, admin, name)
            fake.settle()
            assert "password authentication failed (fake server)" in failed["error"]
            assert len(fake.received) == 1
            if method == 3:
                assert fake.received == [b"entered-for-this-server\x00"]
    updates = sgw.cli_json("events", "--kind", "connection.update", "--limit", "100")
    assert any(e["detail"] == 'fake_3: {"password_auth":["scram-sha-256","any"]}' and e["user"] == "root" for e in updates)


def test_password_env_outside_the_prefix_is_refused_at_every_door(sgw, admin, tmp_path, pg) -> None:
    # The config file: the gateway does not start, and says which prefix.
    bad = make_gateway(tmp_path / "bad", pg, users=False, tail_toml='\n[[connections]]\nname = "leak"\n'
                       'password_env = "WARDGATE_SECRET_KEY"\n')
    out = bad.cli("connections", "list", check=False)
    assert out.returncode != 0 and "'leak'" in out.stderr + out.stdout
    assert "starting with 'WARDGATE_CONN_'" in out.stderr + out.stdout

    # The CLI
    out = sgw.cli("connections", "add", "leak_cli", "-d", "shop", "-U", "app", "--password-env", "WARDGATE_STORE_URL",
                  check=False)
    assert out.returncode == 1 and "starting with 'WARDGATE_CONN_'" in out.stderr

    # MCP, adding and changing
    made = tool(sgw, admin, "connections_create", {"name": "leak_mcp", "host": "127.0.0.1", "database": "shop",
                                                   "user": "app", "password_env": "WARDGATE_SECRET_KEY"})
    assert made.is_error and "starting with 'WARDGATE_CONN_'" in made.content[0].text
    data(tool(sgw, admin, "connections_create", {"name": "leak_mcp", "host": "127.0.0.1", "database": "shop",
                                                 "user": "app", "password": "pw"}))
    changed = tool(sgw, admin, "connections_update", {"name": "leak_mcp", "password_env": "HOME"})
    assert changed.is_error and "starting with 'WARDGATE_CONN_'" in changed.content[0].text

    # The console's form
    key = sgw.cli_json("apikeys", "create", "--name", "console-admin", "--group", "wardgate-admins")["key"]
    base = f"http://127.0.0.1:{sgw.http_port}/console"
    with httpx.Client(follow_redirects=True, timeout=30) as browser:
        assert browser.post(f"{base}/login", data={"api_key": key}).status_code == 200
        page = browser.get(f"{base}/access").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        form = {"csrf": csrf, "action": "add-connection", "name": "leak_console", "host": "127.0.0.1",
                "port": str(pg.port), "database": "shop", "user": "app", "password_env": "WARDGATE_SECRET_KEY"}
        page = html.unescape(browser.post(f"{base}/access", data=form).text)
        assert "starting with 'WARDGATE_CONN_'" in page
        form.update(password_env="WARDGATE_CONN_SHOP_PASSWORD", password_auth="any")
        assert "Connection leak_console added" in html.unescape(browser.post(f"{base}/access", data=form).text)
        edit = {"csrf": csrf, "action": "edit-connection", "name": "leak_console", "host": "localhost"}
        page = html.unescape(browser.post(f"{base}/access", data=edit).text)
        assert "changed" in page and "the stored password was dropped" in page
    names = {c["name"]: c for c in sgw.cli_json("connections", "list")}
    assert not {"leak", "leak_cli"} & set(names)
    assert names["leak_console"]["password"] == "none" and names["leak_console"]["password_auth"] == "any"
    assert names["leak_mcp"]["password"] == "set"
    made = next(e for e in sgw.cli_json("events", "--kind", "connection.create", "--limit", "100")
                if e["detail"].startswith("leak_console"))
    assert made["source"] == "console" and made["user"].endswith("console-admin")
    assert '"password_env":[null,"WARDGATE_CONN_SHOP_PASSWORD"]' in made["detail"]


def test_the_cli_sets_password_auth(sgw) -> None:
    sgw.cli("connections", "add", "fake_cli", "-d", "shop", "-U", "app", "--password-auth", "any")
    listed = {c["name"]: c for c in sgw.cli_json("connections", "list")}
    assert listed["fake_cli"]["password_auth"] == "any" and listed["shop"]["password_auth"] == "scram-sha-256"
    assert listed["shop_md5"]["password_auth"] == "any"  # the md5 connection of the config file opts in
    out = sgw.cli("connections", "add", "fake_cli2", "-d", "shop", "-U", "app", "--password-auth", "md5", check=False)
    assert out.returncode == 1 and "password_auth must be one of" in out.stderr
