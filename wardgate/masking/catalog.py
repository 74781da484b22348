"""The database's catalog as column masking needs it: which (table OID, attribute number) a rule masks.

Rules name columns (`card_number`, `customers.card_number`, `public.customers.card_number`); the catalog
turns the names into the columns' identity in the database, which a rename does not change. Once a
column is masked by a rule it stays masked under that rule by its identity, whatever it is renamed to
later (`remembered`, shared by every session of a connection). A view whose definition reads a masked
column's table has every column masked: its columns may be computed from the masked one in ways the
catalog does not tell.

`hit` answers, for a statement's lineage (`sql/lineage.py`), the first masked column one of its
computed values reads, by identity.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

# One query, so that the session's own connection reads it in one round trip: columns of every table and
# view outside the system schemas ('a'), which columns each view's rule reads ('v'; attnum 0: the
# whole table, as for every relation a view reads), and which table each partition or child inherits ('i').
CATALOG_SQL = (
    "select 'a', a.attrelid::text, a.attnum::text, n.nspname::text, c.relname::text, a.attname::text "
    "from pg_attribute a join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace "
    "where a.attnum > 0 and not a.attisdropped and c.relkind in ('r', 'p', 'v', 'm', 'f') "
    "and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast') "
    "union all "
    "select 'v', r.ev_class::text, d.refobjid::text, d.refobjsubid::text, null, null "
    "from pg_rewrite r join pg_depend d on d.classid = 'pg_rewrite'::regclass and d.objid = r.oid "
    "where d.refclassid = 'pg_class'::regclass and d.refobjid <> r.ev_class "
    "union all "
    "select 'i', i.inhrelid::text, i.inhparent::text, null, null, null from pg_inherits i"
)


class Shared:
    """What the sessions of one connection share: the columns rules have masked, by identity (table OID,
    attribute number -> rule name), and a count of the DDL any of them has seen, after which each reads
    its catalog again."""

    def __init__(self) -> None:
        self.remembered: dict[tuple[int, int], str] = {}
        self.generation = 0
        self.restored = False  # what the store kept from earlier runs has been added
        self._saved = 0  # how many of `remembered` the store has

    def restore(self, kept: dict[str, str]) -> None:
        """Add what the store kept ("relid:attnum" -> rule name), once per connection and run."""
        for key, rule in kept.items():
            relid, _, attnum = key.partition(":")
            if relid.isdigit() and attnum.isdigit():
                self.remembered.setdefault((int(relid), int(attnum)), str(rule))
        self.restored = True
        self._saved = len(self.remembered)

    def unsaved(self) -> dict[str, str] | None:
        """What the store should keep now, when it has grown since it was last kept (else None)."""
        if len(self.remembered) == self._saved:
            return None
        self._saved = len(self.remembered)
        return {f"{relid}:{attnum}": rule for (relid, attnum), rule in self.remembered.items()}

    def changed(self) -> None:
        """A session of the connection ran DDL, or ended the transaction it ran DDL in."""
        self.generation += 1


class Catalog:
    """Columns by identity, and the masked ones among them, for one session's rules."""

    def __init__(self, rules: list[Any], shared: Shared | None = None) -> None:
        self.rules = [r for r in rules if r.columns]
        self._by_name = {r.name: r for r in self.rules}
        self.shared = shared if shared is not None else Shared()
        self.remembered = self.shared.remembered
        self.loaded = False
        self._generation = -1
        self.names: dict[tuple[int, int], tuple[str, str, str]] = {}  # (relid, attnum) -> (schema, rel, column)
        self.relations: dict[str, list[int]] = {}  # "rel" and "schema.rel" -> relids
        self.columns: dict[int, list[tuple[int, str]]] = {}  # relid -> [(attnum, name)] by attnum
        self.masked: dict[tuple[int, int], Any] = {}  # (relid, attnum) -> the rule masking it
        self.masked_relations: dict[int, Any] = {}  # relid -> a rule masking one of its columns
        self._known: set[str] = set()  # every column name in the catalog
        self._masked_names: set[str] = set()  # the names masked columns have now
        self._scope: list[int] = []  # relids of the statement being checked (hit)

    def load(self, rows: Iterable[tuple[str | None, ...]]) -> None:
        names: dict[tuple[int, int], tuple[str, str, str]] = {}
        relations: dict[str, list[int]] = {}
        columns: dict[int, list[tuple[int, str]]] = {}
        reads: dict[int, set[tuple[int, int]]] = {}
        parents: dict[int, set[int]] = {}
        for row in rows:
            if row[0] == "a" and None not in row:
                relid, attnum = int(row[1]), int(row[2])  # type: ignore[arg-type]
                schema, rel, col = str(row[3]), str(row[4]), str(row[5]).lower()
                names[(relid, attnum)] = (schema, rel, col)
                if attnum == 1 or relid not in columns:
                    relations.setdefault(rel.lower(), []).append(relid)
                    relations.setdefault(f"{schema}.{rel}".lower(), []).append(relid)
                columns.setdefault(relid, []).append((attnum, col))
            elif row[0] == "v" and None not in row[:4]:
                reads.setdefault(int(row[1]), set()).add((int(row[2]), int(row[3])))  # type: ignore[arg-type]
            elif row[0] == "i" and None not in row[:3]:
                parents.setdefault(int(row[1]), set()).add(int(row[2]))  # type: ignore[arg-type]
        for cols in columns.values():
            cols.sort()
        masked: dict[tuple[int, int], Any] = {}
        for key, (schema, rel, col) in names.items():
            rule = self._rule_for(col, rel.lower(), schema.lower())
            if rule is None:
                remembered = self.remembered.get(key)
                rule = self._by_name.get(remembered) if remembered is not None else None
            if rule is not None:
                masked[key] = rule
                self.remembered.setdefault(key, rule.name)
        self.names, self.relations, self.columns = names, {k: sorted(set(v)) for k, v in relations.items()}, columns
        self.masked = masked
        self._inherit(parents)
        self._known = {col for cols in columns.values() for _, col in cols}
        self._views(reads)
        self._masked_names = {names[k][2] for k in self.masked if k in names}
        self.masked_relations = {}
        for (relid, _), rule in self.masked.items():
            self.masked_relations.setdefault(relid, rule)
        self.loaded = True
        self._generation = self.shared.generation

    def keep(self) -> None:
        """Go on with the catalog as read (it could not be read again)."""
        self._generation = self.shared.generation

    @property
    def stale(self) -> bool:
        """DDL ran (in this session or another of the connection) since the catalog was read."""
        return self.loaded and self._generation != self.shared.generation

    def _rule_for(self, col: str, rel: str, schema: str) -> Any:
        candidates = (col, f"{rel}.{col}", f"{schema}.{rel}.{col}")
        return next((r for r in self.rules if any(fnmatch.fnmatchcase(n, c) for n in candidates for c in r.columns)),
                    None)

    def _inherit(self, parents: dict[int, set[int]]) -> None:
        """A partition or child table holds its parent's rows: the column of the same name is masked too
        (its attribute number may differ), through every level."""
        grew = True
        while grew:
            grew = False
            for child, ups in parents.items():
                for parent in ups:
                    for (relid, attnum), rule in list(self.masked.items()):
                        if relid != parent:
                            continue
                        name = self.names.get((parent, attnum), ("", "", ""))[2]
                        for child_attnum, child_name in self.columns.get(child, []):
                            if child_name == name and (child, child_attnum) not in self.masked:
                                self.masked[(child, child_attnum)] = rule
                                grew = True

    def _views(self, reads: dict[int, set[tuple[int, int]]]) -> None:
        """Every column of a view over a table with a masked column is masked (through views over views
        too). A view's dependencies name the columns it reads, but a whole-row reference in it (`c::text`)
        depends on the table as a whole, as every view does on each table it reads: the two cannot be told
        apart, so the view is masked whole rather than read past."""
        grew = True
        while grew:
            grew = False
            tables = {relid: rule for (relid, _), rule in self.masked.items()}
            for view, refs in reads.items():
                if view in tables:
                    continue
                rule = next((tables[relid] for relid, _ in sorted(refs) if relid in tables), None)
                if rule is not None:
                    for attnum, _ in self.columns.get(view, []):
                        self.masked[(view, attnum)] = rule
                    grew = True

    # -- questions

    def rule_of(self, relid: int, attnum: int) -> Any:
        return self.masked.get((relid, attnum))

    def _relids(self, rel: str) -> list[int]:
        return self.relations.get(rel, [])

    def hit(self, computed: Iterable[tuple], results: Iterable[tuple],
            relations: Iterable[str] = ()) -> tuple[str, str] | None:
        """(rule kind, reason) for the first masked column a statement computes a value from: "derived" or
        "unresolved" (a reference the catalog cannot place, on a relation with a masked column).
        `relations` are the stored relations the statement names, which its unqualified names may read."""
        self._scope = [relid for rel in relations for relid in self._relids(rel)]
        hits = [h for src in sorted(computed, key=repr) if (h := self._source(src, computed=True)) is not None]
        hits += [h for src in sorted(results, key=repr) if (h := self._source(src, computed=False)) is not None]
        return min(hits, default=None)  # "derived" first: the more telling reason

    def _source(self, src: tuple, computed: bool) -> tuple[str, str] | None:
        kind = src[0]
        if kind == "any":
            if not computed:
                return None
            name = src[1]
            if name in self._masked_names:
                for relid in self._scope:
                    for attnum, col in self.columns.get(relid, []):
                        if col == name and (relid, attnum) in self.masked:
                            return "derived", f"computes a value from masked column {self._label(relid, attnum)}"
            elif name not in self._known and any(r in self.masked_relations for r in self._scope):
                # No table has a column by that name: the catalog is older than the statement (a rename).
                masked = next(r for r in self._scope if r in self.masked_relations)
                return "unresolved", f"reads {name}, which no table of the catalog the gateway read has (next " \
                                     f"to {self._label(masked)}, which holds a masked column)"
            if not self._scope and self._rule_for(name, "", ""):  # relations the catalog does not know
                return "derived", f"computes a value from masked column {name}"
            return None
        if kind == "unplaced":
            name = src[1].rsplit(".", 1)[-1]
            if any(col == name for (_, _, col) in (self.names[k] for k in self.masked)) or self._rule_for(name, "", ""):
                return "unresolved", f"reads {src[1]}, which the gateway cannot place in any relation of the statement"
            return None
        rel = src[1]
        relids = self._relids(rel)
        if kind == "row":
            for relid in relids:
                if relid in self.masked_relations:
                    return "derived", f"takes whole rows of {self._label(relid)}, with masked columns inside"
            return None
        for relid in relids:
            cols = self.columns.get(relid, [])
            if kind == "pos":
                attnum = cols[src[2] - 1][0] if 0 < src[2] <= len(cols) else None
            else:
                attnum = next((a for a, n in cols if n == src[2]), None)
            if attnum is None:
                if relid not in self.masked_relations:
                    continue
                if kind == "name" and src[3]:  # `c.to_jsonb` with no such column: to_jsonb(c), the whole row
                    return "derived", f"takes whole rows of {self._label(relid)} (as {rel}.{src[2]}), with masked " \
                                      "columns inside"
                if computed and src[2] not in self._known:
                    # No table has a column by that name: the catalog is older than the statement (a rename).
                    return "unresolved", f"reads {src[2]}, which no table of the catalog the gateway read has " \
                                         f"(next to {self._label(relid)}, which holds a masked column)"
                continue
            if computed and (relid, attnum) in self.masked:
                return "derived", f"computes a value from masked column {self._label(relid, attnum)}"
        if not relids and computed and kind == "name" and self._rule_for(src[2], rel.rsplit(".", 1)[-1], ""):
            return "derived", f"computes a value from masked column {src[2]}"
        return None

    def _label(self, relid: int, attnum: int | None = None) -> str:
        cols = self.columns.get(relid) or [(0, "?")]
        schema, rel, _ = self.names.get((relid, cols[0][0]), ("?", str(relid), "?"))
        if attnum is None:
            return f"{schema}.{rel}"
        return f"{schema}.{rel}.{self.names.get((relid, attnum), ('', '', '?'))[2]}"

    def altered(self, targets: Iterable[str]) -> str | None:
        """The first relation with a masked column among those a statement alters, renames or drops."""
        for rel in sorted(targets):
            for relid in self._relids(rel):
                if relid in self.masked_relations:
                    return self._label(relid)
        return None
