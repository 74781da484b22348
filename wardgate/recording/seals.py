"""Seals: what binds every recorded row, not only the audit events, into the hash chain.

Each time the recorder writes a row of the store, or the part of a row that a record completes, it
computes a *seal* of what it wrote from the journal record itself: a digest over those fields of that
row. A batch's seals go to the `seals` table, and one `record.seal` event in the chain commits to
all of them (the SHA-256 of the batch's seals in order). `audit verify` recomputes every seal from
the rows as the store now holds them, so any change to a sealed field, a sealed row removed, or a
row that no seal accounts for, is found, and named down to the field.

The parts a row is sealed in follow when its fields become final:

- a session: `session` (who, from where, when; at its start) and `end` (how it ended); a session
  recorded already ended (a refused sign-in) is sealed whole as `session+end`;
- a statement: `statement` (text, bound values, decision and rules; before it is forwarded) and
  `outcome` (status, timing, rows, tag or SQLSTATE, result); one whose outcome came in the same
  batch is sealed whole as `statement+outcome`.

The digest of a part is SHA-256 over the session id, the statement number, the part's name and the
digest of each field's canonical form (below); each field's digest also gives the seal a 32-bit tag
for that field, which is how `verify` names the field that changed (the 128-bit digest is what a
forger would have to match). Sans-IO: the store feeds rows in and keeps what comes out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

SESSION_START = ("user_name", "connection", "credential_id", "client_addr", "started_at", "tls", "application_name",
                 "gateway", "agent")
SESSION_END = ("status", "ended_at", "end_reason", "error_code", "masked")
STMT_START = ("kind", "text", "param_count", "started_at", "decision", "rules", "params")
STMT_OUTCOME = ("status", "duration_ms", "rows", "command_tag", "error_code", "error_message", "result")
PARTS: dict[str, tuple[str, ...]] = {
    "session": SESSION_START, "end": SESSION_END, "session+end": SESSION_START + SESSION_END,
    "statement": STMT_START, "outcome": STMT_OUTCOME, "statement+outcome": STMT_START + STMT_OUTCOME,
}
# Fields added after rows were first sealed: part of a seal only when set, so the seals of rows
# recorded before them still verify, and a value set later, changed or cleared is still found.
LATER: dict[str, tuple[str, ...]] = {"session": ("user_id",), "session+end": ("user_id",)}
SESSION_PARTS = ("session", "end", "session+end")
STARTS = ("session", "session+end", "statement", "statement+outcome")  # a row's first seal is one of these
ENDS = ("end", "session+end", "outcome", "statement+outcome")  # and the seal of its final state one of these
SESSION_ROW = 0  # the statement number of a session's own seals (statements are numbered from 1)
KIND = "record.seal"
ABORTED = "the session ended before the statement finished"  # the outcome the store gives a statement cut off

_FLOATS = frozenset(("started_at", "ended_at", "duration_ms"))
_INTS = frozenset(("param_count", "rows"))
_JSON = frozenset(("rules", "params", "result", "masked"))
_canonical_json = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


def _field_digest(name: str, value: Any) -> bytes:
    """The digest of one field in a canonical form, the same whether the value comes from a journal
    record (a time as text, JSON as text) or back from either store (a float, a parsed JSON value)."""
    h = hashlib.sha256(name.encode() + b"=")
    if value is None:
        h.update(b"n")
    elif name in _FLOATS:
        h.update(b"f" + repr(float(value)).encode())
    elif name in _INTS:
        h.update(b"i" + str(int(value)).encode())
    elif name == "tls":
        h.update(b"b1" if value else b"b0")
    elif name in _JSON:
        if isinstance(value, (str, bytes)):  # JSON text (the relay's result record; some drivers' reads)
            value = json.loads(value)
        h.update(b"j" + _canonical_json(value).encode("utf-8", "surrogatepass"))
    else:
        h.update(b"s")
        h.update(str(value).encode("utf-8", "surrogatepass"))
    return h.digest()


def _names(part: str, row: Mapping[str, Any]) -> tuple[str, ...]:
    return PARTS[part] + tuple(name for name in LATER.get(part, ()) if row.get(name) is not None)


def seal(sid: str, seq: int, part: str, row: Mapping[str, Any]) -> tuple[str, str]:
    """The seal of `part` of a row: (digest, field tags), from `row`'s values for the part's fields."""
    digests = [_field_digest(name, row.get(name)) for name in _names(part, row)]
    head = _canonical_json([sid, seq, part]).encode("utf-8", "surrogatepass")
    return hashlib.sha256(head + b"".join(digests)).hexdigest()[:32], "".join(d[:4].hex() for d in digests)


def changed_fields(part: str, row: Mapping[str, Any], tags: str) -> list[str]:
    """The fields of `part` whose value in `row` is not the one sealed (by their tags)."""
    names = PARTS[part] + LATER.get(part, ())
    return [name for i, name in enumerate(names)
            if tags[8 * i:8 * i + 8] != (_field_digest(name, row.get(name))[:4].hex()
                                         if i < len(PARTS[part]) or row.get(name) is not None else "")]


def batch_digest(seals: Iterable[tuple[str, int, str, str, str]]) -> str:
    """What the chain's `record.seal` event holds of a batch of seals (session, number, part, digest, tags)."""
    h = hashlib.sha256()
    for sid, seq, part, digest, tags in seals:
        h.update(f"{sid}\t{seq}\t{part}\t{digest}\t{tags}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


class Problem:
    """A recorded row that does not match what the chain sealed: where, and what is wrong."""

    __slots__ = ("event_seq", "fields", "message", "session", "statement")

    def __init__(self, message: str, session: str, statement: int | None = None, fields: list[str] | None = None,
                 event_seq: int | None = None) -> None:
        self.message, self.session, self.statement = message, session, statement
        self.fields, self.event_seq = fields or [], event_seq

    def public(self) -> dict[str, Any]:
        return {"problem": self.message, "session": self.session, "statement": self.statement, "fields": self.fields,
                "event_seq": self.event_seq}


Seal = tuple[int, int, str, str, str]  # (event_seq, statement number, part, digest, tags) of one session


def check_session(sid: str, session: Mapping[str, Any] | None, statements: Mapping[int, Mapping[str, Any]],
                  sealed: list[Seal], *, purged: bool, legacy: bool) -> list[Problem]:
    """Compare one session's rows, as the store holds them now, with its seals. `purged`: the chain
    records that retention removed its statements; `legacy`: it was recorded before rows were sealed
    (a store upgraded from an older version), so rows without a seal are not a finding."""
    out: list[Problem] = []
    by_row: dict[int, list[Seal]] = {}
    for s in sealed:
        by_row.setdefault(s[1], []).append(s)
    mine = by_row.pop(SESSION_ROW, [])
    if session is None:
        if mine or by_row:
            first = min(s[0] for s in sealed)
            out.append(Problem(f"session {sid} was deleted from the store (sealed in audit event seq {first})", sid,
                               event_seq=first))
        else:  # statements under a session the store has no row for, and no seal either: added
            out += [Problem(f"statement {seq} of session {sid} is not in the audit chain: the row was added to the "
                            "store (its session is not there either)", sid, seq) for seq in sorted(statements)]
        return out  # its statements are gone with it (or stray, which the deletion already explains)
    out += _check_row(sid, SESSION_ROW, session, mine, legacy, session.get("status") not in (None, "active"),
                      f"session {sid}")
    for seq in sorted(set(statements) | set(by_row)):
        row, its = statements.get(seq), by_row.get(seq, [])
        if row is None:
            if not purged:
                first = min(s[0] for s in its)
                out.append(Problem(f"statement {seq} of session {sid} was deleted from the store (sealed in audit "
                                   f"event seq {first})", sid, seq, event_seq=first))
            continue
        out += _check_row(sid, seq, row, its, legacy, row.get("status") != "running", f"statement {seq} of session {sid}")
    return out


def _check_row(sid: str, seq: int, row: Mapping[str, Any], its: list[Seal], legacy: bool, final: bool,
               what: str) -> list[Problem]:
    out = []
    for event_seq, _, part, digest, tags in its:
        if seal(sid, seq, part, row)[0] != digest:
            fields = changed_fields(part, row, tags)
            named = ", ".join(fields) if fields else "its place (session or number)"
            out.append(Problem(f"{what}: {named} changed after it was recorded (sealed in audit event seq {event_seq})",
                               sid, None if seq == SESSION_ROW else seq, fields, event_seq))
    if legacy:  # recorded before rows were sealed: only what was sealed since is required to match
        return out
    parts = {s[2] for s in its}
    if not parts & set(STARTS):
        out.append(Problem(f"{what} is not in the audit chain: the row was added to the store, or moved there "
                           "from another session", sid, None if seq == SESSION_ROW else seq))
    elif final and not parts & set(ENDS):
        out.append(Problem(f"{what}: its end ({'status' if seq else 'status, end'}) is not in the audit chain; the "
                           "row was changed after it was recorded", sid, None if seq == SESSION_ROW else seq, ["status"]))
    return out
