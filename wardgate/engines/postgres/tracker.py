"""Follows statements through a session: which text ran, and how it ended.

Sans-IO. The relay hands it the frontend messages it inspected (Query, Parse, Bind, Execute,
Close, Sync, FunctionCall) and the backend messages (CommandComplete, EmptyQueryResponse,
PortalSuspended, ErrorResponse, ReadyForQuery). It returns what started and what finished, in
protocol order, so the recorder can write a statement before it is forwarded.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

from .codec import ProtocolViolation, parse_error_fields, read_cstr, rows_from_tag

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")

Q, P, B, E, C, S, F, DESCRIBE = (ord(c) for c in "QPBECSFD")
CMD_COMPLETE, EMPTY, SUSPENDED, ERROR, READY, PARSE_COMPLETE, CLOSE_COMPLETE = (ord(c) for c in "CIsEZ13")
FRONTEND_INSPECT = b"QPBECSF"
BACKEND_INSPECT = b"CIsEZ13"
_UNKNOWN_STATEMENT = ("<unknown prepared statement>", (), "", None, 0)
_PORTAL: tuple = ("<portal>", (), "", None, 0)  # a portal's Close waiting among the statements' changes
_REFUSED = ord("p")  # a change: a Parse the gateway refused (the server gets a text that fails, and keeps nothing)
PARAM_LIMIT = 1000  # characters of a bound value kept in the record
# Bytes of it read: more than is kept, so that the detectors see whole any value (an email is at most
# 254 characters) that reaches into what is kept; the record cuts it to PARAM_LIMIT once masked.
PARAM_READ = PARAM_LIMIT + 256
_TAGS: dict[bytes, tuple[str, int | None]] = {}  # CommandComplete body -> (tag, rows): sessions repeat a few
# A statement's masking plan before the server has described its result: rows that arrive while it is
# still this were never described, and are refused rather than guessed at.
UNSEEN = object()


@dataclass(slots=True)
class Started:
    seq: int
    text: str
    param_count: int
    kind: str  # "simple", "extended" or "function"
    verdict: str = ""  # the decision fields of its record (see session._verdict); "" when no rule matched
    params: list[str | None] | None = None  # an Execute's bound values (text; binary ones described)
    param_types: tuple[int, ...] = ()  # their type OIDs as the Parse declared them (0, or absent: unspecified)
    renames: int = 0  # what running it renames: 1 portals (DECLARE, CLOSE), 2 statements too (PREPARE, DEALLOCATE, DISCARD)


@dataclass(slots=True)
class Finished:
    seq: int
    status: str  # "ok", "error" or "skipped"
    tag: str | None = None
    rows: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    cols: str | None = None  # the result's column names, as JSON text
    sample: list[list[str | None]] | None = None  # its first rows, as sent to the client


@dataclass(slots=True)
class _Pending:
    seq: int
    kind: int  # Q, E, F, S (a Sync boundary with no statement) or DESCRIBE
    tags: list[str] | None = None
    rows: int | None = None
    error: dict[str, str] | None = None
    plan: object = UNSEEN  # the relay's masking plan for this statement's rows (DESCRIBE: what it learns)
    target: tuple[int, bytes] | None = None  # DESCRIBE: (ord('S') or ord('P'), name)
    hidden: bool = False  # DESCRIBE: sent by the gateway itself; its answer is not the client's
    cols: str | None = None
    sample: list[list[str | None]] | None = None


class StatementTracker:
    __slots__ = ("_seq", "_statements", "_changes", "_portals", "_pending", "transaction_status", "track_describe",
                 "codec")

    def __init__(self, track_describe: bool = False) -> None:
        self._seq = 0
        # name -> (text, parameter types, verdict, expected command tags): the prepared statements the
        # server holds. A Parse or Close changes them only when the server answers it (ParseComplete,
        # CloseComplete): one it refuses (a name in use, 42P05) or skips (after an error, up to the
        # Sync) changes nothing there, so it must change nothing here either. Until answered, the
        # change waits in `_changes`, which the messages sent after it see (the server will have
        # made it by the time it reads them, or skipped those too).
        self._statements: dict[bytes, tuple[str, tuple[int, ...], str, object, int]] = {}
        self._changes: deque[tuple[int, bytes, tuple[str, tuple[int, ...], str, object, int] | None]] = deque()
        # name -> (text, values, verdict, parameter types, what running it renames)
        self._portals: dict[bytes, tuple[str, list[str | None], str, tuple[int, ...], int]] = {}
        self._pending: deque[_Pending] = deque()
        # Follow Describe answers too (needed to know which result a RowDescription describes).
        self.track_describe = track_describe
        self.transaction_status = b"I"
        self.codec = "utf-8"  # the Python codec of the session's client_encoding, for text in the record

    # -- frontend

    def frontend(self, mtype: int, body: bytes) -> Started | None:
        if mtype == Q:
            text, _ = read_cstr(body, 0)
            return self._start(Q, text.decode(self.codec, "replace"), 0, "simple")
        if mtype == P:
            name, pos = read_cstr(body, 0)
            text, pos = read_cstr(body, pos)
            self.parsed(name, text.decode(self.codec, "replace"), body, pos)
            return None
        if mtype == B:
            portal, pos = read_cstr(body, 0)
            stmt, pos = read_cstr(body, pos)
            values: list[str | None] = []
            try:
                nformats = (body[pos] << 8) | body[pos + 1]
                formats = body[pos + 2:pos + 2 + 2 * nformats]  # int16 each: 1 (binary) is b"\x00\x01"
                pos += 2 + 2 * nformats
                nparams = (body[pos] << 8) | body[pos + 1]
                pos += 2
                for i in range(nparams):
                    (length,) = _I32.unpack_from(body, pos)
                    pos += 4
                    if length < 0:
                        values.append(None)
                        continue
                    binary = formats[(2 * i + 1) if nformats > 1 else 1] == 1 if nformats else False
                    values.append(f"<binary, {length} bytes>" if binary else
                                  body[pos:pos + min(length, PARAM_READ)].decode(self.codec, "replace"))
                    pos += length
            except (struct.error, IndexError):
                pass  # upstream will reject the malformed Bind; the statement is still recorded
            text, types, verdict, _, renames = self.statement(stmt)
            self._portals[portal] = (text, values, verdict, types, renames)
            return None
        if mtype == E:
            portal, _ = read_cstr(body, 0)
            text, values, verdict, types, renames = self._portals.get(portal, ("<unknown portal>", [], "", (), 0))
            started = self._start(E, text, len(values), "extended", verdict)
            started.params = values
            started.param_types = types
            started.renames = renames
            return started
        if mtype == S:
            self._pending.append(_Pending(-1, S))
            if self._changes:
                self._changes.append((S, b"", None))  # where the server resumes after an error
            return None
        if mtype == DESCRIBE:
            if self.track_describe and len(body) >= 2:
                self._pending.append(_Pending(-1, DESCRIBE, target=(body[0], read_cstr(body, 1)[0])))
            return None
        if mtype == C:
            if len(body) < 2:
                raise ProtocolViolation("Close message is truncated")
            name, _ = read_cstr(body, 1)
            if body[0] == ord("S"):
                self._changes.append((C, name, None))
            else:
                self._portals.pop(name, None)
                self._changes.append((C, name, _PORTAL))  # its CloseComplete is answered in turn too
            return None
        if mtype == F:
            oid = _U32.unpack_from(body, 0)[0] if len(body) >= 4 else 0
            return self._start(F, f"<function call oid={oid}>", 0, "function")
        return None

    def parsed(self, name: bytes, text: str, body: bytes, pos: int, verdict: str = "", expect: object = None,
               *, refused: bool = False, renames: int = 0) -> None:
        """A Parse whose name and text the caller has read already; `pos` is where its parameter types start.
        `expect`: the command tags its Executes should end with (the relay's tripwire). `refused`: the
        gateway sends it on as a text that fails, so the name means it only to the rest of its batch
        (whose Executes the server skips, and the record shows as refused)."""
        nparams = _I16.unpack_from(body, pos)[0] if len(body) >= pos + 2 else 0
        types: tuple[int, ...] = ()
        if 0 < nparams and len(body) >= pos + 2 + 4 * nparams:
            types = struct.unpack_from(f"!{nparams}I", body, pos + 2)
        self._changes.append((_REFUSED if refused else P, name, (text, types, verdict, expect, renames)))

    def statement(self, name: bytes) -> tuple[str, tuple[int, ...], str, object, int]:
        """What `name` will be when the server reads a message sent now: the last Parse or Close of it
        not yet answered, else what the server holds."""
        later_batch = False
        for kind, n, entry in reversed(self._changes):
            if kind == S:
                later_batch = True
            elif n == name and entry is not _PORTAL and not (kind == _REFUSED and later_batch):
                return entry if entry is not None else _UNKNOWN_STATEMENT
        return self._statements.get(name, _UNKNOWN_STATEMENT)

    def in_use(self, name: bytes) -> bool:
        """Whether a Parse of `name` sent now could find the name taken: it is defined, or being defined,
        or its Close waits on an earlier batch (which an error there would skip)."""
        later_batch = False
        for kind, n, entry in reversed(self._changes):
            if kind == S:
                later_batch = True
            elif n == name and entry is not _PORTAL and kind != _REFUSED:
                return entry is not None or later_batch
        return name in self._statements

    def forget_statements(self) -> None:
        """SQL PREPARE, DEALLOCATE or DISCARD is to run (by Query or Execute): the names in the protocol's
        namespace are no longer known, those made by Parses still unanswered included (they run first)."""
        self._statements.clear()
        changes = self._changes
        for i, (kind, name, entry) in enumerate(changes):
            if entry is not None and entry is not _PORTAL and kind != S:
                changes[i] = (kind, name, _UNKNOWN_STATEMENT)

    def _answered(self, kind: int) -> None:
        """The server answered the oldest Parse (or Close) waiting: it now holds what that made."""
        changes = self._changes
        while changes and changes[0][0] == S:
            changes.popleft()
        if changes and changes[0][0] == kind:
            _, name, entry = changes.popleft()
            if entry is None:
                self._statements.pop(name, None)
            elif entry is not _PORTAL:
                self._statements[name] = entry

    def _skipped(self) -> None:
        """An error: the server skips what waits up to the next Sync."""
        changes = self._changes
        while changes and changes[0][0] != S:
            changes.popleft()

    def last(self) -> _Pending | None:
        return self._pending[-1] if self._pending else None

    def describe_portal(self, portal: bytes) -> _Pending:
        """A Describe of `portal` the gateway sends itself, in front of its Execute, to learn what that
        Execute will return; its answer is consumed, not forwarded."""
        pending = _Pending(-1, DESCRIBE, target=(ord("P"), portal), hidden=True)
        self._pending.append(pending)
        return pending

    def described(self) -> _Pending | None:
        """Upstream sent RowDescription or NoData: the Describe it answers, or None if it belongs
        to the current statement (a simple Query)."""
        head = self._head()
        if head is not None and head.kind == DESCRIBE:
            self._pending.popleft()
            return head
        return None

    def next_seq(self) -> int:
        """A sequence number for a statement the gateway answers itself (it never reaches upstream)."""
        self._seq += 1
        return self._seq

    def start_query(self, text: str) -> int:
        """A simple Query the relay has decoded already: its sequence number."""
        self._seq += 1
        self._pending.append(_Pending(self._seq, Q))
        return self._seq

    def _start(self, kind: int, text: str, nparams: int, label: str, verdict: str = "") -> Started:
        self._seq += 1
        self._pending.append(_Pending(self._seq, kind))
        return Started(self._seq, text, nparams, label, verdict)

    # -- backend

    def backend(self, mtype: int, body: bytes) -> list[Finished]:
        if mtype == READY:
            return self.ready(body)
        if mtype == PARSE_COMPLETE or mtype == CLOSE_COMPLETE:
            self._answered(P if mtype == PARSE_COMPLETE else C)
            return []
        if mtype == CMD_COMPLETE or mtype == EMPTY or mtype == SUSPENDED:
            fin = self.complete(body, mtype)
            return [] if fin is None else [fin]
        if mtype == ERROR:
            return self.error(body)
        return []

    def complete(self, body: bytes, mtype: int = CMD_COMPLETE) -> Finished | None:
        """CommandComplete (or EmptyQueryResponse, PortalSuspended): an Execute is finished by it."""
        head = self._head()
        if head is None:
            return None
        if mtype == CMD_COMPLETE:
            known = _TAGS.get(body)
            if known is None:
                end = body.find(b"\x00")
                tag = (body if end < 0 else body[:end]).decode("utf-8", "replace")
                known = (tag, rows_from_tag(tag))
                if len(body) <= 64:  # real tags are short; whatever else a server sends is not kept
                    if len(_TAGS) >= 1024:
                        _TAGS.clear()
                    _TAGS[body] = known
            tag, rows = known
        else:
            tag, rows = ("EMPTY" if mtype == EMPTY else "SUSPENDED"), None
        if head.kind == E:
            self._pending.popleft()
            return Finished(head.seq, "ok", tag, rows, cols=head.cols, sample=head.sample)
        if head.tags is None:
            head.tags = [tag]
        else:
            head.tags.append(tag)
        if rows is not None:
            head.rows = (head.rows or 0) + rows
        return None

    def error(self, body: bytes) -> list[Finished]:
        pending = self._pending
        fields = parse_error_fields(body)
        out: list[Finished] = []
        head = self._head()
        if head is not None and head.kind in (Q, F):
            head.error = fields
            return out
        self._skipped()  # the Parses and Closes of this Sync's batch not yet answered never happen
        if head is None:
            return out
        # Extended protocol: the error voids every Execute (and Describe) up to the next Sync.
        while pending and pending[0].kind in (E, DESCRIBE):
            p = pending.popleft()
            if p.kind == E:
                status = "error" if not out else "skipped"
                out.append(Finished(p.seq, status, None, None, fields.get("C"), fields.get("M")))
        return out

    def fatal(self, body: bytes) -> list[Finished]:
        """The server ends the session with this error (a FATAL one: a shutdown, a terminated backend):
        no ReadyForQuery follows, so the statement it cut short ends with the error now, and those
        queued behind it as skipped."""
        out = self.error(body)
        fields = parse_error_fields(body)
        pending = self._pending
        while pending:
            p = pending.popleft()
            if p.kind == Q or p.kind == F or p.kind == E:
                if out:
                    out.append(Finished(p.seq, "skipped", None, None, fields.get("C"), fields.get("M")))
                else:
                    p.error = p.error or fields
                    out.append(self._finish(p))
        return out

    def ready(self, body: bytes) -> list[Finished]:
        self.transaction_status = body[:1] or b"I"
        pending = self._pending
        out = []
        while pending:
            p = pending.popleft()
            if p.kind == Q or p.kind == F:
                out.append(self._finish(p))
                break
            if p.kind == S:
                if self._changes and self._changes[0][0] == S:
                    self._changes.popleft()  # the batch this Sync ended is over: what follows is the next
                break
            if p.kind == E:
                out.append(Finished(p.seq, "skipped"))
        return out

    def _head(self) -> _Pending | None:
        """The statement the backend is answering now; None while it answers a bare Sync."""
        pending = self._pending
        if pending and pending[0].kind != S:
            return pending[0]
        return None

    current = _head  # the statement whose results upstream is sending now (the relay asks per message)

    def sole_query(self) -> _Pending | None:
        """The simple Query in flight when it is the only thing in flight, else None."""
        pending = self._pending
        if len(pending) == 1 and pending[0].kind == Q:
            return pending[0]
        return None

    def finish_sole(self, complete: bytes, ready: bytes) -> Finished:
        """`complete` then `ready` (a CommandComplete body, then a ReadyForQuery's), when sole_query() is
        what they end: the same as complete() and ready(), in one call."""
        self.complete(complete)
        self.transaction_status = ready[:1] or b"I"
        return self._finish(self._pending.popleft())

    @staticmethod
    def _finish(p: _Pending) -> Finished:
        tag = ";".join(p.tags) if p.tags else None
        if p.error is not None:
            return Finished(p.seq, "error", tag, p.rows, p.error.get("C"), p.error.get("M"), p.cols, p.sample)
        return Finished(p.seq, "ok", tag, p.rows, cols=p.cols, sample=p.sample)

    def clear(self) -> None:
        """Forget every statement, portal and pending answer (the session has ended)."""
        self._statements.clear()
        self._changes.clear()
        self._portals.clear()
        self._pending.clear()

    @property
    def idle(self) -> bool:
        """Nothing sent is waiting for its answer."""
        return not self._pending

    @property
    def in_flight(self) -> int:
        return sum(1 for p in self._pending if p.kind in (Q, E, F))
