"""The wardgate command: help everywhere, JSON output, connections, users, credentials, config by env."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import pytest

from tests.conftest import wardgate_cmd

COMMANDS = [
    [], ["serve"], ["users"], ["users", "add"], ["users", "list"], ["users", "remove"],
    ["connections"], ["connections", "add"], ["connections", "list"], ["connections", "remove"],
    ["credentials"], ["credentials", "issue"], ["credentials", "list"], ["credentials", "revoke"],
    ["sessions"], ["sessions", "list"], ["sessions", "show"], ["admin", "genkey"],
]


def run(tmp_path, *args, input=None, env_extra=None, check=True):  # noqa: ANN001, ANN002, ANN201
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARDGATE_")}
    env.update(WARDGATE_DATA_DIR=str(tmp_path / "data"), **(env_extra or {}))
    out = subprocess.run([*wardgate_cmd(), *args], capture_output=True, text=True, cwd=tmp_path, env=env, input=input, timeout=60)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "wardgate")
def test_help_everywhere(tmp_path, command) -> None:
    out = run(tmp_path, *command, "--help")
    assert "Usage" in out.stdout


def test_connections_secrets_are_encrypted_and_never_shown(tmp_path) -> None:
    run(tmp_path, "connections", "add", "prod", "--host", "db.internal", "--port", "5433", "-d", "app", "-U", "svc",
        "--password-stdin", "--sslmode", "verify-full", input="Sup3r-Secret-Pa55\n")
    run(tmp_path, "connections", "add", "stage", "-d", "app", "-U", "svc", "--password-env", "WARDGATE_CONN_STAGE_PW")
    listed = json.loads(run(tmp_path, "connections", "list", "--json").stdout)
    assert [(c["name"], c["password"], c["source"]) for c in listed] == [("prod", "set", "store"), ("stage", "env:WARDGATE_CONN_STAGE_PW", "store")]
    table = run(tmp_path, "connections", "list").stdout
    assert "prod" in table and "Sup3r" not in table
    raw = (tmp_path / "data" / "wardgate.db").read_bytes()
    assert b"Sup3r-Secret-Pa55" not in raw
    with sqlite3.connect(tmp_path / "data" / "wardgate.db") as db:
        (enc,) = db.execute("select password_enc from connections where name = 'prod'").fetchone()
    assert enc and b"Sup3r" not in enc
    key_file = tmp_path / "data" / "secret.key"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    dup = run(tmp_path, "connections", "add", "prod", "-d", "x", "-U", "y", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad = run(tmp_path, "connections", "add", "bad", "-d", "x", "-U", "y", "--sslmode", "sometimes", check=False)
    assert bad.returncode == 1 and "sslmode must be one of" in bad.stderr
    run(tmp_path, "connections", "remove", "stage")
    assert [c["name"] for c in json.loads(run(tmp_path, "connections", "list", "--json").stdout)] == ["prod"]
    # Who changed what is in the audit log, with the settings but never the password.
    events = json.loads(run(tmp_path, "events", "--json").stdout)
    changes = [(e["kind"], e["detail"].split(":")[0]) for e in reversed(events)]
    assert changes == [("connection.create", "prod"), ("connection.create", "stage"), ("connection.remove", "stage")]
    created = next(e for e in events if e["kind"] == "connection.create" and e["detail"].startswith("prod"))
    assert '"host":[null,"db.internal"]' in created["detail"] and '"password":[null,"set"]' in created["detail"]
    assert created["source"] == "cli" and "@" in created["user"] and "Sup3r" not in json.dumps(events)
    assert json.loads(run(tmp_path, "audit", "verify", "--json").stdout)["ok"]


def test_wrong_secret_key_cannot_read_secrets(tmp_path) -> None:
    run(tmp_path, "connections", "add", "prod", "-d", "app", "-U", "svc", "--password-stdin", input="pw\n")
    (tmp_path / "data" / "secret.key").write_text(subprocess.run([*wardgate_cmd(), "admin", "genkey"], capture_output=True, text=True).stdout)
    out = run(tmp_path, "connections", "list", check=False)
    assert out.returncode != 0 and "cannot be decrypted" in out.stderr


ACCESS = '[[access]]\ngroups = ["dev", "ops"]\nconnections = ["shop"]\n'


def test_users_and_credentials(tmp_path) -> None:
    (tmp_path / "wardgate.toml").write_text(ACCESS)
    run(tmp_path, "connections", "add", "shop", "-d", "shop", "-U", "app")
    assert json.loads(run(tmp_path, "users", "add", "carol", "-g", "dev", "-g", "ops", "--json").stdout)["groups"] == ["dev", "ops"]
    users = json.loads(run(tmp_path, "users", "list", "--json").stdout)
    assert [u["name"] for u in users] == ["carol"]
    cred = json.loads(run(tmp_path, "credentials", "issue", "--user", "carol", "--connection", "shop", "--json").stdout)
    assert cred["url"].startswith("postgresql://carol:wgc_") and cred["url"].endswith("@127.0.0.1:6432/shop?sslmode=require")
    text = run(tmp_path, "credentials", "issue", "--user", "carol", "--connection", "shop").stdout
    assert 'psql "postgresql://carol:' in text
    over = run(tmp_path, "credentials", "issue", "--user", "carol", "--connection", "shop", "--ttl", "13h", check=False)
    assert over.returncode == 1 and "over the maximum" in over.stderr
    nobody = run(tmp_path, "credentials", "issue", "--user", "dave", "--connection", "shop", check=False)
    assert nobody.returncode == 1 and "wardgate users add dave" in nobody.stderr
    listed = json.loads(run(tmp_path, "credentials", "list", "--json").stdout)
    assert len(listed) == 2 and all("credential" not in c for c in listed)
    run(tmp_path, "credentials", "revoke", cred["id"])
    assert len(json.loads(run(tmp_path, "credentials", "list", "--json").stdout)) == 1
    run(tmp_path, "users", "remove", "carol")
    assert json.loads(run(tmp_path, "credentials", "list", "--json").stdout) == []
    run(tmp_path, "users", "add", "mallory")  # in no group: no rule allows anything
    denied = run(tmp_path, "credentials", "issue", "--user", "mallory", "--connection", "shop", check=False)
    assert denied.returncode == 1 and "no access rule allows it" in denied.stderr
    key = json.loads(run(tmp_path, "apikeys", "create", "--name", "ci", "-g", "dev", "--json").stdout)
    run(tmp_path, "apikeys", "revoke", key["id"])
    # Every change above is in the audit log, in order, by the account that ran the command.
    events = list(reversed(json.loads(run(tmp_path, "events", "--json").stdout)))
    assert [e["kind"] for e in events] == [
        "connection.create", "user.create", "credential.issue", "credential.issue", "credential.revoke", "user.remove",
        "user.create", "apikey.create", "apikey.revoke"]
    assert f"credential {cred['id']} for carol on shop" in events[2]["detail"] and cred["credential"] not in json.dumps(events)
    assert key["key"] not in json.dumps(events) and all(e["source"] == "cli" for e in events)


def test_config_file_and_environment(tmp_path) -> None:
    (tmp_path / "custom.toml").write_text('[gateway]\nlisten = "127.0.0.1:7000"\n[credentials]\nmax_ttl = "1h"\n' + ACCESS)
    run(tmp_path, "--config", "custom.toml", "connections", "add", "shop", "-d", "shop", "-U", "app")
    run(tmp_path, "--config", "custom.toml", "users", "add", "erin", "-g", "dev")
    cred = json.loads(run(tmp_path, "--config", "custom.toml", "credentials", "issue", "-u", "erin", "-C", "shop", "--json").stdout)
    assert ":7000/shop" in cred["url"]
    over = run(tmp_path, "--config", "custom.toml", "credentials", "issue", "-u", "erin", "-C", "shop", "--ttl", "2h", check=False)
    assert "over the maximum" in over.stderr
    via_env = run(tmp_path, "credentials", "issue", "-u", "erin", "-C", "shop", "--json",
                  env_extra={"WARDGATE_CONFIG": "custom.toml", "WARDGATE_GATEWAY_LISTEN": "127.0.0.1:7100"})
    assert ":7100/shop" in json.loads(via_env.stdout)["url"]
    missing = run(tmp_path, "--config", "nope.toml", "users", "list", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (tmp_path / "bad.toml").write_text("[gateway]\nbogus = 1\n")
    bad = run(tmp_path, "--config", "bad.toml", "users", "list", check=False)
    assert bad.returncode == 2 and "unknown setting [gateway] bogus" in bad.stderr


def test_sessions_cli_shows_statements(gateway, cred) -> None:
    import psycopg

    with psycopg.connect(gateway.dsn(cred, application_name="t_cli_show")) as conn:
        conn.execute("select 'hello'")
    s = gateway.wait_for_session(lambda s: s["application_name"] == "t_cli_show" and s["status"] == "closed")
    listed = gateway.cli_json("sessions", "list", "--user", "alice")
    assert s["id"] in [x["id"] for x in listed]
    text = gateway.cli("sessions", "show", s["id"][:10]).stdout
    assert "select 'hello'" in text and "SELECT 1" in text
    shown = gateway.cli_json("sessions", "show", s["id"])
    assert [st["text"] for st in shown["statements"]] == ["BEGIN", "select 'hello'", "COMMIT"]
    assert "no session" in gateway.cli("sessions", "show", "ffffffff", check=False).stderr


def test_config_type_errors_are_explained(tmp_path) -> None:
    (tmp_path / "t.toml").write_text("[gateway]\nlisten = 5\n")
    out = run(tmp_path, "--config", "t.toml", "users", "list", check=False)
    assert out.returncode == 2 and "[gateway] listen must be a string" in out.stderr
