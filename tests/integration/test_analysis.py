"""Session risk analysis through the real gateway: native sessions analysed as they close, exposed by
the API and the CLI, refined by an OpenAI-compatible model that sees only masked text, and policy
acting on an exec's level (review, block)."""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import make_gateway, psql
from wardgate.localpg import free_port


class Model:
    """An OpenAI-compatible chat completions endpoint on loopback, standing in for a hosted model."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("authorization"), "body": body})
                content = body["messages"][1]["content"]
                if "risk_t" in content:  # tries to talk a destructive session down
                    answer = {"level": "low", "title": "All fine", "explanation": "Nothing to see."}
                elif "customers" in content:
                    answer = {"level": "medium", "title": "Customer looked up by email", "explanation": "One lookup."}
                else:
                    answer = {"level": "low", "title": "Quiet", "explanation": "Quiet."}
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": json.dumps(answer)}}]}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"


@pytest.fixture(scope="module")
def agw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    model = Model()
    far = (dt.datetime.now(dt.UTC).hour + 12) % 24  # business hours that exclude now: every write is "off hours"
    gw = make_gateway(tmp_path_factory.mktemp("analysis"), pg, extra_toml=f"""
[analysis]
business_hours = "{far:02d}:00-{(far + 1) % 24:02d}:00"
business_days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
on_exec_medium = "block"
on_exec_high = "review"
llm_url = "{model.url}"
llm_model = "risk-test"
llm_key_env = "MODEL_KEY"
""")
    gw.env["MODEL_KEY"] = "sk-test-123"
    gw.start()
    gw.model = model  # type: ignore[attr-defined]
    dsn = gw.dsn(gw.credential())
    psql(dsn, "-c", "select count(*) from customers where email = 'jane.doe@example.com'")
    psql(dsn, "-c", "create table risk_t (id int)", "-c", "drop table risk_t")
    psql(dsn, "-v", "ON_ERROR_STOP=0", input="selec 1;\nselec 2;\nselec 3;\n", check=False)
    yield gw
    gw.stop()
    model.server.shutdown()


def _session_with(gw, text: str) -> str:  # noqa: ANN001
    for s in gw.sessions(user="alice"):
        if any(text in st["text"] for st in gw.session(s["id"])["statements"]):
            return s["id"]
    raise AssertionError(f"no session ran {text!r}")


def _analysis(gw, sid: str, key: str) -> httpx.Response:  # noqa: ANN001
    return httpx.get(f"http://127.0.0.1:{gw.http_port}/api/sessions/{sid}/analysis", params={"wait": 30},
                     headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_sessions_are_analysed_and_the_model_cannot_lower_a_level(agw) -> None:
    key = agw.cli_json("apikeys", "create", "--for-agent", "analyst", "--user", "alice")["key"]
    ddl = _analysis(agw, _session_with(agw, "drop table risk_t"), key).json()
    assert ddl["status"] == "ready" and ddl["level"] == "high" and ddl["source"] == "llm"
    assert ddl["title"] == "Destructive schema change" and "Model's view (low)" in ddl["explanation"]
    assert {f["rule"] for f in ddl["findings"]} >= {"schema-change", "off-hours-write"}

    lookup = _analysis(agw, _session_with(agw, "jane.doe@example.com"), key).json()
    assert (lookup["level"], lookup["title"], lookup["source"]) == ("medium", "Customer looked up by email", "llm")

    refused = _analysis(agw, _session_with(agw, "selec 3"), key).json()
    assert refused["level"] == "medium" and refused["findings"][0]["rule"] == "denied-attempts"

    # The model saw statements without their literals, with the configured key, and nothing else of the data.
    sent = json.dumps([r["body"] for r in agw.model.requests])
    assert "jane.doe@example.com" not in sent and "$1" in sent
    assert all(r["auth"] == "Bearer sk-test-123" and r["path"] == "/v1/chat/completions" for r in agw.model.requests)

    # One successful sign-in event for the key, however many requests it made.
    signed_in = [e for e in agw.cli_json("events", "--kind", "api.authenticate", "--outcome", "ok", "--limit", "100")
                 if e["agent"] == "analyst"]
    assert len(signed_in) == 1 and signed_in[0]["user"] == "alice" and "apikey:" in signed_in[0]["detail"]

    # High and medium sessions are audit events.
    events = agw.cli_json("events", "--kind", "session.analysis", "--limit", "100")
    assert {e["outcome"] for e in events} == {"high", "medium"}


def test_analysis_is_private_and_on_the_cli(agw) -> None:
    sid = _session_with(agw, "drop table risk_t")
    bob = agw.cli_json("apikeys", "create", "--for-agent", "nosy", "--user", "bob")["key"]
    assert _analysis(agw, sid, bob).status_code == 404
    out = agw.cli_json("sessions", "analysis", sid[:12])
    assert out["status"] == "ready" and out["level"] == "high"
    assert "HIGH" in agw.cli("sessions", "analysis", sid).stdout
    missing = agw.cli("sessions", "analysis", "no-such-session", check=False)
    assert missing.returncode == 1 and "no session" in missing.stderr


def test_exec_policy_acts_on_the_risk_level(agw) -> None:
    key = agw.cli_json("apikeys", "create", "--for-agent", "executor", "--user", "bob")["key"]

    def exec_(sql: str) -> dict:
        return httpx.post(f"http://127.0.0.1:{agw.http_port}/api/exec", json={"connection": "shop", "sql": sql},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60).json()

    assert exec_("select 1")["status"] == "completed"
    held = exec_("grant select on customers to public")  # high: review
    assert held["status"] == "pending_approval" and held["rules"][0]["rule"] == "risk:high"
    blocked = exec_("update customers set name = name where id = -1")  # a write off hours: medium, blocked
    assert blocked["status"] == "denied" and blocked["rules"][-1]["rule"] == "risk:medium"
    assert "outside" in blocked["reason"]
    # alice's three refused statements in the last hour make even her harmless exec medium: blocked here
    alice = agw.cli_json("apikeys", "create", "--for-agent", "executor", "--user", "alice")["key"]
    after_refusals = httpx.post(f"http://127.0.0.1:{agw.http_port}/api/exec", json={"connection": "shop", "sql": "select 1"},
                                headers={"Authorization": f"Bearer {alice}"}, timeout=60).json()
    assert after_refusals["status"] == "denied" and "refused" in after_refusals["reason"]
