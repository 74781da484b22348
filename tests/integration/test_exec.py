"""One-shot exec and reviews over the HTTP API, with real PostgreSQL and tokens of a real OpenID provider.

People: amy (dev) asks; olivia (ops, dba) approves; dana (dev) is neither requester nor approver.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx
import psycopg
import pytest

from tests.conftest import APP_PASSWORD, IDP_AUDIENCE, make_gateway

TAIL = """
[[identity_providers]]
name = "corp"
issuer = "{issuer}"
audience = "{audience}"

[exec]
wait = "20s"

[[guardrails]]
preset = "standard"
connections = ["shop"]

[[guardrails]]
name = "deletes-need-review"
kinds = ["delete"]
action = "review"
approvers = ["dba"]
message = "deleting orders needs a DBA's approval"
connections = ["shop"]

[[guardrails]]
name = "updates-need-two"
kinds = ["update"]
action = "review"
approvers = ["dba"]
min_approvals = 2
connections = ["shop"]

[[masking]]
name = "emails"
columns = ["email"]
connections = ["shop"]
except_groups = ["ops"]

[[connections]]
name = "prod"
host = "127.0.0.1"
port = {pg_port}
database = "shop"
user = "app"
password_env = "WARDGATE_CONN_SHOP_PASSWORD"
sslmode = "disable"

[[access]]
name = "prod-break-glass"
groups = ["dev"]
connections = ["prod"]
approvers = ["dba"]
max_duration = "2h"
"""


CREATED: list[int] = []  # orders the tests add, removed at the end: other modules count the shop's rows


@pytest.fixture(scope="module")
def xgw(tmp_path_factory, pg, idp):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("exec"), pg, tail_toml=TAIL.format(issuer=idp.issuer, audience=IDP_AUDIENCE, pg_port=pg.port))
    gw.start()
    yield gw
    gw.stop()
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop"), autocommit=True) as conn:
        conn.execute("delete from orders where id = any(%s)", (CREATED,))


@pytest.fixture(scope="module")
def people(idp):  # noqa: ANN001, ANN201
    def token(user: str, groups: list[str], **extra) -> str:  # noqa: ANN003
        claims = idp.claims(sub=user, preferred_username=user, groups=groups, exp=int(time.time()) + 3600, **extra)
        return idp.forge(claims)
    return {
        "amy": token("amy", ["dev"]),
        "olivia": token("olivia", ["ops", "dba"]),
        "dana": token("dana", ["dev"]),
        "oscar": token("oscar", ["dba"]),
        "agent": token("amy", ["dev"], act={"sub": "claude-code"}),
    }


def call(gw, method: str, path: str, token: str, **kw) -> httpx.Response:  # noqa: ANN001, ANN003
    return httpx.request(method, f"http://127.0.0.1:{gw.http_port}{path}", headers={"Authorization": f"Bearer {token}"},
                         timeout=60, **kw)


def exec_(gw, token: str, sql: str, **kw) -> dict:  # noqa: ANN001, ANN003
    r = call(gw, "POST", "/api/exec", token, json={"connection": "shop", "sql": sql, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_completed_results_are_masked_and_recorded(xgw, people) -> None:
    out = exec_(xgw, people["amy"], "select id, email from customers order by id limit 2")
    assert out["status"] == "completed", out
    assert out["columns"] == ["id", "email"] and out["rows"] == [["1", "[email]"], ["2", "[email]"]]
    assert out["row_count"] == 2 and out["command_tags"] == ["SELECT 2"] and out["truncated"] is False
    assert out["masked"] == {"email": 2}
    # ops are exempt from the email rule
    assert "@" in exec_(xgw, people["olivia"], "select email from customers where id = 1")["rows"][0][0]
    s = xgw.wait_for_session(lambda s: s["id"] == out["session_id"] and s["status"] == "closed")
    assert s["user"] == "amy" and s["application_name"] == "wardgate exec"
    recorded = call(xgw, "GET", f"/api/sessions/{out['session_id']}", people["amy"]).json()
    assert [(st["text"], st["status"], st["rows"]) for st in recorded["statements"]] == [
        ("select id, email from customers order by id limit 2", "ok", 2)]


def test_params_and_agent_identity(xgw, people) -> None:
    out = exec_(xgw, people["agent"], "select $1::int + 1 as answer, $2::text is null as missing", params=["41", None])
    assert out["status"] == "completed" and out["rows"] == [["42", "t"]]
    s = xgw.wait_for_session(lambda s: s["id"] == out["session_id"])
    assert (s["user"], s["agent"]) == ("amy", "claude-code")


def test_denied_failed_and_access(xgw, people) -> None:
    out = exec_(xgw, people["amy"], "delete from orders")
    assert out["status"] == "denied" and out["rules"][0]["rule"] == "standard:unconditional-writes"
    recorded = xgw.wait_for_session(lambda s: s["id"] == out["session_id"] and s["status"] == "closed")
    assert recorded["user"] == "amy"
    out = exec_(xgw, people["amy"], "select * from no_such_table")
    assert out["status"] == "failed" and out["code"] == "42P01" and "no_such_table" in out["error"]
    r = call(xgw, "POST", "/api/exec", people["amy"], json={"connection": "not_there", "sql": "select 1"})
    assert r.json()["status"] == "denied"
    assert call(xgw, "POST", "/api/exec", "not-a-token", json={"connection": "shop", "sql": "select 1"}).status_code == 401


def test_slow_statement_answers_running_then_completes_through_the_long_poll(xgw, people) -> None:
    out = exec_(xgw, people["amy"], "select pg_sleep(5), 'done' as word", wait=1)
    assert out["status"] == "running" and out["session_id"]
    assert "wait" in out["next"]
    # another person cannot wait on it
    assert call(xgw, "GET", f"/api/sessions/{out['session_id']}/wait?timeout=1", people["dana"]).status_code == 404
    final = call(xgw, "GET", f"/api/sessions/{out['session_id']}/wait?timeout=30", people["amy"]).json()
    assert final["status"] == "completed" and final["rows"] == [["", "done"]]
    # the session itself carries the final result too
    xgw.wait_for_session(lambda s: s["id"] == out["session_id"] and s["status"] == "closed")
    recorded = call(xgw, "GET", f"/api/sessions/{out['session_id']}", people["amy"]).json()
    assert recorded["result"]["status"] == "completed" and recorded["statements"][0]["status"] == "ok"


def test_truncation_flag(xgw, people) -> None:
    out = exec_(xgw, people["olivia"], "select g from generate_series(1, 1500) g")
    assert out["status"] == "completed" and len(out["rows"]) == 1000 and out["row_count"] == 1500 and out["truncated"]


def _new_order(pg) -> int:  # noqa: ANN001
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop"), autocommit=True) as conn:
        order_id = conn.execute("insert into orders (customer_id, total_cents) values (1, 100) returning id").fetchone()[0]
    CREATED.append(order_id)
    return order_id


def _exists(pg, order_id: int) -> bool:  # noqa: ANN001
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop"), autocommit=True) as conn:
        return conn.execute("select count(*) from orders where id = %s", (order_id,)).fetchone()[0] == 1


def test_review_graceful_path(xgw, pg, people) -> None:
    order = _new_order(pg)
    sql = f"delete from orders where id = {order}"
    out = exec_(xgw, people["agent"], sql)
    assert out["status"] == "pending_approval", out
    rid = out["review_id"]
    assert out["approvers"] == ["dba"] and rid in out["review_url"] and rid in out["next"]
    assert _exists(pg, order)

    review = call(xgw, "GET", f"/api/reviews/{rid}", people["olivia"]).json()
    assert (review["status"], review["requester"], review["agent"], review["statement"]) == ("pending", "amy", "claude-code", sql)
    assert review["rules"][0]["rule"] == "deletes-need-review" and len(review["sha256"]) == 64
    assert rid in {r["id"] for r in call(xgw, "GET", "/api/reviews?status=pending", people["olivia"]).json()}

    # not yet approved: nothing runs
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["agent"]).status_code == 409
    # no self-approval, no approval by an agent or by someone outside the approver group
    assert call(xgw, "POST", f"/api/reviews/{rid}/approve", people["amy"]).status_code == 403
    assert call(xgw, "POST", f"/api/reviews/{rid}/approve", people["agent"]).status_code == 403
    assert call(xgw, "POST", f"/api/reviews/{rid}/approve", people["dana"]).status_code == 404  # not even visible

    # the requester waits; the approver approves; the wait returns at once
    waited: dict = {}
    waiter = threading.Thread(target=lambda: waited.update(call(xgw, "GET", f"/api/reviews/{rid}/wait?timeout=60",
                                                                 people["agent"]).json()))
    waiter.start()
    time.sleep(0.5)
    t0 = time.time()
    approved = call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"], json={"reason": "customer asked"})
    assert approved.status_code == 200 and approved.json()["status"] == "approved"
    waiter.join(30)
    assert waited["status"] == "approved" and waited["timed_out"] is False and time.time() - t0 < 5

    # only the requester runs it, once, and only the stored statement
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["dana"]).status_code == 403
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["olivia"]).status_code == 403
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["amy"]).status_code == 403  # her agent asked
    ran = call(xgw, "POST", f"/api/reviews/{rid}/execute", people["agent"]).json()
    assert ran["status"] == "completed" and ran["command_tags"] == ["DELETE 1"] and ran["review_id"] == rid
    assert not _exists(pg, order)
    again = call(xgw, "POST", f"/api/reviews/{rid}/execute", people["agent"])
    assert again.status_code == 409 and "executed" in again.json()["detail"]

    # the approval covers that statement only: the same delete of another row asks again
    other = _new_order(pg)
    assert exec_(xgw, people["amy"], f"delete from orders where id = {other}")["status"] == "pending_approval"
    assert _exists(pg, other)

    final = call(xgw, "GET", f"/api/reviews/{rid}", people["amy"]).json()
    assert final["status"] == "executed" and final["session_id"] == ran["session_id"]
    assert [(h["by"], h["decision"]) for h in final["history"]] == [("olivia", "approve")]
    s = xgw.wait_for_session(lambda s: s["id"] == ran["session_id"] and s["status"] == "closed")
    assert s["application_name"] == f"wardgate exec (review {rid})"
    timeline = xgw.cli_json("sessions", "show", ran["session_id"])
    assert timeline["reviews"] == [rid] and timeline["statements"][0]["decision"] == "approved"
    # the audit trail has the whole chain: who asked, who approved, who ran it, and the refusals between
    deadline, chain = time.time() + 10, []
    while time.time() < deadline:
        events = [e for e in xgw.cli_json("events", "--limit", "1000") if e.get("source") == f"review:{rid}"]
        chain = [(e["kind"], e["outcome"], e["user"]) for e in sorted(events, key=lambda e: e["at"])]
        if ("review.executed", "ok", "amy") in chain:
            break
        time.sleep(0.2)
    assert chain[0] == ("review.requested", "ok", "amy")
    assert ("review.approve", "ok", "olivia") in chain and ("review.executed", "ok", "amy") in chain
    assert ("review.approve", "denied", "amy") in chain and ("review.execute", "denied", "dana") in chain


def test_rejection_needs_a_reason_and_stops_the_review(xgw, pg, people) -> None:
    order = _new_order(pg)
    rid = exec_(xgw, people["amy"], f"delete from orders where id = {order}")["review_id"]
    assert call(xgw, "POST", f"/api/reviews/{rid}/reject", people["olivia"]).status_code == 422
    r = call(xgw, "POST", f"/api/reviews/{rid}/reject", people["olivia"], json={"reason": "not during the freeze"})
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    assert r.json()["history"][0]["reason"] == "not during the freeze"
    assert call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"]).status_code == 409
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["amy"]).status_code == 409
    waited = call(xgw, "GET", f"/api/reviews/{rid}/wait?timeout=5", people["amy"]).json()
    assert waited["status"] == "rejected" and waited["timed_out"] is False
    assert _exists(pg, order)


def test_wait_times_out_without_error(xgw, pg, people) -> None:
    rid = exec_(xgw, people["amy"], f"delete from orders where id = {_new_order(pg)}")["review_id"]
    t0 = time.time()
    r = call(xgw, "GET", f"/api/reviews/{rid}/wait?timeout=0", people["amy"])  # clamped to 2 s
    assert r.status_code == 200 and r.json()["timed_out"] is True and r.json()["status"] == "pending"
    assert 1.5 < time.time() - t0 < 10


def cli(gw, token: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    env = {k: v for k, v in gw.env.items() if k not in ("WARDGATE_API_KEY", "WARDGATE_TOKEN")}
    env.update(WARDGATE_TOKEN=token, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "wardgate.cli", "--config", str(gw.config), *args],
                          capture_output=True, text=True, env=env, timeout=120, input=stdin)


def test_cli_exec_and_reviews(xgw, pg, people) -> None:
    out = cli(xgw, people["amy"], "exec", "shop", "-c", "select id, email from customers order by id limit 2")
    assert out.returncode == 0, out.stderr
    assert "[email]" in out.stdout and "@" not in out.stdout and "2 rows" in out.stderr
    out = cli(xgw, people["amy"], "exec", "shop", "--json", stdin="select $1::int * 2 as twice")
    assert out.returncode == 1 and json.loads(out.stdout)["status"] == "failed"  # $1 without a value
    out = cli(xgw, people["amy"], "exec", "shop", "-c", "select $1::int * 2 as twice", "-p", "21", "--json")
    assert json.loads(out.stdout)["rows"] == [["42"]]
    out = cli(xgw, people["amy"], "exec", "shop", "-c", "truncate orders")
    assert out.returncode == 3 and "standard:destructive-ddl" in out.stderr

    order = _new_order(pg)
    out = cli(xgw, people["amy"], "exec", "shop", "-c", f"delete from orders where id = {order}", "--json")
    assert out.returncode == 4
    rid = json.loads(out.stdout)["review_id"]
    assert rid in cli(xgw, people["olivia"], "reviews", "list", "--status", "pending").stdout
    shown = cli(xgw, people["olivia"], "reviews", "show", rid)
    assert f"delete from orders where id = {order}" in shown.stdout and "deletes-need-review" in shown.stdout
    assert cli(xgw, people["amy"], "reviews", "wait", rid, "--timeout", "2").returncode == 4
    refused = cli(xgw, people["amy"], "reviews", "approve", rid)
    assert refused.returncode == 1 and "only members of dba" in refused.stderr
    assert cli(xgw, people["olivia"], "reviews", "approve", rid, "--reason", "ok").returncode == 0
    assert cli(xgw, people["amy"], "reviews", "wait", rid).returncode == 0
    ran = cli(xgw, people["amy"], "reviews", "execute", rid)
    assert ran.returncode == 0 and "DELETE 1" in ran.stderr
    assert not _exists(pg, order)
    again = cli(xgw, people["amy"], "reviews", "execute", rid)
    assert again.returncode == 1 and "executed" in again.stderr


def test_an_approver_cannot_approve_their_own_request(xgw, pg, people) -> None:
    rid = exec_(xgw, people["olivia"], f"delete from orders where id = {_new_order(pg)}")["review_id"]
    r = call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"])
    assert r.status_code == 403 and "your own review" in r.json()["detail"]
    assert call(xgw, "GET", f"/api/reviews/{rid}", people["olivia"]).json()["status"] == "pending"


def test_native_client_gets_the_review_and_reruns_the_exact_statement_after_approval(xgw, pg, people) -> None:
    """psql as alice (a local user): the DELETE is held; after approval the identical statement runs once."""
    from tests.conftest import psql

    order = _new_order(pg)
    sql = f"delete from orders where id = {order}"
    dsn = xgw.dsn(xgw.credential("alice"))
    held = psql(dsn, "-c", sql, check=False)
    assert held.returncode != 0 and "needs review by rule deletes-need-review" in held.stderr
    assert "run this exact statement again once it is approved" in held.stderr
    rid = next(r["id"] for r in call(xgw, "GET", "/api/reviews?status=pending", people["olivia"]).json()
               if r["statement"] == sql)
    # asking again before approval names the same review, not a new one
    assert rid in psql(dsn, "-c", sql, check=False).stderr
    assert _exists(pg, order)

    assert call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"]).json()["status"] == "approved"
    # another statement is not covered, and neither is another person's session
    other = _new_order(pg)
    assert "needs review" in psql(dsn, "-c", f"delete from orders where id = {other}", check=False).stderr
    bob = psql(xgw.dsn(xgw.credential("bob")), "-c", sql, check=False)
    assert bob.returncode != 0 and "needs review" in bob.stderr and _exists(pg, order)
    # the requester's re-run executes it, once; the rest of the session carries on
    ran = psql(dsn, "-c", sql, "-c", "select 1")
    assert "DELETE 1" in ran.stdout and not _exists(pg, order)
    assert "needs review" in psql(dsn, "-c", sql, check=False).stderr  # used up: a new review
    assert call(xgw, "GET", f"/api/reviews/{rid}", people["olivia"]).json()["status"] == "executed"


def test_extended_protocol_with_parameters_is_sent_to_exec(xgw, pg) -> None:
    order = _new_order(pg)
    with psycopg.connect(xgw.dsn(xgw.credential("alice")), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="wardgate exec"):
            conn.execute("delete from orders where id = %s", (order,))
    assert _exists(pg, order)


def test_reviews_expire(tmp_path, pg, idp, people) -> None:
    tail = TAIL.format(issuer=idp.issuer, audience=IDP_AUDIENCE, pg_port=pg.port) + '\n[reviews]\nttl = "2s"\n'
    gw = make_gateway(tmp_path / "gw", pg, tail_toml=tail)
    gw.start()
    try:
        order = _new_order(pg)
        rid = exec_(gw, people["amy"], f"delete from orders where id = {order}")["review_id"]
        approved = exec_(gw, people["amy"], f"delete from orders where id = {order} and true")["review_id"]
        assert call(gw, "POST", f"/api/reviews/{approved}/approve", people["olivia"]).status_code == 200
        time.sleep(2.5)
        assert call(gw, "GET", f"/api/reviews/{rid}", people["amy"]).json()["status"] == "expired"
        r = call(gw, "POST", f"/api/reviews/{rid}/approve", people["olivia"])
        assert r.status_code == 409 and "expired" in r.json()["detail"]
        waited = call(gw, "GET", f"/api/reviews/{rid}/wait?timeout=30", people["amy"]).json()
        assert waited["status"] == "expired" and waited["timed_out"] is False
        # approved in time, but not run in time: it does not run
        late = call(gw, "POST", f"/api/reviews/{approved}/execute", people["amy"])
        assert late.status_code == 409 and "expired" in late.json()["detail"] and _exists(pg, order)
    finally:
        gw.stop()


class _Receiver:
    """An HTTP endpoint that records what it is sent; it answers 500 to the first request, to test retries."""

    def __init__(self) -> None:
        import http.server

        received = self.received = []
        failed_once = self.failed_once = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                if not failed_once:
                    failed_once.append(True)
                    self.send_response(500)
                    self.end_headers()
                    return
                received.append((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:  # noqa: ANN002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_review_steps_are_notified_signed_and_retried(tmp_path, pg, idp, people) -> None:
    from wardgate.reviews.notify import signature

    rx = _Receiver()
    tail = TAIL.format(issuer=idp.issuer, audience=IDP_AUDIENCE, pg_port=pg.port) + (
        f'\n[reviews]\nurl = "https://wardgate.example"\nwebhook_url = "http://127.0.0.1:{rx.port}/hook"\n'
        f'webhook_secret_env = "REVIEW_HOOK_SECRET"\nslack_webhook_url = "http://127.0.0.1:{rx.port}/slack"\n')
    gw = make_gateway(tmp_path / "gw", pg, tail_toml=tail)
    gw.env["REVIEW_HOOK_SECRET"] = "hook-secret-123"
    gw.start()
    try:
        order = _new_order(pg)
        rid = exec_(gw, people["amy"], f"delete from orders where id = {order}")["review_id"]
        call(gw, "POST", f"/api/reviews/{rid}/approve", people["olivia"])
        assert call(gw, "POST", f"/api/reviews/{rid}/execute", people["amy"]).json()["status"] == "completed"
        deadline = time.time() + 20
        while time.time() < deadline and len([r for r in rx.received if r[0] == "/hook"]) < 3:
            time.sleep(0.2)
        hooks = [r for r in rx.received if r[0] == "/hook"]
        kinds = [json.loads(body)["kind"] for _, _, body in hooks]
        assert kinds == ["review.requested", "review.approved", "review.executed"]  # the first, after a retry
        for _, headers, body in hooks:
            assert headers["x-wardgate-signature"] == signature(b"hook-secret-123", headers["x-wardgate-timestamp"], body)
            assert signature(b"wrong", headers["x-wardgate-timestamp"], body) != headers["x-wardgate-signature"]
        assert json.loads(hooks[0][2])["review"]["statement"] == f"delete from orders where id = {order}"
        slack = [json.loads(body)["text"] for path, _, body in rx.received if path == "/slack"]
        assert any(f"<https://wardgate.example/api/reviews/{rid}|Review {rid}>" in t for t in slack)
        assert "hook-secret-123" not in gw.log.read_text()
    finally:
        gw.stop()
        rx.server.shutdown()


def test_just_in_time_access_grant(xgw, pg, people) -> None:
    """alice (dev) may reach prod only inside an approved window; revoking the grant ends her session."""
    from tests.conftest import psql

    def issue(user: str = "alice", ttl: str = "2h") -> subprocess.CompletedProcess[str]:
        return xgw.cli("credentials", "issue", "-u", user, "-C", "prod", "--ttl", ttl, "--json", check=False)

    refused = issue()
    assert refused.returncode != 0 and "only with an approved grant" in refused.stderr and "grants request" in refused.stderr
    assert exec_(xgw, people["amy"], "select 1", connection="prod")["status"] == "denied"

    out = cli(xgw, people["amy"], "grants", "request", "prod", "--duration", "3h", "--reason", "incident")
    assert out.returncode == 1 and "at most 7200 seconds" in out.stderr
    asked = call(xgw, "POST", "/api/grants", people["amy"], json={"connection": "prod", "duration": "30m",
                                                                 "reason": "incident 4211"}).json()
    assert asked["status"] == "pending_approval" and asked["approvers"] == ["dba"]
    rid = asked["review_id"]
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["amy"]).status_code == 409  # a grant does not run
    assert exec_(xgw, people["amy"], "select 1", connection="prod")["status"] == "denied"  # not before approval
    assert call(xgw, "POST", f"/api/reviews/{rid}/approve", people["amy"]).status_code == 403  # not by herself
    approved = call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"], json={"reason": "go"}).json()
    assert approved["status"] == "approved" and approved["active"] and approved["window_end"]
    mine = cli(xgw, people["amy"], "grants", "list", "--json")
    assert [g["id"] for g in json.loads(mine.stdout) if g["active"]] == [rid]

    # inside the window: exec works, and credentials end with the window (30 minutes, not the 2 h asked)
    assert exec_(xgw, people["amy"], "select 41 + 1", connection="prod")["rows"] == [["42"]]
    assert issue("bob").returncode != 0  # bob (ops) is not under the rule at all

    # a native session under the grant, for a local user with the same rule: alice asks as well
    alice = xgw.cli_json("apikeys", "create", "--for-agent", "psql-helper", "--user", "alice")["key"]
    asked = call(xgw, "POST", "/api/grants", alice, json={"connection": "prod", "duration": "30m", "reason": "same incident"})
    assert asked.status_code == 200, asked.text
    arid = asked.json()["review_id"]
    assert call(xgw, "POST", f"/api/reviews/{arid}/approve", people["olivia"]).json()["status"] == "approved"
    issued = json.loads(issue().stdout)
    left = time.mktime(time.strptime(issued["expires_at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.mktime(time.gmtime())
    assert 25 * 60 < left <= 30 * 60 + 5
    dsn = xgw.dsn(issued)
    assert psql(dsn, "-At", "-c", "select 1").stdout.strip() == "1"
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute("select 2").fetchone() == (2,)
        assert call(xgw, "POST", f"/api/reviews/{arid}/revoke", people["olivia"], json={"reason": "done"}).json()["status"] == "revoked"
        deadline = time.time() + 10
        ended = False
        while time.time() < deadline and not ended:
            try:
                conn.execute("select 3")
                time.sleep(0.2)
            except psycopg.OperationalError:
                ended = True
        assert ended, "revoking the grant must end the live session"
    assert issue().returncode != 0  # and no new credential


def test_a_grant_window_ends_the_sessions_in_it(xgw, people) -> None:
    key = xgw.cli_json("apikeys", "create", "--for-agent", "short-window", "--user", "alice")["key"]
    rid = call(xgw, "POST", "/api/grants", key, json={"connection": "prod", "duration": "4s", "reason": "quick look"}).json()["review_id"]
    assert call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"]).json()["status"] == "approved"
    issued = xgw.cli_json("credentials", "issue", "-u", "alice", "-C", "prod", "--ttl", "1h")
    with psycopg.connect(xgw.dsn(issued), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        deadline, ended = time.time() + 15, False
        while time.time() < deadline and not ended:
            try:
                conn.execute("select 1")
                time.sleep(0.2)
            except psycopg.OperationalError:
                ended = True
        assert ended, "the session must end with the grant's window"
    assert xgw.cli("credentials", "issue", "-u", "alice", "-C", "prod", check=False).returncode != 0


def test_min_approvals_counts_different_people(xgw, people) -> None:
    rid = exec_(xgw, people["amy"], "update orders set status = status where id = 1")["review_id"]
    first = call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"]).json()
    assert (first["status"], first["approvals"], first["min_approvals"]) == ("pending", 1, 2)
    again = call(xgw, "POST", f"/api/reviews/{rid}/approve", people["olivia"])
    assert again.status_code == 409 and "another approver" in again.json()["detail"]
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["amy"]).status_code == 409
    second = call(xgw, "POST", f"/api/reviews/{rid}/approve", people["oscar"]).json()
    assert (second["status"], second["approvals"]) == ("approved", 2)
    assert call(xgw, "POST", f"/api/reviews/{rid}/execute", people["amy"]).json()["command_tags"] == ["UPDATE 1"]


def test_openapi_describes_every_route_with_examples(xgw) -> None:
    spec = httpx.get(f"http://127.0.0.1:{xgw.http_port}/openapi.json").json()
    missing = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            content = op["responses"]["200"].get("content", {}).get("application/json", {})
            if not (content.get("example") or content.get("examples")):
                missing.append(f"{method.upper()} {path}")
            body = op.get("requestBody")
            if body is not None:
                schema_ = body["content"]["application/json"]["schema"]
                ref = schema_.get("$ref") or next((a["$ref"] for a in schema_.get("anyOf", []) if "$ref" in a), "")
                schema = spec["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else {}
                if not any("examples" in prop for prop in schema.get("properties", {}).values()):
                    missing.append(f"{method.upper()} {path} (request body)")
            assert op.get("summary"), f"{method} {path} has no summary"
    assert missing == [], missing


def test_long_poll_right_after_running_is_answered(xgw, people) -> None:
    """The exec's owner is known at once, before the recorder has put the session in the store."""
    out = exec_(xgw, people["amy"], "select pg_sleep(1), 'later' as word", wait=0)
    assert out["status"] == "running"
    assert call(xgw, "GET", f"/api/sessions/{out['session_id']}/wait?timeout=1", people["dana"]).status_code == 404
    final = call(xgw, "GET", f"/api/sessions/{out['session_id']}/wait?timeout=30", people["amy"]).json()
    assert final["status"] == "completed" and final["rows"] == [["", "later"]]
