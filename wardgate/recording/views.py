"""Plain-data views of recorded sessions, shared by the CLI's --json output and the API."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..store import Store


def iso(ts: float | None) -> str | None:
    return None if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def session_summary(s: Any, statements: int | None = None) -> dict[str, Any]:
    out = {
        "id": s.id, "user": s.user_name, "agent": s.agent, "connection": s.connection, "credential_id": s.credential_id,
        "client_addr": s.client_addr, "tls": s.tls, "application_name": s.application_name,
        "started_at": iso(s.started_at), "ended_at": iso(s.ended_at), "status": s.status,
        "end_reason": s.end_reason, "error_code": s.error_code, "masked": s.masked or {},
        "purged_at": iso(s.purged_at),  # its statements were removed by retention (the audit log says so)
    }
    if statements is not None:
        out["statements"] = statements
    return out


def statement_view(st: Any) -> dict[str, Any]:
    return {
        "seq": st.seq, "kind": st.kind, "text": st.text, "param_count": st.param_count,
        "started_at": iso(st.started_at), "duration_ms": st.duration_ms, "status": st.status, "rows": st.rows,
        "command_tag": st.command_tag, "error_code": st.error_code, "error_message": st.error_message,
        "decision": st.decision or "allow", "rules": st.rules or [], "params": st.params, "result": st.result,
    }


def list_sessions(store: "Store", **filters: Any) -> list[dict[str, Any]]:
    return [session_summary(s, n) for s, n in store.list_sessions(**filters)]


def show_session(store: "Store", session_id: str) -> dict[str, Any]:
    """A session's whole timeline: who (and which agent), its statements with decisions, rules, values
    and results, masking counts, and the reviews whose approved statements it ran."""
    s, stmts = store.get_session(session_id)
    return {**session_summary(s), "reviews": store.reviews_of_session(s.id),
            "statements": [statement_view(st) for st in stmts]}


def event_view(e: Any) -> dict[str, Any]:
    return {"id": e.id, "at": iso(e.at), "kind": e.kind, "outcome": e.outcome, "user": e.user_name, "agent": e.agent,
            "source": e.source, "client_addr": e.client_addr, "detail": e.detail}


_CATEGORY = (("authenticate", "authentication"), ("session.", "session"), ("statement.", "database"),
             ("guardrail.", "database"), ("masking.", "database"), ("exec.", "database"), ("credential.", "iam"),
             ("apikey.", "iam"), ("grant.", "iam"), ("review.", "iam"), ("connection.", "configuration"),
             ("policy.", "configuration"), ("retention.", "configuration"))
_SUCCESS = frozenset(("ok", "allow", "shadow"))
_FAILURE = frozenset(("denied", "deny", "error"))


def siem_event(e: Any) -> dict[str, Any]:
    """An audit event in the export schema (docs/audit.md): Elastic Common Schema field names where
    one fits, Wardgate's own under `wardgate`, and the chain position and hashes to check it by."""
    from .. import __version__

    category = next((c for prefix, c in _CATEGORY if prefix in e.kind), "process")
    outcome = "success" if e.outcome in _SUCCESS else "failure" if e.outcome in _FAILURE else "unknown"
    out: dict[str, Any] = {
        "@timestamp": iso(e.at),
        "event": {"id": e.id, "action": e.kind, "category": [category], "kind": "event", "outcome": outcome,
                  "sequence": e.seq, "provider": "wardgate"},
        "user": {"name": e.user_name},
        "source": {"address": e.client_addr},
        "observer": {"vendor": "Wardgate", "product": "Wardgate", "version": __version__},
        "message": e.detail,
        "wardgate": {"outcome": e.outcome, "agent": e.agent, "origin": e.source, "hash": e.hash,
                     "prev_hash": e.prev_hash},
    }
    return out
