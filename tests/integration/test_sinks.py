"""Streaming audit sinks: a JSON-lines file with rotation, syslog over TCP and an HMAC-signed webhook.
The webhook goes down while traffic continues; when it returns, every event arrives exactly once, in order."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import socketserver
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.conftest import make_gateway, psql
from wardgate.localpg import free_port

SECRET = "sink-secret-123"


class Webhook:
    """An HTTP receiver that can be stopped and started again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.events: list[dict] = []
        self.checkpoints: list[dict] = []
        self.bad_signatures = 0
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                stamp = self.headers["x-wardgate-timestamp"]
                want = "sha256=" + hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
                if not hmac.compare_digest(want, self.headers.get("x-wardgate-signature", "")):
                    outer.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                outer.events.extend(json.loads(body)["events"])
                if json.loads(body).get("checkpoint"):
                    outer.checkpoints.append(json.loads(body)["checkpoint"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None


class Syslog(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self) -> None:
        self.messages: list[bytes] = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                while True:
                    size = b""
                    while (c := self.rfile.read(1)) not in (b" ", b""):
                        size += c
                    if not size:
                        return
                    self.server.messages.append(self.rfile.read(int(size)))  # type: ignore[attr-defined]

        super().__init__(("127.0.0.1", free_port()), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def _seqs(events: list[dict]) -> list[int]:
    return [e["event"]["sequence"] for e in events]


@pytest.fixture
def sinks(tmp_path, pg):  # noqa: ANN001, ANN201
    hook, syslog = Webhook(), Syslog()
    hook.start()
    gw = make_gateway(tmp_path, pg, tail_toml=f"""
[[audit_sinks]]
name = "file"
type = "file"
path = "audit/events.jsonl"
max_bytes = 4096
backups = 50

[[audit_sinks]]
name = "siem"
type = "syslog"
address = "tcp://127.0.0.1:{syslog.server_address[1]}"

[[audit_sinks]]
name = "hook"
type = "webhook"
url = "http://127.0.0.1:{hook.port}/ingest"
secret_env = "SINK_SECRET"
batch = 7
""")
    gw.env["SINK_SECRET"] = SECRET
    gw.start()
    yield gw, hook, syslog
    gw.stop()
    syslog.shutdown()
    syslog.server_close()
    if hook.server is not None:
        hook.stop()


def _noise(gw, n: int) -> None:  # noqa: ANN001
    for i in range(n):  # a refused sign-in is one audit event each
        httpx.get(f"http://127.0.0.1:{gw.http_port}/api/me", headers={"Authorization": f"Bearer bad-{i}"})


def _until(check, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_a_sink_outage_loses_nothing_and_repeats_nothing(sinks) -> None:
    gw, hook, syslog = sinks
    _noise(gw, 5)
    _until(lambda: len(hook.events) >= 5)

    hook.stop()  # the SIEM is down
    _noise(gw, 12)
    dsn = gw.dsn(gw.credential())
    assert psql(dsn, "-Atc", "select 41 + 1").stdout.strip() == "42"  # the data path does not wait for it
    _until(lambda: not httpx.get(f"http://127.0.0.1:{gw.http_port}/healthz").json()["audit_sinks"]["hook"]["healthy"])
    stalled = len(hook.events)
    # The refusals are journaled at once and reach the store's chain through the recorder process,
    # which may still be applying the last of them: the chain grows past the stalled sink regardless.
    _until(lambda: gw.store().audit_head() >= stalled + 12)
    head = gw.store().audit_head()
    assert head >= stalled + 12

    hook.start()  # back again
    _until(lambda: hook.events and _seqs(hook.events)[-1] >= gw.store().audit_head() >= head)
    exported = [json.loads(x) for x in gw.cli("audit", "export").stdout.splitlines()]
    got = _seqs(hook.events)
    assert got == list(range(1, got[-1] + 1))  # every event, once, in order
    assert hook.events == exported[: len(got)]  # the same documented schema as `audit export`
    assert hook.bad_signatures == 0
    # The signed checkpoints came with the events they cover, in order.
    assert hook.checkpoints and [c["seq"] for c in hook.checkpoints] == sorted(c["seq"] for c in hook.checkpoints)
    assert hook.checkpoints[-1]["seq"] <= got[-1]
    status = gw.cli_json("audit", "sinks")
    assert {s["name"] for s in status["sinks"]} == {"file", "siem", "hook"}


def test_file_sink_rotates_and_syslog_is_rfc5424(sinks) -> None:
    gw, _, syslog = sinks
    _noise(gw, 30)
    data_dir = gw.dir / "data" / "audit"

    def file_events() -> list[dict]:
        files = sorted(data_dir.glob("events.jsonl.*"), key=lambda p: -int(p.suffix[1:])) + [data_dir / "events.jsonl"]
        return [json.loads(line) for p in files if p.exists() for line in p.read_text().splitlines()]

    _until(lambda: len(file_events()) >= 30 and len(syslog.messages) >= 30)
    lines = file_events()
    events = [e for e in lines if "sequence" in e["event"]]
    assert _seqs(events) == list(range(1, len(events) + 1))
    # After the events it covers, each batch carries the signed checkpoint: an anchor outside the store.
    checkpoints = [e["wardgate"]["checkpoint"] for e in lines if e["event"]["action"] == "audit.checkpoint"]
    assert checkpoints and all(cp["seq"] <= events[-1]["event"]["sequence"] for cp in checkpoints)
    anchored = gw.cli("audit", "verify", "--anchor", "file", "--json", check=False)
    assert anchored.returncode == 0 and json.loads(anchored.stdout)["ok"], anchored.stdout + anchored.stderr
    assert (data_dir / "events.jsonl.1").exists()
    for path in data_dir.glob("events.jsonl*"):  # rotated at 4096 bytes, between whole events
        assert path.stat().st_size <= 4096 or len(path.read_text().splitlines()) == 1
    assert oct((data_dir / "events.jsonl").stat().st_mode & 0o777) == "0o600"
    pattern = re.compile(rb'^<(\d+)>1 \S+Z \S+ wardgate \d+ (\S+) \[wardgate@32473 seq="(\d+)" hash="([0-9a-f]{64})"')
    seqs = []
    marks = [m for m in syslog.messages if b" audit.checkpoint [wardgate@32473 checkpoint=" in m]
    assert marks and all(json.loads(m.split(b"\xef\xbb\xbf", 1)[1])["wardgate"]["checkpoint"]["signature"] for m in marks)
    for msg in syslog.messages:
        if msg in marks:
            continue
        m = pattern.match(msg)
        assert m, msg[:200]
        assert int(m.group(1)) in (13 * 8 + 4, 13 * 8 + 5)
        body = json.loads(msg.split(b"\xef\xbb\xbf", 1)[1])
        assert body["event"]["sequence"] == int(m.group(3)) and body["event"]["action"] == m.group(2).decode()
        seqs.append(int(m.group(3)))
    assert seqs == list(range(1, len(seqs) + 1))
    denied = next(json.loads(m.split(b"\xef\xbb\xbf", 1)[1]) for m in syslog.messages if b"api.authenticate" in m)
    assert denied["event"]["outcome"] == "failure" and denied["event"]["category"] == ["authentication"]


def test_bad_sink_settings_are_refused(tmp_path, pg) -> None:  # noqa: ANN001
    gw = make_gateway(tmp_path, pg)
    with gw.config.open("a") as f:
        f.write('[[audit_sinks]]\nname = "x"\ntype = "syslog"\naddress = "http://h:1"\n')
    out = gw.cli("audit", "sinks", check=False)
    assert out.returncode == 2 and "udp://, tcp:// or tls://" in out.stderr
