"""Whether a WHERE or ON clause chooses rows at all: constant folding over PostgreSQL's parse tree.

`chooses_no_rows` answers for the guardrail against writes that change every row. A condition counts
as none when it is true for every row, given that every column it names has a value (as every column
of a NOT NULL table has): `true`, `1 = 1`, `NOT false`, `'t'::bool`, `1 IN (1, 2)`, `2 BETWEEN 1 AND 3`,
`x = x`, `x IS NOT NULL`, and any of these under NOT, AND, OR, IS [NOT] TRUE/FALSE/UNKNOWN,
IS [NOT] NULL, IS [NOT] DISTINCT FROM, casts and COALESCE. A comparison of a column with anything but
itself is a condition, and so is WHERE CURRENT OF.

A condition that names no column at all (parameters, functions, subqueries without columns, casts the
fold does not know) is the same for every row: it takes all of them or none. Unless it folds to false
or null, it counts as none (fail closed). So does a condition nested deeper than MAX_DEPTH.

The module is pure: the caller passes `read`, which returns the body of an `A_Const` node when the fold
needs its value (and records that the answer depends on it), or None. The fold runs at most twice over
the tree, so it is linear in its size: first reading no constant at all (every constant may be anything,
null included), then, only when that could not rule a full match out, reading the constants it needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

MAX_DEPTH = 100

Read = Callable[[Any], "dict[str, Any] | None"]

# The possible behaviours of an expression over the rows. A constant is the same in every row: a value
# (kind, python value), or NULL. ROW depends on the row (ROW_NN: and is never null); ANY is a constant
# the fold does not know. A plain column is ("col", names): a value in every row (the assumption above),
# equal to itself.
NULL = None
ROW = "row"
ROW_NN = "row-not-null"
ANY = "any"
TRUE = ("bool", True)
FALSE = ("bool", False)
_BOOLS = frozenset({TRUE, FALSE, NULL})
_SET_LIMIT = 6  # beyond this many known values, an expression is ANY (keeps each step constant-time)


class _TooDeep(Exception):
    pass


def chooses_no_rows(node: Any, read: Read) -> bool:
    """True when `node` (a WHERE clause or MERGE's ON) is missing or counts as no condition (module doc)."""
    if node is None:
        return True
    try:
        first = _Fold(lambda _node: None).truths(node)
        if TRUE not in first:
            return False
        if first == {TRUE}:
            return True  # true whatever the constants: nothing read
        return TRUE in _Fold(read).truths(node)
    except _TooDeep:
        return True
    except RecursionError:
        return True


def names_no_column(node: Any) -> bool:
    """True when `node` names no column (and is not CURRENT OF): it is the same for every row. Reads no constant."""
    return not _names_column(node)


def _names_column(node: Any) -> bool:
    """Whether a subtree names a column or is CURRENT OF; walked without recursion, reading no constant."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key in ("ColumnRef", "CurrentOfExpr"):
                    return True
                if key != "A_Const" and isinstance(value, (dict, list)):
                    stack.append(value)
    return False


def _cap(values: set[Any]) -> frozenset[Any]:
    known = {v for v in values if v not in (ROW, ROW_NN, ANY)}
    if len(known) > _SET_LIMIT:
        values = (values - known) | {ANY}
    return frozenset(values)


def _is_col(v: Any) -> bool:
    return isinstance(v, tuple) and v[0] == "col"


def _row_like(v: Any) -> bool:
    return v in (ROW, ROW_NN) or _is_col(v)


_BOOL_WORDS = {"t": True, "true": True, "y": True, "yes": True, "on": True, "1": True,
               "f": False, "false": False, "n": False, "no": False, "off": False, "0": False}
_INT = re.compile(r"\s*[+-]?\d+\s*")
_NUM = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*")
_LOWER = re.compile(r"[a-z]*")


def _parse_bool(s: str) -> bool | None:
    word = s.strip().lower()
    if word in _BOOL_WORDS:
        return _BOOL_WORDS[word]
    for full, value in (("true", True), ("false", False), ("yes", True), ("no", False)):
        if word and full.startswith(word):
            return value
    return None


def _as(kind: str, v: Any) -> Any:
    """A known constant as PostgreSQL would convert it to `kind` (bool, int, num, text); ANY when unsure."""
    if v is NULL:
        return NULL
    if not isinstance(v, tuple) or v[0] == "col":
        return ROW_NN if _is_col(v) else v
    have, value = v
    if have == kind:
        return v
    if kind == "bool":
        if have in ("unknown", "text"):
            parsed = _parse_bool(value)
            return ANY if parsed is None else ("bool", parsed)
        if have == "int":
            return ("bool", value != 0)
    elif kind == "int":
        if have in ("unknown", "text") and _INT.fullmatch(value):
            return ("int", int(value))
        if have == "num":
            return ("int", int(value.to_integral_value(rounding="ROUND_HALF_UP")))
        if have == "bool":
            return ("int", int(value))
    elif kind == "num":
        if have in ("unknown", "text") and _NUM.fullmatch(value):
            return ("num", Decimal(value.strip()))
        if have == "int":
            return ("num", Decimal(value))
    elif kind == "text":
        if have == "unknown":
            return ("text", value)
        if have == "int":
            return ("text", str(value))
        if have == "bool":
            return ("text", "true" if value else "false")
    return ANY


_CAST_KINDS = {"bool": "bool", "boolean": "bool", "int2": "int", "int4": "int", "int8": "int", "integer": "int",
               "smallint": "int", "bigint": "int", "numeric": "num", "decimal": "num", "text": "text", "varchar": "text"}
_INT_RANGE = {"int2": 2**15, "smallint": 2**15, "int4": 2**31, "integer": 2**31, "int8": 2**63, "bigint": 2**63}


def _compare(op: str, a: Any, b: Any) -> Any:
    """`a op b` for two known non-null constants: TRUE, FALSE or ANY."""
    ka, kb = a[0], b[0]
    if ka == "unknown" and kb == "unknown":
        ka = kb = "text"
        a, b = ("text", a[1]), ("text", b[1])
    elif ka == "unknown":
        a, ka = _as(kb, a), kb
    elif kb == "unknown":
        b, kb = _as(ka, b), ka
    if a is ANY or b is ANY:
        return ANY
    if {ka, kb} <= {"int", "num"}:
        x, y = Decimal(a[1]), Decimal(b[1])
    elif ka == kb and ka in ("bool", "text"):
        x, y = a[1], b[1]
        if ka == "text" and op not in ("=", "<>", "!=") and x != y \
                and not (_LOWER.fullmatch(x) and _LOWER.fullmatch(y)):
            return ANY  # ordering of text depends on the collation
    else:
        return ANY
    result = {"=": x == y, "<>": x != y, "!=": x != y, "<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}.get(op)
    return ANY if result is None else ("bool", result)


_SAME = {"=": TRUE, "<=": TRUE, ">=": TRUE, "<>": FALSE, "!=": FALSE, "<": FALSE, ">": FALSE}


def _cmp1(op: str, a: Any, b: Any) -> frozenset[Any]:
    if a is NULL or b is NULL:
        return frozenset({NULL})
    if a is ANY or b is ANY:  # may be null
        other = b if a is ANY else a
        if _row_like(other):
            return frozenset({ROW if other is ROW else ROW_NN, NULL})
        return _BOOLS
    if _is_col(a) and a == b:
        return frozenset({_SAME[op]})
    if a is ROW or b is ROW:
        return frozenset({ROW})
    if _row_like(a) or _row_like(b):
        return frozenset({ROW_NN})
    got = _compare(op, a, b)
    return _BOOLS if got is ANY else frozenset({got})


def _not1(t: Any) -> Any:
    return {TRUE: FALSE, FALSE: TRUE}.get(t, t)


def _and1(a: Any, b: Any) -> Any:
    if FALSE in (a, b):
        return FALSE
    if ROW in (a, b):
        return ROW
    if ROW_NN in (a, b):
        return ROW if NULL in (a, b) else ROW_NN
    if NULL in (a, b):
        return NULL
    return TRUE


def _or1(a: Any, b: Any) -> Any:
    return _not1(_and1(_not1(a), _not1(b)))  # De Morgan holds in three-valued logic, and for row-dependent truths


def _combine(f: Callable[[Any, Any], Any], a: frozenset[Any], b: frozenset[Any]) -> frozenset[Any]:
    return frozenset(f(x, y) for x in a for y in b)


_BOOLTEST = {
    "IS_TRUE": {TRUE: TRUE, FALSE: FALSE, NULL: FALSE},
    "IS_NOT_TRUE": {TRUE: FALSE, FALSE: TRUE, NULL: TRUE},
    "IS_FALSE": {TRUE: FALSE, FALSE: TRUE, NULL: FALSE},
    "IS_NOT_FALSE": {TRUE: TRUE, FALSE: FALSE, NULL: TRUE},
    "IS_UNKNOWN": {TRUE: FALSE, FALSE: FALSE, NULL: TRUE, ROW_NN: FALSE},
    "IS_NOT_UNKNOWN": {TRUE: TRUE, FALSE: TRUE, NULL: FALSE, ROW_NN: TRUE},
}


class _Fold:
    def __init__(self, read: Read) -> None:
        self.read = read

    def truths(self, node: Any) -> frozenset[Any]:
        """The behaviours of a condition: TRUE, FALSE, NULL, ROW, ROW_NN."""
        return self._truths(node, 0)

    def _truths(self, node: Any, depth: int) -> frozenset[Any]:
        out: set[Any] = set()
        for v in self._value(node, depth):
            if v is ANY:
                out |= _BOOLS
            elif _is_col(v):
                out.add(ROW_NN)
            elif v in (ROW, ROW_NN, NULL):
                out.add(v)
            else:
                b = _as("bool", v)
                out |= _BOOLS if b is ANY else {b}
        return frozenset(out)

    def _value(self, node: Any, depth: int) -> frozenset[Any]:
        if depth > MAX_DEPTH:
            raise _TooDeep
        d = depth + 1
        if not isinstance(node, dict) or len(node) != 1:
            return self._opaque(node)
        (key, body), = node.items()
        if not isinstance(body, dict):
            return self._opaque(node)
        if key == "A_Const":
            return frozenset({self._const(node)})
        if key == "ColumnRef":
            fields = body.get("fields") or []
            names = tuple(f["String"].get("sval", "") for f in fields if isinstance(f, dict) and "String" in f)
            if len(names) != len(fields):  # t.*: a whole row
                return frozenset({ROW})
            return frozenset({("col", names)})
        if key == "BoolExpr":
            return self._bool(body, d)
        if key == "NullTest":
            return self._nulltest(body, d)
        if key == "BooleanTest":
            table = _BOOLTEST.get(str(body.get("booltesttype")))
            if table is None:
                return self._opaque(node)
            return frozenset(table.get(t, ROW) for t in self._truths(body.get("arg"), d))
        if key == "TypeCast":
            return self._cast(body, d)
        if key == "A_Expr":
            return self._expr(body, node, d)
        if key == "CoalesceExpr":
            return self._coalesce(body, d)
        return self._opaque(node)

    def _const(self, node: Any) -> Any:
        const = self.read(node)
        if const is None:
            return ANY
        if const.get("isnull"):
            return NULL
        if "boolval" in const:
            return ("bool", bool(const["boolval"].get("boolval", False)))
        if "ival" in const:
            return ("int", int(const["ival"].get("ival", 0)))
        if "fval" in const:
            text = str(const["fval"].get("fval", "")).replace("_", "")
            try:
                return ("num", Decimal(text))
            except InvalidOperation:
                return ANY
        if "sval" in const:
            return ("unknown", str(const["sval"].get("sval", "")))
        return ANY

    def _bool(self, body: dict[str, Any], d: int) -> frozenset[Any]:
        op, args = body.get("boolop"), body.get("args") or []
        sets = [self._truths(a, d) for a in args]
        if op == "NOT_EXPR" and len(sets) == 1:
            return frozenset(_not1(t) for t in sets[0])
        if op in ("AND_EXPR", "OR_EXPR") and sets:
            f = _and1 if op == "AND_EXPR" else _or1
            acc = sets[0]
            for s in sets[1:]:
                acc = _combine(f, acc, s)
            return acc
        return _BOOLS

    def _nulltest(self, body: dict[str, Any], d: int) -> frozenset[Any]:
        is_null = body.get("nulltesttype") == "IS_NULL"
        out = set()
        for v in self._value(body.get("arg"), d):
            if v is ROW:
                out.add(ROW)
            elif v is ANY:
                out |= {TRUE, FALSE}
            elif v is NULL:
                out.add(TRUE if is_null else FALSE)
            else:  # a known value, a plain column, a value in every row
                out.add(FALSE if is_null else TRUE)
        return frozenset(out)

    def _cast(self, body: dict[str, Any], d: int) -> frozenset[Any]:
        values = self._value(body.get("arg"), d)
        tn = body.get("typeName") or {}
        names = [n["String"].get("sval", "") for n in tn.get("names") or [] if isinstance(n, dict) and "String" in n]
        target = names[-1] if names and (len(names) == 1 or names[0] == "pg_catalog") else ""
        kind = _CAST_KINDS.get(target)
        if tn.get("typmods") or tn.get("arrayBounds") or tn.get("setof"):
            kind = None  # varchar(3), numeric(5, 2), int[]: not modelled
        out = set()
        for v in values:
            if v is NULL or v in (ROW, ANY):
                out.add(v)
            elif _is_col(v) or v is ROW_NN:
                out.add(ROW_NN)
            elif kind is None:
                out.add(ANY)
            else:
                got = _as(kind, v)
                if got is not ANY and kind == "int" and target in _INT_RANGE and not -_INT_RANGE[target] <= got[1] < _INT_RANGE[target]:
                    got = ANY  # out of range: an error
                out.add(got)
        return _cap(out)

    def _expr(self, body: dict[str, Any], node: Any, d: int) -> frozenset[Any]:
        kind = body.get("kind")
        names = [n["String"].get("sval", "") for n in body.get("name") or [] if isinstance(n, dict) and "String" in n]
        op = names[-1] if names and (len(names) == 1 or names[0] == "pg_catalog") else ""
        lexpr, rexpr = body.get("lexpr"), body.get("rexpr")
        if isinstance(rexpr, dict) and isinstance(rexpr.get("List"), dict):  # IN (...), BETWEEN a AND b
            rexpr = rexpr["List"].get("items")
        if kind == "AEXPR_OP" and lexpr is not None and rexpr is not None and op in _SAME:
            left, right = self._value(lexpr, d), self._value(rexpr, d)
            out = self._cmp(op, left, right)
            if op == "=":
                # With transform_null_equals on, the server reads `x = NULL` (a NULL literal) as `x IS NULL`.
                # A session can turn it on where no rule sees (a view over pg_settings, a function) and the
                # server does not report it, so both readings count. A constant not read yet may be NULL.
                for const, values, other in ((lexpr, left, rexpr), (rexpr, right, lexpr)):
                    if isinstance(const, dict) and "A_Const" in const and (NULL in values or ANY in values):
                        out |= self._nulltest({"nulltesttype": "IS_NULL", "arg": other}, d)
            return out
        if kind in ("AEXPR_DISTINCT", "AEXPR_NOT_DISTINCT") and op == "=":
            return self._distinct(kind == "AEXPR_DISTINCT", self._value(lexpr, d), self._value(rexpr, d))
        if kind == "AEXPR_IN" and op in ("=", "<>") and isinstance(rexpr, list) and rexpr:
            left = self._value(lexpr, d)
            f = _or1 if op == "=" else _and1
            acc: frozenset[Any] | None = None
            for item in rexpr:
                one = self._cmp(op, left, self._value(item, d))
                acc = one if acc is None else _combine(f, acc, one)
            return acc if acc is not None else _BOOLS
        if kind in ("AEXPR_BETWEEN", "AEXPR_NOT_BETWEEN", "AEXPR_BETWEEN_SYM", "AEXPR_NOT_BETWEEN_SYM") \
                and isinstance(rexpr, list) and len(rexpr) == 2:
            x, lo, hi = self._value(lexpr, d), self._value(rexpr[0], d), self._value(rexpr[1], d)
            inside = _combine(_and1, self._cmp(">=", x, lo), self._cmp("<=", x, hi))
            if kind.endswith("_SYM"):
                inside = _combine(_or1, inside, _combine(_and1, self._cmp(">=", x, hi), self._cmp("<=", x, lo)))
            return frozenset(_not1(t) for t in inside) if "NOT" in kind else inside
        return self._opaque(node)

    def _cmp(self, op: str, left: frozenset[Any], right: frozenset[Any]) -> frozenset[Any]:
        out: set[Any] = set()
        for a in left:
            for b in right:
                out |= _cmp1(op, a, b)
        return frozenset(out)

    def _distinct(self, distinct: bool, left: frozenset[Any], right: frozenset[Any]) -> frozenset[Any]:
        """IS [NOT] DISTINCT FROM: like = and <>, but null is a value."""
        out: set[Any] = set()
        for a in left:
            for b in right:
                if a is NULL and b is NULL:
                    same: frozenset[Any] = frozenset({TRUE})
                elif a is NULL or b is NULL:  # a known value, or a plain column (a value in every row), is not null
                    other = b if a is NULL else a
                    same = frozenset({ROW}) if other is ROW else frozenset({TRUE, FALSE}) if other is ANY else frozenset({FALSE})
                elif a is ANY or b is ANY:  # may be null
                    other = b if a is ANY else a
                    same = frozenset({ROW}) if other is ROW else frozenset({ROW_NN, FALSE}) if _row_like(other) \
                        else frozenset({TRUE, FALSE})
                else:
                    same = frozenset(ROW if t is NULL else t for t in _cmp1("=", a, b))
                out |= {_not1(t) for t in same} if distinct else same
        return frozenset(out)

    def _coalesce(self, body: dict[str, Any], d: int) -> frozenset[Any]:
        out: set[Any] = set()
        going = True  # some possibility is still null: the next argument decides
        for arg in body.get("args") or []:
            if not going:
                break  # an earlier argument is never null: the rest are never reached
            values = self._value(arg, d)
            going = False
            for v in values:
                if v is NULL:
                    going = True
                elif v in (ROW, ANY):
                    out.add(v)
                    going = True
                else:
                    out.add(v)
        if going:
            out.add(NULL)
        return _cap(out)

    def _opaque(self, node: Any) -> frozenset[Any]:
        """Anything else: ROW when it names a column (or is CURRENT OF), else a constant the fold does not know."""
        return frozenset({ROW if _names_column(node) else ANY})
