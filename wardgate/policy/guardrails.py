"""Guardrails: rules over classified statements, scoped to connections and groups.

A rule matches a statement when any of its conditions does. Actions are `deny` and `review`
(a review is refused until the review workflow exists: fail closed); `shadow = true` records what
the rule would have done without enforcing it. Statements the parser rejects are always denied.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..domain import Identity
from ..sql.classify import OPAQUE_KINDS, Classification, classify, kind_of, known_kinds, template_key
from .scope import in_scope

# Patterns (fnmatch) over a function's name and its schema-qualified name, as the parser reads them
# (case-folded unless quoted, U&"" decoded): so pg_catalog."pg_terminate_backend" and PG_TERMINATE_BACKEND
# are both pg_terminate_backend. Calls in column notation, `(pid).pg_terminate_backend`, count too.
DANGEROUS_FUNCTIONS = (
    # files on the database server, and large objects (which lo_import and lo_export move to and from them;
    # the rest of the family writes and reads objects shared by every session of the database)
    "pg_read_file*", "pg_read_binary_file*", "pg_ls_*", "pg_stat_file", "pg_file_*", "pg_logdir_ls",
    "lo_*", "loread", "lowrite",
    # SQL the gateway cannot see: a query, cursor, table or schema named in a string
    "query_to_xml*", "cursor_to_xml*", "table_to_xml*", "schema_to_xml*", "database_to_xml*", "ts_stat", "ts_rewrite",
    "crosstab*", "connectby", "xpath_table",
    # other servers
    "dblink*",
    # other sessions: signals to their backends
    "pg_cancel_backend", "pg_terminate_backend", "pg_signal_backend", "pg_log_backend_memory_contexts",
    # the server: configuration, logs, WAL, backups, replication, statistics
    "pg_reload_conf", "pg_rotate_logfile*", "pg_logfile_rotate", "pg_promote", "pg_switch_wal", "pg_switch_xlog",
    "pg_create_restore_point", "pg_backup_start", "pg_backup_stop", "pg_start_backup", "pg_stop_backup",
    "pg_wal_replay_*", "pg_xlog_replay_*", "pg_create_*_replication_slot", "pg_copy_*_replication_slot",
    "pg_drop_replication_slot", "pg_replication_slot_advance", "pg_logical_slot_*", "pg_replication_origin_*",
    "pg_logical_emit_message", "pg_sync_replication_slots", "pg_stat_reset*", "pg_stat_statements_reset",
    "pg_import_system_collations",
    # settings, which SET would show the gateway (an UPDATE of pg_settings calls it too)
    "set_config",
)


@dataclass(frozen=True)
class Rule:
    name: str
    action: str = "deny"  # deny or review
    message: str = ""
    connections: tuple[str, ...] = ("*",)
    groups: tuple[str, ...] = ("*",)
    except_groups: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    relations: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    unconditional: bool = False
    writes: bool = False
    copy_program: bool = False
    role_switch: bool = False  # SET ROLE / SET SESSION AUTHORIZATION
    escapes_off: bool = False  # statements that turn standard_conforming_strings off
    null_equals: bool = False  # statements that turn transform_null_equals on
    masked_filters: bool = False  # statements that filter, join, group or sort on a masked column
    masked_derived: bool = False  # statements that compute values from a masked column, or take whole rows
    binds_function: bool = False  # DDL binding a function called unseen, or another server (Classification.function_bindings)
    privileges: bool = False  # role, privilege, ownership, row-level security and database settings administration
    destructive_alter: bool = False  # ALTER TABLE ... DROP COLUMN, ALTER COLUMN ... TYPE
    masked_columns: tuple[str, ...] = ()  # filled per session from the masking rules that apply
    masked_unresolved: bool = False  # statements whose lineage cannot be followed to the catalog
    masked_schema: bool = False  # ALTER, RENAME or DROP of a relation holding a masked column
    # The session's masking catalog (masking/catalog.py): masked columns by identity. Without one (a policy
    # check outside a session), masked columns are matched by name.
    catalog: Any = field(default=None, compare=False, repr=False)
    shadow: bool = False
    approvers: tuple[str, ...] = ()  # review: groups whose members may approve (none: the admins)
    min_approvals: int = 1  # review: approvals needed, each from a different person, never the requester

    def applies_to(self, identity: Identity, connection: str) -> bool:
        return in_scope(identity, connection, self.connections, self.groups, self.except_groups)

    def why(self, c: Classification) -> str | None:
        """The reason this rule matches `c`, or None."""
        if self.kinds and (hit := sorted(c.kinds & set(self.kinds))):
            return f"statement kind {', '.join(hit)}"
        if self.relations:
            touched = sorted(c.reads | c.writes)
            for rel in touched:
                short = rel.rsplit(".", 1)[-1]
                if any(fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(short, p) for p in self.relations):
                    return f"relation {rel}"
        if self.functions:
            for fn in sorted(c.functions):
                short = fn.rsplit(".", 1)[-1]
                if any(fnmatch.fnmatchcase(short, p) or fnmatch.fnmatchcase(fn, p) for p in self.functions):
                    return f"function {short}"
        if self.unconditional and c.unconditional:
            return f"{', '.join(sorted(c.unconditional)).upper()} without a condition"
        if self.writes and c.is_write:
            return "a write on a read-only connection"
        if self.copy_program and c.copy_program:
            return "COPY ... PROGRAM"
        if self.copy_program and c.copy_file:
            return "COPY to or from a file on the database server"
        if self.role_switch and c.role_switch:
            return "switches the database role"
        if self.null_equals and c.null_equals:
            return "turns transform_null_equals on (x = NULL would then mean x IS NULL)"
        if self.escapes_off and c.escapes_off:
            return "turns standard_conforming_strings off"
        if self.binds_function and c.function_bindings:
            return f"{', '.join(sorted(c.function_bindings))} binds a function, or another server, to the database"
        if self.privileges and c.privilege_changes:
            return f"{', '.join(sorted(c.privilege_changes))} administers roles, privileges or the database"
        if self.destructive_alter and c.destructive_alters:
            return f"ALTER ... {', '.join(sorted(c.destructive_alters))} destroys or rewrites stored data"
        if self.masked_filters and self.masked_columns:
            if col := _first_masked(c.filter_columns, self.masked_columns, c.renames):
                return f"filters, joins, groups or sorts on masked column {col} (its values could be inferred)"
        catalog = self.catalog
        if (self.masked_derived or self.masked_unresolved) and catalog is not None and catalog.loaded:
            hit = catalog.hit(c.computed, c.results, c.scope_relations)
            if self.masked_unresolved and c.unresolved:
                return f"{sorted(c.unresolved)[0]}; the gateway cannot tell which columns it copies"
            if hit is not None and (hit[0] == "derived") == self.masked_derived:
                return hit[1]
            return None
        if self.masked_unresolved and c.unresolved:
            return f"{sorted(c.unresolved)[0]}; the gateway cannot tell which columns it copies"
        if self.masked_unresolved and self.masked_columns and any(s[0] == "pos" for s in c.computed):
            # Without the catalog, a column named by its position in an alias list cannot be placed.
            return "computes a value from a column renamed by an alias list, which the gateway cannot place here"
        if self.masked_schema and c.altered:
            if catalog is not None and catalog.loaded:
                if rel := catalog.altered(c.altered):
                    return f"alters, renames or drops {rel}, which holds a masked column"
            else:
                return f"alters, renames or drops {sorted(c.altered)[0]}, which may hold a masked column"
        if self.masked_derived and self.masked_columns:
            if c.whole_rows:
                return "takes whole rows as one value, with their masked columns inside"
            if col := _first_masked(c.derived_columns, self.masked_columns, c.renames):
                return f"computes a value from masked column {col}"
            return _computed_by_name(c, self.masked_columns)
        return None


def _computed_by_name(c: Classification, patterns: tuple[str, ...]) -> str | None:
    """Without a catalog (a policy check outside a session): the statement's lineage matched by the names
    rules give. A session decides on its catalog instead, by the columns' identity."""
    columns = {p.rsplit(".", 1)[-1].lower() for p in patterns}
    tables = {p.split(".")[-2].lower() for p in patterns if "." in p}
    anywhere = any("." not in p for p in patterns)
    for src in sorted(c.computed | c.results, key=repr):
        if src[0] == "row" and (anywhere or src[1].rsplit(".", 1)[-1] in tables):
            return f"takes whole rows of {src[1]}, which may hold a masked column"
        if src in c.computed and src[0] in ("any", "name"):
            col = src[1] if src[0] == "any" else src[2]
            if any(fnmatch.fnmatchcase(col, m) for m in columns):
                return f"computes a value from masked column {col}"
    return None


def _first_masked(columns: frozenset[str], patterns: tuple[str, ...], renames: frozenset[tuple[str, str]]) -> str | None:
    """The first of `columns` (plain names, as a statement writes them) that may be a masked column.
    A rule's `table.column` is matched by its column name (a statement's reference seldom names the
    table, and an alias hides it), and names a subquery or CTE gives a masked column are masked too."""
    masks = {p.rsplit(".", 1)[-1].lower() for p in patterns}

    def masked(name: str) -> bool:
        return name in aliases or any(fnmatch.fnmatchcase(name, m) for m in masks)

    aliases: set[str] = set()
    grew = True
    while grew:
        grew = False
        for out, src in renames:
            if out not in aliases and (src == "*" or masked(src)):
                aliases.add(out)
                grew = True
    return next((col for col in sorted(columns) if masked(col)), None)


def standard_rules(scope: dict[str, Any]) -> list[Rule]:
    """What a security team starts from: the preset `standard`."""
    return [
        Rule("standard:dangerous-functions", functions=DANGEROUS_FUNCTIONS, copy_program=True,
             message="reads or writes server files or large objects, runs programs or SQL the gateway cannot see, "
                     "reaches other servers, signals other sessions or reconfigures the server", **scope),
        Rule("standard:destructive-ddl", kinds=("drop", "truncate", "alter_system", "drop_database", "drop_role"),
             destructive_alter=True,
             message="destroys data (DROP, TRUNCATE, a dropped column, a column's type changed, which can round or "
                     "truncate its values) or reconfigures the server", **scope),
        # A condition that holds for every row whose columns have values (1 = 1, NOT false, id IS NOT NULL,
        # x = x, or one naming no column at all) is no condition: see wardgate/sql/conditions.py.
        Rule("standard:unconditional-writes", unconditional=True,
             message="would change every row; add a WHERE clause that chooses rows by their columns (one that holds "
                     "for every row, such as 1 = 1 or id IS NOT NULL, counts as none)", **scope),
        # The gateway logs in as the connection's role; acting as another would escape what that role
        # is allowed, and what the record says of who did what.
        Rule("standard:role-switch", role_switch=True,
             message="the gateway acts as the connection's database role; SET ROLE and SET SESSION AUTHORIZATION "
                     "would act as another", **scope),
        Rule("standard:opaque-code", kinds=tuple(sorted(OPAQUE_KINDS)), message="DO blocks and procedures cannot be inspected", **scope),
        # Code stored in the server runs later, out of the gateway's sight: a function body is a string
        # to the parser, so creating one would be a way around every rule above.
        Rule("standard:server-code", kinds=("create_function", "create_trig", "create_event_trig", "rule", "load",
                                            "create_extension", "alter_extension"),
             message="creates code or loads libraries that would run out of the gateway's sight", **scope),
        # An operator, cast, aggregate, type or language calls its function with no call in the statement that
        # uses it (CREATE OPERATOR ### (FUNCTION = pg_terminate_backend), then `pid ### 0`): every rule on
        # functions would be blind to it. Foreign servers and subscriptions reach other databases.
        Rule("standard:function-binding", binds_function=True,
             message="binds a function the server would call with no call in any statement (operators, casts, "
                     "aggregates, types, conversions, languages, access methods, triggers), changes how stored "
                     "functions run, or links the database to another server", **scope),
        # Every user of a connection shares its database role: a setting, grant or ownership change on it is a
        # change for all of them, and outlives the session.
        Rule("standard:privileges", privileges=True,
             message="administers roles, privileges, ownership or row-level security, or changes database-wide "
                     "settings; the connection's database role is shared by everyone who uses it", **scope),
    ]


@dataclass(frozen=True)
class Match:
    rule: str
    action: str
    reason: str
    message: str
    shadow: bool
    approvers: tuple[str, ...] = ()  # review: from the rule that matched
    min_approvals: int = 1

    def public(self) -> dict[str, Any]:
        return {"rule": self.rule, "action": self.action, "reason": self.reason, "message": self.message, "shadow": self.shadow}


@dataclass(frozen=True)
class Decision:
    action: str  # allow, deny or review
    matches: tuple[Match, ...] = ()
    classification: Classification = field(default_factory=Classification)

    @property
    def enforced(self) -> list[Match]:
        return [m for m in self.matches if not m.shadow]

    @property
    def error_message(self) -> str:
        m = self.enforced[0] if self.enforced else None
        if m is None:
            return "allowed"
        verb = "needs review" if m.action == "review" else "denied"
        text = f"{verb} by rule {m.rule}: {m.reason}"
        return f"{text} ({m.message})" if m.message else text

    def public(self) -> dict[str, Any]:
        return {"action": self.action, "matches": [m.public() for m in self.matches],
                "classification": self.classification.public()}


# Statements longer than this are decided every time rather than kept: the cache holds short texts only.
CACHE_TEXT_LIMIT = 16 * 1024


class StatementPolicy:
    """The rules that apply to one identity on one connection.

    Decisions are made on the exact text the server will parse, and cached under that text; a decision
    whose classification read no constant's value is cached under the statement's template instead (see
    classify.template_key), so `WHERE aid = 7` and `WHERE aid = 8` are decided once between them."""

    def __init__(self, rules: list[Rule], cache_size: int = 2048) -> None:
        self.rules = rules
        # An enforced rule refuses every write: the session's transactions are made read-only upstream too,
        # so a write no rule can see (a function that writes, called in a SELECT) fails in the database.
        self.read_only = any(r.writes and not r.shadow and r.action == "deny" for r in rules)
        self._cache: OrderedDict[str, Decision] = OrderedDict()
        self._cache_size = cache_size

    def forget(self) -> None:
        """Drop every cached decision (the catalog some rules read has changed)."""
        self._cache.clear()

    def decided(self, text: str) -> bool:
        """Whether `decide(text)` is answered from the cache, without classifying."""
        return len(text) <= CACHE_TEXT_LIMIT and text in self._cache

    def decide(self, text: str, classification: Classification | None = None) -> Decision:
        """The decision on `text`; `classification` is its classification when the caller already has it
        (made off the event loop for a long statement, see sql/offload.py)."""
        if len(text) > CACHE_TEXT_LIMIT:  # never cached: not even hashed (64 MiB take 40 ms)
            return self._decide(text, classification)
        cache = self._cache
        hit = cache.get(text)
        if hit is not None:
            return hit
        template = template_key(text)
        if template is not None:
            # A template key starts with NUL, which no statement text holds (PostgreSQL reads a C string),
            # so the two kinds of key never meet.
            template = "\0" + template
            hit = cache.get(template)
            if hit is not None:
                return hit
        decision = self._decide(text, classification)
        key = template if template is not None and not decision.classification.value_dependent else text
        cache[key] = decision
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return decision

    def _decide(self, text: str, c: Classification | None = None) -> Decision:
        if c is None:
            c = classify(text)
        if c.uninspected:
            return Decision("deny", (Match("gateway:inspection", "deny", c.error or "", "", False),), c)
        if c.error is not None:
            m = Match("parser", "deny", f"the statement does not parse: {c.error}", "", False)
            return Decision("deny", (m,), c)
        matches = []
        for rule in self.rules:
            reason = rule.why(c)
            if reason is not None:
                matches.append(Match(rule.name, rule.action, reason, rule.message, rule.shadow, rule.approvers,
                                     rule.min_approvals))
        enforced = [m.action for m in matches if not m.shadow]
        action = "deny" if "deny" in enforced else ("review" if "review" in enforced else "allow")
        return Decision(action, tuple(matches), c)


def parse_rules(raw: list[dict[str, Any]]) -> list[Rule]:
    """[[guardrails]] entries from the config: rules, or `preset = "standard"` with a scope."""
    rules: list[Rule] = []
    for i, entry in enumerate(raw, 1):
        entry = dict(entry)
        scope = {k: tuple(entry.pop(k)) for k in ("connections", "groups", "except_groups") if k in entry}
        if "shadow" in entry:
            scope["shadow"] = bool(entry["shadow"])
        preset = entry.pop("preset", None)
        if preset is not None:
            entry.pop("shadow", None)
            if preset != "standard" or entry:
                raise ValueError(f"guardrail {i}: preset must be \"standard\" with only connections, groups, except_groups, shadow")
            rules.extend(standard_rules(scope))
            continue
        name = entry.pop("name", f"guardrail-{i}")
        action = entry.pop("action", "deny")
        if action not in ("deny", "review"):
            raise ValueError(f"guardrail {name!r}: action must be deny or review")
        entry.pop("shadow", None)
        fields = {}
        for key in ("kinds", "relations", "functions"):
            if key in entry:
                fields[key] = tuple(entry.pop(key))
        unknown_kinds = sorted(set(fields.get("kinds", ())) - known_kinds())
        if unknown_kinds:  # a rule that names no real kind would never match: refuse it rather than guard nothing
            hint = ", ".join(f"{k!r} (use {kind_of(k)!r}?)" if kind_of(k) in known_kinds() else repr(k) for k in unknown_kinds)
            raise ValueError(f"guardrail {name!r}: unknown statement kinds {hint}; kinds are snake_case statement "
                             "names such as select, insert, update, delete, truncate, drop, alter_system, do, call")
        for key in ("unconditional", "writes", "copy_program", "masked_filters", "role_switch", "binds_function",
                    "privileges", "destructive_alter"):
            if key in entry:
                fields[key] = bool(entry.pop(key))
        if entry.get("dangerous_functions"):
            entry.pop("dangerous_functions")
            fields["functions"] = fields.get("functions", ()) + DANGEROUS_FUNCTIONS
        message = entry.pop("message", "")
        if "approvers" in entry or "min_approvals" in entry:
            if action != "review":
                raise ValueError(f"guardrail {name!r}: approvers and min_approvals go with action = \"review\"")
            fields["approvers"] = tuple(entry.pop("approvers", ()))
            fields["min_approvals"] = int(entry.pop("min_approvals", 1))
            if fields["min_approvals"] < 1:
                raise ValueError(f"guardrail {name!r}: min_approvals must be at least 1")
        if entry:
            raise ValueError(f"guardrail {name!r}: unknown keys {sorted(entry)}")
        if not set(fields) - {"approvers", "min_approvals"}:
            raise ValueError(f"guardrail {name!r} matches nothing: give kinds, relations, functions, unconditional, writes, "
                             "copy_program, masked_filters, role_switch, binds_function, privileges or destructive_alter")
        rules.append(Rule(name, action, message, **scope, **fields))
    return rules
