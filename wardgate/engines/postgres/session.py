"""The relay of an established session: frames both directions, records statements, forwards bytes.

Per read: frame (inspecting only the messages a record needs), write the records to the journal
in one call, then forward the read in one write. A statement therefore never reaches the database
before it is recorded. Outcomes are handed to the recorder's deferred batch (see recorder.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ...masking.messages import mask_message
from ...masking.plan import UNSCANNED, MaskingPolicy, RowMasker
from ...metrics import STATS
from ...policy.guardrails import CACHE_TEXT_LIMIT, Match, StatementPolicy
from ...recording.journal import event
from ...sql import encoding
from ...sql.classify import Classification
from ...sql.offload import INLINE_CHARS, Offload
from ...sql.tags import as_predicted
from . import codec
from .budget import Budget
from .framing import ROWS, Framer
from .slices import PIECE, Outbox, json_parts, read_statement, sql_of, sql_view, take_pieces
from .stream import StreamProtocol
from .tracker import BACKEND_INSPECT, PARAM_LIMIT, UNSEEN, Finished, Started, StatementTracker

log = logging.getLogger("wardgate.session")
_DECIDED = STATS.statements  # decision -> count; bumped inline on the hot path
_RULES = STATS.rules
_LATENCY = STATS.latency
DRAIN_SECONDS = 5.0  # how long a failed session's client may go on writing before it is closed

_json = json.JSONEncoder(ensure_ascii=False).encode
_jstring = json.encoder.encode_basestring  # a str as a JSON string, in C


def _set_reading(peer: StreamProtocol, paused: bool) -> None:
    """Backpressure: stop (or resume) reading from `peer` while the other side cannot take more."""
    t = peer.transport
    if t is not None and not t.is_closing():
        t.pause_reading() if paused else t.resume_reading()


def _resume_later(set_reading: Callable[[], None]) -> None:
    """Resume reading once the loop has come round, never from within a read's callback: uvloop (libuv)
    reads again at once when reading resumes there, up to 32 reads in a row, and a session whose pieces
    each took their whole slice of time would hold the loop for all of them (150 ms, seen)."""
    asyncio.get_running_loop().call_soon(set_reading)


def _splice(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (offset, length, replacement) edits, given in stream order, in one pass."""
    parts, last = [], 0
    for offset, length, replacement in edits:
        parts.append(data[last:offset])
        parts.append(replacement)
        last = offset + length
    parts.append(data[last:])
    return b"".join(parts)


# Types whose values no detector reads (the server parses them as what they are): bool, int8, int2,
# int4, oid, float4, float8, money, date, time, timestamp, timestamptz, interval, timetz, numeric, uuid.
NOT_TEXT_OIDS = frozenset((16, 20, 21, 23, 26, 700, 701, 790, 1082, 1083, 1114, 1184, 1186, 1266, 1700, 2950))
PARAM_SCAN_BUDGET = 32 * 1024  # characters of one Bind's values searched for the record (_masked_params)


def _jstr(value: str | None) -> str:
    return "null" if value is None else _jstring(value)


def _stmt_head(sid: str, seq: int, kind: str, nparams: int) -> str:
    """A statement's record up to its text."""
    # Times are written as integers with an exponent (microseconds: 1700000000123456e-6), which JSON
    # reads as the same number and which is three times cheaper to format than a float.
    return f'{{"k":"stmt","sid":"{sid}","seq":{seq},"kind":"{kind}","np":{nparams},"at":{time.time_ns() // 1000}e-6,"text":'


def _stmt_line(sid: str, seq: int, kind: str, nparams: int, text: str, verdict: str = "") -> str:
    """A statement's record; `verdict` is empty for the common case (allowed, no rule matched)."""
    return f"{_stmt_head(sid, seq, kind, nparams)}{_jstring(text)}{verdict}}}\n"


def _verdict(action: str, decision: Any) -> str:
    """The decision fields of a statement's record: what the gateway did, and every rule that matched."""
    return f',"d":"{action}","r":{_json([m.public() for m in decision.matches])}'


def _done_line(sid: str, seq: int, status: str, ms: str | None, rows: int | None, tag: str | None,
               code: str | None, msg: str | None, result: str = "") -> str:
    """A statement's outcome; an error's code and message only when there is one (absent reads as null)."""
    error = "" if code is None and msg is None else f',"code":{_jstr(code)},"msg":{_jstr(msg)}'
    return (f'{{"k":"done","sid":"{sid}","seq":{seq},"status":"{status}","ms":{ms or "null"},'
            f'"rows":{"null" if rows is None else rows},"tag":{_jstr(tag)}{error}{result}}}\n')


def _result(fin: Finished) -> str:
    """What the record keeps of a statement's result (it has columns): them, and with sampling its first rows."""
    if fin.sample is None:
        return _columns_only(fin.cols)  # type: ignore[arg-type]
    return f',"cols":{fin.cols},"sample":{_json(fin.sample)}'


@functools.lru_cache(maxsize=512)
def _columns_only(cols: str) -> str:
    """The result record of a statement whose columns are `cols`, as the store keeps it (JSON text in
    a JSON string), so that the recorder stores it without decoding and encoding it again."""
    return ',"res":' + _jstring('{"columns":' + cols + "}")


def _sample_value(raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return f"<binary, {len(raw)} bytes>"
    if text.isprintable() or not any(ord(c) < 32 and c not in "\t\n\r" for c in text):
        return text
    return f"<binary, {len(raw)} bytes>"



_TERMINATE = ord("X")
_TERMINATE_MESSAGE = b"X\x00\x00\x00\x04"
_ERROR = ord("E")
_READY = ord("Z")
_QUERY = ord("Q")
_PARSE = ord("P")
_FUNCTION_CALL = ord("F")
_EXECUTE = ord("E")
_BIND = ord("B")
_SYNC = ord("S")
_CLOSE = ord("C")
_ROW_DESCRIPTION = ord("T")
_NO_DATA = ord("n")
_DATA_ROW = ord("D")
_ROW_RUN = _DATA_ROW | ROWS  # consecutive DataRows, framed as one entry: (_ROW_RUN, end, start)
_COPY_OUT = ord("H")
_COPY_DATA = ord("d")
_COMMAND_COMPLETE = ord("C")
_PARAMETER_STATUS = ord("S")
_FAST_PATH_REFUSED = "function calls over the fast-path protocol are refused by the gateway; call the function in SQL"
_PLACEHOLDER = re.compile(r"\$[0-9]")
_PREDICTED: dict[tuple[tuple[frozenset[str] | None, ...], str, str], bool] = {}  # tripwire verdicts, shared
_NAMES_SQL = frozenset({"prepare", "deallocate", "discard", "declare_cursor", "close_portal"})
_STATEMENT_NAMES_SQL = frozenset({"prepare", "deallocate", "discard"})  # of those, the ones that name statements
_MASK_TYPES = frozenset((_ROW_DESCRIPTION, _NO_DATA, _COPY_OUT, _COPY_DATA, _COMMAND_COMPLETE))
_DESCRIBE = ord("D")
_ASYNC = frozenset(b"NAS")
_REPORTS = frozenset(b"ENA")
_FLUSH = ord("H")


class _Unmaskable(Exception):
    pass


class _ReadPast(Exception):
    """The session can no longer be read as the server reads it (a setting changed by code the rules
    could not see): (message to the client, reason in the record)."""


class _Described:
    """What a Describe of a portal told of the rows its Execute returns: the plan, once the answer came."""

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: RowMasker | None | object = UNSEEN


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
        on_end: Callable[["Relay", str, str | None], None],  # (relay, reason, SQLSTATE it ended with)
        on_abandon: Callable[["Relay"], None] | None = None,
        max_message: int,
        policy: StatementPolicy | None = None,
        masking: MaskingPolicy | None = None,
        on_ddl: Callable[[], None] | None = None,
        user: str | None = None,
        agent: str | None = None,
        review: Callable[[str, Any], str | None] | None = None,
        results: str = "summary",
        sample_rows: int = 5,
        sample_bytes: int = 64 * 1024,
        client_encoding: str = "UTF8",
        offload: Offload | None = None,
        budget: Budget[Relay] | None = None,
        record_parts: Callable[[list[bytes]], None] | None = None,
        durable: Callable[[], asyncio.Future[None]] | None = None,
    ) -> None:
        self.user, self.agent = user, agent
        # For statements a rule holds for review: None to run it (approved), else the refusal naming the review.
        self._review = review
        self.session_id = session_id
        self.connection = connection
        self.client = client
        self.upstream = upstream
        self._record = record
        self._defer = defer
        self._on_end = on_end
        self._on_abandon = on_abandon
        self.masking = masking if masking else None
        # DDL run here (told by its classification) makes every session of the connection with column rules
        # read its catalog again before its next statement; meanwhile the client's bytes are held.
        self._on_ddl = on_ddl
        self._ddl = False  # DDL has run in this session: its transaction's end changes what others see
        self._ddl_sent = False  # DDL (or the end of its transaction) sent, whose ReadyForQuery has not come
        self._held: list[bytes] | None = None  # the client's bytes while its earlier ones wait (catalog, worker)
        self._upstream_full = False  # the upstream's write buffer is full: the client is not read meanwhile
        self._client_full = False  # and the other way round
        # A long read's pieces not yet taken, [data, offset] (see slices.take_pieces); the side is not read meanwhile.
        self._client_backlog: deque[list] | None = None
        self._upstream_backlog: deque[list] | None = None
        # What goes to each side, a slice a turn when it is long (slices.Outbox); the other side waits.
        self._client_out = Outbox(self.client, self._set_upstream_reading)
        self._upstream_out = Outbox(self.upstream, self._set_client_reading)
        self._to_client: list[bytes] | None = None  # while pieces are taken: what they forward, written after
        # Long statements are classified off the event loop, in a worker (sql/offload.py); their
        # classifications wait here for the decision that uses them.
        self._offload = offload
        # By offset in the read: (text, classification, whether it has a backslash or non-ASCII)
        self._prepared: dict[int, tuple[str, Classification, bool]] = {}
        self._prep: tuple[str, Classification, bool] | None = None  # of the statement being read and decided
        self._json: tuple[str, list[bytes]] | None = None  # the last long statement, its text as JSON in parts
        self._parts = False  # records being written hold a long statement's parts
        self._record_parts = record_parts
        # durability = "fsync": what a read recorded is on disk before the read is forwarded (syncer.py).
        self._durable = durable
        self._unsynced = False  # records written that the next forward must wait on
        self._outcomes_unsynced = False  # and outcomes written that the next answer must wait on
        self._answer_waits = False  # an answer waits for its outcomes to reach the disk
        self._classifying: asyncio.Future[None] | None = None
        self._budget = budget  # the gateway-wide cap on bytes held for inspection (budget.py)
        self._waiting = 0  # bytes of a read waiting for a worker
        self._draining = 0  # ended: bytes of the client's message to read and drop before closing (fail)
        self._catalog_answer: bytearray | None = None  # its answer so far, while the catalog is read again
        self._catalog_rows: list[tuple[str | None, ...]] = []
        self._catalog_failed = False
        self.tracker = StatementTracker(track_describe=self.masking is not None)
        self.policy = policy or StatementPolicy([])
        # Client text is read in the session's client_encoding, as the server converts it. Where rules
        # read statements, bytes that do not decode are refused rather than guessed at (see sql/encoding.py).
        self._strict = bool(self.policy.rules)
        self._follow_encoding(client_encoding)
        # With masking on, an Execute's rows are masked by what the server said of that very portal just
        # before it ran: a Describe of it, the client's or the gateway's own, with no other message between
        # (a Bind, a Close or any statement could give the name to other rows). (portal, what it learns)
        self._described: tuple[bytes, _Described] | None = None
        self._copy_out = False
        self._refusals: dict[str, str] = {}  # marker sent upstream -> the refusal it stands for
        self._refused_queries: dict[int, str] = {}  # seq -> refusal, for Queries and function calls
        # Every frontend message is looked at (they are few and small), except CopyData, which streams.
        self.client_framer = Framer(
            bytes(t for t in codec.FRONTEND_TYPES if t != ord("d")),
            allowed=codec.FRONTEND_TYPES,
            small=codec.SMALL_FRONTEND_TYPES,
            max_inspect=max_message,
            max_message=max_message,
        )
        # Results in the record: column names (summary), and the first rows (sample) within a budget.
        self._results = results != "off"
        self._sample_rows = sample_rows
        self._sample_budget = sample_bytes if results == "sample" else 0
        self._column_names: dict[bytes, str] = {}  # RowDescription -> its names as JSON
        if self.masking is None and not self._sample_budget:
            inspect = BACKEND_INSPECT + b"S" + (b"T" if self._results else b"")
            self.server_framer = Framer(inspect, max_inspect=1 << 30, max_message=1 << 30)
        elif self.masking is None:
            self.server_framer = Framer(BACKEND_INSPECT + b"STD", max_inspect=max_message, max_message=1 << 30,
                                        rows=_DATA_ROW)
        else:
            # Rows are rewritten, so they are looked at whole (bounded like any inspected message).
            # Errors, notices and notifications carry values too (masking/messages.py).
            self.server_framer = Framer(BACKEND_INSPECT + b"STnDdHGNA", max_inspect=max_message,
                                        max_message=max_message, rows=_DATA_ROW)
        self._starts: dict[int, int] = {}  # seq -> perf_counter_ns at its start
        self._verdict = ""  # decision fields for the next statement record, when a rule matched
        # The tripwire: what the classification says the server will run, compared with the tags of what
        # it ran (CommandComplete). Per statement in flight (seq), and per prepared statement and portal
        # name, since an Execute runs what its portal was bound to.
        self._classified: Classification | None = None  # of the statement _decide saw last
        self._expect: dict[int, tuple[frozenset[str] | None, ...]] = {}
        self._portal_expect: dict[bytes, frozenset[str] | None] = {}
        self._read_past: list[str] = []  # what the server ran that the gateway did not classify
        # Queries and Syncs sent whose ReadyForQuery has not come back, and Executes sent since the last
        # Sync: while either is nonzero, the server may have changed a setting it has not reported yet.
        self._unanswered = 0
        self._executed = 0
        self.ended = False
        self.terminating = False
        self.upstream_fatal: str | None = None

    def start(self) -> None:
        self.client.on_lost = self._client_lost
        self.upstream.on_lost = self._upstream_lost
        # Backpressure: a peer that does not read stops us reading from the other side.
        self.client.on_pause = self._client_pause
        self.upstream.on_pause = self._upstream_pause
        self.upstream.start_relay(self.from_upstream)
        self.client.start_relay(self.from_client)
        # Either side may have gone while the session was being set up.
        if self.upstream.closed:
            self._upstream_lost(self.upstream.close_exc)
        elif self.client.closed:
            self._client_lost(self.client.close_exc)

    # -- client -> upstream

    def from_client(self, data: bytes) -> None:
        if self.ended:
            if self._draining:
                self._draining = max(0, self._draining - len(data))
                if not self._draining:
                    self.client.close()
            return
        if self._held is not None:
            self._held.append(data)
            return
        if self._client_backlog is not None:
            self._client_backlog.append([data, 0])
            return
        if len(data) > PIECE:
            # A long read (a pipeline of thousands of messages) is taken in pieces, with other sessions
            # served between them once a slice of time is used up (see slices.take_pieces).
            self._client_backlog = deque([[data, 0]])
            self._set_client_reading()
            self._take_client_pieces()
            return
        self._client_read(data)

    def _take_client_pieces(self) -> None:
        backlog = self._client_backlog
        if backlog is None or self.ended:
            return
        if take_pieces(backlog, self._client_read, lambda: self.ended or self._held is not None):
            self._client_backlog = None
            if self._held is not None and backlog:  # the rest waits behind what holds the session
                self._held.extend(data[at:] for data, at in backlog)
            _resume_later(self._set_client_reading)
        else:
            asyncio.get_running_loop().call_soon(self._take_client_pieces)

    def _client_read(self, data: bytes) -> None:
        if self._held is not None:
            self._held.append(data)
            return
        masking = self.masking
        if masking is not None and masking.catalog.stale and self.tracker.idle \
                and self.tracker.transaction_status != b"E":
            self._read_catalog(data)
            return
        try:
            fwd, msgs = self.client_framer.feed(data)
            rest = self.client_framer.rest and self.client_framer.take_rest()  # after a long message: next
            if self._budget is not None and self._over_budget():
                return
            # A read no longer than INLINE_CHARS holds no long statement: no second pass over its messages.
            if len(fwd) > INLINE_CHARS and self._offload is not None and msgs and self._classify_first(fwd, msgs):
                if rest and self._held is not None:
                    self._held.insert(0, rest)
                return  # decided once a worker has classified its long statements; the client waits
            fwd = self._statements(fwd, msgs)
        except Exception as exc:  # each kind ends the session as it should (_client_failed)
            self._client_failed(exc)
            return
        if fwd:
            if self._unsynced and self._durable is not None:
                self._forward_when_durable(fwd, rest)
                return
            self._upstream_out.send(fwd)
        if rest and not self.ended:
            self._client_read(rest)

    def _forward_when_durable(self, fwd: bytes, rest: bytes | None) -> None:
        """Forward `fwd` once its records are on disk; until then the client's further bytes wait."""
        self._unsynced = False
        self._held = [rest] if rest else []
        self._set_client_reading()
        self._durable().add_done_callback(lambda fut: self._durable_done(fut, fwd))  # type: ignore[misc]

    def _durable_done(self, fut: asyncio.Future[None], fwd: bytes) -> None:
        if self.ended:
            return
        if fut.cancelled() or fut.exception() is not None:
            self._client_failed(fut.exception() or OSError("the journal's flush was cancelled"))
            return
        self._upstream_out.send(fwd)
        held, self._held = self._held or [], None
        self._set_client_reading()
        if held:
            self.from_client(b"".join(held))

    def _statements(self, fwd: bytes, msgs: list, records_out: list | None = None) -> bytes:
        """Decide and record the client's messages `msgs` framed from `fwd`; what to forward upstream. With
        `records_out`, the records are put there for the caller to write, instead of written here."""
        if msgs:
            records: list = []  # lines (str), and the parts of a long statement's record (_stmt_record)
            edits: list[tuple[int, int, bytes]] = []  # (offset, length, replacement) in fwd
            for mtype, body, offset in msgs:
                if mtype != _EXECUTE and mtype != _FLUSH:
                    self._described = None
                if mtype == _QUERY:  # the common case, in one place
                    prep = self._prep = self._prepared.pop(offset, None) if self._prepared else None
                    raw = codec.read_cstr(body, 0)[0] if prep is None else b""  # read already: not copied again
                    text, refusal = self._read_sql(raw)
                    self._unanswered += 1  # after reading it: it waits on the ones before, not on itself
                    if refusal is None:
                        refusal = self._decide(text, records)
                    if refusal is not None:
                        self._refuse(mtype, body, offset, refusal, records, edits, text)
                        continue
                    seq = self.tracker.start_query(text)
                    self._starts[seq] = time.perf_counter_ns()
                    self._stmt_record(records, seq, "simple", 0, text, self._take_verdict())
                    self._expect_query(seq)
                    continue
                if mtype == _TERMINATE:
                    self.terminating = True
                    continue
                if mtype == _PARSE:  # decided on its text, which is read once
                    name, pos = codec.read_cstr(body, 0)
                    prep = self._prep = self._prepared.pop(offset, None) if self._prepared else None
                    if prep is None:
                        raw, pos = codec.read_cstr(body, pos)
                    else:  # read already: not copied again
                        raw, pos = b"", body.index(0, pos) + 1
                    text, refusal = self._read_sql(raw)
                    if refusal is None and name and self.tracker.in_use(name):
                        # The server refuses a name in use (42P05) and keeps the statement it had; one whose
                        # fate waits on an earlier batch could be either. Refused here, the record always
                        # knows which statement a Bind runs.
                        refusal = self._gateway_refusal(
                            f"prepared statement {name.decode('utf-8', 'replace')!r} already exists (or its Close is "
                            "not answered yet); close it, and wait for the answer, before preparing the name again",
                            "gateway:prepared-name")
                    if refusal is None:
                        refusal = self._decide(text, records, extended=True)
                    if refusal is not None:
                        self._refuse(mtype, body, offset, refusal, records, edits, text)
                        continue
                    c = self._classified
                    # One statement or none (empty: EmptyQueryResponse); more, and the server refuses the Parse
                    renames = 0 if c is None or not c.kinds & _NAMES_SQL else 2 if c.kinds & _STATEMENT_NAMES_SQL else 1
                    self.tracker.parsed(name, text, body, pos, self._take_verdict(),
                                        c.expected_tags[0] if c is not None and c.statements == 1 else None,
                                        renames=renames)
                    continue
                if mtype == _FUNCTION_CALL:
                    self._unanswered += 1  # sent on as a Query, answered with ReadyForQuery
                    _DECIDED["deny"] += 1
                    self._refuse(mtype, body, offset, _FAST_PATH_REFUSED, records, edits)
                    continue
                if mtype == _SYNC:
                    self._unanswered += 1
                    self._executed = 0
                elif mtype == _EXECUTE and self.masking is not None:
                    described = self._describe_first(body, offset, edits)
                started = self.tracker.frontend(mtype, body)
                if started is not None:
                    self._executed += mtype == _EXECUTE
                    self._starts[started.seq] = time.perf_counter_ns()
                    verdict = started.verdict
                    if started.params:
                        verdict += ',"p":[' + ",".join([_jstr(v) for v in self._masked_params(
                            started.params, started.param_types)]) + "]"
                    self._stmt_record(records, started.seq, started.kind, started.param_count, started.text, verdict)
                    if mtype == _EXECUTE:
                        expected = self._portal_expect.get(codec.read_cstr(body, 0)[0])
                        if expected is not None:
                            self._expect[started.seq] = (expected,)
                        if started.renames:  # SQL PREPARE, DEALLOCATE, DECLARE and the like, by Execute
                            if started.renames == 2:
                                self.tracker.forget_statements()
                            self._portal_expect.clear()
                        if self.masking is not None:
                            self.tracker.last().plan = described  # type: ignore[union-attr]
                elif mtype == _DESCRIBE:
                    if self.masking is not None and body[:1] == b"P":
                        learnt = self.tracker.last().plan = _Described()  # type: ignore[union-attr]
                        self._described = (codec.read_cstr(body, 1)[0], learnt)
                elif mtype == _BIND:
                    portal, pos = codec.read_cstr(body, 0)
                    self._portal_expect[portal] = self.tracker.statement(codec.read_cstr(body, pos)[0])[3]
                elif mtype == _CLOSE and len(body) >= 3 and body[0] == ord("P"):
                    self._portal_expect.pop(codec.read_cstr(body, 1)[0], None)
            if records:
                if records_out is None:
                    self._write(records)
                else:
                    records_out.extend(records)
            if edits:
                fwd = _splice(fwd, edits)
        return fwd

    def _client_failed(self, exc: Exception) -> None:
        """End the session for what went wrong with the client's messages, each kind as it should."""
        if isinstance(exc, codec.ProtocolViolation):
            self.fail(codec.fatal("08P01", f"protocol violation: {exc}", hint="the gateway closed this session; reconnect"), f"protocol violation: {exc}", "08P01")
        elif isinstance(exc, OSError):
            log.error("cannot write the recording journal: %s", exc, extra={"session_id": self.session_id})
            self.fail(
                codec.fatal("58030", "the gateway cannot record this session, so it will not run statements",
                            hint="try again later; the gateway's operator has been told"),
                "recording failed", "58030",
            )
        else:
            self._internal_error(exc)

    def _classify_first(self, fwd: bytes, msgs: list) -> bool:
        """Whether the read holds long statements to classify in a worker first (sql/offload.py); if so,
        the read is decided once they are, and the client's next bytes wait for it."""
        long = []
        size = 0
        for mtype, body, offset in msgs:
            if (mtype == _QUERY or mtype == _PARSE) and len(body) > INLINE_CHARS:
                # A text too long for the decision cache is not copied out of its message here (_prepare
                # reads it in place); a shorter one may have been decided already.
                if len(body) <= CACHE_TEXT_LIMIT:
                    raw = sql_of(mtype, body)
                    if len(raw) <= INLINE_CHARS or self.policy.decided(raw.decode(self._codec, "replace")):
                        continue
                long.append((offset, mtype, body))
                size += len(body)
        if not long:
            return False
        self._waiting = len(fwd) + size  # the read, and its messages framed from it
        if self._budget is not None and self._over_budget():
            return True  # ended: holding the most while the budget is spent
        self._held = []
        self._set_client_reading()
        self._classifying = asyncio.ensure_future(self._classify_then_relay(fwd, msgs, long))
        return True

    async def _classify_then_relay(self, fwd: bytes, msgs: list, long: list[tuple[int, int, bytes]]) -> None:
        """Read, classify and encode for the record each long statement away from the event loop (in slices
        between which other sessions run, and in a worker), then decide and relay the read as usual. A
        few sessions at a time do this (`Offload.turn`), so that what it takes in memory stays bounded."""
        try:
            await self._prepare(long)
        except Exception as exc:  # this session ends, as it should for each kind; the others go on
            self._prepared.clear()
            self._classifying = None
            self._client_failed(exc)
            return
        await self._relay_prepared(fwd, msgs)

    async def _prepare(self, long: list[tuple[int, int, bytes]]) -> None:
        offload = self._offload
        assert offload is not None
        encoding_was = self._codec
        async with offload.turn():
            for offset, mtype, body in long:
                sql = sql_view(mtype, body)
                read = await read_statement(sql, encoding_was)
                if read is None:
                    continue  # not valid in the session's encoding: _read_sql refuses it as it stands
                text, ascii_only, backslash = read
                special = backslash or not ascii_only  # what _read_sql asks of the text
                # The worker reads UTF-8: the client's bytes are sent as they are when they are that already.
                classification = await offload.classify(text, sql if ascii_only or encoding_was == "utf-8" else None)
                del sql
                self._prepared[offset] = (text, classification, special)
                self._json = (text, await json_parts(text))
        if self._codec != encoding_was:
            self._prepared.clear()  # read in another encoding than the server's now: read again, inline

    async def _relay_prepared(self, fwd: bytes, msgs: list) -> None:
        if self.ended:
            return
        records: list = []
        try:
            fwd = self._statements(fwd, msgs, records)
            if records:
                # Written in a thread (the journal's writev lets go of the interpreter): a long statement's
                # record is as long as it is. Still before the statement is forwarded.
                await asyncio.to_thread(self._write, records)
                if self._durable is not None:
                    self._unsynced = False
                    await self._durable()
        except Exception as exc:  # each kind ends the session as it should (_client_failed)
            self._client_failed(exc)
            return
        finally:
            self._prepared.clear()
            self._classifying = None
            self._waiting = 0
        del records
        if self.ended:
            return
        if fwd:
            self._upstream_out.send(fwd)
        del fwd, msgs
        self._over_budget()  # what it held is given back (and memory to the system, when it was much)
        held, self._held = self._held or [], None
        self._set_client_reading()
        if held:
            self.from_client(b"".join(held))

    def _stmt_record(self, records: list, seq: int, kind: str, nparams: int, text: str, verdict: str) -> None:
        """Append a statement's record to `records`: a line, or for the long statement last encoded off the
        hot path, the line's parts (bytes, written as they are: see _write)."""
        made = self._json
        if made is None or made[0] is not text:
            records.append(_stmt_line(self.session_id, seq, kind, nparams, text, verdict))
            return
        records.append([_stmt_head(self.session_id, seq, kind, nparams).encode(), *made[1], f"{verdict}}}\n".encode()])
        self._parts = True

    def _write(self, records: list) -> None:
        """Write records to the journal: lines, and the parts of long statements' records among them."""
        self._unsynced = True
        if not self._parts:
            self._record(records)
            return
        self._parts = False
        if self._record_parts is None:
            self._record([r if isinstance(r, str) else b"".join(r).decode("utf-8", "surrogatepass") for r in records])
            return
        out: list[bytes] = []
        lines: list[str] = []
        for r in records:
            if isinstance(r, str):
                lines.append(r)
                continue
            if lines:
                out.append("".join(lines).encode("utf-8"))
                lines = []
            out.extend(r)
        if lines:
            out.append("".join(lines).encode("utf-8"))
        self._record_parts(out)

    def _over_budget(self) -> bool:
        """Count what this session holds for inspection against the gateway-wide budget (budget.py); end
        the sessions holding the most when the total is over it. Whether this session was one of them."""
        held = self.client_framer.pending + self.server_framer.pending + self._waiting
        if self._held:
            held += sum(map(len, self._held))
        over = self._budget.hold(self, held)  # type: ignore[union-attr]
        for relay in over:
            log.warning("inspection budget of %d bytes reached: ending the session holding %d bytes",
                        relay._budget.cap, relay._budget.held(relay), extra={"session_id": relay.session_id})
            relay.fail(codec.fatal(
                "53200", "the gateway is holding too much data for inspection across its sessions, and this "
                "session held the most", hint="send smaller statements (or fetch fewer rows at a time) and reconnect"),
                "inspection budget exceeded", "53200", drain=True)
        return self.ended

    def _set_client_reading(self) -> None:
        """Read from the client unless its statements wait (for a worker, the catalog, their turn in a long
        read) or the upstream cannot take more."""
        _set_reading(self.client, self._held is not None or self._client_backlog is not None or self._upstream_full
                     or self._upstream_out.busy)

    def _set_upstream_reading(self) -> None:
        _set_reading(self.upstream, self._upstream_backlog is not None or self._client_full or self._client_out.busy)

    def _upstream_pause(self, full: bool) -> None:
        self._upstream_full = full
        self._set_client_reading()

    def _client_pause(self, full: bool) -> None:
        self._client_full = full
        self._set_upstream_reading()

    def _answered(self) -> None:
        """A ReadyForQuery: the server has reported every setting changed before it."""
        if self._unanswered:
            self._unanswered -= 1

    def _expect_query(self, seq: int) -> None:
        """What the classification of the Query just started predicts, for the tripwire."""
        c = self._classified
        if c is None:
            return
        self._expect[seq] = c.expected_tags
        if c.kinds & _NAMES_SQL:
            # SQL PREPARE, DECLARE and the like name prepared statements and portals in the namespace the
            # protocol's use: what a protocol name was bound to is no longer known.
            if c.kinds & _STATEMENT_NAMES_SQL:
                self.tracker.forget_statements()
            self._portal_expect.clear()

    def _as_predicted(self, seq: int, fin: Finished) -> bool:
        """Whether the tags of what the server ran agree with the classification (True when none is kept)."""
        expected = self._expect.pop(seq, None)
        if expected is None or fin.tag is None:
            return True
        key = (expected, fin.tag, fin.status)
        ok = _PREDICTED.get(key)
        if ok is None:
            ok = as_predicted(expected, fin.tag.split(";"), fin.status == "ok")
            if len(_PREDICTED) < 4096:  # sessions answer the same few tags to the same few statements
                _PREDICTED[key] = ok
        return ok

    def _read_sql(self, raw: bytes) -> tuple[str, str | None]:
        """A statement's text as the server will read it, and the refusal when the gateway cannot be sure
        it reads the same (None: go on and decide)."""
        prep = self._prep  # (text, classification, whether it has a backslash or non-ASCII) when read already
        if self._strict and (self._unanswered or self._executed) and (
                prep[2] if prep is not None else b"\\" in raw or not raw.isascii()):
            # Statements the server has run since its last ReadyForQuery may have changed how it reads this
            # one (standard_conforming_strings decides what a backslash does, client_encoding what a
            # non-ASCII byte is), through code no rule sees: a view over pg_settings, a trigger, a function's
            # SET clause. The server reports such changes only with ReadyForQuery; text with neither reads
            # alike under every setting, so only this text has to wait for the answer.
            return prep[0] if prep is not None else raw.decode(self._codec, "replace"), self._gateway_refusal(
                "a statement with a backslash or non-ASCII text was sent before the server had answered the "
                "statements before it (ReadyForQuery), which could change how it reads the text "
                "(standard_conforming_strings, client_encoding); send it after their results have arrived")
        if prep is not None:  # read already, off the hot path (it decoded without error)
            return prep[0], None
        if raw.isascii():  # the same characters in every encoding PostgreSQL accepts from a client
            return raw.decode("ascii"), None
        try:
            return raw.decode(self._codec), None
        except UnicodeDecodeError:
            text = raw.decode(self._codec, "replace")
            if self._strict:
                return text, self._gateway_refusal(
                    f"the statement is not valid {self.client_encoding} (the session's client_encoding); "
                    "the gateway refuses what it cannot read exactly as the server does")
            return text, None

    def _gateway_refusal(self, reason: str, rule: str = "gateway:encoding") -> str:
        """A refusal of the gateway's own (rule gateway:encoding, or `rule`), recorded like a rule's."""
        _DECIDED["deny"] += 1
        _RULES[(rule, "deny")] += 1
        self._verdict = ',"d":"deny","r":' + _json([Match(rule, "deny", reason, "", False).public()])
        return f"denied by rule {rule}: {reason}"

    def _masked_params(self, values: list[str | None], types: tuple[int, ...] = ()) -> list[str | None]:
        """Bound values for the record: content detectors apply, as they would to results, to the first
        PARAM_SCAN_BUDGET characters of the text-like ones; the values after are recorded as [unscanned].
        One Bind can carry tens of thousands of values, and searching them all would hold the event loop.
        A value the Parse typed as a number, time, boolean or uuid is recorded as it is: an id of 19
        digits is not a card number because it passes Luhn. Untyped values (OID 0) are text-like."""
        masking = self.masking
        if masking is None:
            return [v if v is None or len(v) <= PARAM_LIMIT else v[:PARAM_LIMIT] for v in values]
        budget = PARAM_SCAN_BUDGET
        out: list[str | None] = []
        for i, v in enumerate(values):
            if v is None:
                out.append(None)
            elif i < len(types) and types[i] in NOT_TEXT_OIDS:
                out.append(v[:PARAM_LIMIT])
            elif len(v) <= budget:
                budget -= len(v)
                out.append(masking.mask_text(v)[:PARAM_LIMIT])  # cut once masked: no PII is cut in two
            else:
                budget = 0
                out.append(UNSCANNED)
        return out

    def _describe_first(self, body: bytes, offset: int, edits: list[tuple[int, int, bytes]]) -> _Described:
        """Where the rows of an Execute will come from. Only a Describe of its portal sent just before it
        (with nothing but a Flush or Executes of the same portal between) says for sure: a plan kept by
        name from earlier could describe other rows by now (SQL PREPARE, DECLARE, CLOSE, a new Bind). So
        without one, the gateway sends its own Describe in front of the Execute and consumes the answer."""
        portal = codec.read_cstr(body, 0)[0]
        if self._described is not None and self._described[0] == portal:
            return self._described[1]
        learnt = self.tracker.describe_portal(portal).plan = _Described()
        edits.append((offset, 0, codec.message(b"D", b"P" + codec.cstr(portal))))
        self._described = (portal, learnt)
        return learnt

    def _columns(self, body: bytes) -> str:
        """A RowDescription's column names as JSON, for the record of the statement it describes (cached:
        a session sees the same few again and again)."""
        if len(self._column_names) >= 256:
            self._column_names.clear()
        names = self._column_names[body] = _json([f.name for f in codec.row_description(body)])
        return names

    def _sample(self, run: bytes | memoryview) -> None:
        """The first rows of a result, as the client gets them (masked), kept for its record."""
        entry = self.tracker.current()
        if entry is None:
            return
        if entry.sample is None:
            entry.sample = []
        pos, n = 0, len(run)
        while pos < n and len(entry.sample) < self._sample_rows and self._sample_budget > 0:
            length = int.from_bytes(run[pos + 1:pos + 5], "big")
            if length - 4 > self._sample_budget:  # a row over what is left: none is kept after it
                self._sample_budget = 0
                return
            body = bytes(run[pos + 5:pos + 1 + length])
            entry.sample.append([None if v is None else _sample_value(v) for v in codec.data_row_raw(body)])
            self._sample_budget -= len(body)
            pos += 1 + length

    def _mask_rows(self, end: int, start: int, edits: list[tuple[int, int, bytes]], data: bytes) -> bytes | None:
        """data[start:end], a run of DataRows, masked in one call with the plan of their result; the
        masked run, or None when nothing in it changed."""
        entry = self.tracker.current()
        plan = entry.plan if entry is not None else UNSEEN
        if isinstance(plan, _Described):
            plan = plan.plan
        if plan is UNSEEN:
            raise _Unmaskable("a result arrived whose columns the gateway has not seen described")
        if plan is not None:
            try:
                new = plan.mask_run(data, start, end)  # type: ignore[union-attr]
            except ValueError as exc:
                raise codec.ProtocolViolation(str(exc)) from None
            if new is not None:
                edits.append((start, end - start, new))
            return new
        return None

    def _mask(self, mtype: int, body: bytes, offset: int, edits: list[tuple[int, int, bytes]]) -> None:
        """Masking, on the way back: plans from RowDescriptions, and COPY data."""
        masking = self.masking
        assert masking is not None
        if mtype == _ROW_DESCRIPTION or mtype == _NO_DATA:
            described = self.tracker.described()
            if described is None:  # a simple Query's statement: its rows follow
                if (entry := self.tracker.current()) is not None:
                    entry.plan = masking.plan(body) if mtype == _ROW_DESCRIPTION else None
                return
            if isinstance(described.plan, _Described):  # a portal's (a statement's is not what runs)
                # A portal's RowDescription has the formats its rows come in, as Bind chose them.
                described.plan.plan = masking.plan(body) if mtype == _ROW_DESCRIPTION else None
            if described.hidden:
                edits.append((offset, 5 + len(body), b""))
        elif mtype == _COPY_OUT:
            if body[:1] == b"\x01":
                raise _Unmaskable("binary COPY output cannot be masked; use COPY in text or CSV format")
            self._copy_out = True
        elif mtype == _COPY_DATA and self._copy_out:
            new = masking.mask_copy_line(body)
            if new is not None:
                edits.append((offset, 5 + len(body), codec.message(b"d", new)))
        elif mtype == _COMMAND_COMPLETE:
            self._copy_out = False
            entry = self.tracker.current()
            if entry is not None:
                plan = entry.plan.plan if isinstance(entry.plan, _Described) else entry.plan
                if isinstance(plan, RowMasker):
                    plan.take_counts(masking.totals)
                if entry.kind == _QUERY:  # the next statement of the Query has rows of its own
                    entry.plan = UNSEEN

    def _decide(self, statement: str, records: list[str], extended: bool = False) -> str | None:
        """None to let the statement through, else the refusal message. Shadow rules that matched are
        recorded as events: what they would have done, enforced by nothing."""
        prep, self._prep = self._prep, None
        decision = self.policy.decide(statement, prep[1] if prep is not None and prep[0] is statement else None)
        self._classified = decision.classification
        c = decision.classification
        if self._on_ddl is not None and (c.changes_schema or (self._ddl and "transaction" in c.kinds)):
            # Told by the classification, not the command tag (CREATE TABLE AS answers SELECT). Catalogs are
            # read again once the server has answered (ReadyForQuery): after the DDL for this session, and
            # after the COMMIT or ROLLBACK that ends its transaction for every other session.
            self._ddl = self._ddl or c.changes_schema
            self._ddl_sent = True
        if decision.action == "allow" and not decision.matches:
            _DECIDED["allow"] += 1
            return None
        for m in decision.matches:
            _RULES[(m.rule, "shadow" if m.shadow else m.action)] += 1
            if m.shadow:
                records.append(self._event_line("guardrail.shadow", f"would {m.action}",
                                                f"{m.rule}: {m.reason} in {statement[:500]!r}"))
        if decision.action == "review" and self._review is not None:
            if extended and _PLACEHOLDER.search(statement):
                # An approval binds the exact input; here the values come later, in Bind, unseen by the approver.
                refusal: str | None = (
                    f"{decision.error_message}; a statement with parameters that needs review runs through "
                    "`wardgate exec` (or POST /api/exec with params), where the review binds the values too")
            else:
                refusal = self._review(statement, decision)
            verdict = "review" if refusal is not None else "approved"
            _DECIDED[verdict] += 1
            self._verdict = _verdict(verdict, decision)
            return refusal
        if decision.action == "allow":
            _DECIDED["shadow"] += 1
            self._verdict = _verdict("shadow", decision)  # only shadow rules matched
            return None
        _DECIDED["deny"] += 1
        self._verdict = _verdict("deny", decision)
        return decision.error_message

    def _take_verdict(self) -> str:
        verdict, self._verdict = self._verdict, ""
        return verdict

    def _refuse(self, mtype: int, body: bytes, offset: int, message: str, records: list,
                edits: list[tuple[int, int, bytes]], text: str | None = None) -> None:
        """Refuse a statement by sending upstream, in its place, text that fails to parse with a marker.

        PostgreSQL then does exactly what it does for any statement that fails: the error comes at that
        point of the stream (after everything sent before it), the transaction is marked failed, and
        in the extended protocol the rest of the batch is skipped until Sync. On the way back the
        gateway swaps the syntax error for its own refusal (SQLSTATE 42501)."""
        sid = self.session_id
        marker = f"wardgate_refused_{secrets.token_hex(8)}"
        self._refusals[marker] = message
        if mtype == _PARSE:
            name, pos = codec.read_cstr(body, 0)
            raw, pos = codec.read_cstr(body, pos)
            if text is None:
                text = raw.decode(self._codec, "replace")
            seq = self.tracker.next_seq()
            verdict = self._take_verdict()
            self._stmt_record(records, seq, "extended", 0, text, verdict)
            records.append(_done_line(sid, seq, "denied", None, None, None, "42501", message))
            # Its name still maps to the real text (and the refusal), for the records of its Executes.
            self.tracker.parsed(name, text, body, pos, verdict, refused=True)
            replacement = codec.message(b"P", codec.cstr(name) + codec.cstr(marker) + b"\x00\x00")
        else:
            if mtype == _QUERY and text is not None:  # read already: not read again
                started = Started(self.tracker.start_query(text), text, 0, "simple")
            else:
                started = self.tracker.frontend(mtype, body)  # type: ignore[assignment]
                assert started is not None
            self._refused_queries[started.seq] = message
            self._starts[started.seq] = time.perf_counter_ns()
            verdict = self._take_verdict() if mtype == _QUERY else ',"d":"deny","r":[]'
            self._stmt_record(records, started.seq, started.kind, started.param_count, started.text, verdict)
            text = started.text
            replacement = codec.message(b"Q", codec.cstr(marker))
        edits.append((offset, 5 + len(body), replacement))
        outcome = "review" if verdict.startswith(',"d":"review"') else "denied"
        records.append(self._event_line("statement.refused", outcome, f"{message} in {text[:500]!r}"))

    def _event_line(self, kind: str, outcome: str, detail: str) -> str:
        """An audit event about this session, as a journal line."""
        return _json(event(kind, outcome, user=self.user, agent=self.agent, source=f"session:{self.session_id}",
                           detail=detail)) + "\n"

    def _refusal_of(self, error_body: bytes) -> tuple[str, str] | None:
        """(marker, message) when an upstream error is the echo of one of our refusals."""
        if b"wardgate_refused_" not in error_body:
            return None
        text = codec.parse_error_fields(error_body).get("M", "")
        for marker, message in self._refusals.items():
            if marker in text:
                return marker, message
        return None

    # -- upstream -> client

    def _simple_answer(self, msgs: list, fwd: bytes) -> bytes | None:
        """The most common read of all, handled in one pass: the whole answer to the only Query in
        flight (RowDescription, DataRows, CommandComplete, ReadyForQuery). The bytes to forward, or None
        when the read is anything else, for the general loop (which does the same, message by message)."""
        n = len(msgs)
        if not (3 <= n <= 4 and msgs[0][0] == _ROW_DESCRIPTION and msgs[-1][0] == _READY
                and msgs[-2][0] == _COMMAND_COMPLETE and (n == 3 or msgs[1][0] == _ROW_RUN)):
            return None
        tracker = self.tracker
        entry = tracker.sole_query()
        if entry is None or self._refused_queries or self._refusals or self._sample_budget > 0:
            return None
        description = msgs[0][1]
        masking = self.masking
        if masking is not None:
            plan = entry.plan = masking.plan(description)
            if plan is not None:
                if n == 4:
                    _, end, start = msgs[1]
                    try:
                        new = plan.mask_run(fwd, start, end)
                    except ValueError as exc:
                        raise codec.ProtocolViolation(str(exc)) from None
                    if new is not None:
                        fwd = b"".join((fwd[:start], new, fwd[end:]))
                plan.take_counts(masking.totals)
            self._copy_out = False
        if self._results:
            names = self._column_names.get(description)
            entry.cols = names if names is not None else self._columns(description)
        self._outcomes([self._outcome(tracker.finish_sole(msgs[-2][1], msgs[-1][1]))])
        self._answered()
        return fwd

    def _outcomes(self, lines: list[str]) -> None:
        """Record statements' outcomes: deferred (written with the next write, or after OUTCOME_DELAY),
        or with durability = "fsync" written now, the answer held until they are on disk."""
        if self._durable is None:
            self._defer(lines)
            return
        self._record(lines)
        self._outcomes_unsynced = True

    def _answer_when_durable(self, out: list[bytes]) -> None:
        """durability = "fsync": send the client `out` once the outcomes it answers are on disk; the
        upstream is not read meanwhile (what it sent waits in the backlog, taken after)."""
        self._outcomes_unsynced = False
        self._answer_waits = True
        if self._upstream_backlog is None:
            self._upstream_backlog = deque()
        self._set_upstream_reading()
        self._durable().add_done_callback(lambda fut: self._answer_durable(fut, out))  # type: ignore[misc]

    def _answer_durable(self, fut: asyncio.Future[None], out: list[bytes]) -> None:
        self._answer_waits = False
        if self.ended:
            return
        if fut.cancelled() or fut.exception() is not None:
            self._client_failed(fut.exception() or OSError("the journal's flush was cancelled"))  # 58030
            return
        self._client_out.write(out)
        self._take_upstream_pieces()  # what came meanwhile; then reading goes on

    def _outcome(self, fin: Finished) -> str:
        """A finished statement's record, with its duration."""
        if self._expect and not self._as_predicted(fin.seq, fin):
            what = f"the server answered {fin.tag!r}, which its classification did not predict"
            self._read_past.append(f"statement {fin.seq}: {what}")
            fin = Finished(fin.seq, "differential", fin.tag, fin.rows, "42501",
                           f"the gateway was read past: {what}", fin.cols, fin.sample)
        t0 = self._starts.pop(fin.seq, None)
        ms = None
        if t0 is not None:
            elapsed = time.perf_counter_ns() - t0
            _LATENCY.observe(elapsed * 1e-9)
            ms = f"{elapsed // 1000}e-3"
        return _done_line(self.session_id, fin.seq, fin.status, ms, fin.rows, fin.tag, fin.error_code,
                          fin.error_message, "" if fin.cols is None else _result(fin))

    def from_upstream(self, data: bytes) -> None:
        if self.ended:
            return
        if self._upstream_backlog is not None:
            self._upstream_backlog.append([data, 0])
            return
        if len(data) > PIECE and self.masking is not None:
            # Masking costs up to a microsecond a byte (values dense with what detectors look for): a long
            # read is masked in pieces, with other sessions served between them (see slices.take_pieces).
            self._upstream_backlog = deque([[data, 0]])
            self._set_upstream_reading()
            self._take_upstream_pieces()
            return
        self._upstream_read(data)

    def _take_upstream_pieces(self) -> None:
        backlog = self._upstream_backlog
        if backlog is None or self.ended:
            return
        if self._answer_waits:
            return  # taken again once the answers before are on disk (_answer_durable)
        out = self._to_client = []  # what the pieces forward, written once (a write is a system call)
        try:
            done = take_pieces(backlog, self._upstream_read, lambda: self.ended)
        finally:
            self._to_client = None
        if out and not self.ended:
            if self._outcomes_unsynced:
                self._answer_when_durable(out)
                return
            self._client_out.write(out)
        if done:
            self._upstream_backlog = None
            _resume_later(self._set_upstream_reading)
        else:
            asyncio.get_running_loop().call_soon(self._take_upstream_pieces)

    def _upstream_read(self, data: bytes) -> None:
        if self._catalog_answer is not None:
            data = self._catalog_read(data)
            if not data or self.ended:
                return
        try:
            fwd, msgs = self.server_framer.feed(data)
            rest = self.server_framer.rest and self.server_framer.take_rest()  # after a long message: next
            if self._budget is not None and self._over_budget():
                return
            if msgs and (simple := self._simple_answer(msgs, fwd)) is not None:
                fwd = simple
            elif msgs:
                records = []
                edits: list[tuple[int, int, bytes]] = []
                masking = self.masking
                tracker = self.tracker
                for mtype, body, offset in msgs:
                    if mtype == _ROW_RUN:  # (type, end, start): a run of DataRows
                        masked = self._mask_rows(body, offset, edits, fwd) if masking is not None else None  # type: ignore[arg-type]
                        if self._sample_budget > 0:  # read in place: a long row is not copied to be looked at
                            self._sample(masked if masked is not None else memoryview(fwd)[offset:body])  # type: ignore[misc]
                        continue
                    if mtype == _PARAMETER_STATUS:
                        self._parameter(*codec.parse_parameter_status(body))
                        continue
                    if masking is not None and mtype in _MASK_TYPES:
                        self._mask(mtype, body, offset, edits)
                    refusal = None
                    if masking is not None and mtype in _REPORTS and mtype != _ERROR:
                        masked_report = mask_message(mtype, body, masking, self._codec)
                        if masked_report is not None:
                            edits.append((offset, 5 + len(body), masked_report))
                            continue
                    if mtype == _ROW_DESCRIPTION:
                        if self._results:
                            names = self._column_names.get(body)
                            if names is None:
                                names = self._columns(body)
                            entry = tracker.current()
                            if entry is not None:
                                entry.cols = names
                        continue
                    if mtype == _READY:
                        self._answered()
                        if self._ddl_sent:
                            self._ddl_sent = False
                            self._on_ddl()  # type: ignore[misc]
                        finished = tracker.ready(body)
                    elif mtype == _COMMAND_COMPLETE:
                        fin = tracker.complete(body)
                        if fin is None:
                            continue
                        finished = [fin]
                    elif mtype == _ERROR:
                        refusal = self._refusal_of(body)  # the echo of a refusal marker: replaced whole
                        fatal = False
                        if refusal is not None:
                            edits.append((offset, 5 + len(body), codec.error_response(
                                "42501", refusal[1], hint="refused by the Wardgate gateway; see `wardgate policy check`")))
                        else:
                            length = 5 + len(body)
                            if masking is not None and (masked := mask_message(mtype, body, masking, self._codec)):
                                body = masked[5:]  # the record keeps what the client gets
                                edits.append((offset, length, masked))
                            if codec.is_fatal(body):
                                if edits and edits[-1][0] == offset:
                                    edits.pop()
                                edits.append((offset, length, self._name_the_connection(body)))
                                fatal = True
                        finished = tracker.fatal(body) if fatal else tracker.backend(mtype, body)
                    else:
                        finished = tracker.backend(mtype, body)
                    for fin in finished:
                        refused = self._refused_queries.pop(fin.seq, None) if self._refused_queries else None
                        if refused is not None:  # a Query (or function call) refused as a whole
                            fin = Finished(fin.seq, "denied", fin.tag, fin.rows, "42501", refused)
                        elif refusal is not None:  # an Execute in the batch of a refused Parse: never ran
                            fin = Finished(fin.seq, "skipped", fin.tag, fin.rows, "42501", refusal[1])
                        records.append(self._outcome(fin))
                if records:
                    self._outcomes(records)
                if edits:
                    fwd = _splice(fwd, edits)
                if self._refusals and not self.tracker.in_flight:
                    self._refusals.clear()
            if self._read_past:
                self._tripped()
                return
        except codec.ProtocolViolation as exc:
            self.fail(codec.fatal("08P01", f"connection {self.connection!r} sent invalid protocol data: {exc}"), f"upstream protocol violation: {exc}", "08P01")
            return
        except _ReadPast as exc:
            # Something the rules could not see (server code) changed how the server reads SQL: what
            # follows would be read differently by PostgreSQL than by the gateway, so nothing more runs.
            message, reason = exc.args
            self.fail(codec.fatal("42501", message), reason, "42501")
            return
        except _Unmaskable as exc:
            # Fail closed: nothing unmasked leaves the gateway.
            self.fail(codec.fatal("42501", f"the gateway cannot mask this result: {exc}"), f"unmaskable result: {exc}", "42501")
            return
        except Exception:
            self._internal_error()
            return
        if fwd:
            out = self._to_client
            if out is not None:
                out.append(fwd)
            elif self._outcomes_unsynced and self._durable is not None:
                self._upstream_backlog = deque([[rest, 0]] if rest else [])
                self._answer_when_durable([fwd])
                return
            else:
                self._client_out.send(fwd)
        if rest and not self.ended:
            self._upstream_read(rest)

    def _read_catalog(self, data: bytes) -> None:
        """Read the catalog again (DDL ran) before the client's `data`, which waits until it is read: its
        statements are decided on the catalog as it is now."""
        self._held = [data]
        self._catalog_answer = bytearray()
        self._catalog_rows = []
        self._catalog_failed = False
        self._upstream_out.send(codec.message(b"Q", codec.cstr(self.masking.CATALOG_SQL)))  # type: ignore[union-attr]

    def _catalog_read(self, data: bytes) -> bytes:
        """Upstream's answer to the catalog query, consumed; what follows its ReadyForQuery is returned."""
        buf = self._catalog_answer
        assert buf is not None
        buf += data
        pos, n, rows, other = 0, len(buf), self._catalog_rows, []
        while n - pos >= 5:
            length = int.from_bytes(buf[pos + 1:pos + 5], "big")
            if length < 4 or length > (1 << 30):
                self.fail(codec.fatal("08P01", f"connection {self.connection!r} sent invalid protocol data"),
                          "upstream protocol violation while reading the catalog", "08P01")
                return b""
            if n - pos < 1 + length:
                break
            mtype, body = buf[pos], bytes(buf[pos + 5:pos + 1 + length])
            pos += 1 + length
            if mtype == _DATA_ROW:
                rows.append(tuple(None if v is None else v.decode("utf-8", "replace") for v in codec.data_row_raw(body)))
            elif mtype == _ERROR:
                self._catalog_failed = True
            elif mtype in _ASYNC:  # notices, notifications, settings: the client's, after the catalog
                other.append(bytes(buf[pos - 1 - length:pos]))
            elif mtype == _READY:
                rest = bytes(buf[pos:])
                self._catalog_answer = None
                self._catalog_rows = []
                if self._catalog_failed:  # decided on the catalog as read before; names it lacks are refused as unresolved
                    self.masking.catalog.keep()  # type: ignore[union-attr]
                else:
                    self.masking.load_catalog(rows)  # type: ignore[union-attr]
                    self.policy.forget()
                held, self._held = self._held or [], None
                self.from_client(b"".join(held))
                return b"".join(other) + rest
        del buf[:pos]
        return b"".join(other)

    def _tripped(self) -> None:
        """The server ran something other than what the gateway classified: the gateway was read past.
        Nothing more runs in this session, and the alarm is raised in the audit chain."""
        detail = "; ".join(self._read_past)[:2000]
        log.error("read past: %s", detail, extra={"session_id": self.session_id})
        try:
            self._record([self._event_line("statement.differential", "high", f"the server ran what the gateway did "
                                           f"not classify ({detail}); the session was ended")])
        except OSError:
            log.exception("cannot record the differential of session %s", self.session_id)
        self.fail(codec.fatal("42501", "the server ran a statement other than the one the gateway classified; the "
                              "session is closed and the security team alerted"),
                  "read past: the server's command tags disagreed with the classification", "42501")

    def _follow_encoding(self, client_encoding: str) -> None:
        """Read client text from now on as the server converts `client_encoding` (where no rule reads
        statements, an encoding the gateway does not read exactly is shown as UTF-8, for the record)."""
        self.client_encoding = client_encoding
        exact = encoding.refusal(client_encoding) is None
        self.tracker.codec = self._codec = encoding.codec(client_encoding) if exact else "utf-8"

    def _parameter(self, name: str, value: str) -> None:
        """A setting the server reports (ParameterStatus). Those that decide how it reads SQL are followed:
        standard_conforming_strings must stay on, and client_encoding must stay one the gateway reads."""
        if name == "client_encoding":
            refused = encoding.refusal(value)
            if refused is not None and self._strict:
                raise _ReadPast(f"the session's client_encoding changed to {value}: {refused}; the session is closed",
                                f"client_encoding changed to {value}")
            self._follow_encoding(value)
        elif name == "standard_conforming_strings" and value != "on" and self._strict:
            raise _ReadPast("the session turned standard_conforming_strings off, which the gateway's rules cannot "
                            "read safely; the session is closed", "standard_conforming_strings turned off")

    def _name_the_connection(self, body: bytes) -> bytes:
        """Upstream is ending the session: say which connection, so the client's error is clear."""
        fields = codec.parse_error_fields(body)
        self.upstream_fatal = fields.get("C", "08006")  # the SQLSTATE the session ends with, in its record
        return codec.error_response(
            fields.get("C", "08006"), f"connection {self.connection!r}: {fields.get('M', 'closed by the server')}",
            severity="FATAL", detail=fields.get("D"), hint=fields.get("H"),
        )

    # -- endings

    def _internal_error(self, exc: BaseException | None = None) -> None:
        """A fault of the gateway's own: end this session clearly (fail closed); others carry on."""
        log.error("internal error in session %s", self.session_id, extra={"session_id": self.session_id},
                  exc_info=exc or True)
        self.fail(codec.fatal("XX000", "internal gateway error; this session is closed",
                              hint="reconnect; the gateway's log has the details"), "internal gateway error", "XX000")

    def _client_lost(self, exc: Exception | None) -> None:
        if self.tracker.in_flight and not self.ended and self._on_abandon is not None:
            # Nobody will read the result: stop the work upstream instead of letting it run on.
            self._on_abandon(self)
        self.upstream.close()
        self.end("client closed" if self._closed_by_client() else "client disconnected")

    def _upstream_lost(self, exc: Exception | None) -> None:
        if not self.ended and not self.terminating and not self.upstream_fatal:
            STATS.upstream_errors[self.connection] += 1
            self.client.write(
                codec.fatal("08006", f"the connection to {self.connection!r} was lost",
                            hint="reconnect; the gateway serves new sessions once the database is back")
            )
        if not self._draining:
            self.client.close()
        # After the client's Terminate the server closing is the end the client asked for, whichever side is seen first
        self.end("client closed" if self._closed_by_client() else "upstream closed the connection", self.upstream_fatal)

    def _closed_by_client(self) -> bool:
        """The client ended the session with a Terminate: one read already, or the last of the bytes it
        sent that the session holds unread (its socket can be seen closed before they are taken)."""
        if self.terminating:
            return True
        waiting = self._held[-1] if self._held else self._client_backlog[-1][0] if self._client_backlog else b""
        return waiting.endswith(_TERMINATE_MESSAGE)

    def fail(self, error: bytes, reason: str, code: str | None = None, *, drain: bool = False) -> None:
        """Send `error` to the client and end the session. With `drain`, what the client goes on sending is
        read and dropped for a few seconds before its connection is closed: a client still writing a long
        message would otherwise lose the error to the reset that closing on unread bytes causes."""
        if self.ended:
            return
        self.client.write(error)
        if drain and self.client.transport is not None and self.client_framer.incomplete:
            self._draining = self.client_framer.incomplete
            asyncio.get_running_loop().call_later(DRAIN_SECONDS, self.client.close)
        else:
            self.client.close()
        self.upstream.close()
        self.end(reason, code)

    def end(self, reason: str, code: str | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        if self._classifying is not None:
            self._classifying.cancel()
        self._on_end(self, reason if code is None else f"{reason} ({code})", code)
        # Let go of what the session held, now: the relay sits in reference cycles with its protocols
        # (their callbacks), which only a full garbage collection breaks, and it may hold long statements
        # (framed, read, encoded for the record, prepared under a name).
        self._held = None
        self._json = None
        self._prepared.clear()
        self._catalog_answer = None
        self.client_framer.clear()
        self.server_framer.clear()
        self._upstream_out.clear()
        self._client_out.clear()
        self.tracker.clear()
        if self._budget is not None:
            self._budget.release(self)  # after all the above: memory may go back to the system
