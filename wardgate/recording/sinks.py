"""Streaming audit sinks: the audit chain delivered to SIEMs in order, each event once.

The queue is the audit log itself, on disk in the store. Each sink keeps a cursor there (the last
sequence number it accepted) and reads on from it; a sink that is down falls behind and catches up
when it returns, without holding back the data path or the other sinks. The cursor moves only after
the sink accepted a batch, so nothing is skipped. A gateway that dies between a delivery and the
cursor's update sends that batch again on restart: receivers that must never see a repeat
deduplicate by `event.id` (or `event.sequence`).

Sinks: a JSON-lines file with size rotation, syslog (RFC 5424 over UDP, TCP or TLS with octet
counting, RFC 6587), and an HTTP webhook (batched, retried with backoff, HMAC-signed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..config import ConfigError
from ..reviews.notify import signature
from .anchors import ACTION, checkpoint_view
from .views import iso, siem_event

log = logging.getLogger("wardgate.sinks")

POLL = 0.5
MAX_BACKOFF = 30.0
KINDS = ("file", "syslog", "webhook")


@dataclass
class SinkSpec:
    """One `[[audit_sinks]]` entry of wardgate.toml."""

    name: str
    type: str
    path: str = ""  # file: where to write (relative paths are under data_dir)
    max_bytes: int = 100 * 1024 * 1024  # file: rotate when the file reaches this size
    backups: int = 5  # file: rotated files kept (path.1 is the newest)
    address: str = ""  # syslog: udp://host:514, tcp://host:601 or tls://host:6514
    facility: int = 13  # syslog: 13 = log audit
    app_name: str = "wardgate"
    url: str = ""  # webhook: where to POST
    secret_env: str = ""  # webhook: the environment variable holding the HMAC secret
    batch: int = 200  # events a delivery at most
    timeout: float = 10.0


def parse_sinks(raw: list[dict[str, Any]]) -> list[SinkSpec]:
    specs = []
    for i, entry in enumerate(raw, 1):
        name = entry.get("name", f"sink-{i}")
        try:
            spec = SinkSpec(**{"name": name, **entry})
        except TypeError as exc:
            raise ConfigError(f"audit sink {name!r}: {exc}") from None
        if spec.type not in KINDS:
            raise ConfigError(f"audit sink {name!r}: type must be one of {', '.join(KINDS)}")
        need = {"file": "path", "syslog": "address", "webhook": "url"}[spec.type]
        if not getattr(spec, need):
            raise ConfigError(f"audit sink {name!r}: a {spec.type} sink needs {need}")
        if spec.type == "syslog" and urlsplit(spec.address).scheme not in ("udp", "tcp", "tls"):
            raise ConfigError(f"audit sink {name!r}: address must be udp://, tcp:// or tls://HOST:PORT")
        if spec.type == "webhook" and urlsplit(spec.url).scheme not in ("http", "https"):
            raise ConfigError(f"audit sink {name!r}: url must be http:// or https://")
        if spec.batch < 1 or spec.max_bytes < 1024 or spec.backups < 1:
            raise ConfigError(f"audit sink {name!r}: batch must be positive, max_bytes at least 1024, backups at least 1")
        specs.append(spec)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError("audit sink names must be unique")
    return specs


def _line(e: Any) -> str:
    return json.dumps(siem_event(e), ensure_ascii=False, separators=(",", ":"))


def checkpoint_record(cp: dict[str, Any]) -> dict[str, Any]:
    """A signed checkpoint as the sinks deliver it, after the events it covers: not an event of the
    chain (it has no sequence of its own), but what `audit verify --anchor` checks the store against."""
    from .. import __version__

    return {"@timestamp": iso(cp["at"]), "event": {"action": ACTION, "kind": "state", "provider": "wardgate"},
            "observer": {"vendor": "Wardgate", "product": "Wardgate", "version": __version__},
            "wardgate": {"checkpoint": checkpoint_view(cp)}}


def _checkpoint_line(cp: dict[str, Any]) -> str:
    return json.dumps(checkpoint_record(cp), separators=(",", ":"))


class FileSink:
    def __init__(self, spec: SinkSpec, data_dir: Path) -> None:
        self.path = Path(spec.path) if Path(spec.path).is_absolute() else data_dir / spec.path
        self.max_bytes, self.backups = spec.max_bytes, spec.backups

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # accepted means on disk: the cursor moves past these events next
        finally:
            os.close(fd)

    def _write(self, lines: list[bytes]) -> None:
        """Append whole lines, rotating first whenever the next line would take the file past max_bytes
        (a single line larger than that gets a file of its own)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        size = self.path.stat().st_size if self.path.exists() else 0
        chunk: list[bytes] = []
        for line in lines:
            if size and size + len(line) > self.max_bytes:
                if chunk:
                    self._append(b"".join(chunk))
                    chunk = []
                self._rotate()
                size = 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._append(b"".join(chunk))

    async def send(self, events: list[Any], checkpoint: dict[str, Any] | None = None) -> None:
        lines = [(_line(e) + "\n").encode("utf-8") for e in events]
        if checkpoint is not None:
            lines.append((_checkpoint_line(checkpoint) + "\n").encode())
        await asyncio.to_thread(self._write, lines)

    async def close(self) -> None:
        pass


def _sd_value(v: Any) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def syslog_message(e: Any, facility: int, app_name: str, hostname: str) -> bytes:
    """One RFC 5424 message: the header, structured data with the chain position, the event as JSON."""
    severity = 4 if e.outcome in ("denied", "deny", "error") else 5  # warning, notice
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(e.at)) + f".{int(e.at % 1 * 1e6):06d}Z"
    msgid = "".join(c for c in e.kind if 33 <= ord(c) <= 126)[:32] or "-"
    sd = (f'[wardgate@32473 seq="{e.seq}" hash="{e.hash}" outcome="{_sd_value(e.outcome)}"'
          + (f' user="{_sd_value(e.user_name)}"' if e.user_name else "") + "]")
    head = f"<{facility * 8 + severity}>1 {stamp} {hostname} {app_name[:48]} {os.getpid()} {msgid} {sd} "
    return head.encode("utf-8") + b"\xef\xbb\xbf" + _line(e).encode("utf-8")


def syslog_checkpoint(cp: dict[str, Any], facility: int, app_name: str, hostname: str) -> bytes:
    """A signed checkpoint as an RFC 5424 message (MSGID audit.checkpoint), after the events it covers."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(cp["at"])) + f".{int(cp['at'] % 1 * 1e6):06d}Z"
    sd = f'[wardgate@32473 checkpoint="{cp["seq"]}" hash="{cp["hash"]}"]'
    head = f"<{facility * 8 + 6}>1 {stamp} {hostname} {app_name[:48]} {os.getpid()} {ACTION} {sd} "
    return head.encode("utf-8") + b"\xef\xbb\xbf" + _checkpoint_line(cp).encode("utf-8")


class SyslogSink:
    def __init__(self, spec: SinkSpec) -> None:
        u = urlsplit(spec.address)
        self.scheme, self.host, self.port = u.scheme, u.hostname or "127.0.0.1", u.port or (6514 if u.scheme == "tls" else 514)
        self.facility, self.app_name, self.timeout = spec.facility, spec.app_name, spec.timeout
        self.hostname = socket.gethostname()[:255] or "-"
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._udp: socket.socket | None = None

    async def _stream(self) -> asyncio.StreamWriter:
        if self._writer is not None and (self._reader is None or not self._reader.at_eof()) and not self._writer.is_closing():
            return self._writer
        await self.close()
        ctx = ssl.create_default_context() if self.scheme == "tls" else None
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=ctx), self.timeout)
        return self._writer

    async def send(self, events: list[Any], checkpoint: dict[str, Any] | None = None) -> None:
        messages = [syslog_message(e, self.facility, self.app_name, self.hostname) for e in events]
        if checkpoint is not None:
            messages.append(syslog_checkpoint(checkpoint, self.facility, self.app_name, self.hostname))
        if self.scheme == "udp":
            if self._udp is None:
                self._udp = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_DGRAM)
            for msg in messages:
                self._udp.sendto(msg, (self.host, self.port))
            return
        try:
            writer = await self._stream()
            writer.write(b"".join(str(len(m)).encode() + b" " + m for m in messages))  # octet counting
            await asyncio.wait_for(writer.drain(), self.timeout)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        self._writer = self._reader = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None


class WebhookSink:
    def __init__(self, spec: SinkSpec) -> None:
        self.url = spec.url
        secret = os.environ.get(spec.secret_env, "") if spec.secret_env else ""
        if spec.secret_env and not secret:
            raise ConfigError(f"audit sink {spec.name!r}: the environment variable {spec.secret_env} is not set")
        self.secret = secret.encode()
        self.client = httpx.AsyncClient(timeout=spec.timeout)

    async def send(self, events: list[Any], checkpoint: dict[str, Any] | None = None) -> None:
        payload: dict[str, Any] = {"events": [siem_event(e) for e in events]}
        if checkpoint is not None:
            payload["checkpoint"] = checkpoint_view(checkpoint)
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        stamp = str(int(time.time()))
        headers = {"content-type": "application/json", "x-wardgate-timestamp": stamp,
                   "x-wardgate-first-seq": str(events[0].seq), "x-wardgate-last-seq": str(events[-1].seq)}
        if self.secret:
            headers["x-wardgate-signature"] = signature(self.secret, stamp, body)
        r = await self.client.post(self.url, content=body, headers=headers)
        if r.status_code >= 300:
            raise OSError(f"HTTP {r.status_code}")

    async def close(self) -> None:
        await self.client.aclose()


def make_sink(spec: SinkSpec, data_dir: Path) -> Any:
    if spec.type == "file":
        return FileSink(spec, data_dir)
    if spec.type == "syslog":
        return SyslogSink(spec)
    return WebhookSink(spec)


class Shipper:
    """Runs every configured sink: reads the chain after each sink's cursor and delivers it."""

    def __init__(self, store: Any, specs: list[SinkSpec], data_dir: Path) -> None:
        self.store = store
        self.sinks = [(spec, make_sink(spec, data_dir)) for spec in specs]
        self.state: dict[str, dict[str, Any]] = {spec.name: {"delivered": None, "error": None} for spec in specs}

    async def run(self) -> None:
        try:
            await asyncio.gather(*(self._ship(spec, sink) for spec, sink in self.sinks))
        finally:
            for _, sink in self.sinks:
                await sink.close()

    async def _ship(self, spec: SinkSpec, sink: Any) -> None:
        while True:
            try:
                cursor = (await asyncio.to_thread(self.store.sink_cursors)).get(spec.name, (0, 0.0))[0]
                break
            except Exception:  # noqa: BLE001 - the store may be away at start; the sink starts when it is back
                log.exception("audit sink %s: cannot read its cursor; will retry", spec.name)
                await asyncio.sleep(MAX_BACKOFF / 6)
        state = self.state[spec.name]
        state["delivered"] = cursor
        backoff, failures = POLL, 0
        while True:
            try:
                events = await asyncio.to_thread(self.store.events_after, cursor, spec.batch)
            except Exception:  # noqa: BLE001 - the store may be briefly away; the events wait there
                log.exception("audit sink %s: cannot read the audit log; will retry", spec.name)
                await asyncio.sleep(MAX_BACKOFF / 6)
                continue
            if not events:
                await asyncio.sleep(POLL)
                continue
            try:
                # The checkpoint covering the newest of these events goes with them: the receiver then
                # holds a signed head the store cannot be cut back behind (anchors.py).
                checkpoint = await asyncio.to_thread(self.store.checkpoint_upto, events[-1].seq)
                if checkpoint is not None and checkpoint["seq"] <= cursor:
                    checkpoint = None  # sent with an earlier batch
                await sink.send(events, checkpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: keep the events, retry with backoff
                failures += 1
                state["error"] = f"{type(exc).__name__}: {exc}"
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("audit sink %s is not accepting events (%s); %d waiting from seq %d, retrying",
                                spec.name, state["error"], len(events), events[0].seq)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
                continue
            if failures:
                log.warning("audit sink %s is back after %d failed attempts", spec.name, failures)
            failures, backoff, state["error"] = 0, POLL, None
            cursor = events[-1].seq
            state["delivered"] = cursor
            try:
                await asyncio.to_thread(self.store.set_sink_cursor, spec.name, cursor)
            except Exception:  # noqa: BLE001 - kept in memory; the next delivery stores it
                log.exception("audit sink %s: cannot store its cursor", spec.name)
