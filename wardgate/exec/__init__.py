"""One-shot execution: one statement batch, through the same Gatekeeper, masking and recording as a
native session, answered with an envelope whose `status` tells the caller what to do next.

  completed         columns, rows (masked), row count, command tags, duration, session_id, truncated
  failed            the database's or the gateway's error, with its SQLSTATE
  denied            the rules and reasons
  pending_approval  a review holds the statement: review_id, its URL, and how to go on
  running           still executing after the wait threshold: poll or long-poll the session

The HTTP API, the CLI, the MCP server and the web console all call `ExecRunner.run`.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..analysis import exec_action
from ..domain import Identity
from ..engines.postgres import codec, upstream
from ..engines.postgres.stream import PeerClosed
from ..masking.messages import mask_report
from ..masking.plan import MaskingPolicy
from ..policy.guardrails import Decision, Match, StatementPolicy
from ..recording.views import show_session
from ..sql.classify import Classification
from ..sql.tags import as_predicted
from ..store import NotFound
from ..text import UNREADABLE_MESSAGE, unreadable

if TYPE_CHECKING:
    from ..app import Gateway

log = logging.getLogger("wardgate.exec")

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")


@dataclass
class _Result:
    columns: list[str] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    row_count: int = 0
    size: int = 0
    truncated: bool = False
    error: dict[str, str] | None = None


def _unreadable(connection: str, sql: str, params: list[str | None] | None) -> str | None:
    """Why PostgreSQL could not read `sql` or a value of `params` as sent (None: it can)."""
    if unreadable(connection):
        return f"the connection name {UNREADABLE_MESSAGE}"
    if unreadable(sql):
        return f"the statement {UNREADABLE_MESSAGE}"
    for n, value in enumerate(params or (), 1):
        if value is not None and unreadable(value):
            return f"value ${n} {UNREADABLE_MESSAGE}"
    return None


class ExecRunner:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.settings = gateway.settings.exec
        self._running: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._finished: dict[str, tuple[float, dict[str, Any]]] = {}  # session id -> (at, envelope)
        self._owners: dict[str, tuple[str, str]] = {}  # session id -> (uid, name), for execs running or kept
        self._heard: dict[str, asyncio.Event] = {}  # session id -> set when its result reaches the store
        self._saving: set[asyncio.Task[None]] = set()

    def heard(self, session_id: str) -> None:
        """Another replica stored the result of `session_id` (store/bus.py): wake its waiters here."""
        event = self._heard.pop(session_id, None)
        if event is not None:
            event.set()

    def purged(self, before: str) -> None:
        """Session content that ended before `before` was purged (on any replica): keep none of its results."""
        cutoff = float(before)
        for sid in [k for k, (at, _) in self._finished.items() if at < cutoff]:
            del self._finished[sid]

    def heard_all(self) -> None:
        for session_id in list(self._heard):
            self.heard(session_id)

    # -- the door

    async def run(self, caller: Identity, connection: str, sql: str, params: list[str | None] | None = None, *,
                  wait: float | None = None, addr: str | None = None, review_id: str | None = None) -> dict[str, Any]:
        """Decide, then run (or refuse, or hold for review) one statement batch for `caller`."""
        gk = self.gateway.gatekeeper
        why = _unreadable(connection, sql, params)
        if why is not None:
            # PostgreSQL reads text only up to a NUL byte and has no encoding for a lone surrogate: the
            # server could not read what the gateway would decide on, so nothing is decided or sent.
            self.gateway.record_event("exec.invalid", "denied", user=caller.user, agent=caller.agent, addr=addr,
                                      source=caller.source, detail=why)
            return {"status": "failed", "code": "22021", "error": why,
                    "next": "send the statement and its values as text without NUL characters"}
        access = await asyncio.to_thread(gk.authorize, caller, connection, "exec")
        if not access.allowed:
            self.gateway.record_event("exec.access", "denied", user=caller.user, agent=caller.agent, addr=addr,
                                      source=caller.source, detail=f"{connection}: {access.reason}")
            return {"status": "denied", "connection": connection, "reason": access.reason,
                    "rules": [], "next": "ask an administrator for exec access to this connection"}
        # A long statement is classified off the event loop, like a native client's (sql/offload.py).
        decision = gk.decide(caller, connection, sql, await self.gateway.postgres.offload.classify_long(sql))
        if decision.action == "allow" and review_id is None and self.gateway.settings.analysis.enabled:
            decision = await self._weigh_risk(caller, sql, decision)
        if decision.action == "review" and review_id is None:
            return await self.gateway.reviews.request(caller, connection, sql, params or [], decision, addr=addr)
        if decision.action == "deny":
            sid = self._open_session(caller, connection, addr)
            message = decision.error_message
            self.gateway.recorder.write([self._stmt(sid, sql, params, time.time(), "deny", decision, caller, connection),
                                         self._outcome(sid, "denied", code="42501", msg=message)])
            self.gateway.record_event("statement.refused", "denied", user=caller.user, agent=caller.agent, addr=addr,
                                      source=f"session:{sid}", detail=f"{message} in {sql[:500]!r}")
            self._close_session(sid, "exec denied")
            return {"status": "denied", "connection": connection, "session_id": sid, "reason": message,
                    "rules": [m.public() for m in decision.enforced],
                    "next": "change the statement, or ask for the rule to be changed; see `wardgate policy check`"}
        sid = self._open_session(caller, connection, addr, review_id=review_id)
        self._owners[sid] = (caller.uid, caller.user)
        verdict = "approved" if review_id is not None else "shadow" if decision.matches else "allow"
        task = asyncio.get_running_loop().create_task(self._execute(sid, caller, connection, sql, params, verdict, decision))
        self._running[sid] = task
        task.add_done_callback(lambda t, sid=sid: self._done(sid, t))
        threshold = self.settings.wait_seconds if wait is None else max(0.0, wait)
        try:
            return await asyncio.wait_for(asyncio.shield(task), threshold)
        except TimeoutError:
            return self._running_envelope(sid, connection)

    async def _weigh_risk(self, caller: Identity, sql: str, decision: Decision) -> Decision:
        """Policy acting on the exec's risk level ([analysis] on_exec_medium / on_exec_high): an allowed
        statement may still be held for review or blocked as a whole."""
        settings = self.gateway.settings.analysis
        risk = await asyncio.to_thread(self.gateway.analyzer.assess_exec, caller.uid, sql, decision.classification)
        action = exec_action(risk.level, settings)
        if action == "allow":
            return decision
        reason = f"risk {risk.level}: {risk.explanation}"
        verb = "deny" if action == "block" else "review"
        match = Match(f"risk:{risk.level}", verb, reason, f"{risk.title} (session risk analysis)", False)
        return Decision(verb, (*decision.matches, match), decision.classification)

    async def wait(self, session_id: str, timeout: float) -> dict[str, Any] | None:
        """The final envelope of an exec session, waiting up to `timeout`; None if it is not an exec
        (or its result is no longer kept: the session record is then the answer). An exec that runs
        on another replica is waited for through the store."""
        task = self._running.get(session_id)
        if task is not None:
            try:
                return await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                envelope = self._running_envelope(session_id, "")
                envelope["timed_out"] = True
                return envelope
        done = self._finished.get(session_id)
        if done is not None:
            return done[1]
        deadline = time.monotonic() + timeout
        store = self.gateway.store
        while True:
            event = self._heard.setdefault(session_id, asyncio.Event())
            found = await asyncio.to_thread(store.get_exec_result, session_id)
            if found is not None:
                return found
            try:
                row = await asyncio.to_thread(store.session_row, session_id)
            except NotFound:
                return None
            if not (row.application_name or "").startswith("wardgate exec") or row.status == "closed":
                return await asyncio.to_thread(store.get_exec_result, session_id)  # it may have just landed
            left = deadline - time.monotonic()
            if left <= 0:
                envelope = self._running_envelope(session_id, row.connection)
                envelope["timed_out"] = True
                return envelope
            try:  # woken when the result is stored (any replica); else look again now and then
                await asyncio.wait_for(event.wait(), min(left, 30.0 if self.gateway.bus.listening else 1.0))
            except TimeoutError:
                pass

    def result(self, session_id: str) -> dict[str, Any] | None:
        """The final envelope of a finished exec session, while it is kept (in the store, for every
        replica); else None. Blocking."""
        done = self._finished.get(session_id)
        return done[1] if done is not None else self.gateway.store.get_exec_result(session_id)

    def _running_envelope(self, sid: str, connection: str) -> dict[str, Any]:
        return {"status": "running", "session_id": sid, "connection": connection,
                "next": f"GET /api/sessions/{sid}/wait?timeout=60 returns the result when it finishes "
                        f"(or `wardgate sessions wait {sid}`)"}

    def _done(self, sid: str, task: asyncio.Task[dict[str, Any]]) -> None:
        self._running.pop(sid, None)
        if task.cancelled():
            return
        exc = task.exception()
        envelope = task.result() if exc is None else {"status": "failed", "session_id": sid, "code": "XX000",
                                                      "error": "internal gateway error"}
        now = time.time()
        self._finished[sid] = (now, envelope)
        # The store keeps it for every replica: an agent's next long-poll may reach another one.
        saving = asyncio.get_running_loop().create_task(asyncio.to_thread(
            self._keep_result, sid, envelope, now + self.settings.keep_seconds))
        self._saving.add(saving)
        saving.add_done_callback(self._saved)
        # Results stay for long-polls for a while; the session record keeps the rest for good.
        for old in [k for k, (at, _) in self._finished.items() if now - at > self.settings.keep_seconds]:
            del self._finished[old]
            self._owners.pop(old, None)

    def _keep_result(self, sid: str, envelope: dict[str, Any], until: float) -> None:
        uid, name = self._owners.get(sid, ("", ""))
        self.gateway.store.put_exec_result(sid, name, envelope, until, uid=uid)

    def _saved(self, task: asyncio.Task[None]) -> None:
        self._saving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cannot keep an exec result in the store: %s", task.exception())

    def owner(self, session_id: str) -> str | None:
        """The uid of the identity whose session this is: known at once for an exec (the store may not
        have it yet), else from the store (blocking: call it from a thread)."""
        known = self._owners.get(session_id)
        if known is not None:
            return known[0]
        try:
            return self.gateway.store.session_owner(self.gateway.store.session_row(session_id))
        except NotFound:
            return None

    def session(self, caller: Identity, session_id: str) -> dict[str, Any]:
        """A recorded session the caller may read, with an exec's final envelope while it is kept.
        NotFound also when it is someone else's (not confirming it exists). Blocking."""
        data = show_session(self.gateway.store, session_id)
        if not self.gateway.gatekeeper.can_read_all(caller) and \
                not caller.owns(self.owner(data["id"])):
            raise NotFound(f"no session {session_id!r}")
        result = self.result(session_id)
        if result is not None:
            data["result"] = result
        return data

    # -- recording

    def _open_session(self, caller: Identity, connection: str, addr: str | None, review_id: str | None = None) -> str:
        sid = uuid.uuid4().hex
        self.gateway.recorder.write([{
            "k": "session", "sid": sid, "user": caller.user, "uid": caller.uid or None, "conn": connection,
            "addr": addr or "http",
            "at": time.time(), "tls": False, "app": "wardgate exec" + (f" (review {review_id})" if review_id else ""),
            "gw": self.gateway.recorder.instance, "agent": caller.agent,
        }])
        return sid

    def _stmt(self, sid: str, sql: str, params: list[str | None] | None, at: float, verdict: str, decision: Any,
              caller: Identity, connection: str) -> dict[str, Any]:
        """The record of the exec's statement (an exec session holds one, seq 1), with the decision and
        its parameters, masked as results would be for the caller."""
        record = {"k": "stmt", "sid": sid, "seq": 1, "kind": "exec", "np": len(params or []), "at": at, "text": sql,
                  "d": verdict, "r": [m.public() for m in decision.matches]}
        if params:
            masking = self.gateway.gatekeeper.masking_policy(caller, connection)
            record["p"] = [None if p is None else masking.mask_text(p) if masking else p for p in params]
        return record

    @staticmethod
    def _outcome(sid: str, status: str, ms: float | None = None, rows: int | None = None, tag: str | None = None,
              code: str | None = None, msg: str | None = None) -> dict[str, Any]:
        """Its outcome."""
        return {"k": "done", "sid": sid, "seq": 1, "status": status, "ms": None if ms is None else f"{ms:.3f}",
                "rows": rows, "tag": tag, "code": code, "msg": msg}

    def _close_session(self, sid: str, reason: str, masked: Counter[str] | None = None) -> None:
        end: dict[str, Any] = {"k": "end", "sid": sid, "at": time.time(), "reason": reason}
        if masked:
            end["masked"] = dict(masked)
        self.gateway.recorder.keep([end])

    # -- running

    async def _execute(self, sid: str, caller: Identity, connection: str, sql: str,
                       params: list[str | None] | None, verdict: str, decision: Any) -> dict[str, Any]:
        gw = self.gateway
        started = time.time()
        # The statement is durable before it reaches the database (on disk, with durability = "fsync").
        await gw.recorder.write_durable([self._stmt(sid, sql, params, started, verdict, decision, caller, connection)])
        masking = gw.gatekeeper.masking_policy(caller, connection)
        try:
            return await self._run_upstream(sid, connection, sql, params, masking, started,
                                            gw.gatekeeper.statement_policy(caller, connection, masking),
                                            decision.classification.expected_tags, caller,
                                            changes_schema=decision.classification.changes_schema,
                                            classification=decision.classification)
        except Exception:
            log.exception("exec session %s failed", sid)
            self._close_session(sid, "internal gateway error")
            raise

    async def _read_catalog(self, up: Any, connection: str, masking: MaskingPolicy) -> None:
        """The connection's catalog for column masking, with the masked columns the store kept from
        earlier (renamed columns stay masked); without the store, the rules' names still mask."""
        gw = self.gateway
        shared = gw.gatekeeper.shared_catalog(connection)
        if not shared.restored:
            try:
                shared.restore(await asyncio.to_thread(gw.store.masked_columns, connection))
            except Exception as exc:
                log.warning("cannot read the masked columns of %s from the store: %s", connection, exc)
        masking.load_catalog(await upstream.simple_query(up, masking.CATALOG_SQL))
        if (grown := shared.unsaved()) is not None:
            try:
                await asyncio.to_thread(gw.store.remember_masked, connection, grown)
            except Exception as exc:
                log.warning("cannot keep the masked columns of %s in the store: %s", connection, exc)

    def _unreachable(self, sid: str, connection: str, code: str, reason: str, caller: Identity | None) -> str:
        """What the caller is told when the database cannot be opened: the reason for an admin; for anyone
        else a message without it, since it names the database's host, port or addresses. The reason is
        logged and kept in the audit log (exec.upstream) either way."""
        gw = self.gateway
        log.warning("exec session %s: %s", sid, reason, extra={"session_id": sid, "connection": connection})
        gw.record_event("exec.upstream", "error", user=caller.user if caller else None,
                        agent=caller.agent if caller else None, source=f"session:{sid}",
                        detail=f"{connection}: {reason} (SQLSTATE {code})")
        if caller is not None and "admin" in gw.gatekeeper.roles(caller):
            return reason
        return upstream.unreachable_message(connection)

    async def _run_upstream(self, sid: str, connection: str, sql: str, params: list[str | None] | None,
                            masking: MaskingPolicy, started: float, policy: StatementPolicy,
                            expected: tuple[frozenset[str] | None, ...] = (), caller: Identity | None = None,
                            changes_schema: bool = False,
                            classification: Classification | None = None) -> dict[str, Any]:
        gw = self.gateway
        up = None
        connecting = False
        try:
            spec = await asyncio.to_thread(gw.store.get_connection, connection)
            if spec is None:
                raise upstream.UpstreamError(f"connection {connection!r} does not exist", "3D000")
            # The statement goes out as UTF-8: say so, over any role's or database's default encoding.
            connecting = True
            up = await upstream.connect(spec, {"application_name": "wardgate exec", "client_encoding": "UTF8"},
                                        gw.settings.gateway.upstream_connect_timeout,
                                        standard_strings=bool(policy.rules), read_only=policy.read_only,
                                        password_env_prefix=gw.settings.upstream.password_env_prefix)
            connecting = False
            if masking and masking.needs_catalog:
                await self._read_catalog(up, connection, masking)
                if caller is not None:
                    # Decided again on the catalog just read: column rules follow columns by identity
                    # (aliases, renames, views), which the decision made before connecting matched by name.
                    second = policy.decide(sql, classification)  # `policy` follows `masking`'s catalog
                    if second.action == "deny":
                        message = second.error_message
                        gw.recorder.keep([self._outcome(sid, "denied", code="42501", msg=message)])
                        gw.record_event("statement.refused", "denied", user=caller.user, agent=caller.agent,
                                        source=f"session:{sid}", detail=f"{message} in {sql[:500]!r}")
                        self._close_session(sid, "exec denied")
                        return {"status": "denied", "connection": connection, "session_id": sid, "reason": message,
                                "rules": [m.public() for m in second.enforced],
                                "next": "change the statement, or ask for the rule to be changed; see "
                                        "`wardgate policy check`"}
            result = await self._query(up, sql, params, masking if masking else None)
            if changes_schema:
                gw.gatekeeper.shared_catalog(connection).changed()
        except (upstream.UpstreamError, PeerClosed, OSError, TimeoutError) as exc:
            code = getattr(exc, "code", "08006")
            message = str(exc) or "the connection to the database was lost"
            if connecting and code != "42501":  # 42501: the gateway's own refusal of the session's settings
                message = self._unreachable(sid, connection, code, message, caller)
            gw.recorder.keep([self._outcome(sid, "error", code=code, msg=message)])
            self._close_session(sid, "exec failed")
            return {"status": "failed", "session_id": sid, "connection": connection, "code": code, "error": message}
        finally:
            if up is not None:
                up.protocol.write(codec.message(b"X", b""))
                up.protocol.close()
        ms = (time.time() - started) * 1000
        tag = ";".join(result.tags) or None
        if policy.rules and not as_predicted(expected, result.tags, result.error is None):
            # The server ran something other than what was classified: the tripwire, as on the native door
            what = f"the server answered {tag!r}, which the statement's classification did not predict"
            gw.recorder.keep([self._outcome(sid, "differential", ms, tag=tag, code="42501", msg=f"read past: {what}")])
            gw.record_event("statement.differential", "high", user=caller.user if caller else None,
                            agent=caller.agent if caller else None, source=f"session:{sid}",
                            detail=f"the server ran what the gateway did not classify ({what})")
            self._close_session(sid, "read past: the server's command tags disagreed with the classification")
            return {"status": "failed", "session_id": sid, "connection": connection, "code": "42501",
                    "error": "the server ran a statement other than the one the gateway classified; the security "
                             "team has been alerted"}
        if result.error is not None:
            code, message = result.error.get("C", "XX000"), result.error.get("M", "error")
            gw.recorder.keep([self._outcome(sid, "error", ms, tag=tag, code=code, msg=message)])
            self._close_session(sid, "exec finished", masking.totals if masking else None)
            envelope = {"status": "failed", "session_id": sid, "connection": connection, "code": code, "error": message}
            for key, letter in (("detail", "D"), ("hint", "H")):
                if result.error.get(letter):
                    envelope[key] = result.error[letter]
            return envelope
        done = self._outcome(sid, "ok", ms, result.row_count, tag)
        recording = gw.settings.recording
        if recording.results != "off" and result.columns:
            done["cols"] = result.columns
            if recording.results == "sample":
                sample, size = [], 0  # masked already, as the caller gets them
                for row in result.rows[:recording.sample_rows]:
                    size += sum(len(v or "") for v in row)
                    if size > recording.sample_bytes:
                        break
                    sample.append(row)
                done["sample"] = sample
        gw.recorder.keep([done])
        self._close_session(sid, "exec finished", masking.totals if masking else None)
        await gw.recorder.settle()  # durability = "fsync": the outcome is on disk before the caller has it
        return {
            "status": "completed", "session_id": sid, "connection": connection, "columns": result.columns,
            "rows": result.rows, "row_count": result.row_count, "command_tags": result.tags, "duration_ms": round(ms, 3),
            "truncated": result.truncated, "masked": dict(masking.totals) if masking else {},
        }

    async def _query(self, up: upstream.Upstream, sql: str, params: list[str | None] | None,
                     masking: MaskingPolicy | None) -> _Result:
        proto = up.protocol
        if params is None:
            proto.write(codec.message(b"Q", codec.cstr(sql)))
        else:
            bind = codec.cstr("") + codec.cstr("") + _I16.pack(0) + _I16.pack(len(params))
            for p in params:
                if p is None:
                    bind += _I32.pack(-1)
                else:
                    raw = p.encode("utf-8")
                    bind += _I32.pack(len(raw)) + raw
            bind += _I16.pack(0)  # all results in text
            proto.write(b"".join([
                codec.message(b"P", codec.cstr("") + codec.cstr(sql) + _I16.pack(0)),
                codec.message(b"B", bind),
                codec.message(b"D", b"P" + codec.cstr("")),
                codec.message(b"E", codec.cstr("") + _I32.pack(0)),
                codec.message(b"S", b""),
            ]))
        result = _Result()
        plan = None
        # NoticeResponse and NotificationResponse are read past, not kept: neither reaches the caller or
        # the record, so what they may quote (masking/messages.py) goes nowhere.
        max_rows, max_bytes = self.settings.max_rows, self.settings.max_bytes
        while True:
            mtype, body = await proto.read_message()
            if mtype == 0x54:  # RowDescription: a new result set; the last one is returned
                result.columns = [f.name for f in codec.row_description(body)]
                result.rows, result.truncated, result.size = [], False, 0
                plan = masking.plan(body) if masking is not None else None
            elif mtype == 0x44:  # DataRow
                result.row_count += 1
                if len(result.rows) >= max_rows or result.size + len(body) > max_bytes:
                    result.truncated = True
                    continue
                if plan is not None:
                    masked = plan.rewrite(body)
                    if masked is not None:
                        body = masked
                result.size += len(body)
                result.rows.append(codec.data_row_values(body))
            elif mtype == 0x43:  # CommandComplete
                result.tags.append(codec.read_cstr(body, 0)[0].decode("utf-8", "replace"))
                if plan is not None and masking is not None:
                    plan.take_counts(masking.totals)
            elif mtype == 0x45:  # ErrorResponse: it may quote stored values (masking/messages.py), masked
                # before it becomes the answer, the record and the result kept for long-polls
                masked = mask_report(body, masking) if masking is not None else None
                result.error = codec.parse_error_fields(body if masked is None else masked)
            elif mtype == 0x47:  # CopyInResponse: there is no data to send over exec
                proto.write(codec.message(b"f", codec.cstr("COPY FROM STDIN is not available over exec")))
            elif mtype == 0x5A:  # ReadyForQuery
                if not result.columns and result.tags:
                    result.row_count = codec.rows_from_tag(result.tags[-1]) or 0
                return result
