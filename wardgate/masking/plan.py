"""Masking rules, and the plan resolved once per RowDescription that rewrites DataRows on bytes.

Only planned columns are touched; a row is rebuilt only when a value changed. Text-format values
are masked in place (inside JSON and arrays too, since detectors work on the text); a masked
column in binary format becomes NULL, which is valid for every type.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import struct
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache

from ..domain import Identity
from ..policy.scope import in_scope
from .detectors import ALL_KINDS, Detector, custom, find

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
STRATEGIES = ("redact", "partial", "hash", "null")
# Types whose text form may carry PII found by content: text, varchar, bpchar, name, json, jsonb, xml, unknown,
# and arrays of text-like types.
TEXT_LIKE_OIDS = frozenset({25, 1043, 1042, 19, 114, 3802, 142, 705, 1009, 1015, 1014, 199, 3807})
PLAIN_TEXT_OIDS = frozenset({25, 1043, 1042, 19, 705})
NULL_VALUE = b"\xff\xff\xff\xff"


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


class RowMasker:
    """The plan for one result: which columns to mask and how."""

    def __init__(self, columns: list[_Column], salt: bytes) -> None:
        self.columns = columns
        self.by_index = {c.index: c for c in columns}
        self.salt = salt
        self.counts: Counter[str] = Counter()

    def for_formats(self, formats: tuple[int, ...]) -> RowMasker:
        """This plan for rows in the result formats a Bind asked for."""
        def fmt(i: int) -> int:
            return formats[0] if len(formats) == 1 else (formats[i] if i < len(formats) else 0)

        columns = [
            _Column(c.index, c.name, c.type_oid, fmt(c.index) == 1 and c.type_oid not in PLAIN_TEXT_OIDS, c.whole, c.detectors)
            for c in self.columns
        ]
        masker = RowMasker(columns, self.salt)
        masker.counts = self.counts  # one tally per result description
        return masker

    def rewrite(self, body: bytes) -> bytes | None:
        """The DataRow body masked, or None when nothing changed."""
        (n,) = _I16.unpack_from(body, 0)
        pos = 2
        parts: list[bytes] | None = None
        start = 0
        by_index = self.by_index
        for i in range(n):
            (length,) = _I32.unpack_from(body, pos)
            value_at = pos + 4
            end = value_at + (length if length > 0 else 0)
            col = by_index.get(i)
            if col is not None and length >= 0:
                new = self._mask(col, body[value_at:end])
                if new is not None:
                    if parts is None:
                        parts = []
                    parts.append(body[start:pos])
                    parts.append(new)
                    start = end
            pos = end
        if parts is None:
            return None
        parts.append(body[start:])
        return b"".join(parts)

    def _mask(self, col: _Column, raw: bytes) -> bytes | None:
        """The new length-prefixed value, or None to keep it."""
        if col.whole is not None:
            self.counts[col.name] += 1
            # A number or a date cannot hold "[card_number]": other types become NULL, valid for every type.
            if col.binary or col.whole.strategy == "null" or col.type_oid not in TEXT_LIKE_OIDS:
                return NULL_VALUE
            if col.whole.strategy == "redact":
                return _redacted(col.name)  # the same bytes for every row
            masked = mask_value(raw.decode("utf-8", "replace"), col.whole.strategy, col.name, self.salt)
            return NULL_VALUE if masked is None else _value(masked)
        kinds, patterns, strategy = col.detectors  # type: ignore[misc]
        text = raw.decode("utf-8", "replace")
        spans = find(text, raw, kinds, patterns)
        if not spans:
            return None
        self.counts[col.name] += len(spans)
        if strategy == "null" or col.binary:
            return NULL_VALUE
        out, last = [], 0
        for s, e, kind in spans:
            out.append(text[last:s])
            out.append(mask_value(text[s:e], strategy, kind, self.salt) or "")
            last = e
        out.append(text[last:])
        return _value("".join(out))


@lru_cache(maxsize=1024)
def _redacted(name: str) -> bytes:
    return _value(f"[{name}]")


def _value(text: str) -> bytes:
    data = text.encode("utf-8")
    return _I32.pack(len(data)) + data


class MaskingPolicy:
    """The masking rules for one session; resolves a RowMasker per RowDescription."""

    # Real table and column names for RowDescription's (table OID, attribute number), read from the
    # catalog when the session starts: aliases cannot hide a masked column, and rules can say table.column.
    CATALOG_SQL = (
        "select a.attrelid, a.attnum, n.nspname, c.relname, a.attname from pg_attribute a "
        "join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace "
        "where a.attnum > 0 and not a.attisdropped and c.relkind in ('r', 'p', 'v', 'm', 'f') "
        "and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')"
    )

    def __init__(self, rules: list[MaskRule], salt: bytes) -> None:
        self.rules = rules
        self.salt = salt
        self.totals: Counter[str] = Counter()
        self.catalog: dict[tuple[int, int], tuple[str, str, str]] = {}

    @property
    def needs_catalog(self) -> bool:
        return any(r.columns for r in self.rules)

    def load_catalog(self, rows: list[tuple[str | None, ...]]) -> None:
        self.catalog = {(int(r[0]), int(r[1])): (str(r[2]), str(r[3]), str(r[4]).lower()) for r in rows if None not in r}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def plan(self, row_description: bytes) -> RowMasker | None:
        (n,) = _I16.unpack_from(row_description, 0)
        pos = 2
        columns = []
        for i in range(n):
            end = row_description.index(b"\x00", pos)
            name = row_description[pos:end].decode("utf-8", "replace")
            pos = end + 1
            table, attnum, type_oid, _size, _mod, fmt = struct.unpack_from("!IhIhih", row_description, pos)
            pos += 18
            names = [name.lower()]
            source = self.catalog.get((table, attnum)) if table else None
            if source is not None:
                schema, rel, column = source
                names += [column, f"{rel}.{column}", f"{schema}.{rel}.{column}"]
            whole = next((r for r in self.rules if any(fnmatch.fnmatchcase(n, c) for n in names for c in r.columns)), None)
            detectors = None
            if whole is None and type_oid in TEXT_LIKE_OIDS:
                for r in self.rules:
                    if r.detectors or r.patterns:
                        detectors = (r.detectors, r.patterns, r.strategy)
                        break
            if whole is not None or detectors is not None:
                # Text types are the same bytes in binary format; others can only become NULL.
                binary = fmt == 1 and type_oid not in PLAIN_TEXT_OIDS
                columns.append(_Column(i, name, type_oid, binary, whole, detectors))
        return RowMasker(columns, self.salt) if columns else None

    def mask_copy_line(self, data: bytes) -> bytes | None:
        """COPY ... TO STDOUT data in text form: detectors apply to the whole line."""
        for r in self.rules:
            if r.detectors or r.patterns:
                text = data.decode("utf-8", "replace")
                spans = find(text, data, r.detectors, r.patterns)
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
