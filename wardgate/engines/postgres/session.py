"""The relay of an established session: frames both directions, records statements, forwards bytes.

Per read: frame (inspecting only the messages a record needs), write the records to the journal
in one call, then forward the read in one write. A statement therefore never reaches the database
before it is recorded. Outcomes are handed to the recorder's deferred batch (see recorder.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from . import codec
from .framing import Framer
from .stream import StreamProtocol
from .tracker import BACKEND_INSPECT, FRONTEND_INSPECT, StatementTracker

log = logging.getLogger("wardgate.session")

_json = json.JSONEncoder(ensure_ascii=False).encode


def _jstr(value: str | None) -> str:
    return "null" if value is None else _json(value)


_TERMINATE = ord("X")
_ERROR = ord("E")


class Relay:
    def __init__(
        self,
        *,
        session_id: str,
        connection: str,
        client: StreamProtocol,
        upstream: StreamProtocol,
        record: Callable[[list[str]], None],
        defer: Callable[[list[str]], None],
        on_end: Callable[["Relay", str], None],
        on_abandon: Callable[["Relay"], None] | None = None,
        max_message: int,
    ) -> None:
        self.session_id = session_id
        self.connection = connection
        self.client = client
        self.upstream = upstream
        self._record = record
        self._defer = defer
        self._on_end = on_end
        self._on_abandon = on_abandon
        self.tracker = StatementTracker()
        self.client_framer = Framer(
            FRONTEND_INSPECT + b"X",
            allowed=codec.FRONTEND_TYPES,
            small=codec.SMALL_FRONTEND_TYPES,
            max_inspect=max_message,
            max_message=max_message,
        )
        self.server_framer = Framer(BACKEND_INSPECT, max_inspect=1 << 30, max_message=1 << 30)
        self._starts: dict[int, float] = {}
        self.ended = False
        self.terminating = False
        self.upstream_fatal = False

    def start(self) -> None:
        self.client.on_lost = self._client_lost
        self.upstream.on_lost = self._upstream_lost
        # Backpressure: a peer that does not read stops us reading from the other side.
        self.client.on_pause = self._pause_upstream
        self.upstream.on_pause = self._pause_client
        self.upstream.start_relay(self.from_upstream)
        self.client.start_relay(self.from_client)
        # Either side may have gone while the session was being set up.
        if self.upstream.closed:
            self._upstream_lost(self.upstream.close_exc)
        elif self.client.closed:
            self._client_lost(self.client.close_exc)

    def _pause_upstream(self, paused: bool) -> None:
        t = self.upstream.transport
        if t is not None and not t.is_closing():
            t.pause_reading() if paused else t.resume_reading()

    def _pause_client(self, paused: bool) -> None:
        t = self.client.transport
        if t is not None and not t.is_closing():
            t.pause_reading() if paused else t.resume_reading()

    # -- client -> upstream

    def from_client(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            fwd, msgs = self.client_framer.feed(data)
            if msgs:
                records = []
                sid = self.session_id
                for mtype, body, _ in msgs:
                    if mtype == _TERMINATE:
                        self.terminating = True
                        continue
                    started = self.tracker.frontend(mtype, body)
                    if started is not None:
                        self._starts[started.seq] = time.perf_counter()
                        records.append(
                            f'{{"k":"stmt","sid":"{sid}","seq":{started.seq},"kind":"{started.kind}",'
                            f'"np":{started.param_count},"at":{time.time()!r},"text":{_json(started.text)}}}\n'
                        )
                if records:
                    self._record(records)
        except codec.ProtocolViolation as exc:
            self.fail(codec.fatal("08P01", f"protocol violation: {exc}", hint="the gateway closed this session; reconnect"), f"protocol violation: {exc}", "08P01")
            return
        except OSError as exc:
            log.error("cannot write the recording journal: %s", exc)
            self.fail(
                codec.fatal("58030", "the gateway cannot record this session, so it will not run statements",
                            hint="try again later; the gateway's operator has been told"),
                "recording failed", "58030",
            )
            return
        except Exception:
            self._internal_error()
            return
        if fwd:
            self.upstream.transport.write(fwd)  # type: ignore[union-attr]

    # -- upstream -> client

    def from_upstream(self, data: bytes) -> None:
        if self.ended:
            return
        try:
            fwd, msgs = self.server_framer.feed(data)
            if msgs:
                records = []
                sid = self.session_id
                fatal_at = []
                for mtype, body, offset in msgs:
                    if mtype == _ERROR and codec.is_fatal(body):
                        fatal_at.append((offset, body))
                    for fin in self.tracker.backend(mtype, body):
                        t0 = self._starts.pop(fin.seq, None)
                        ms = "null" if t0 is None else f"{(time.perf_counter() - t0) * 1000:.3f}"
                        records.append(
                            f'{{"k":"done","sid":"{sid}","seq":{fin.seq},"status":"{fin.status}","ms":{ms},'
                            f'"rows":{"null" if fin.rows is None else fin.rows},"tag":{_jstr(fin.tag)},'
                            f'"code":{_jstr(fin.error_code)},"msg":{_jstr(fin.error_message)}}}\n'
                        )
                if records:
                    self._defer(records)
                if fatal_at:
                    fwd = self._name_the_connection(fwd, fatal_at)
        except codec.ProtocolViolation as exc:
            self.fail(codec.fatal("08P01", f"connection {self.connection!r} sent invalid protocol data: {exc}"), f"upstream protocol violation: {exc}", "08P01")
            return
        except Exception:
            self._internal_error()
            return
        if fwd:
            self.client.transport.write(fwd)  # type: ignore[union-attr]

    def _name_the_connection(self, fwd: bytes, fatal_at: list[tuple[int, bytes]]) -> bytes:
        """Upstream is ending the session: say which connection, so the client's error is clear."""
        self.upstream_fatal = True
        for offset, body in reversed(fatal_at):
            fields = codec.parse_error_fields(body)
            rewritten = codec.error_response(
                fields.get("C", "08006"), f"connection {self.connection!r}: {fields.get('M', 'closed by the server')}",
                severity="FATAL", detail=fields.get("D"), hint=fields.get("H"),
            )
            fwd = fwd[:offset] + rewritten + fwd[offset + 1 + len(body) + 4 :]
        return fwd

    # -- endings

    def _internal_error(self) -> None:
        """A fault of the gateway's own: end this session clearly (fail closed); others carry on."""
        log.exception("internal error in session %s", self.session_id)
        self.fail(codec.fatal("XX000", "internal gateway error; this session is closed",
                              hint="reconnect; the gateway's log has the details"), "internal gateway error", "XX000")

    def _client_lost(self, exc: Exception | None) -> None:
        if self.tracker.in_flight and not self.ended and self._on_abandon is not None:
            # Nobody will read the result: stop the work upstream instead of letting it run on.
            self._on_abandon(self)
        self.upstream.close()
        self.end("client terminated" if self.terminating else "client disconnected")

    def _upstream_lost(self, exc: Exception | None) -> None:
        if not self.ended and not self.terminating and not self.upstream_fatal:
            self.client.write(
                codec.fatal("08006", f"the connection to {self.connection!r} was lost",
                            hint="reconnect; the gateway serves new sessions once the database is back")
            )
        self.client.close()
        self.end("upstream closed the connection")

    def fail(self, error: bytes, reason: str, code: str | None = None) -> None:
        """Send `error` to the client and end the session."""
        if self.ended:
            return
        self.client.write(error)
        self.client.close()
        self.upstream.close()
        self.end(reason, code)

    def end(self, reason: str, code: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        self._on_end(self, reason if code is None else f"{reason} ({code})")
