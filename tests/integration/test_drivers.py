"""More real clients: the Node.js pg driver and the PostgreSQL JDBC driver, each through a scripted
session with TLS (verified against the gateway's CA) and SCRAM-SHA-256, under the hostile corpus's
policy: guardrails, column masking, content masking. Every statement is recorded once, with the user."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import make_gateway
from tests.integration.test_hostile import POLICY

CLIENTS = Path(__file__).parent.parent / "clients"
JDBC_JAR = Path("/usr/share/java/postgresql.jar")


@pytest.fixture(scope="module")
def dgw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("drivers"), pg, tail_toml=POLICY)
    gw.start()
    yield gw
    gw.stop()


def recorded(gw, app: str, count: int) -> list[dict]:  # noqa: ANN001
    s = gw.wait_for_session(lambda s: s["application_name"] == app and s["status"] == "closed")
    assert s["user"] == "alice" and s["tls"] is True
    detail = gw.session(s["id"], until=lambda d: len(d["statements"]) >= count
                        and all(st["status"] != "running" for st in d["statements"]))
    return detail["statements"]


def test_node_pg_driver(dgw) -> None:
    node_modules = CLIENTS / "node_modules" / "pg"
    assert node_modules.exists(), "run `make test` (it installs tests/clients with npm ci)"
    cred = dgw.credential("alice")
    cfg = {"host": "127.0.0.1", "port": dgw.port, "user": "alice", "password": cred["credential"], "database": "shop",
           "ca": str(dgw.ca), "application_name": "t_node_pg"}
    out = subprocess.run(["node", str(CLIENTS / "session.mjs"), json.dumps(cfg)], capture_output=True, text=True,
                         timeout=60, cwd=CLIENTS)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["tls"] is True and got["count"] == 200
    assert got["param"]["id"] == 7 and got["param"]["email"] == "[email]"
    assert got["param"]["card_number"].endswith("0007") and "4111" not in got["param"]["card_number"]
    assert [r["status"] for r in got["prepared"]] == ["[status]"] * 3
    assert got["denied"]["code"] == "42501" and "standard:unconditional-writes" in got["denied"]["message"]
    assert got["derived"]["code"] == "42501" and "masking:derived" in got["derived"]["message"]
    assert got["error"]["code"] == "22012"
    assert got["update"] == 1 and got["after"] == 1
    statements = recorded(dgw, "t_node_pg", 11)
    assert [st["status"] for st in statements].count("denied") == 2
    assert sum(1 for st in statements if st["text"] == "select id, status from orders where id = $1") == 3


def test_jdbc_driver(dgw, tmp_path) -> None:
    assert JDBC_JAR.exists() and shutil.which("java"), "run `make test` (scripts/system-deps.sh test installs them)"
    cred = dgw.credential("alice")
    url = (f"jdbc:postgresql://127.0.0.1:{dgw.port}/shop?sslmode=verify-full&sslrootcert={dgw.ca}"
           "&ApplicationName=t_jdbc&assumeMinServerVersion=10")  # the name in the startup packet, not a later SET
    out = subprocess.run(["java", "-cp", str(JDBC_JAR), str(CLIENTS / "Session.java"), url, "alice", cred["credential"]],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "JAVA_TOOL_OPTIONS": "-Xshare:auto"})
    assert out.returncode == 0, out.stderr
    got = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    assert got["count"] == "200"
    rows = [r.split("|") for r in got["prepared"].strip(";").split(";")]
    assert [int(r[0]) for r in rows] == list(range(1, 8))
    assert all(r[1] == "[email]" and r[2].endswith(f"000{i}") and "4111" not in r[2] for i, r in enumerate(rows, 1))
    assert got["denied"].startswith("42501") and "standard:unconditional-writes" in got["denied"]
    assert got["derived"].startswith("42501") and "masking:derived" in got["derived"]
    assert got["error"].startswith("22012")
    assert got["batch"] == "3" and got["after"] == "1"
    statements = recorded(dgw, "t_jdbc", 15)
    prepared = [st for st in statements if st["text"] == "select id, email, card_number from customers where id = $1"]
    assert len(prepared) == 7 and all(st["status"] == "ok" for st in prepared)
    assert sum(1 for st in statements if st["text"].startswith("update orders")) == 3
