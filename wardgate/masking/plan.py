"""Masking rules, and the plan resolved once per RowDescription that rewrites DataRows on bytes.

Only planned columns are touched; a row is rebuilt only when a value changed. Text-format values
are masked in place (inside JSON and arrays too, since detectors work on the text); a masked
column in binary format becomes NULL, which is valid for every type.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import hmac
import struct
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from ..domain import Identity
from ..engines.postgres.codec import row_description as row_description_fields
from ..policy.scope import in_scope
from .catalog import CATALOG_SQL, Catalog, Shared
from .detectors import ALL_KINDS, Detector, TooManyMatches, custom, find

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
STRATEGIES = ("redact", "partial", "hash", "null")
# Types whose text form may carry PII found by content: text, varchar, bpchar, name, json, jsonb, xml, unknown,
# and arrays of text-like types.
TEXT_LIKE_OIDS = frozenset({25, 1043, 1042, 19, 114, 3802, 142, 705, 1009, 1015, 1014, 199, 3807})
PLAIN_TEXT_OIDS = frozenset({25, 1043, 1042, 19, 705})
# Types that cannot hold what a content detector looks for: bool, dates and times, intervals, uuid, and
# numbers too narrow for any kind (a bare number can only be a card number, of 13 digits or more):
# smallint, integer, real, oid, money. Every other type is searched: wide numbers (a card number kept as
# bigint), and types whose text form embeds text (a whole row, a record, an enum, a domain, an array).
NO_PII_OIDS = frozenset({16, 1082, 1083, 1266, 1114, 1184, 1186, 2950, 21, 23, 700, 26, 790})
# Numbers wide enough for a card number (bigint, double, numeric): searched in binary format too, as their
# decimal text; a found value cannot be rewritten in place (a client would fail to read "[card]"), so it
# becomes NULL.
NUMBER_OIDS = frozenset({20, 701, 1700})


def binary_number_text(type_oid: int, raw: bytes) -> bytes:
    """The decimal digits of a bigint, double or numeric in PostgreSQL's binary format (b"" if malformed)."""
    try:
        return _binary_number_text(type_oid, raw)
    except (struct.error, ValueError):
        return b""


def _binary_number_text(type_oid: int, raw: bytes) -> bytes:
    if type_oid == 20:
        return str(int.from_bytes(raw, "big", signed=True)).encode()
    if type_oid == 701:
        return format(struct.unpack("!d", raw)[0], "f").encode()
    ndigits, weight, sign = struct.unpack_from("!hhH", raw)  # numeric: base-10000 digits
    if sign == 0xC000 or ndigits <= 0:
        return b"0"
    digits = struct.unpack_from(f"!{ndigits}h", raw, 8)
    whole = "".join(f"{d:04d}" for d in digits[: weight + 1]).lstrip("0") + "0000" * max(0, weight + 1 - ndigits)
    fraction = "".join(f"{d:04d}" for d in digits[max(0, weight + 1):])
    fraction = "0000" * max(0, -weight - 1) + fraction if fraction else ""
    return f"{whole or '0'}.{fraction}".rstrip(".").encode()
NULL_VALUE = b"\xff\xff\xff\xff"
# A text value longer than this is masked whole rather than searched: detection is linear in a value's
# length, yet a single value must not hold the event loop for long ([gateway] max_scanned_value).
SCAN_LIMIT = 1 << 20
# What such a value becomes (NULL for the null strategy): whatever the strategy, no work in its length.
UNSCANNED = "[unscanned]"


@dataclass(frozen=True)
class MaskRule:
    name: str
    strategy: str = "redact"
    columns: tuple[str, ...] = ()  # column names (globs) masked whole
    detectors: tuple[str, ...] = ()  # content kinds masked wherever they appear in text-like columns
    patterns: tuple[Detector, ...] = ()  # custom regular expressions, masked like the detectors
    connections: tuple[str, ...] = ("*",)
    groups: tuple[str, ...] = ("*",)
    except_groups: tuple[str, ...] = ()

    def applies_to(self, identity: Identity, connection: str) -> bool:
        return in_scope(identity, connection, self.connections, self.groups, self.except_groups)


def parse_rules(raw: list[dict]) -> list[MaskRule]:
    rules = []
    for i, entry in enumerate(raw, 1):
        entry = dict(entry)
        name = entry.pop("name", f"masking-{i}")
        strategy = entry.pop("strategy", "redact")
        if strategy not in STRATEGIES:
            raise ValueError(f"masking rule {name!r}: strategy must be one of {', '.join(STRATEGIES)}")
        detectors = tuple(entry.pop("detectors", ()))
        unknown = set(detectors) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"masking rule {name!r}: unknown detectors {sorted(unknown)}; known: {', '.join(ALL_KINDS)}")
        columns = tuple(c.lower() for c in entry.pop("columns", ()))
        raw_patterns = entry.pop("patterns", {})
        if not isinstance(raw_patterns, dict):
            raise ValueError(f"masking rule {name!r}: patterns is a table of name = \"regular expression\"")
        patterns = tuple(custom(k, v) for k, v in raw_patterns.items())
        scope = {k: tuple(entry.pop(k)) for k in ("connections", "groups", "except_groups") if k in entry}
        if entry:
            raise ValueError(f"masking rule {name!r}: unknown keys {sorted(entry)}")
        if not columns and not detectors and not patterns:
            raise ValueError(f"masking rule {name!r} masks nothing: give columns, detectors or patterns")
        rules.append(MaskRule(name, strategy, columns, detectors, patterns, **scope))
    return rules


def mask_value(value: str, strategy: str, kind: str, salt: bytes) -> str | None:
    if strategy == "null":
        return None
    if strategy == "partial":
        keep = value[-4:] if len(value) > 4 else ""
        return "*" * max(len(value) - len(keep), 4) + keep
    if strategy == "hash":
        return f"{kind}:" + hmac.new(salt, value.encode(), hashlib.sha256).hexdigest()[:16]
    return f"[{kind}]"


@dataclass
class _Column:
    index: int
    name: str
    type_oid: int
    binary: bool
    whole: MaskRule | None
    detectors: tuple[tuple[str, ...], tuple[Detector, ...], str] | None  # (kinds, custom patterns, strategy)


# The least a value needs for a detector of each kind to match: an "@", this many digits, or the dots
# and colons of an address. Values without them skip the detectors (and the interpreter) entirely.
_MIN_DIGITS = {"card": 13, "iban": 10, "ssn": 9, "phone": 7}

Action = bytes | tuple | None  # see mask_rows in engines/postgres/_wire.c


class RowMasker:
    """The plan for one result: which columns to mask and how, as one action per column index."""

    def __init__(self, columns: list[_Column], salt: bytes, hits: list[int] | None = None,
                 scan_limit: int = SCAN_LIMIT) -> None:
        self.columns = columns
        self.salt = salt
        self.scan_limit = scan_limit
        width = max((c.index for c in columns), default=-1) + 1
        self.hits = hits if hits is not None else [0] * width  # values masked, per column index
        by_index = {c.index: c for c in columns}
        self.actions: tuple[Action, ...] = tuple(self._action(by_index.get(i)) for i in range(width))
        self._row_budget = scan_limit  # characters the values of the row at hand may still have searched

    def take_counts(self, into: Counter[str]) -> None:
        """Add the values masked per column name since the last call to `into`."""
        hits = self.hits
        for c in self.columns:
            n = hits[c.index]
            if n:
                into[c.name] += n
                hits[c.index] = 0

    def mask_run(self, data: bytes, start: int, end: int) -> bytes | None:
        """data[start:end], a run of whole DataRows, masked; None when nothing changed."""
        self._row_budget = self.scan_limit
        if end - start <= self.scan_limit:  # no row in it can have more searched than that
            return mask_rows(data, start, end, self.actions, self.hits)
        return self._mask_long_run(data, start, end)

    def _mask_long_run(self, data: bytes, start: int, end: int) -> bytes | None:
        """A run longer than the scan limit, row by row: the values of one row are searched up to the
        limit in all, and those past it masked whole, as a value longer than the limit is. Searching each
        value of a wide row up to the limit held the loop for all of them at once (one row of 120 values
        of a MiB each: 1.3 s)."""
        out: list[bytes] = []
        changed, pos = False, start
        while pos < end:
            if end - pos < 5:
                raise ValueError("malformed DataRow")
            row_end = pos + 1 + _U32.unpack_from(data, pos + 1)[0]
            if row_end > end or row_end <= pos + 5:
                raise ValueError("malformed DataRow")
            self._row_budget = self.scan_limit
            new = mask_rows(data, pos, row_end, self.actions, self.hits)
            if new is not None and not changed:
                changed = True
                out.append(data[start:pos])
            if changed:
                out.append(data[pos:row_end] if new is None else new)
            pos = row_end
        return b"".join(out) if changed else None

    def rewrite(self, body: bytes) -> bytes | None:
        """One DataRow body masked, or None when nothing changed."""
        new = self.mask_run(b"D" + _U32.pack(len(body) + 4) + body, 0, len(body) + 5)
        return None if new is None else new[5:]

    def _action(self, col: _Column | None) -> Action:
        if col is None:
            return None
        if col.whole is not None:
            # A number or a date cannot hold "[card_number]": other types become NULL, valid for every type.
            if col.binary or col.whole.strategy == "null" or col.type_oid not in TEXT_LIKE_OIDS:
                return NULL_VALUE
            if col.whole.strategy == "redact":
                return _redacted(col.name)  # the same bytes for every row
            return (functools.partial(self._mask_whole, col), False, 0, False, True)
        kinds, patterns, _ = col.detectors  # type: ignore[misc]
        # A binary number's bytes are not its digits: the pre-filter cannot judge it, so it is always looked at.
        always = bool(patterns) or (col.binary and col.type_oid in NUMBER_OIDS)
        return (functools.partial(self._mask_content, col), *_screen(kinds), always)

    def _mask_whole(self, col: _Column, raw: bytes) -> bytes:
        self.hits[col.index] += 1
        masked = mask_value(raw.decode("utf-8", "replace"), col.whole.strategy, col.name, self.salt)  # type: ignore[union-attr]
        return NULL_VALUE if masked is None else _value(masked)

    def _mask_content(self, col: _Column, raw: bytes) -> bytes | None:
        kinds, patterns, strategy = col.detectors  # type: ignore[misc]
        if col.binary and col.type_oid in NUMBER_OIDS:
            raw = binary_number_text(col.type_oid, raw)
        if len(raw) <= self._row_budget:
            self._row_budget -= len(raw)
            text = raw.decode("utf-8", "replace")
            try:
                spans = find(text, raw, kinds, patterns)
            except TooManyMatches:
                spans = None
        else:
            spans = None
        if spans is None:  # too long, or too dense, to search: masked whole
            self.hits[col.index] += 1
            # JSON, XML and arrays would not parse as "[unscanned]": they become NULL, like binary values.
            plain = not col.binary and col.type_oid in PLAIN_TEXT_OIDS
            return _value(UNSCANNED) if plain and strategy != "null" else NULL_VALUE
        if not spans:
            return None
        self.hits[col.index] += len(spans)
        if strategy == "null" or col.binary or col.type_oid in NUMBER_OIDS:
            return NULL_VALUE
        out, last = [], 0
        for s, e, kind in spans:
            out.append(text[last:s])
            out.append(mask_value(text[s:e], strategy, kind, self.salt) or "")
            last = e
        out.append(text[last:])
        return _value("".join(out))


@lru_cache(maxsize=64)
def _screen(kinds: tuple[str, ...]) -> tuple[bool, int, bool]:
    """What _worth_a_look needs to know of detector kinds: (email among them, fewest digits any
    digit-based kind needs, ip among them)."""
    min_digits = min((_MIN_DIGITS[k] for k in kinds if k in _MIN_DIGITS), default=0)
    return "email" in kinds, min_digits, "ip" in kinds


def _worth_a_look(raw: bytes, at: bool, min_digits: int, ip: bool) -> bool:
    """Could a detector match? When this says no, none can (the same test as in _wire.c)."""
    if at and b"@" in raw:
        return True
    if min_digits and len(raw) - len(raw.translate(None, b"0123456789")) >= min_digits:
        return True
    return ip and (raw.count(b".") >= 3 or raw.count(b":") >= 2)


def mask_rows_py(data: bytes, start: int, end: int, actions: tuple[Action, ...], counts: list[int]) -> bytes | None:
    """The reference for mask_rows in _wire.c: the same contract, one DataRow at a time."""
    if start < 0 or end > len(data) or start > end or len(counts) < len(actions):
        raise ValueError("mask_rows: bad arguments")
    out: list[bytes] = []
    changed = False
    pos = start
    while pos < end:
        if end - pos < 7 or data[pos] != 0x44:
            raise ValueError("malformed DataRow")
        (length,) = _U32.unpack_from(data, pos + 1)
        if length < 6 or length > end - pos - 1:
            raise ValueError("malformed DataRow")
        row_end = pos + 1 + length
        (ncols,) = _I16.unpack_from(data, pos + 5)
        if ncols < 0:
            raise ValueError("malformed DataRow")
        q = pos + 7
        parts: list[bytes] = []
        last = pos + 5
        for i in range(ncols):
            if row_end - q < 4:
                raise ValueError("malformed DataRow")
            (vlen,) = _I32.unpack_from(data, q)
            if vlen < -1 or vlen > row_end - q - 4:
                raise ValueError("malformed DataRow")
            vend = q + 4 + max(vlen, 0)
            action = actions[i] if i < len(actions) else None
            if action is not None and vlen >= 0:
                new = None
                if isinstance(action, bytes):
                    new = action
                    counts[i] += 1
                else:
                    fn, at, min_digits, ip, always = action
                    raw = data[q + 4 : vend]
                    if always or _worth_a_look(raw, at, min_digits, ip):
                        new = fn(raw)
                if new is not None:
                    if not _valid_value(new):
                        raise ValueError("a masking replacement is not a length-prefixed value")
                    parts.append(data[last:q])
                    parts.append(new)
                    last = vend
            q = vend
        if q != row_end:
            raise ValueError("malformed DataRow")
        if parts:
            if not changed:
                changed = True
                out.append(data[start:pos])
            parts.append(data[last:row_end])
            row = b"".join(parts)
            out.append(b"D" + _U32.pack(len(row) + 4) + row)
        elif changed:
            out.append(data[pos:row_end])
        pos = row_end
    return b"".join(out) if changed else None


def _valid_value(v: bytes) -> bool:
    if not isinstance(v, bytes) or len(v) < 4:
        return False
    (n,) = _I32.unpack_from(v, 0)
    return (n == -1 and len(v) == 4) or (n >= 0 and n == len(v) - 4)


try:
    from ..engines.postgres._wire import mask_rows
except ImportError:  # built without a C compiler: the same contract, slower
    mask_rows = mask_rows_py


@lru_cache(maxsize=1024)
def _redacted(name: str) -> bytes:
    return _value(f"[{name}]")


def _value(text: str) -> bytes:
    data = text.encode("utf-8")
    return _I32.pack(len(data)) + data


class MaskingPolicy:
    """The masking rules for one session; resolves a RowMasker per RowDescription."""

    # Which (table OID, attribute number) each column rule masks, read from the catalog when the session
    # starts and again after DDL: RowDescription names a result column's origin by them, so aliases cannot
    # hide a masked column, and rules can say table.column (see masking/catalog.py).
    CATALOG_SQL = CATALOG_SQL

    def __init__(self, rules: list[MaskRule], salt: bytes, shared: Shared | None = None,
                 scan_limit: int = SCAN_LIMIT) -> None:
        self.rules = rules
        self.salt = salt
        self.scan_limit = scan_limit
        self.totals: Counter[str] = Counter()
        self.catalog = Catalog(rules, shared)
        self._plans: dict[bytes, RowMasker | None] = {}  # by RowDescription: a session repeats the same few

    PLAN_CACHE = 256

    @property
    def needs_catalog(self) -> bool:
        return any(r.columns for r in self.rules)

    def load_catalog(self, rows: list[tuple[str | None, ...]]) -> None:
        self.catalog.load(rows)
        self._plans.clear()

    def __bool__(self) -> bool:
        return bool(self.rules)

    def plan(self, row_description: bytes) -> RowMasker | None:
        try:
            return self._plans[row_description]
        except KeyError:
            pass
        plan = self._plan(row_description)
        if len(self._plans) >= self.PLAN_CACHE:
            self._plans.clear()
        self._plans[row_description] = plan
        return plan

    def _plan(self, row_description: bytes) -> RowMasker | None:
        columns = []
        for i, field in enumerate(row_description_fields(row_description)):
            name, table, attnum, type_oid, fmt = field.name, field.table_oid, field.attnum, field.type_oid, field.format
            # By the column's identity first; by the name the result gives it too (never less masking).
            whole = self.catalog.rule_of(table, attnum) if table else None
            if whole is None:
                lowered = name.lower()
                whole = next((r for r in self.rules if any(fnmatch.fnmatchcase(lowered, c) for c in r.columns)), None)
            detectors = None
            if whole is None and type_oid not in NO_PII_OIDS:
                for r in self.rules:
                    if r.detectors or r.patterns:
                        detectors = (r.detectors, r.patterns, r.strategy)
                        break
            if whole is not None or detectors is not None:
                # Text types are the same bytes in binary format; others can only become NULL.
                binary = fmt == 1 and type_oid not in PLAIN_TEXT_OIDS
                columns.append(_Column(i, name, type_oid, binary, whole, detectors))
        return RowMasker(columns, self.salt, scan_limit=self.scan_limit) if columns else None

    def mask_text(self, text: str) -> str:
        """A free-standing value (a statement's parameter, for its record) with the content detectors applied."""
        for r in self.rules:
            if r.detectors or r.patterns:
                if len(text) > self.scan_limit:
                    return UNSCANNED
                raw = text.encode("utf-8")
                if not r.patterns and not _worth_a_look(raw, *_screen(r.detectors)):
                    return text  # no detector of this rule can match (their own pre-filters would say so too)
                try:
                    spans = find(text, raw, r.detectors, r.patterns)
                except TooManyMatches:
                    return UNSCANNED
                if not spans:
                    return text
                out, last = [], 0
                for s, e, kind in spans:
                    out.append(text[last:s])
                    out.append(mask_value(text[s:e], r.strategy, kind, self.salt) or f"[{kind}]")
                    last = e
                out.append(text[last:])
                return "".join(out)
        return text

    def mask_copy_line(self, data: bytes) -> bytes | None:
        """COPY ... TO STDOUT data in text form: detectors apply to the whole line (field by field when
        it is longer than the scan limit, and a field longer than that is masked whole)."""
        if len(data) > self.scan_limit:
            body, end = (data[:-1], data[-1:]) if data.endswith(b"\n") else (data, b"")
            fields = body.split(b"\t")
            masked = [self._copy_field(f) for f in fields]
            if all(m is None for m in masked):
                return None
            return b"\t".join(f if m is None else m for f, m in zip(fields, masked, strict=True)) + end
        return self._copy_field(data)

    def _copy_field(self, data: bytes) -> bytes | None:
        for r in self.rules:
            if r.detectors or r.patterns:
                if len(data) > self.scan_limit:
                    self.totals["(copy)"] += 1
                    return b"\\N" if r.strategy == "null" else UNSCANNED.encode()
                text = data.decode("utf-8", "replace")
                try:
                    spans = find(text, data, r.detectors, r.patterns)
                except TooManyMatches:
                    self.totals["(copy)"] += 1
                    return b"\\N" if r.strategy == "null" else UNSCANNED.encode()
                if not spans:
                    return None
                self.totals["(copy)"] += len(spans)
                out, last = [], 0
                for s, e, kind in spans:
                    out.append(text[last:s])
                    out.append(mask_value(text[s:e], r.strategy, kind, self.salt) or "\\N")
                    last = e
                out.append(text[last:])
                return "".join(out).encode("utf-8")
        return None
