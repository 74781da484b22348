"""Statement classification over the real PostgreSQL parser (libpg_query through pglast).

`classify(text)` parses with `parse_sql_json` (the fast path) and walks the tree once, collecting
statement kinds (inside CTEs, EXPLAIN, PREPARE and multi-statement strings too), relations read
and written, functions called, conditionless writes and COPY details. Literals and comments are
data in the tree, so keyword text inside them never looks like a statement.

The classification is of the exact text the server will parse. It also says whether it read the value
of any constant (`value_dependent`): one that did not is the same for every text that PostgreSQL's own
parser reads as the same tree with other constants in it, which is what lets the statement cache share
it (see `template_key`).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pglast.parser import ParseError, normalize, parse_sql_json

from .conditions import chooses_no_rows, names_no_column
from .lineage import lineage as resolve_lineage
from .tags import expected_tag

# Kinds that only read (or only touch the session). Anything else counts as a write: unknown = write.
READ_KINDS = frozenset({
    "select", "explain", "prepare", "execute", "deallocate", "transaction", "variable_set", "variable_show",
    "listen", "unlisten", "notify", "fetch", "close_portal", "declare_cursor", "discard", "copy_to", "check_point_noop",
    "lock",
})
OPAQUE_KINDS = frozenset({"do", "call"})
_NOT_DDL = READ_KINDS | {"insert", "update", "delete", "merge", "copy_from"}
_NAMES = {
    "SelectStmt": "select", "InsertStmt": "insert", "UpdateStmt": "update", "DeleteStmt": "delete", "MergeStmt": "merge",
    "DropStmt": "drop", "TruncateStmt": "truncate", "AlterSystemStmt": "alter_system", "DoStmt": "do",
    "CallStmt": "call", "ExplainStmt": "explain", "PrepareStmt": "prepare", "ExecuteStmt": "execute",
    "DeallocateStmt": "deallocate", "TransactionStmt": "transaction", "VariableSetStmt": "variable_set",
    "VariableShowStmt": "variable_show", "DropdbStmt": "drop_database", "CreatedbStmt": "create_database",
    "ClosePortalStmt": "close_portal", "FetchStmt": "fetch", "DeclareCursorStmt": "declare_cursor",
    "ListenStmt": "listen", "UnlistenStmt": "unlisten", "NotifyStmt": "notify", "DiscardStmt": "discard",
    "LockStmt": "lock", "DropRoleStmt": "drop_role", "GrantStmt": "grant", "GrantRoleStmt": "grant_role",
}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def kind_of(node_name: str) -> str:
    return _NAMES.get(node_name) or _CAMEL.sub("_", node_name.removesuffix("Stmt")).lower()


def known_kinds() -> frozenset[str]:
    """Every statement kind a rule can name: one per statement node of PostgreSQL's grammar."""
    from pglast import ast

    return frozenset({kind_of(n) for n in dir(ast) if n.endswith("Stmt")} | READ_KINDS | OPAQUE_KINDS
                     | {"copy_from", "copy_to"})


@dataclass(frozen=True)
class Classification:
    kinds: frozenset[str] = frozenset()
    reads: frozenset[str] = frozenset()
    writes: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    unconditional: frozenset[str] = frozenset()  # update/delete/merge that touch every row
    copy_program: bool = False
    statements: int = 0
    error: str | None = None  # the parser's message when the text does not parse
    # columns that decide which rows come back or their order (WHERE, JOIN ... ON, GROUP BY, HAVING, ORDER BY)
    filter_columns: frozenset[str] = frozenset()
    # SET standard_conforming_strings to anything but on: PostgreSQL would then read backslashes in
    # plain string literals as escapes, and the statements after it differently from this parser
    escapes_off: bool = False
    # Lineage of result values, for column masking (which works on plain result columns only):
    # columns whose values are computed into a result or another row (inside expressions, set
    # operations, scalar subqueries, INSERT ... SELECT, UPDATE ... SET, views and tables made from queries),
    derived_columns: frozenset[str] = frozenset()
    # (output name, source name) of plain columns passed through a subquery or CTE under another name
    # ("*" as source: a star under renamed columns),
    renames: frozenset[tuple[str, str]] = frozenset()
    # and whether a whole row of a relation is taken as one value (`SELECT t FROM t`, `row_to_json(t.*)`).
    whole_rows: bool = False
    # makes writes possible again, or locks rows: START TRANSACTION READ WRITE, SET [default_]transaction_read_only
    # off, SELECT ... FOR UPDATE (a read-only session refuses these as writes)
    read_write: bool = False
    role_switch: bool = False  # SET ROLE, SET SESSION AUTHORIZATION: act as another database role
    copy_file: bool = False  # COPY to or from a file on the database server
    # The top-level statements' node names, in order (`SelectStmt`, `DropStmt`, ...): what the server will run
    nodes: tuple[str, ...] = ()
    # Per top-level statement, the CommandComplete tags the server may answer it with (None: any); the
    # session relay compares them with what the server says it ran (see sql/tags.py)
    expected_tags: tuple[frozenset[str] | None, ...] = ()
    # Whether the walk read the value of a constant (a literal's value decided something): then the
    # classification holds for this exact text only, not for others that differ in their constants
    value_dependent: bool = False
    # DDL that binds a function the server then calls with no call in any statement (CREATE OPERATOR,
    # CREATE CAST, CREATE AGGREGATE, a type's I/O functions, a language's handler, ...), changes how
    # existing functions run (ALTER FUNCTION), or links the database to another server (CREATE
    # SUBSCRIPTION, CREATE SERVER): each statement in words, "CREATE OPERATOR"
    function_bindings: frozenset[str] = frozenset()
    # Role, privilege and ownership administration, row-level security and database-wide settings:
    # "GRANT", "ALTER ROLE ... SET", "ALTER TABLE ... DISABLE ROW LEVEL SECURITY"
    privilege_changes: frozenset[str] = frozenset()
    # ALTER TABLE commands that destroy or rewrite stored data: "DROP COLUMN", "ALTER COLUMN ... TYPE"
    destructive_alters: frozenset[str] = frozenset()
    # SET transform_null_equals on: the server would then read `x = NULL` as `x IS NULL`, so a condition
    # the gateway reads as choosing no rows (`id = NULL OR NOT id = NULL`) would choose every row
    null_equals: bool = False
    # Lineage resolved as PostgreSQL resolves names (sql/lineage.py): the sources of values computed or
    # stored, and of plain result columns; what could not be followed; relations altered, renamed or dropped
    computed: frozenset[tuple] = frozenset()
    results: frozenset[tuple] = frozenset()
    unresolved: frozenset[str] = frozenset()
    altered: frozenset[str] = frozenset()
    scope_relations: frozenset[str] = frozenset()  # stored relations in its FROM lists, as typed
    # Not read at all: too large or complex to classify within the gateway's budget (`error` says so).
    uninspected: bool = False

    @functools.cached_property
    def changes_schema(self) -> bool:
        """DDL: anything but reads, row writes and session commands (CREATE TABLE AS and SELECT INTO too,
        whose command tag says SELECT)."""
        return bool(self.kinds - _NOT_DDL)

    @property
    def is_write(self) -> bool:
        return bool(self.kinds - READ_KINDS) or bool(self.writes) or self.copy_program or self.copy_file or self.read_write

    def public(self) -> dict[str, Any]:
        return {
            "kinds": sorted(self.kinds), "reads": sorted(self.reads), "writes": sorted(self.writes),
            "functions": sorted(self.functions), "unconditional": sorted(self.unconditional),
            "copy_program": self.copy_program, "statements": self.statements, "error": self.error,
            "filter_columns": sorted(self.filter_columns), "escapes_off": self.escapes_off,
            "derived_columns": sorted(self.derived_columns), "whole_rows": self.whole_rows,
            "read_write": self.read_write, "role_switch": self.role_switch, "copy_file": self.copy_file,
            "nodes": list(self.nodes), "function_bindings": sorted(self.function_bindings),
            "privilege_changes": sorted(self.privilege_changes), "destructive_alters": sorted(self.destructive_alters),
        }


@dataclass
class _Walk:
    kinds: set[str] = field(default_factory=set)
    reads: set[str] = field(default_factory=set)
    writes: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    unconditional: set[str] = field(default_factory=set)
    copy_program: bool = False
    filter_columns: set[str] = field(default_factory=set)
    escapes_off: bool = False
    read_write: bool = False
    role_switch: bool = False
    copy_file: bool = False
    value_dependent: bool = False
    function_bindings: set[str] = field(default_factory=set)
    privilege_changes: set[str] = field(default_factory=set)
    destructive_alters: set[str] = field(default_factory=set)
    null_equals: bool = False


def _const(node: Any, w: _Walk) -> dict[str, Any] | None:
    """The body of a constant (A_Const), read for its value. Every read of a literal's value goes through
    here, and marks the classification as holding for this text only (see Classification.value_dependent)."""
    if not isinstance(node, dict):
        return None
    const = node.get("A_Const")
    if not isinstance(const, dict):
        return None
    w.value_dependent = True
    return const


def _relname(rv: dict[str, Any]) -> str:
    name = rv.get("relname", "?")
    return f"{rv['schemaname']}.{name}" if rv.get("schemaname") else name


def _names(items: list[Any]) -> str:
    return ".".join(i.get("String", {}).get("sval", "?") for i in items if isinstance(i, dict))


def _visit(node: Any, w: _Walk) -> None:
    if isinstance(node, list):
        for item in node:
            _visit(item, w)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "A_Const":  # a literal: holds no statement, relation or call (its value is read by _const only)
            continue
        if key.endswith("Stmt") and isinstance(value, dict):
            _statement(key, value, w)
        elif key == "RangeVar" and isinstance(value, dict):
            w.reads.add(_relname(value))
        elif key in ("relation", "table") and isinstance(value, dict) and "relname" in value:
            # The relation a utility statement acts on (ALTER TABLE, CREATE INDEX or TRIGGER ON, CREATE
            # POLICY ON, REFRESH, CLUSTER, ...), a typed field the JSON does not wrap as a RangeVar
            w.writes.add(_relname(value))
        elif key == "JoinExpr" and isinstance(value, dict) and value.get("quals"):
            _columns(value["quals"], w.filter_columns)
            _visit(value, w)
        elif key == "setstmt" and isinstance(value, dict):  # ALTER ROLE / DATABASE ... SET: later sessions' settings
            _escapes(value, w)
            _visit(value, w)
        elif key == "DefElem" and isinstance(value, dict):  # START TRANSACTION READ WRITE and the like
            if value.get("defname") == "transaction_read_only" and _setting_value([value.get("arg")], w) not in _ON:
                w.read_write = True
            _visit(value, w)
        elif key == "lockingClause" and value:
            w.read_write = True
            _visit(value, w)
        elif key == "FuncCall" and isinstance(value, dict):
            name = _names(value.get("funcname", []))
            w.functions.add(name)
            if name == "pg_catalog.system_user":
                w.reads.add("system_user")  # before PostgreSQL 16 a name like any other: a table, in FROM
            _visit(value, w)
        elif key in _SQL_SYNTAX and isinstance(value, dict):
            # SQL/JSON and MERGE syntax of PostgreSQL 16 and later (the parser's grammar is 18's). An older
            # server reads `json_value(...)` as a call of whatever function of that name it finds, so the
            # rules see the name as a function either way.
            w.functions.add(_JSON_OPS.get(str(value.get("op")), "json_value") if key == "JsonFuncExpr" else _SQL_SYNTAX[key])
            _visit(value, w)
        elif key == "A_Indirection" and isinstance(value, dict):
            # `(expr).name` is a field of a composite value, or a call of the function `name` with `expr` as
            # its one argument (PostgreSQL's column notation): `(pid).pg_terminate_backend` calls it
            for item in value.get("indirection") or []:
                if isinstance(item, dict) and isinstance(item.get("String"), dict):
                    w.functions.add(str(item["String"].get("sval", "?")))
            _visit(value, w)
        elif isinstance(value, (dict, list)):
            _visit(value, w)


_SQL_SYNTAX = {
    "JsonFuncExpr": "", "JsonTable": "json_table", "JsonScalarExpr": "json_scalar", "JsonSerializeExpr": "json_serialize",
    "JsonParseExpr": "json", "JsonObjectConstructor": "json_object", "JsonArrayConstructor": "json_array",
    "JsonArrayQueryConstructor": "json_array", "JsonObjectAgg": "json_objectagg", "JsonArrayAgg": "json_arrayagg",
    "MergeSupportFunc": "merge_action",
}
_JSON_OPS = {"JSON_VALUE_OP": "json_value", "JSON_QUERY_OP": "json_query", "JSON_EXISTS_OP": "json_exists"}
_FILTER_KEYS = ("whereClause", "havingClause", "groupClause", "sortClause", "quals", "joinCondition")


def _columns(node: Any, out: set[str]) -> None:
    if isinstance(node, list):
        for item in node:
            _columns(item, out)
    elif isinstance(node, dict):
        ref = node.get("ColumnRef")
        if isinstance(ref, dict):
            names = [f["String"]["sval"] for f in ref.get("fields", []) if isinstance(f, dict) and "String" in f]
            if names:
                out.add(names[-1].lower())
        for key, value in node.items():
            if key != "A_Const" and isinstance(value, (dict, list)):
                _columns(value, out)


_ON = frozenset({"on", "true", "yes", "1"})
_OFF = frozenset({"off", "false", "no", "0"})
# Settings that make a session act as another database role (in SET, or in a session's startup options).
ROLE_SETTINGS = frozenset({"role", "session_authorization"})


def _setting_value(args: Any, w: _Walk) -> str | None:
    """The value of `SET name = value` as text, when it is one plain constant; else None."""
    if not isinstance(args, list) or len(args) != 1:
        return None
    const = _const(args[0], w)
    if const is None:
        return None
    for key, inner in (("sval", "sval"), ("ival", "ival"), ("boolval", "boolval")):
        if key in const:
            return str(const[key].get(inner, 0)).lower()
    return None


def _escapes(setting: dict[str, Any], w: _Walk) -> None:
    """A SET (of this session, or of a role's or database's sessions) that turns standard_conforming_strings off,
    turns read-only transactions off, or switches the database role."""
    name, value = str(setting.get("name", "")).lower(), _setting_value(setting.get("args"), w)
    if setting.get("kind") != "VAR_SET_VALUE":
        return
    if name == "standard_conforming_strings" and value not in _ON:
        w.escapes_off = True
    elif name in ("default_transaction_read_only", "transaction_read_only") and value not in _ON:
        w.read_write = True
    elif name in ROLE_SETTINGS and value not in ("none", "default"):
        w.role_switch = True
    elif name == "transform_null_equals" and value not in _OFF:
        w.null_equals = True


def _statement(name: str, body: dict[str, Any], w: _Walk) -> None:
    kind = kind_of(name)
    rest = dict(body)
    for key in _FILTER_KEYS:
        if rest.get(key):
            _columns(rest[key], w.filter_columns)
    if name in ("InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt") and "relation" in rest:
        relation = rest.pop("relation")
        w.writes.add(_relname(relation))
        if relation.get("relname") == "pg_settings" and relation.get("schemaname") in (None, "pg_catalog"):
            w.functions.add("pg_catalog.set_config")  # the view's rule turns an UPDATE into set_config calls
        if name in ("UpdateStmt", "DeleteStmt") and chooses_no_rows(rest.get("whereClause"), lambda n: _const(n, w)):
            w.unconditional.add(kind)
        if name == "MergeStmt" and _merge_touches_every_row(rest, w):
            w.unconditional.add(kind)
    elif name == "SelectStmt" and rest.get("intoClause"):
        w.writes.add(_relname(rest.pop("intoClause").get("rel", {})))
        kind = "select_into"
    elif name == "TruncateStmt":
        for item in rest.pop("relations", []):
            w.writes.add(_relname(item.get("RangeVar", {})))
    elif name == "DropStmt":
        for obj in rest.get("objects", []):
            if isinstance(obj, dict) and "List" in obj:
                w.writes.add(_names(obj["List"].get("items", [])))
    elif name == "VariableSetStmt":
        _escapes(rest, w)
    elif name == "CopyStmt":
        rel = rest.pop("relation", None)
        kind = "copy_from" if rest.get("is_from") else "copy_to"
        if rel is not None:
            (w.writes if rest.get("is_from") else w.reads).add(_relname(rel))
        if rest.get("is_program"):
            w.copy_program = True
        elif rest.get("filename"):
            w.copy_file = True
    _administration(name, rest, w)
    w.kinds.add(kind)
    _visit(rest, w)


def _merge_touches_every_row(merge: dict[str, Any], w: _Walk) -> bool:
    """MERGE updates or deletes every row of its target when a WHEN MATCHED clause that does so has no
    condition of its own and ON counts as no condition (each target row matches), or a WHEN NOT MATCHED
    BY SOURCE clause has none and ON names no column (either every row matches or none does)."""
    on = merge.get("joinCondition")
    on_none = on_constant = None
    for item in merge.get("mergeWhenClauses") or []:
        clause = item.get("MergeWhenClause") if isinstance(item, dict) else None
        if not isinstance(clause, dict) or clause.get("commandType") not in ("CMD_UPDATE", "CMD_DELETE"):
            continue
        match = clause.get("matchKind") or ("MERGE_WHEN_MATCHED" if clause.get("matched") else "")
        if not chooses_no_rows(clause.get("condition"), lambda n: _const(n, w)):
            continue
        if match == "MERGE_WHEN_MATCHED":
            if on_none is None:
                on_none = chooses_no_rows(on, lambda n: _const(n, w))
            if on_none:
                return True
        elif match == "MERGE_WHEN_NOT_MATCHED_BY_SOURCE":
            if on_constant is None:
                on_constant = names_no_column(on)
            if on_constant:
                return True
    return False


# Statements that bind a function the server will call with no call of it in any later statement, change
# how existing functions run, or link the database to another server (Classification.function_bindings).
_BINDINGS = {
    "CreateCastStmt": "CREATE CAST", "CreateConversionStmt": "CREATE CONVERSION",
    "CreateOpClassStmt": "CREATE OPERATOR CLASS", "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY",
    "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY", "AlterOperatorStmt": "ALTER OPERATOR",
    "AlterTypeStmt": "ALTER TYPE ... SET", "CreateTransformStmt": "CREATE TRANSFORM",
    "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER", "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER",
    "CreatePLangStmt": "CREATE LANGUAGE", "CreateAmStmt": "CREATE ACCESS METHOD", "CreateTrigStmt": "CREATE TRIGGER",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER", "AlterEventTrigStmt": "ALTER EVENT TRIGGER",
    "AlterFunctionStmt": "ALTER FUNCTION", "CreateSubscriptionStmt": "CREATE SUBSCRIPTION",
    "AlterSubscriptionStmt": "ALTER SUBSCRIPTION", "CreateForeignServerStmt": "CREATE SERVER",
    "AlterForeignServerStmt": "ALTER SERVER", "CreateUserMappingStmt": "CREATE USER MAPPING",
    "AlterUserMappingStmt": "ALTER USER MAPPING", "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA",
}
# CREATE AGGREGATE, OPERATOR, TYPE (with I/O functions), TEXT SEARCH PARSER and TEMPLATE all bind functions;
# these do not (any other kind of DefineStmt counts as binding one).
_DEFINES_NO_FUNCTION = frozenset({"OBJECT_COLLATION", "OBJECT_TSDICTIONARY", "OBJECT_TSCONFIGURATION"})
_DEFINE_NAMES = {"OBJECT_TSPARSER": "TEXT SEARCH PARSER", "OBJECT_TSTEMPLATE": "TEXT SEARCH TEMPLATE"}
_PRIVILEGES = {
    "CreateRoleStmt": "CREATE ROLE", "AlterRoleStmt": "ALTER ROLE", "AlterRoleSetStmt": "ALTER ROLE ... SET",
    "DropRoleStmt": "DROP ROLE", "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
    "CreatePolicyStmt": "CREATE POLICY", "AlterPolicyStmt": "ALTER POLICY", "AlterOwnerStmt": "ALTER ... OWNER TO",
    "ReassignOwnedStmt": "REASSIGN OWNED", "DropOwnedStmt": "DROP OWNED", "SecLabelStmt": "SECURITY LABEL",
    "AlterDatabaseStmt": "ALTER DATABASE", "AlterDatabaseSetStmt": "ALTER DATABASE ... SET",
}
_RENAMES = {"OBJECT_ROLE": "ALTER ROLE ... RENAME", "OBJECT_POLICY": "ALTER POLICY ... RENAME",
            "OBJECT_DATABASE": "ALTER DATABASE ... RENAME"}
_TABLE_PRIVILEGES = {
    "AT_EnableRowSecurity": "ENABLE ROW LEVEL SECURITY", "AT_DisableRowSecurity": "DISABLE ROW LEVEL SECURITY",
    "AT_ForceRowSecurity": "FORCE ROW LEVEL SECURITY", "AT_NoForceRowSecurity": "NO FORCE ROW LEVEL SECURITY",
    "AT_ChangeOwner": "OWNER TO",
}
_TABLE_DESTROYS = {"AT_DropColumn": "DROP COLUMN", "AT_AlterColumnType": "ALTER COLUMN ... TYPE"}


def _administration(name: str, body: dict[str, Any], w: _Walk) -> None:
    """Function bindings, privilege changes and destructive ALTER TABLE commands of one statement. Reads
    node names and fields the grammar sets, never a constant's value."""
    if name in _BINDINGS:
        w.function_bindings.add(_BINDINGS[name])
    elif name == "DefineStmt":
        what = str(body.get("kind", ""))
        if what not in _DEFINES_NO_FUNCTION and not (what == "OBJECT_TYPE" and not body.get("definition")):
            w.function_bindings.add("CREATE " + _DEFINE_NAMES.get(what, what.removeprefix("OBJECT_").replace("_", " ")))
    elif name == "CreateRangeStmt":
        params = [p.get("DefElem", {}).get("defname") for p in body.get("params") or [] if isinstance(p, dict)]
        if {"subtype_diff", "canonical"} & set(params):
            w.function_bindings.add("CREATE TYPE ... AS RANGE")
    elif name in _PRIVILEGES:
        w.privilege_changes.add(_PRIVILEGES[name])
    elif name in ("GrantStmt", "GrantRoleStmt"):
        verb = "GRANT" if body.get("is_grant") else "REVOKE"
        w.privilege_changes.add(verb if name == "GrantStmt" else f"{verb} (role membership)")
    elif name == "RenameStmt" and body.get("renameType") in _RENAMES:
        w.privilege_changes.add(_RENAMES[body["renameType"]])
    elif name == "DropStmt" and body.get("removeType") == "OBJECT_POLICY":
        w.privilege_changes.add("DROP POLICY")
    elif name == "AlterTableStmt":
        what = "TYPE" if body.get("objtype") == "OBJECT_TYPE" else "TABLE"
        for item in body.get("cmds") or []:
            cmd = item.get("AlterTableCmd") if isinstance(item, dict) else None
            sub = str((cmd or {}).get("subtype", ""))
            if sub in _TABLE_PRIVILEGES:
                w.privilege_changes.add(f"ALTER {what} ... {_TABLE_PRIVILEGES[sub]}")
            elif sub in _TABLE_DESTROYS:
                label = _TABLE_DESTROYS[sub]
                w.destructive_alters.add(label.replace("COLUMN", "ATTRIBUTE") if what == "TYPE" else label)


@dataclass
class _Lineage:
    derived: set[str] = field(default_factory=set)
    renames: set[tuple[str, str]] = field(default_factory=set)
    singles: set[str] = field(default_factory=set)  # one-name references: a column, or a whole row
    relations: set[str] = field(default_factory=set)  # relation, alias, subquery and CTE names in scope
    star_value: bool = False  # `t.*` or `*` used as a value, not expanded into result columns

    def ref(self, ref: dict[str, Any]) -> tuple[str | None, bool]:
        """A ColumnRef's last name (None for a star) and whether it has one name only."""
        fields = [f for f in ref.get("fields", []) if isinstance(f, dict)]
        if not fields or "String" not in fields[-1]:
            return None, False
        return fields[-1]["String"]["sval"].lower(), len(fields) == 1

    def values(self, node: Any) -> None:
        """Every column in an expression whose value reaches a result or a row: derived."""
        if isinstance(node, list):
            for item in node:
                self.values(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key == "ColumnRef" and isinstance(value, dict):
                    name, single = self.ref(value)
                    if name is None:
                        self.star_value = True
                    else:
                        self.derived.add(name)
                        if single:
                            self.singles.add(name)
                elif key == "SelectStmt" and isinstance(value, dict):
                    self.select(value, tracked=False)  # a scalar, ARRAY or EXISTS subquery: no column origin
                elif isinstance(value, (dict, list)):
                    self.values(value)

    def targets(self, items: Any, tracked: bool) -> list[tuple[str, str]]:
        """A target list. Plain columns of a `tracked` list keep their origin (PostgreSQL reports it in
        RowDescription, so masking finds them); everything else is derived. Returns (output, source)."""
        plain: list[tuple[str, str]] = []
        for item in items or []:
            target = item.get("ResTarget", {}) if isinstance(item, dict) else {}
            val = target.get("val")
            ref = val.get("ColumnRef") if isinstance(val, dict) and len(val) == 1 else None
            if tracked and isinstance(ref, dict):
                name, single = self.ref(ref)
                if single and name is not None:
                    self.singles.add(name)
                plain.append((str(target.get("name") or name or "*").lower(), name or "*"))
            else:
                self.values(val)
        return plain

    def select(self, s: dict[str, Any], tracked: bool, colnames: Any = None) -> None:
        if s.get("op") not in (None, "SETOP_NONE"):  # UNION, INTERSECT, EXCEPT: result columns have no origin
            for arm in ("larg", "rarg"):
                if isinstance(s.get(arm), dict):
                    self.select(s[arm], tracked=False)
            self.other(s.get("withClause"))
            return
        plain = self.targets(s.get("targetList"), tracked)
        self.values(s.get("valuesLists"))
        names = [c.get("String", {}).get("sval", "").lower() for c in colnames or [] if isinstance(c, dict)]
        for out, src in plain:
            self.renames.add((out, src))
            for renamed in names:  # `AS s(a, b)` renames by position; a star hides which: all of them
                self.renames.add((renamed, src))
        for key, value in s.items():
            if key not in ("targetList", "valuesLists", "larg", "rarg"):
                self.other(value)

    def other(self, node: Any) -> None:
        """Any other part of a statement: find the queries, relations and value lists inside it."""
        if isinstance(node, list):
            for item in node:
                self.other(item)
            return
        if not isinstance(node, dict):
            return
        for key, value in node.items():
            if not isinstance(value, (dict, list)):
                continue
            if key == "SelectStmt":
                self.select(value, tracked=False)
            elif key == "RangeVar":
                self.relations.add(str(value.get("relname", "")).lower())
                self.alias(value)
            elif key == "RangeSubselect":
                self.alias(value)
                if isinstance(value.get("subquery", {}).get("SelectStmt"), dict):
                    self.select(value["subquery"]["SelectStmt"], True, (value.get("alias") or {}).get("colnames"))
            elif key == "CommonTableExpr":
                self.relations.add(str(value.get("ctename", "")).lower())
                query = value.get("ctequery", {})
                if isinstance(query.get("SelectStmt"), dict):
                    self.select(query["SelectStmt"], True, value.get("aliascolnames"))
                else:
                    self.statement(query)
            elif key == "RangeFunction":  # functions in FROM compute rows from their arguments (values, so
                self.values(value.get("functions"))  # derived); their alias names no table row
            elif key == "returningList":
                for out, src in self.targets(value, tracked=True):
                    self.renames.add((out, src))
            elif key == "targetList":  # UPDATE ... SET: values written into another column
                self.targets(value, tracked=False)
            else:
                self.other(value)

    def alias(self, node: dict[str, Any]) -> None:
        if isinstance(node.get("alias"), dict):
            self.relations.add(str(node["alias"].get("aliasname", "")).lower())

    def statement(self, stmt: Any) -> None:
        """A top-level statement: a SELECT's (and PREPARE's, DECLARE's) plain columns keep their origin."""
        if not isinstance(stmt, dict):
            return
        for key, value in stmt.items():
            if key == "SelectStmt" and isinstance(value, dict):
                self.select(value, tracked=True)
            elif key in ("PrepareStmt", "DeclareCursorStmt") and isinstance(value, dict):
                self.statement(value.get("query"))
                self.other({k: v for k, v in value.items() if k != "query"})
            else:
                self.other({key: value})


def lineage(stmts: list[Any]) -> _Lineage:
    lin = _Lineage()
    for stmt in stmts:
        lin.statement(stmt)
    return lin


def template_key(text: str) -> str | None:
    """A key that `text` shares with the texts PostgreSQL's parser reads as the same statements with other
    constants: libpg_query's normalisation (the one pg_stat_statements uses), in which each constant the
    parser found becomes a placeholder. None when there is none to share.

    Two texts with one key have equal tokens outside their constants, so the parser builds them the same
    tree but for the constants' values, and a classification that read no value (not value_dependent)
    holds for both. A text with a `$` is left out: its own parameters would look like the placeholders
    (`select $1 + 5` and `select $1 + $2` normalise alike), and so would a dollar-quoted string."""
    if "$" in text:
        return None
    try:
        return normalize(text)
    except (ParseError, RecursionError, ValueError):
        return None


def classify(text: str) -> Classification:
    """The classification of exactly `text`, as PostgreSQL's parser reads it. Anything it cannot read
    (a syntax error, or nesting too deep to follow) has `error` set, and is refused by every policy."""
    try:
        tree = json.loads(parse_sql_json(text))
        stmts = tree.get("stmts", [])
        w = _Walk()
        bodies = [s.get("stmt", {}) for s in stmts]
        _visit(bodies, w)
        if "view" in w.kinds and any(r.rsplit(".", 1)[-1] == "pg_settings" for r in w.reads):
            # An UPDATE of a view over pg_settings reaches the view's rule, which calls set_config, with
            # no call in any statement: the view is refused as that call would be.
            w.functions.add("pg_catalog.set_config")
        lin = lineage(bodies)
        resolved = resolve_lineage(bodies)
    except ParseError as exc:
        return Classification(error=str(exc.args[0]) if exc.args else "syntax error")
    except ValueError as exc:
        # libpg_query's message can quote half a character (an invalid surrogate escape before a
        # non-ASCII one), which pglast cannot decode: a syntax error all the same
        return Classification(error=f"the statement does not parse ({type(exc).__name__})")
    except RecursionError:
        # libpg_query follows nesting PostgreSQL itself would refuse (its max_stack_depth); the JSON
        # decoder and the walk stop earlier. Either way there is nothing sound to decide on.
        return Classification(error="the statement is nested too deeply for the gateway to read; simplify it")
    return Classification(
        frozenset(w.kinds), frozenset(w.reads), frozenset(w.writes), frozenset(w.functions),
        frozenset(w.unconditional), w.copy_program, len(stmts), None, frozenset(w.filter_columns), w.escapes_off,
        frozenset(lin.derived), frozenset(lin.renames), lin.star_value or bool(lin.singles & lin.relations),
        w.read_write, w.role_switch, w.copy_file,
        tuple(next(iter(b), "") for b in bodies), tuple(expected_tag(b) for b in bodies), w.value_dependent,
        function_bindings=frozenset(w.function_bindings), privilege_changes=frozenset(w.privilege_changes),
        destructive_alters=frozenset(w.destructive_alters), null_equals=w.null_equals,
        computed=frozenset(resolved.computed), results=frozenset(resolved.results),
        unresolved=frozenset(resolved.unresolved), altered=frozenset(resolved.altered),
        scope_relations=frozenset(resolved.relations),
    )
