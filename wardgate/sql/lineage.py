"""Which stored columns a statement's values are computed from, resolved as PostgreSQL resolves names.

Column masking rewrites plain result columns, found by the origin PostgreSQL reports for each in
RowDescription (a table OID and an attribute number, through aliases, subqueries and CTEs). A value
computed from a masked column has no origin, so it cannot be masked and must be refused; for that the
gateway has to know which columns every expression reads, whatever names the statement gives them.

This module resolves every column reference against the statement's own scopes: range-table aliases
and their column alias lists (`customers AS c(a, b, e, p, k)` makes `k` the fifth column), joins,
subqueries and CTEs (a name passed through them keeps its sources), whole-row references (`c`, `c.*` as a
value) and functional notation (`c.to_jsonb` is `to_jsonb(c)` when `c` has no such column). It does not
need the catalog: a source names the relation as typed and the column by name or by position, and the
session maps it to (table OID, attribute number) with the catalog it has read (`masking/catalog.py`).

Where it is unsure it over-approximates, so a statement is refused rather than read past: a name is
looked up in every scope, not only the innermost that has it; a reference no scope can supply is kept
as `unplaced`; anything a stored query or command carries (SELECT INTO, CREATE TABLE AS, views,
INSERT ... SELECT, UPDATE ... SET, set operations) counts as computed. Plain columns of a RETURNING list
are results like a SELECT's: PostgreSQL reports their origin too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A source of a value: ("name", relation, column, qualified) | ("pos", relation, position) |
# ("row", relation) | ("any", column): the column of that name of any stored relation the statement
# names (an unqualified name, which any of them could supply) | ("unplaced", column). `relation` is as
# typed ("s.t" or "t").
Source = tuple
# An unqualified name is asked of every subquery or CTE over a `*` in scope; past this many in one scope the
# statement is not followed (and is refused where column rules apply), so that the work stays linear in
# the statement's size.
MAX_LOOKUPS = 32


@dataclass
class _Entry:
    """One item of a FROM list as a statement can name it."""

    name: str  # alias, or the relation's own name
    rel: str | None = None  # a stored relation, as typed
    colnames: tuple[str, ...] = ()  # a column alias list, by position
    columns: list[tuple[str, frozenset[Source]]] | None = None  # a subquery's or CTE's outputs
    star: tuple[_Entry, ...] = ()  # a subquery's `*`: columns of these, names unknown here
    cte: bool = False  # a WITH query, which a relation name in FROM may mean
    _by_output: tuple[tuple, dict[str, frozenset[Source]]] | None = field(default=None, repr=False, compare=False)

    def column(self, name: str, qualified: bool) -> set[Source]:
        if self.rel is not None:
            # An alias list renames the first columns: a name in it means that position (a column further
            # on with the same name would make the reference ambiguous, which the server refuses).
            found: set[Source] = set(self._index().get(name, ()))
            return found or {("name", self.rel, name, qualified) if qualified else ("any", name)}
        width = len(self.columns or ())
        found = set(self._index().get(name, ()))
        if self.star:
            renamed = [i for i, c in enumerate(self.colnames) if c == name]
            only = self.star[0] if len(self.star) == 1 and not width else None
            if renamed and only is not None and only.rel is not None and not only.colnames:
                return {("pos", only.rel, i + 1) for i in renamed}  # `(SELECT * FROM t) s(a, b)`: by position
            for entry in self.star:
                found |= entry.column(name, qualified)
            if renamed or len(self.colnames) > width:
                found |= self.row()  # a renamed position past a star: which column is not known here
        elif qualified and not found:
            found = self.row()  # `s.to_jsonb`: functional notation over the subquery's whole row
        return found

    def _index(self) -> dict[str, frozenset[Source]]:
        """Sources by column name, made once per state of the entry (a subquery's columns, or an alias
        list's positions, may be asked for many times)."""
        key = (id(self.columns), len(self.columns or ()), self.colnames)
        index = self._by_output
        if index is None or index[0] != key:
            merged: dict[str, frozenset[Source]] = {}
            if self.rel is not None:
                for i, c in enumerate(self.colnames):
                    merged[c] = merged.get(c, frozenset()) | {("pos", self.rel, i + 1)}
            else:
                for out, sources in self._outputs():
                    merged[out] = merged.get(out, frozenset()) | sources
            index = self._by_output = (key, merged)
        return index[1]

    def _outputs(self) -> list[tuple[str, frozenset[Source]]]:
        outputs = list(self.columns or [])
        if self.star:
            return outputs
        for i, renamed in enumerate(self.colnames[: len(outputs)]):
            outputs[i] = (renamed, outputs[i][1])
        return outputs

    def passed(self) -> set[Source]:
        """The sources of a star over this entry that are not columns with an origin of their own: a stored
        relation's columns have one; a subquery's outputs pass on what they are."""
        if self.rel is not None:
            return set()
        found: set[Source] = set()
        for _, sources in self.columns or []:
            found |= sources
        for entry in self.star:
            found |= entry.passed()
        return found

    def row(self) -> set[Source]:
        """Every source of a whole row of this entry."""
        if self.rel is not None:
            return {("row", self.rel)}
        found: set[Source] = set()
        for _, sources in self.columns or []:
            found |= sources
        for entry in self.star:
            found |= entry.row()
        return found


class _Scope:
    """One FROM list's entries (or a WITH list's), indexed as they are added, so that an unqualified name is
    answered at once: what the entries with known column names (alias lists, subqueries and CTEs without a
    star) give for it, whether a stored relation may hold it under its own name (`any_for`), and the
    entries with a star, which are asked one by one."""

    __slots__ = ("count", "by_name", "plain", "aliased", "hits", "named", "starred")

    def __init__(self) -> None:
        self.count = 0  # entries indexed so far
        self.by_name: dict[str, list[_Entry]] = {}
        self.plain = False  # a stored relation without an alias list: it may hold any name
        self.aliased = 0  # stored relations with an alias list
        self.hits: dict[str, int] = {}  # name -> how many of those rename a position to it
        self.named: dict[str, set[Source]] = {}
        self.starred: list[_Entry] = []

    def add(self, entries: list[_Entry]) -> None:
        for e in entries[self.count:]:
            self.by_name.setdefault(e.name, []).append(e)
            if e.rel is not None and not e.colnames:
                self.plain = True
            elif e.rel is not None or not e.star:
                if e.rel is not None:
                    self.aliased += 1
                for name, sources in e._index().items():
                    self.named.setdefault(name, set()).update(sources)
                    if e.rel is not None:
                        self.hits[name] = self.hits.get(name, 0) + 1
            else:
                self.starred.append(e)
        self.count = len(entries)

    def any_for(self, name: str) -> bool:
        """Whether a stored relation here may hold `name` under its own name (an alias-listed one holds
        the names past its list)."""
        return self.plain or self.hits.get(name, 0) < self.aliased


@dataclass
class Lineage:
    computed: set[Source] = field(default_factory=set)  # sources of values computed or stored
    results: set[Source] = field(default_factory=set)  # sources of plain result columns (origin reported)
    unresolved: set[str] = field(default_factory=set)  # what could not be followed, in words
    altered: set[str] = field(default_factory=set)  # relations altered, renamed or dropped, as typed
    relations: set[str] = field(default_factory=set)  # stored relations in FROM lists, as typed ("any" sources)
    _index: dict[int, tuple[list, _Scope]] = field(default_factory=dict, repr=False)

    def statement(self, stmt: Any) -> None:
        if not isinstance(stmt, dict) or not stmt:
            return
        name, body = next(iter(stmt.items()))
        if not isinstance(body, dict):
            return
        if name == "SelectStmt":
            self.select(body, [], "value" if body.get("intoClause") else "result")
        elif name in ("PrepareStmt", "DeclareCursorStmt"):
            self.statement(body.get("query"))  # its result is what EXECUTE or FETCH returns, with origins
        elif name == "ExplainStmt":
            self.statement(body.get("query"))
        elif name == "CreateTableAsStmt":
            query = body.get("query") or {}
            if "ExecuteStmt" in query:
                self.unresolved.add("CREATE TABLE AS EXECUTE (the prepared statement's columns are not known here)")
            else:
                self.stored(query)
        elif name in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"):
            self.write(name, body)
        elif name in ("AlterTableStmt", "RenameStmt", "AlterObjectSchemaStmt") and isinstance(body.get("relation"), dict):
            self.altered.add(_relation(body["relation"]))
            self.ddl(body)
        elif name == "DropStmt" and body.get("removeType") in _DROPS_RELATIONS:
            for obj in body.get("objects") or []:
                items = obj.get("List", {}).get("items", []) if isinstance(obj, dict) else []
                self.altered.add(".".join(_strings(items)))
        else:
            self.ddl(body)

    def ddl(self, body: dict[str, Any]) -> None:
        """Any other statement. An expression in DDL is evaluated over stored rows by the server: an index's
        expressions and predicate, extended statistics, a constraint, a policy, a default. Its errors can
        quote the value (`CREATE INDEX ON customers ((card_number::tsquery))` fails with the card number in
        the message), so every column an expression in it names counts as computed, over the relations the
        statement names."""
        entries = [e for rv in _range_vars(body) for e in self.from_item({"RangeVar": rv}, [])]
        self.computed |= self.values(body, [entries])

    def stored(self, query: Any, scopes: list[list[_Entry]] | None = None) -> None:
        """A query whose rows are kept (a table, a view): every value in it is a copy. `scopes`: the WITH
        queries of the statement around it (INSERT ... SELECT)."""
        if isinstance(query, dict) and isinstance(query.get("SelectStmt"), dict):
            self.select(query["SelectStmt"], scopes or [], "value")
        else:
            self.computed |= self.values(query, scopes or [])

    # -- queries

    def select(self, s: dict[str, Any], outer: list[list[_Entry]], mode: str) -> _Entry:
        """Walk a SELECT; return its outputs, as an entry a FROM list could name. A plain column of a "result" (the statement's
        own rows) is one whose origin the server reports, so masking finds it; of a "from" query (a subquery
        or CTE in FROM) it passes through to whoever reads it; of a "value" query (a scalar subquery, a set
        operation's arm, a query whose rows are stored) it is a value like any expression."""
        scopes = outer + [self.with_clause(s.get("withClause"), outer)]
        if s.get("op") not in (None, "SETOP_NONE"):  # UNION, INTERSECT, EXCEPT: outputs have no origin
            arms = [self.select(s[arm], scopes, "value") for arm in ("larg", "rarg") if isinstance(s.get(arm), dict)]
            if any(a.star for a in arms):
                return _Entry("", columns=[], star=tuple(arms))
            width = max((len(a.columns or []) for a in arms), default=0)
            first = arms[0].columns or [] if arms else []
            return _Entry("", columns=[(first[i][0] if i < len(first) else "?", frozenset().union(
                *(a.columns[i][1] for a in arms if a.columns and i < len(a.columns)))) for i in range(width)])
        here: list[_Entry] = []
        scopes = scopes + [here]
        for item in s.get("fromClause") or []:
            here.extend(self.from_item(item, scopes))
        outputs = self.targets(s.get("targetList"), scopes, mode)
        self.computed |= self.values(s.get("valuesLists"), scopes)  # VALUES rows have no origin
        for key in ("whereClause", "havingClause"):
            self.condition(s.get(key), scopes)
        for key in ("groupClause", "sortClause", "windowClause", "distinctClause"):
            self.keys(s.get(key), scopes)
        for key in ("limitCount", "limitOffset"):
            self.computed |= self.values(s.get(key), scopes)
        return outputs

    # Operators that only compare: a masked column may be an operand of one (and is then matched, which the
    # masked_filters rule is about), as the rows chosen tell nothing more than the comparison.
    _COMPARE_KINDS = frozenset({"AEXPR_LIKE", "AEXPR_ILIKE", "AEXPR_IN", "AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN",
                                "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM", "AEXPR_DISTINCT",
                                "AEXPR_NOT_DISTINCT", "AEXPR_NULLIF"})
    _COMPARE_OPS = frozenset({"=", "<>", "!=", "<", ">", "<=", ">=", "~", "!~", "~*", "!~*", "~~", "!~~", "~~*",
                              "!~~*"})

    def condition(self, node: Any, scopes: list[list[_Entry]]) -> None:
        """A condition (WHERE, HAVING, JOIN ... ON). A masked column may be compared in it, as a plain
        operand of a comparison, but nothing may be computed from one: a function, a cast or any
        expression over it could carry its value out through an error message, a notification or a
        setting (`current_setting(card_number)`, `pg_notify('c', card_number)`), so that counts as computed."""
        if isinstance(node, list):
            for item in node:
                self.condition(item, scopes)
            return
        if not isinstance(node, dict) or not node:
            return
        kind, body = next(iter(node.items()))
        if not isinstance(body, dict):
            return
        if kind == "ColumnRef":
            self.resolve(_names(body), scopes)
        elif kind == "BoolExpr":
            self.condition(body.get("args"), scopes)
        elif kind in ("NullTest", "BooleanTest"):
            self.operand(body.get("arg"), scopes)
        elif kind == "A_Expr" and (body.get("kind") in self._COMPARE_KINDS or (
                body.get("kind") in ("AEXPR_OP", "AEXPR_OP_ANY", "AEXPR_OP_ALL")
                and _strings(body.get("name")) and _strings(body.get("name"))[-1] in self._COMPARE_OPS)):
            for side in ("lexpr", "rexpr"):
                self.operand(body.get(side), scopes)
        elif kind == "SubLink":  # EXISTS, IN (SELECT ...), = ANY (SELECT ...)
            self.operand(body.get("testexpr"), scopes)
            self.computed |= self.values(body.get("subselect"), scopes)
        elif kind not in ("A_Const", "ParamRef"):
            self.computed |= self.values(node, scopes)

    def operand(self, node: Any, scopes: list[list[_Entry]]) -> None:
        """An operand of a comparison: a plain column (or a list of them) is compared; anything else is computed."""
        if isinstance(node, list):
            for item in node:
                self.operand(item, scopes)
        elif isinstance(node, dict) and "ColumnRef" in node and len(node) == 1:
            self.resolve(_names(node["ColumnRef"]), scopes)
        elif isinstance(node, dict) and ("A_Const" in node or "ParamRef" in node):
            return
        elif node is not None:
            self.computed |= self.values(node, scopes)

    def keys(self, node: Any, scopes: list[list[_Entry]]) -> None:
        """GROUP BY, ORDER BY, DISTINCT ON and window clauses: plain columns order or group rows; an
        expression over a masked column is computed (an error or a side effect could carry it out)."""
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, list):
                stack.extend(n)
            elif isinstance(n, dict):
                for key, value in n.items():
                    if key in ("SortBy", "GroupingSet", "WindowDef") and isinstance(value, dict):
                        stack.append([value.get(k) for k in ("node", "content", "partitionClause", "orderClause")])
                    elif key in ("ColumnRef", "A_Const"):
                        if key == "ColumnRef":
                            self.resolve(_names(value), scopes)
                    else:
                        self.computed |= self.values({key: value}, scopes)

    def targets(self, items: Any, scopes: list[list[_Entry]], mode: str) -> _Entry:
        """A target list (a SELECT's, or a RETURNING list), read in `mode` (see select)."""
        outputs: list[tuple[str, frozenset[Source]]] = []
        stars: list[_Entry] = []
        for item in items or []:
            target = item.get("ResTarget", {}) if isinstance(item, dict) else {}
            val = target.get("val")
            ref = val.get("ColumnRef") if isinstance(val, dict) and len(val) == 1 else None
            if isinstance(ref, dict):
                names = _names(ref)
                if names and names[-1] == "*":
                    # `*` and `t.*` expand into the columns of the entries they name, origins and all
                    expanded = self.expand(names, scopes)
                    stars.extend(expanded)
                    if mode == "value":
                        self.computed |= {src for e in expanded for src in e.row()}
                    elif mode == "result":
                        self.results |= {src for e in expanded for src in e.passed()}
                    continue
                sources = frozenset(self.resolve(names, scopes))
                if mode == "value":
                    self.computed |= sources
                elif mode == "result":
                    self.results |= sources
                outputs.append((str(target.get("name") or names[-1]), sources))
            else:
                sources = frozenset(self.values(val, scopes))
                self.computed |= sources
                outputs.append((str(target.get("name") or "?"), sources))
        return _Entry("", columns=outputs, star=tuple(stars))

    def expand(self, names: list[str], scopes: list[list[_Entry]]) -> list[_Entry]:
        """The entries a star names: `*` the innermost FROM list's, `t.*` those called t."""
        if names == ["*"]:
            return list(scopes[-1]) if scopes else []
        qualifier = names[-2]
        return [e for scope in scopes for e in scope if e.name == qualifier]

    def with_clause(self, w: Any, outer: list[list[_Entry]]) -> list[_Entry]:
        entries: list[_Entry] = []
        if not isinstance(w, dict):
            return entries
        recursive = bool(w.get("recursive"))
        for item in w.get("ctes") or []:
            cte = item.get("CommonTableExpr") if isinstance(item, dict) else None
            if not isinstance(cte, dict):
                continue
            entry = _Entry(str(cte.get("ctename", "")).lower(), colnames=_strings(cte.get("aliascolnames")),
                           columns=[], cte=True)
            query = cte.get("ctequery") or {}
            scopes = outer + [entries]
            select = query.get("SelectStmt") if isinstance(query, dict) else None
            if not isinstance(select, dict):
                # INSERT/UPDATE/DELETE ... RETURNING in WITH: its plain columns pass through like a query's.
                if isinstance(query, dict) and query:
                    kind, body = next(iter(query.items()))
                    if kind in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt") and isinstance(body, dict):
                        outputs = self.write(kind, body, "from")
                        entry.columns, entry.star = outputs.columns, outputs.star
                    else:
                        self.statement(query)
                entries.append(entry)
                continue
            if recursive:
                # A recursive CTE reads itself: first with its own outputs unknown, then with every source
                # the first walk found standing for each of them.
                entries.append(entry)
                first = self.select(select, scopes, "from")
                every = frozenset(first.row())
                entry.columns, entry.star = [(n, every) for n, _ in first.columns or []], first.star
                second = self.select(select, scopes, "from")
                entry.columns, entry.star = [(n, src | every) for n, src in second.columns or []], second.star
                continue
            # Plain columns pass through a CTE with their sources, not yet computed: `WITH x AS (SELECT
            # card_number ...) SELECT card_number FROM x` has the origin reported.
            outputs = self.select(select, scopes, "from")
            entry.columns, entry.star = outputs.columns, outputs.star
            entries.append(entry)
        return entries

    def from_item(self, item: Any, scopes: list[list[_Entry]]) -> list[_Entry]:
        if not isinstance(item, dict):
            return []
        if "RangeVar" in item:
            rv = item["RangeVar"]
            rel = _relation(rv)
            alias = rv.get("alias") or {}
            name = str(alias.get("aliasname") or rv.get("relname", "")).lower()
            cte = None if rv.get("schemaname") else _cte(scopes, str(rv.get("relname", "")).lower())
            if cte is not None:  # a CTE read under its name or an alias
                return [_Entry(name, columns=cte.columns, star=cte.star, colnames=_strings(alias.get("colnames")) or
                               cte.colnames)]
            self.relations.add(rel)
            return [_Entry(name, rel=rel, colnames=_strings(alias.get("colnames")))]
        if "JoinExpr" in item:
            j = item["JoinExpr"]
            left = self.from_item(j.get("larg"), scopes)
            sides = left + self.from_item(j.get("rarg"), scopes + [left])  # a LATERAL right side sees the left
            self.condition(j.get("quals"), scopes + [sides])
            # A column merged by USING or NATURAL is computed (COALESCE in a FULL or RIGHT join, a coercion
            # when the sides' types differ), so it reports no origin: what it reads counts as computed.
            for name in _strings(j.get("usingClause")):
                self.computed |= self.resolve([name], [sides])
            if j.get("isNatural"):
                self.computed |= {src for e in sides for src in e.row()}
            alias = j.get("alias")
            if isinstance(alias, dict):  # (a JOIN b) AS j: one name for both sides' columns
                return sides + [_Entry(str(alias.get("aliasname", "")).lower(), columns=[], star=tuple(sides),
                                       colnames=_strings(alias.get("colnames")))]
            return sides
        if "RangeSubselect" in item:
            sub = item["RangeSubselect"]
            alias = sub.get("alias") or {}
            query = (sub.get("subquery") or {}).get("SelectStmt")
            outputs = self.select(query, scopes, "from") if isinstance(query, dict) else _Entry("", columns=[])
            return [_Entry(str(alias.get("aliasname", "")).lower(), columns=outputs.columns, star=outputs.star,
                           colnames=_strings(alias.get("colnames")))]
        if "RangeFunction" in item:
            f = item["RangeFunction"]
            sources = self.values(f.get("functions"), scopes)  # computed from their arguments
            self.computed |= sources
            alias = f.get("alias") or {}
            return [_Entry(str(alias.get("aliasname", "")).lower(), columns=[], colnames=_strings(alias.get("colnames")))]
        # Anything else in FROM (a table function over JSON or XML, a TABLESAMPLE): what it reads is computed.
        self.computed |= self.values(item, scopes)
        return []

    # -- writes

    def write(self, name: str, body: dict[str, Any], mode: str = "result") -> _Entry:
        """INSERT, UPDATE, DELETE, MERGE: values written into rows are computed. A RETURNING list is read
        like a SELECT's target list (PostgreSQL reports the origin of its plain columns too)."""
        here: list[_Entry] = []
        scopes = [self.with_clause(body.get("withClause"), []), here]
        rel = body.get("relation")
        if isinstance(rel, dict):
            here.extend(self.from_item({"RangeVar": rel}, scopes))
            if name == "InsertStmt":  # ON CONFLICT ... DO UPDATE reads the proposed row as `excluded`
                here.append(_Entry("excluded", rel=here[0].rel))
        for key in ("fromClause", "usingClause"):
            for item in body.get(key) or []:
                here.extend(self.from_item(item, scopes))
        if name == "MergeStmt":
            here.extend(self.from_item(body.get("sourceRelation"), scopes))
            self.condition(body.get("joinCondition"), scopes)
        if isinstance(body.get("selectStmt"), dict):
            self.stored(body["selectStmt"], scopes[:1])
        self.computed |= self.values(body.get("targetList"), scopes)
        self.computed |= self.values(body.get("onConflictClause"), scopes)
        self.computed |= self.values(body.get("mergeWhenClauses"), scopes)
        self.condition(body.get("whereClause"), scopes)
        returning = body.get("returningClause") or {}
        items = returning.get("exprs") if isinstance(returning, dict) else returning
        return self.targets(items or body.get("returningList"), scopes, mode)

    # -- expressions

    def values(self, node: Any, scopes: list[list[_Entry]]) -> set[Source]:
        """The sources of every column an expression reads (its subqueries' computed values are counted
        as computed where they are walked)."""
        found: set[Source] = set()
        stack = [node]
        while stack:
            n = stack.pop()
            if isinstance(n, list):
                stack.extend(n)
            elif isinstance(n, dict):
                for key, value in n.items():
                    if key == "ColumnRef" and isinstance(value, dict):
                        found |= self.resolve(_names(value), scopes)
                    elif key == "SelectStmt" and isinstance(value, dict):
                        # A scalar, ARRAY or EXISTS subquery: its values are computed into this one.
                        found |= self.select(value, scopes, "value").row()
                    elif isinstance(value, (dict, list)):
                        stack.append(value)
        return found

    def _levels(self, scopes: list[list[_Entry]]) -> list[_Scope]:
        """Each scope's index, brought up to date (a FROM list grows as it is walked; each entry is indexed
        once), so that a reference is looked up in time independent of how many entries are in scope."""
        out = []
        for scope in scopes:
            cached = self._index.get(id(scope))
            if cached is None or cached[0] is not scope:
                cached = self._index[id(scope)] = (scope, _Scope())
            cached[1].add(scope)
            out.append(cached[1])
        return out

    def resolve(self, names: list[str], scopes: list[list[_Entry]]) -> set[Source]:
        """The sources a column reference may read, in every scope that could supply it."""
        if not names:
            return set()
        if names == ["*"]:
            return {s for scope in scopes for e in scope for s in e.row()}
        levels = self._levels(scopes)
        if len(names) == 1:
            (name,) = names
            found: set[Source] = set()
            starred = 0
            for level in levels:
                for e in level.by_name.get(name, ()):
                    found |= e.row()  # `SELECT c FROM customers c`: the whole row as one value
                if level.any_for(name):
                    found.add(("any", name))  # one source for every stored relation's column of that name
                found |= level.named.get(name, set())
                starred += len(level.starred)
                if starred > MAX_LOOKUPS:
                    self.unresolved.add(f"a statement with more than {MAX_LOOKUPS} subqueries over `*` in scope")
                    return found
                for e in level.starred:
                    found |= e.column(name, False)
            return found or {("unplaced", name)}
        qualifier, last = names[-2], names[-1]
        schema = ".".join(names[:-2]) if len(names) > 2 else None
        named = [e for level in levels for e in level.by_name.get(qualifier, ()) if schema is None or
                 (e.rel or "").endswith(f"{schema}.{qualifier}")]
        if not named:
            # Not a relation: a composite column and one of its fields (`comp.field`), or a name from a
            # scope this walk does not model. Either way its value is the column's.
            unplaced: set[Source] = {("unplaced", ".".join(names))}
            return self.resolve(names[:-1], scopes) | unplaced if len(names) == 2 else unplaced
        if last == "*":
            return {s for e in named for s in e.row()}
        return {s for e in named for s in e.column(last, True)}


_DROPS_RELATIONS = frozenset({"OBJECT_TABLE", "OBJECT_VIEW", "OBJECT_MATVIEW", "OBJECT_FOREIGN_TABLE"})


def _range_vars(node: Any) -> list[dict[str, Any]]:
    """Every RangeVar in a statement, outside the queries in it (which have FROM lists of their own)."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, list):
            stack.extend(n)
        elif isinstance(n, dict):
            for key, value in n.items():
                if key == "RangeVar" and isinstance(value, dict):
                    out.append(value)
                elif key in ("relation", "relations") and isinstance(value, dict) and "relname" in value:
                    out.append(value)
                elif key != "SelectStmt" and isinstance(value, (dict, list)):
                    stack.append(value)
    return out


def _relation(rv: dict[str, Any]) -> str:
    """A RangeVar's relation as typed, schema-qualified when it is ("public.customers" or "customers")."""
    return ".".join(str(rv[k]).lower() for k in ("schemaname", "relname") if rv.get(k))


def _names(ref: dict[str, Any]) -> list[str]:
    out = []
    for f in ref.get("fields") or []:
        if isinstance(f, dict) and "String" in f:
            out.append(str(f["String"].get("sval", "")).lower())
        elif isinstance(f, dict) and "A_Star" in f:
            out.append("*")
    return out


def _strings(items: Any) -> tuple[str, ...]:
    return tuple(str(i.get("String", {}).get("sval", "")).lower() for i in items or [] if isinstance(i, dict))


def _cte(scopes: list[list[_Entry]], name: str) -> _Entry | None:
    """The WITH query an unqualified relation name means, innermost first (None: a stored relation)."""
    for scope in reversed(scopes):
        for e in scope:
            if e.cte and e.name == name:
                return e
    return None


def lineage(stmts: list[Any]) -> Lineage:
    lin = Lineage()
    for stmt in stmts:
        lin.statement(stmt)
    return lin
