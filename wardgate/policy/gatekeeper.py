"""The Gatekeeper: the one decision every door asks before acting for an identity."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Callable
from typing import Any

from ..config import Settings
from ..domain import Identity
from ..masking.catalog import Shared
from ..masking.plan import MaskingPolicy
from ..sql.classify import Classification
from .access import AccessDecision, AccessPolicy
from .guardrails import Decision, Rule, StatementPolicy

COPY_OUT_RULE = Rule(
    "masking:copy-out", kinds=("copy_to",),
    message="column masking applies to you on this connection, and COPY output cannot be masked by column; "
            "use SELECT, whose result columns the gateway masks",
)

# With standard_conforming_strings off, PostgreSQL reads a backslash in a plain string literal as an
# escape, and so splits `SELECT 'a\' , ' ; DROP TABLE t; -- '` into a SELECT and a DROP, where the
# gateway's parser (like PostgreSQL's default) sees one SELECT of two strings. Every rule relies on
# reading statements as the server does, so wherever a rule applies, the setting stays on: this rule
# refuses changing it, and the gateway refuses sessions (and ends any) where the server reports it off.
# Column masking rewrites result columns that come straight from a masked column; PostgreSQL names
# their origin in RowDescription, even through aliases, subqueries and CTEs. A value computed from a
# masked column (`upper(status)`, `status || ''`, `to_jsonb(t)`, a UNION, a scalar subquery, a copy into
# another table or view) has no origin to go by, so for identities the masking applies to, it is refused.
DERIVED_RULE = Rule(
    "masking:derived", masked_derived=True,
    message="column masking applies to you on this connection, and only plain masked columns can be masked in "
            "results; select the column itself (it comes back masked), or ask for an exemption",
)

UNRESOLVED_RULE = Rule(
    "masking:unresolved", masked_unresolved=True,
    message="column masking applies to you on this connection, and the gateway cannot tell which columns this "
            "statement reads or copies; name the columns of the tables themselves",
)

# Masking follows a column by its identity (table OID, attribute number), so a rename cannot unmask it for
# anyone; but the rules that name it would no longer find it in a fresh catalog, nor a view rebuilt over it.
SCHEMA_RULE = Rule(
    "masking:schema", masked_schema=True,
    message="column masking applies to you on this connection, and this statement alters, renames or drops a "
            "table or view holding a masked column; ask someone the rule does not apply to",
)

# These serialise whole tables, schemas or databases named in a string, or the rows of a query given as a
# string, or read a table's pages: no statement names the columns they read, so neither column rules nor
# the catalog can follow them, and the values inside come back in a form (XML, word statistics, raw
# tuples) that content detectors do not read. The planner's statistics keep samples of every column's
# values (pg_stats.most_common_vals, histogram_bounds), readable by anyone who may read the table, and
# pg_stat_activity shows the text of every session of the same role, values others typed included.
WHOLE_TABLES_RULE = Rule(
    "masking:whole-tables",
    relations=("pg_stats", "pg_stats_ext", "pg_stats_ext_exprs", "pg_statistic", "pg_statistic_ext_data",
               "pg_stat_activity", "pg_stat_statements", "pg_stat_statements_info"),
    functions=("table_to_xml", "table_to_xmlschema", "table_to_xml_and_xmlschema", "query_to_xml",
               "query_to_xmlschema", "query_to_xml_and_xmlschema", "cursor_to_xml", "cursor_to_xmlschema",
               "schema_to_xml", "schema_to_xmlschema", "schema_to_xml_and_xmlschema", "database_to_xml",
               "database_to_xmlschema", "database_to_xml_and_xmlschema", "ts_stat", "xpath_table", "crosstab",
               "crosstab2", "crosstab3", "crosstab4", "connectby", "get_raw_page", "heap_page_items",
               "heap_page_item_attrs", "tuple_data_split", "bt_page_items", "brin_page_items", "gin_leafpage_items",
               "pg_mcv_list_items", "pg_stat_get_activity", "pg_stat_statements"),
    message="masking applies to you on this connection, and this reads tables or queries named in a string, or "
            "samples of stored values, which the gateway cannot mask; select the columns themselves",
)

ESCAPES_RULE = Rule(
    "gateway:string-escapes", escapes_off=True,
    message="the gateway reads SQL with standard_conforming_strings on, as PostgreSQL does by default; "
            "use E'...' strings for backslash escapes",
)

NULL_EQUALS_RULE = Rule(
    "gateway:null-equals", null_equals=True,
    message="the gateway reads x = NULL as PostgreSQL does by default (never true), as its rules on conditions "
            "rely on; write x IS NULL",
)


class Gatekeeper:
    def __init__(self, settings: Settings, masking_salt: bytes | None = None) -> None:
        self.access = AccessPolicy(list(settings.access))
        self.guardrails = list(settings.guardrails)
        self.masking = list(settings.masking)
        self.scan_limit = settings.gateway.max_scanned_value
        # Hash-masked values stay equal across sessions (so joins still work), yet cannot be guessed:
        # the gateway passes a salt derived from its secret key.
        self.masking_salt = masking_salt or os.urandom(32)
        # The caller's approved grant windows (connection -> end); the gateway sets it to a store lookup.
        self.grants: Callable[[str], dict[str, float]] | None = None
        self._admins = set(settings.roles.admins)
        self._auditors = set(settings.roles.auditors)
        # Per connection: the columns masking rules have masked, by identity, and DDL seen by any session
        self._catalogs: dict[str, Shared] = {}

    def reload(self, settings: Settings) -> None:
        """Take the policy of `settings` (access, guardrails, masking, roles): the next decision uses it."""
        self.access = AccessPolicy(list(settings.access))
        self.guardrails = list(settings.guardrails)
        self.masking = list(settings.masking)
        self.scan_limit = settings.gateway.max_scanned_value
        self._admins = set(settings.roles.admins)
        self._auditors = set(settings.roles.auditors)

    def roles(self, identity: Identity) -> set[str]:
        """Management roles: admin (change anything), auditor (read every record). An agent never holds one."""
        if identity.agent:
            return set()
        groups = set(identity.groups)
        return {role for role, members in (("admin", self._admins), ("auditor", self._auditors)) if groups & members}

    def can_read_all(self, identity: Identity) -> bool:
        """Auditors and admins read every record (sessions, reviews); everyone else their own."""
        return bool(self.roles(identity) & {"admin", "auditor"})

    def authorize(self, identity: Identity, connection: str, verb: str, now: dt.datetime | None = None) -> AccessDecision:
        """May `identity` use `connection` for `verb` (connect, exec)? Deny unless a rule allows it."""
        grants = self.grants(identity.uid) if self.grants is not None and self.access.has_grant_rules else None
        return self.access.check(identity, connection, verb, now, grants)

    def statement_policy(self, identity: Identity, connection: str, masking: MaskingPolicy | None = None) -> StatementPolicy:
        """The guardrails for one session, resolved once so the hot path only evaluates them. With the
        session's `masking`, column rules follow its catalog (masked columns by identity); without, names."""
        rules = [r for r in self.guardrails if r.applies_to(identity, connection)]
        if masking is None:
            masking = self.masking_policy(identity, connection)
        masked = tuple(c for m in masking.rules for c in m.columns)
        if masking.rules:
            rules.append(WHOLE_TABLES_RULE)
        if masked:
            rules = [dataclasses.replace(r, masked_columns=masked) if r.masked_filters else r for r in rules]
            # COPY output names no columns, so column rules cannot apply to it: without this rule,
            # COPY (SELECT masked_column ...) TO STDOUT would be a way around them.
            rules.append(COPY_OUT_RULE)
            catalog = masking.catalog
            rules.append(dataclasses.replace(DERIVED_RULE, masked_columns=masked, catalog=catalog))
            rules.append(dataclasses.replace(UNRESOLVED_RULE, masked_columns=masked, catalog=catalog))
            rules.append(dataclasses.replace(SCHEMA_RULE, masked_columns=masked, catalog=catalog))
        if rules:
            # first, so that a refusal for it names it (ALTER ROLE ... SET standard_conforming_strings is a
            # privilege change too, but the escapes are what makes it dangerous to every rule)
            rules.insert(0, ESCAPES_RULE)
            rules.insert(1, NULL_EQUALS_RULE)
        return StatementPolicy(rules)

    def shared_catalog(self, connection: str) -> Shared:
        """What the sessions of `connection` share of its catalog (masked columns, DDL seen)."""
        return self._catalogs.setdefault(connection, Shared())

    def masking_policy(self, identity: Identity, connection: str) -> MaskingPolicy:
        """The masking rules for one session (empty when none apply). Columns a rule has masked stay masked
        by their identity for every later session of the connection, whatever they are renamed to."""
        return MaskingPolicy([r for r in self.masking if r.applies_to(identity, connection)], self.masking_salt,
                             self.shared_catalog(connection), scan_limit=self.scan_limit)

    def decide(self, identity: Identity, connection: str, statement: str,
               classification: Classification | None = None) -> Decision:
        """allow / deny / review for one statement, with the matched rules and reasons (`classification`:
        the statement's, when the caller has made it already, off the event loop)."""
        return self.statement_policy(identity, connection).decide(statement, classification)

    def check(self, identity: Identity, connection: str, statement: str, verb: str = "connect",
              classification: Classification | None = None) -> dict[str, Any]:
        """What `policy check` shows, at every door (CLI, MCP, console): the decision as access and the
        rules make it, the matched rules, the classification, and how results would be masked."""
        access = self.authorize(identity, connection, verb)
        decision = self.decide(identity, connection, statement, classification)
        masking = [{"rule": r.name, "strategy": r.strategy,
                    "detectors": list(r.detectors) + [f"pattern:{d.kind}" for d in r.patterns], "columns": list(r.columns)}
                   for r in self.masking_policy(identity, connection).rules]
        return {**decision.public(), "action": decision.action if access.allowed else "deny",
                "access": {"allowed": access.allowed, "reason": access.reason}, "masking": masking}
