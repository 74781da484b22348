"""Masking of the server's messages other than rows: ErrorResponse, NoticeResponse, NotificationResponse.

Masked values escape through them as easily as through a DataRow. PostgreSQL quotes the offending value
in the message of a data exception (`invalid input syntax for type integer: "customer1@example.com"`),
the key in the detail of a unique or foreign-key violation (`Key (email)=(...) already exists.`), the
whole stored row, masked columns included, in the detail of a NOT NULL, CHECK or view check option
violation (`Failing row contains (1, ..., 4111 1111 1111 0001, ...)`), and a NOTIFY payload is whatever
the statement chose to send (`select pg_notify('x', email) from customers`).

Sans-IO, over message bodies (the bytes after the five-byte type and length header):

  mask_report(body, masking)        ErrorResponse and NoticeResponse
  mask_notification(body, masking)  NotificationResponse
  mask_message(mtype, body, masking) either, by type, answered as a whole message (header included)

Each answers None when nothing changed, so the caller forwards the bytes it has; a field is decoded only
when a rule looks at it and encoded again only when one changed it. A malformed body raises
codec.ProtocolViolation rather than being passed on unread: a real server never sends one, and bytes the
gateway could not read are bytes it could not mask (a client's parser may still find values in them).
(When no rule could apply, no rules at all, or no content detectors for a notification, the body is not
read and the answer is None.)

What is masked, for an identity under masking rules:
- content detectors (MaskingPolicy.mask_text) over every field that can carry a value: the message (M),
  detail (D), hint (H), context (W), internal query (q), and any field type this module does not know;
  the fields that only name things or places in the server's source (see _NAMES) are left as they are;
- where column rules apply (a rule with `columns`), also what the detectors cannot recognise, since a
  masked column is masked whatever its content (a national id of nine bare digits, say):
  * DETAIL is dropped when it quotes stored values: one starting `Key (` (unique, exclusion and foreign
    key violations), one saying the failing row contains (NOT NULL, CHECK, a view's check option, a
    partition's key), and any DETAIL of SQLSTATE class 22 (data exception: the DETAIL of invalid JSON,
    XML or arrays quotes the input) or 23 (integrity violation: the key, the row);
  * in the message of a class 22 error, the quoted value becomes "[masked]";
  * in the context of a class 22 error, the JSON text quoted by `JSON data, line N: ...` becomes [masked].

Not covered (no message can tell): a value a statement puts into a message of its own making, such as
`raise exception '%', national_id` in a DO block, or a NOTIFY payload holding a column masked by name but
not by content; the statement rules are what keep those from running.

What this module does is linear in the size of the body, with no regular expression of its own; the
detectors are the ones rows go through (MaskingPolicy.mask_text), at their cost.
"""

from __future__ import annotations

from ..engines.postgres.codec import ProtocolViolation
from ..engines.postgres.codec import message as _frame
from .plan import MaskingPolicy

# Fields that name things (schema s, table t, column c, data type d, constraint n) or say where in the
# server something happened (S/V severity, C SQLSTATE, P/p positions, F file, L line, R routine): they
# carry no stored value and are passed through. Every other field, known (M, D, H, W, q) or not, may.
_NAMES = frozenset(b"SVCPpFLRstcdn")
_SQLSTATE, _MESSAGE, _DETAIL, _CONTEXT = ord("C"), ord("M"), ord("D"), ord("W")
_MASKED_VALUE = '"[masked]"'

_ERROR, _NOTICE, _NOTIFICATION = ord("E"), ord("N"), ord("A")


def mask_message(mtype: int, body: bytes, masking: MaskingPolicy, encoding: str = "utf-8") -> bytes | None:
    """The whole message (type byte, length, body) with `body` masked when `mtype` is an ErrorResponse
    ('E'), NoticeResponse ('N') or NotificationResponse ('A'); None when nothing changed or the type is
    none of these. ProtocolViolation when the body is malformed."""
    if mtype == _ERROR or mtype == _NOTICE:
        new = mask_report(body, masking, encoding)
    elif mtype == _NOTIFICATION:
        new = mask_notification(body, masking, encoding)
    else:
        return None
    return None if new is None else _frame(bytes((mtype,)), new)


def mask_report(body: bytes, masking: MaskingPolicy, encoding: str = "utf-8") -> bytes | None:
    """An ErrorResponse or NoticeResponse body masked for `masking`'s identity, fields in their order;
    None when nothing changed (always when `masking` has no rules: the body is then not read).

    `encoding` is the Python codec of the session's client_encoding (the server sends messages in it):
    a field is decoded (errors="replace") only when a rule looks at it, encoded again only when one
    changed it, and every other field keeps its bytes. ProtocolViolation when the body is not fields
    of a type byte and a NUL-terminated string, ended by a NUL, and nothing after."""
    rules = masking.rules
    if not rules:
        return None
    detect = any(r.detectors or r.patterns for r in rules)
    columns = any(r.columns for r in rules)
    fields = _fields(body)
    sqlstate = next((body[s:e] for code, s, e in fields if code == _SQLSTATE), b"")
    data_exception, integrity = sqlstate.startswith(b"22"), sqlstate.startswith(b"23")
    edits: list[tuple[int, bytes | None]] = []  # (field index, its new string or None to drop it)
    for i, (code, start, end) in enumerate(fields):
        if code in _NAMES:
            continue
        raw = body[start:end]
        text: str | None = None
        if columns:
            if code == _DETAIL and (data_exception or integrity or _quotes_stored_values(raw)):
                edits.append((i, None))  # PostgreSQL quotes the key or the stored row here, masked columns included
                continue
            if data_exception and code == _MESSAGE and b'"' in raw:
                text = _mask_quoted(raw.decode(encoding, "replace"))
            elif data_exception and code == _CONTEXT and b"JSON data, line " in raw:
                text = _mask_json_context(raw.decode(encoding, "replace"))
        if detect:
            before = raw.decode(encoding, "replace") if text is None else text
            after = masking.mask_text(before)
            if after != before:
                text = after
        if text is not None:
            new = text.replace("\x00", "").encode(encoding, "replace")
            if new != raw:
                edits.append((i, new))
    if not edits:
        return None
    out: list[bytes] = []
    last = 0  # body[last:] is not yet copied
    for i, new in edits:
        code, start, end = fields[i]
        out.append(body[last : start - 1])
        if new is not None:
            out.append(bytes((code,)) + new + b"\x00")
        last = end + 1
    out.append(body[last:])  # the fields after the last edit, and the terminator
    return b"".join(out)


def mask_notification(body: bytes, masking: MaskingPolicy, encoding: str = "utf-8") -> bytes | None:
    """A NotificationResponse body (int32 process id, channel, payload) with the payload through the
    content detectors; None when nothing changed (always without detectors: a payload names no column,
    so column rules cannot apply to it). The channel is left as it is: the listener named it in its own
    LISTEN. ProtocolViolation when the body is not those three parts exactly (it is not read at all
    when `masking` has no content detectors)."""
    if not any(r.detectors or r.patterns for r in masking.rules):
        return None
    if len(body) < 4:
        raise ProtocolViolation("NotificationResponse is truncated")
    channel_end = body.find(b"\x00", 4)
    payload_end = body.find(b"\x00", channel_end + 1) if channel_end >= 0 else -1
    if payload_end < 0:
        raise ProtocolViolation("NotificationResponse: string is not terminated")
    if payload_end != len(body) - 1:
        raise ProtocolViolation("NotificationResponse has bytes after its payload")
    raw = body[channel_end + 1 : payload_end]
    text = raw.decode(encoding, "replace")
    masked = masking.mask_text(text)
    if masked == text:
        return None
    new = masked.replace("\x00", "").encode(encoding, "replace")
    return None if new == raw else body[: channel_end + 1] + new + b"\x00"


def _fields(body: bytes) -> list[tuple[int, int, int]]:
    """(type byte, start, end) of each field's string in `body`, checking the body's framing."""
    out: list[tuple[int, int, int]] = []
    pos, size = 0, len(body)
    while pos < size and body[pos] != 0:
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            raise ProtocolViolation("ErrorResponse/NoticeResponse: a field is not terminated")
        out.append((body[pos], pos + 1, end))
        pos = end + 1
    if pos != size - 1:
        raise ProtocolViolation("ErrorResponse/NoticeResponse: " + (
            "the fields are not terminated" if pos >= size else "bytes after the terminating NUL"))
    return out


def _quotes_stored_values(detail: bytes) -> bool:
    # `Key (email)=(...) already exists.`, `Key (customer_id)=(9999) is not present in table ...`;
    # `Failing row contains (...)`, `Partition key of the failing row contains (...) = (...)`.
    return detail.startswith(b"Key (") or b"ailing row contains" in detail


def _mask_quoted(message: str) -> str:
    """A data exception's message with its quoted value as "[masked]". PostgreSQL writes the value
    between double quotes without doubling quotes inside, so the value runs from its opening quote to
    the message's last quote. Its opening quote is the first after the first ': ' outside quotes
    (`invalid value for parameter "x": "..."`, `invalid input syntax for type integer: "..."`); a
    message without one quotes the value first (`value "..." is out of range for type integer`)."""
    first = message.find('"')
    if first < 0:
        return message
    start = first
    colon, counted, quotes = message.find(": "), 0, 0
    while colon >= 0:
        quotes += message.count('"', counted, colon)
        counted = colon
        if quotes % 2 == 0:  # not inside a quoted value (one holding ': ' itself)
            start = message.find('"', colon + 2)
            if start < 0:
                return message  # quoted names only, the value unquoted (and not a stored one)
            break
        colon = message.find(": ", colon + 2)
    last = message.rfind('"')
    if last == start:  # no closing quote: mask to the end
        return message[:start] + _MASKED_VALUE
    return message[:start] + _MASKED_VALUE + message[last + 1 :]


def _mask_json_context(context: str) -> str:
    """A class 22 context with the input quoted by `JSON data, line N: <text>` as [masked]."""
    lines = context.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("JSON data, line "):
            cut = line.find(": ")
            lines[i] = (line[: cut + 2] if cut >= 0 else "JSON data, ") + "[masked]"
    return "\n".join(lines)
