"""The HTTP listener: health, and TLS when configured."""

from __future__ import annotations

import ssl

import httpx
import psycopg

from tests.conftest import make_gateway


def test_healthz_reports_live_sessions(gateway, cred) -> None:
    url = f"http://127.0.0.1:{gateway.http_port}/healthz"
    with psycopg.connect(gateway.dsn(cred)):
        body = httpx.get(url).json()
        assert body["status"] == "ok" and body["recorder"] == "running" and body["live_sessions"] >= 1
    assert httpx.get(f"http://127.0.0.1:{gateway.http_port}/nope").status_code == 404


def test_http_listener_serves_tls(tmp_path, pg) -> None:
    gw = make_gateway(tmp_path / "gw", pg, extra_toml="http_tls = true")
    gw.http_scheme = "https"
    gw.start()
    try:
        r = httpx.get(f"https://127.0.0.1:{gw.http_port}/healthz", verify=ssl.create_default_context(cafile=str(gw.ca)))
        assert r.status_code == 200 and r.json()["status"] == "ok"
        try:
            httpx.get(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=3)
        except httpx.HTTPError:
            pass
        else:
            raise AssertionError("plain HTTP must not be served when http_tls is on")
    finally:
        gw.stop()
