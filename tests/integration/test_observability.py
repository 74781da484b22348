"""What operators watch: Prometheus metrics at /metrics (behind a bearer token when configured),
liveness and readiness endpoints, and JSON log lines carrying session and request ids."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import make_gateway, psql

TAIL = """
[[guardrails]]
preset = "standard"
connections = ["shop"]

[[masking]]
name = "emails"
columns = ["email"]
connections = ["shop"]
"""


@pytest.fixture(scope="module")
def ogw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("observed"), pg, tail_toml=TAIL,
                      extra_toml='metrics_token_env = "METRICS_TOKEN"\nlog_format = "json"',
                      env_extra={"METRICS_TOKEN": "scrape-me-7f3a"})
    gw.start()
    yield gw
    gw.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition, whatever the order of its labels."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m and m.group(1) == name and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")) == labels:
            return float(m.group(3))
    raise AssertionError(f"no {name} {labels} in:\n{text}")


def test_metrics_count_what_the_gateway_did(ogw) -> None:
    url = f"http://127.0.0.1:{ogw.http_port}/metrics"
    assert httpx.get(url).status_code == 401  # the token is required once configured
    assert httpx.get(url, headers={"authorization": "Bearer wrong"}).status_code == 401
    dsn = ogw.dsn(ogw.credential())
    psql(dsn, "-Atc", "select email from customers limit 5")
    assert psql(dsn, "-Atc", "delete from orders", check=False).returncode != 0
    ogw.wait_for_session(lambda s: s["status"] == "closed" and s["statements"] == 1 and "delete" not in str(s))
    text = httpx.get(url, headers={"authorization": "Bearer scrape-me-7f3a"}).text
    assert metric(text, "wardgate_statements_total", decision="allow") >= 1
    assert metric(text, "wardgate_statements_total", decision="deny") >= 1
    assert metric(text, "wardgate_rule_matches_total", rule="standard:unconditional-writes", action="deny") >= 1
    assert metric(text, "wardgate_sessions_total", connection="shop") >= 2
    assert metric(text, "wardgate_masked_values_total", column="email") >= 5
    assert metric(text, "wardgate_statement_duration_seconds_count") >= 2
    assert metric(text, "wardgate_recorder_up") == 1
    refused = psql(dsn.replace("wgc_", "wgc_x"), "-Atc", "select 1", check=False)
    assert refused.returncode != 0
    text = httpx.get(url, headers={"authorization": "Bearer scrape-me-7f3a"}).text
    assert metric(text, "wardgate_sessions_refused_total", code="28P01") >= 1


def test_liveness_and_readiness(ogw) -> None:
    base = f"http://127.0.0.1:{ogw.http_port}"
    assert httpx.get(f"{base}/livez").json() == {"status": "alive"}
    ready = httpx.get(f"{base}/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "problems": []}


def test_log_lines_are_json_with_session_and_request_ids(ogw) -> None:
    dsn = ogw.dsn(ogw.credential())
    psql(dsn, "-Atc", "select 1", env={"PGAPPNAME": "t_logs"})
    r = httpx.get(f"http://127.0.0.1:{ogw.http_port}/api/me", headers={"x-request-id": "req-1234"})
    assert r.status_code == 401 and r.headers["x-request-id"] == "req-1234"
    ogw.wait_for_session(lambda s: s["application_name"] == "t_logs" and s["status"] == "closed")
    lines = [json.loads(line) for line in ogw.log.read_text().splitlines() if line.startswith("{")]
    started = [x for x in lines if x["msg"].startswith("session started")]
    assert started and all(x["session_id"] and x["connection"] == "shop" for x in started)
    assert any(x.get("request_id") == "req-1234" and x.get("path") == "/api/me" and x.get("status") == 401 for x in lines)
    secret = dsn.split(":")[2].split("@")[0]
    assert secret not in ogw.log.read_text()  # the credential never reaches a log line
