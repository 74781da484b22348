"""The CommandComplete tags PostgreSQL may send for a statement, predicted from its parse tree.

A tripwire compares each tag the server sends with the prediction for the statement at that
position: a tag outside the prediction means the server ran something other than what the gateway
classified. The prediction follows PostgreSQL's CreateCommandTag (src/backend/tcop/utility.c, names
from src/include/tcop/cmdtaglist.h) applied to the raw parse tree, as exec_simple_query does, plus
the few places that replace that tag while the statement runs (COMMIT answering ROLLBACK, CREATE
TABLE AS answering SELECT n, EXECUTE answering with the prepared statement's own tag).

Tags are compared by key: the tag without its trailing row counts ("INSERT 0 3" -> "INSERT").
The statement is one entry of `parse_sql_json(text)["stmts"][i]["stmt"]`, e.g. {"SelectStmt": {...}}
(in that JSON a false boolean or an absent name is left out, enums are spelled out).
"""

from __future__ import annotations

from typing import Any

# The statement nodes whose tag does not depend on any field.
_FIXED: dict[str, str] = {
    "InsertStmt": "INSERT", "DeleteStmt": "DELETE", "UpdateStmt": "UPDATE", "MergeStmt": "MERGE",
    "SelectStmt": "SELECT", "PLAssignStmt": "SELECT",
    "DeclareCursorStmt": "DECLARE CURSOR", "PrepareStmt": "PREPARE",
    "CreateDomainStmt": "CREATE DOMAIN", "CreateSchemaStmt": "CREATE SCHEMA", "CreateStmt": "CREATE TABLE",
    "CreateTableSpaceStmt": "CREATE TABLESPACE", "DropTableSpaceStmt": "DROP TABLESPACE",
    "AlterTableSpaceOptionsStmt": "ALTER TABLESPACE",
    "CreateExtensionStmt": "CREATE EXTENSION", "AlterExtensionStmt": "ALTER EXTENSION",
    "AlterExtensionContentsStmt": "ALTER EXTENSION",
    "CreateFdwStmt": "CREATE FOREIGN DATA WRAPPER", "AlterFdwStmt": "ALTER FOREIGN DATA WRAPPER",
    "CreateForeignServerStmt": "CREATE SERVER", "AlterForeignServerStmt": "ALTER SERVER",
    "CreateUserMappingStmt": "CREATE USER MAPPING", "AlterUserMappingStmt": "ALTER USER MAPPING",
    "DropUserMappingStmt": "DROP USER MAPPING", "CreateForeignTableStmt": "CREATE FOREIGN TABLE",
    "ImportForeignSchemaStmt": "IMPORT FOREIGN SCHEMA",
    "TruncateStmt": "TRUNCATE TABLE", "CommentStmt": "COMMENT", "SecLabelStmt": "SECURITY LABEL", "CopyStmt": "COPY",
    "AlterDomainStmt": "ALTER DOMAIN", "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
    "CompositeTypeStmt": "CREATE TYPE", "CreateEnumStmt": "CREATE TYPE", "CreateRangeStmt": "CREATE TYPE",
    "AlterEnumStmt": "ALTER TYPE", "AlterTypeStmt": "ALTER TYPE",
    "ViewStmt": "CREATE VIEW", "IndexStmt": "CREATE INDEX", "RuleStmt": "CREATE RULE",
    "CreateSeqStmt": "CREATE SEQUENCE", "AlterSeqStmt": "ALTER SEQUENCE", "DoStmt": "DO",
    "CreatedbStmt": "CREATE DATABASE", "AlterDatabaseStmt": "ALTER DATABASE",
    "AlterDatabaseRefreshCollStmt": "ALTER DATABASE", "AlterDatabaseSetStmt": "ALTER DATABASE",
    "DropdbStmt": "DROP DATABASE",
    "NotifyStmt": "NOTIFY", "ListenStmt": "LISTEN", "UnlistenStmt": "UNLISTEN", "LoadStmt": "LOAD", "CallStmt": "CALL",
    "ClusterStmt": "CLUSTER", "ExplainStmt": "EXPLAIN", "RefreshMatViewStmt": "REFRESH MATERIALIZED VIEW",
    "AlterSystemStmt": "ALTER SYSTEM", "VariableShowStmt": "SHOW",
    "CreateTransformStmt": "CREATE TRANSFORM", "CreateTrigStmt": "CREATE TRIGGER",
    "CreateEventTrigStmt": "CREATE EVENT TRIGGER", "AlterEventTrigStmt": "ALTER EVENT TRIGGER",
    "CreatePLangStmt": "CREATE LANGUAGE",
    # CREATE/ALTER/DROP USER and GROUP are role statements: the tag says ROLE whatever the wording
    "CreateRoleStmt": "CREATE ROLE", "AlterRoleStmt": "ALTER ROLE", "AlterRoleSetStmt": "ALTER ROLE",
    "DropRoleStmt": "DROP ROLE", "DropOwnedStmt": "DROP OWNED", "ReassignOwnedStmt": "REASSIGN OWNED",
    "LockStmt": "LOCK TABLE", "ConstraintsSetStmt": "SET CONSTRAINTS", "CheckPointStmt": "CHECKPOINT",
    "ReindexStmt": "REINDEX", "CreateConversionStmt": "CREATE CONVERSION", "CreateCastStmt": "CREATE CAST",
    "CreateOpClassStmt": "CREATE OPERATOR CLASS", "CreateOpFamilyStmt": "CREATE OPERATOR FAMILY",
    "AlterOpFamilyStmt": "ALTER OPERATOR FAMILY", "AlterOperatorStmt": "ALTER OPERATOR",
    "AlterTSDictionaryStmt": "ALTER TEXT SEARCH DICTIONARY",
    "AlterTSConfigurationStmt": "ALTER TEXT SEARCH CONFIGURATION",
    "CreatePolicyStmt": "CREATE POLICY", "AlterPolicyStmt": "ALTER POLICY", "CreateAmStmt": "CREATE ACCESS METHOD",
    "CreatePublicationStmt": "CREATE PUBLICATION", "AlterPublicationStmt": "ALTER PUBLICATION",
    "CreateSubscriptionStmt": "CREATE SUBSCRIPTION", "AlterSubscriptionStmt": "ALTER SUBSCRIPTION",
    "DropSubscriptionStmt": "DROP SUBSCRIPTION", "AlterCollationStmt": "ALTER COLLATION",
    "CreateStatsStmt": "CREATE STATISTICS", "AlterStatsStmt": "ALTER STATISTICS",
}

# DROP by DropStmt.removeType (databases, roles, tablespaces, subscriptions have nodes of their own).
_DROP: dict[str, str] = {
    "OBJECT_TABLE": "DROP TABLE", "OBJECT_SEQUENCE": "DROP SEQUENCE", "OBJECT_VIEW": "DROP VIEW",
    "OBJECT_MATVIEW": "DROP MATERIALIZED VIEW", "OBJECT_INDEX": "DROP INDEX", "OBJECT_TYPE": "DROP TYPE",
    "OBJECT_DOMAIN": "DROP DOMAIN", "OBJECT_COLLATION": "DROP COLLATION", "OBJECT_CONVERSION": "DROP CONVERSION",
    "OBJECT_SCHEMA": "DROP SCHEMA", "OBJECT_TSPARSER": "DROP TEXT SEARCH PARSER",
    "OBJECT_TSDICTIONARY": "DROP TEXT SEARCH DICTIONARY", "OBJECT_TSTEMPLATE": "DROP TEXT SEARCH TEMPLATE",
    "OBJECT_TSCONFIGURATION": "DROP TEXT SEARCH CONFIGURATION", "OBJECT_FOREIGN_TABLE": "DROP FOREIGN TABLE",
    "OBJECT_EXTENSION": "DROP EXTENSION", "OBJECT_FUNCTION": "DROP FUNCTION", "OBJECT_PROCEDURE": "DROP PROCEDURE",
    "OBJECT_ROUTINE": "DROP ROUTINE", "OBJECT_AGGREGATE": "DROP AGGREGATE", "OBJECT_OPERATOR": "DROP OPERATOR",
    "OBJECT_LANGUAGE": "DROP LANGUAGE", "OBJECT_CAST": "DROP CAST", "OBJECT_TRIGGER": "DROP TRIGGER",
    "OBJECT_EVENT_TRIGGER": "DROP EVENT TRIGGER", "OBJECT_RULE": "DROP RULE",
    "OBJECT_FDW": "DROP FOREIGN DATA WRAPPER", "OBJECT_FOREIGN_SERVER": "DROP SERVER",
    "OBJECT_OPCLASS": "DROP OPERATOR CLASS", "OBJECT_OPFAMILY": "DROP OPERATOR FAMILY", "OBJECT_POLICY": "DROP POLICY",
    "OBJECT_TRANSFORM": "DROP TRANSFORM", "OBJECT_ACCESS_METHOD": "DROP ACCESS METHOD",
    "OBJECT_PUBLICATION": "DROP PUBLICATION", "OBJECT_STATISTIC_EXT": "DROP STATISTICS",
}

# AlterObjectTypeCommandTag: ALTER TABLE, RENAME, SET SCHEMA, OWNER TO, DEPENDS ON and
# ALTER ... ALL IN TABLESPACE, by the object type the statement names. The tag follows the words
# of the statement, not the object: ALTER TABLE on a view says ALTER TABLE.
_ALTER: dict[str, str] = {
    "OBJECT_AGGREGATE": "ALTER AGGREGATE", "OBJECT_ATTRIBUTE": "ALTER TYPE", "OBJECT_CAST": "ALTER CAST",
    "OBJECT_COLLATION": "ALTER COLLATION", "OBJECT_COLUMN": "ALTER TABLE", "OBJECT_CONVERSION": "ALTER CONVERSION",
    "OBJECT_DATABASE": "ALTER DATABASE", "OBJECT_DOMAIN": "ALTER DOMAIN", "OBJECT_DOMCONSTRAINT": "ALTER DOMAIN",
    "OBJECT_EXTENSION": "ALTER EXTENSION", "OBJECT_FDW": "ALTER FOREIGN DATA WRAPPER",
    "OBJECT_FOREIGN_SERVER": "ALTER SERVER", "OBJECT_FOREIGN_TABLE": "ALTER FOREIGN TABLE",
    "OBJECT_FUNCTION": "ALTER FUNCTION", "OBJECT_INDEX": "ALTER INDEX", "OBJECT_LANGUAGE": "ALTER LANGUAGE",
    "OBJECT_LARGEOBJECT": "ALTER LARGE OBJECT", "OBJECT_OPCLASS": "ALTER OPERATOR CLASS",
    "OBJECT_OPERATOR": "ALTER OPERATOR", "OBJECT_OPFAMILY": "ALTER OPERATOR FAMILY", "OBJECT_POLICY": "ALTER POLICY",
    "OBJECT_PROCEDURE": "ALTER PROCEDURE", "OBJECT_ROLE": "ALTER ROLE", "OBJECT_ROUTINE": "ALTER ROUTINE",
    "OBJECT_RULE": "ALTER RULE", "OBJECT_SCHEMA": "ALTER SCHEMA", "OBJECT_SEQUENCE": "ALTER SEQUENCE",
    "OBJECT_TABLE": "ALTER TABLE", "OBJECT_TABCONSTRAINT": "ALTER TABLE", "OBJECT_TABLESPACE": "ALTER TABLESPACE",
    "OBJECT_TRIGGER": "ALTER TRIGGER", "OBJECT_EVENT_TRIGGER": "ALTER EVENT TRIGGER",
    "OBJECT_TSCONFIGURATION": "ALTER TEXT SEARCH CONFIGURATION", "OBJECT_TSDICTIONARY": "ALTER TEXT SEARCH DICTIONARY",
    "OBJECT_TSPARSER": "ALTER TEXT SEARCH PARSER", "OBJECT_TSTEMPLATE": "ALTER TEXT SEARCH TEMPLATE",
    "OBJECT_TYPE": "ALTER TYPE", "OBJECT_VIEW": "ALTER VIEW", "OBJECT_MATVIEW": "ALTER MATERIALIZED VIEW",
    "OBJECT_PUBLICATION": "ALTER PUBLICATION", "OBJECT_SUBSCRIPTION": "ALTER SUBSCRIPTION",
    "OBJECT_STATISTIC_EXT": "ALTER STATISTICS",
}
# The object-type field of each ALTER node that _ALTER reads.
_ALTER_FIELD = {"AlterTableStmt": "objtype", "AlterTableMoveAllStmt": "objtype", "AlterObjectDependsStmt": "objectType",
                "AlterObjectSchemaStmt": "objectType", "AlterOwnerStmt": "objectType"}

_DEFINE: dict[str, str] = {
    "OBJECT_AGGREGATE": "CREATE AGGREGATE", "OBJECT_OPERATOR": "CREATE OPERATOR", "OBJECT_TYPE": "CREATE TYPE",
    "OBJECT_TSPARSER": "CREATE TEXT SEARCH PARSER", "OBJECT_TSDICTIONARY": "CREATE TEXT SEARCH DICTIONARY",
    "OBJECT_TSTEMPLATE": "CREATE TEXT SEARCH TEMPLATE", "OBJECT_TSCONFIGURATION": "CREATE TEXT SEARCH CONFIGURATION",
    "OBJECT_COLLATION": "CREATE COLLATION", "OBJECT_ACCESS_METHOD": "CREATE ACCESS METHOD",
}

_TRANSACTION: dict[str, frozenset[str]] = {
    "TRANS_STMT_BEGIN": frozenset({"BEGIN"}), "TRANS_STMT_START": frozenset({"START TRANSACTION"}),
    # COMMIT (and PREPARE TRANSACTION) of a failed transaction block rolls it back and says so
    "TRANS_STMT_COMMIT": frozenset({"COMMIT", "ROLLBACK"}),
    "TRANS_STMT_PREPARE": frozenset({"PREPARE TRANSACTION", "ROLLBACK"}),
    "TRANS_STMT_ROLLBACK": frozenset({"ROLLBACK"}), "TRANS_STMT_ROLLBACK_TO": frozenset({"ROLLBACK"}),
    "TRANS_STMT_SAVEPOINT": frozenset({"SAVEPOINT"}), "TRANS_STMT_RELEASE": frozenset({"RELEASE"}),
    "TRANS_STMT_COMMIT_PREPARED": frozenset({"COMMIT PREPARED"}),
    "TRANS_STMT_ROLLBACK_PREPARED": frozenset({"ROLLBACK PREPARED"}),
}

_DISCARD = {"DISCARD_ALL": "DISCARD ALL", "DISCARD_PLANS": "DISCARD PLANS", "DISCARD_TEMP": "DISCARD TEMP",
            "DISCARD_SEQUENCES": "DISCARD SEQUENCES"}
_FUNCTION = {"OBJECT_FUNCTION": "ALTER FUNCTION", "OBJECT_PROCEDURE": "ALTER PROCEDURE", "OBJECT_ROUTINE": "ALTER ROUTINE"}


def _one(tag: str | None) -> frozenset[str] | None:
    return frozenset((tag,)) if tag else None


def expected_tag(stmt: dict[str, Any]) -> frozenset[str] | None:
    """The tag keys PostgreSQL may send for this one top-level statement; None when no sound prediction
    exists (EXECUTE, and any node or object type PostgreSQL itself has no tag for)."""
    if not isinstance(stmt, dict) or len(stmt) != 1:
        return None
    ((name, body),) = stmt.items()
    if not isinstance(body, dict):
        return None
    fixed = _FIXED.get(name)
    if fixed is not None:
        return frozenset((fixed,))
    if name in _ALTER_FIELD:
        return _one(_ALTER.get(body.get(_ALTER_FIELD[name], "")))
    if name == "TransactionStmt":
        return _TRANSACTION.get(body.get("kind", ""))
    if name == "DropStmt":
        return _one(_DROP.get(body.get("removeType", "")))
    if name == "RenameStmt":
        # renaming a column takes its tag from the relation's type (ALTER VIEW v RENAME COLUMN ...)
        kind = body.get("renameType", "")
        return _one(_ALTER.get(body.get("relationType", "") if kind == "OBJECT_COLUMN" else kind))
    if name == "VariableSetStmt":  # SET, SET LOCAL, SET TRANSACTION, SET ROLE ...; RESET and RESET ALL
        return frozenset(("RESET",)) if body.get("kind") in ("VAR_RESET", "VAR_RESET_ALL") else frozenset(("SET",))
    if name == "CreateTableAsStmt":
        # Once it has run the query it reports "SELECT n"; WITH NO DATA, or IF NOT EXISTS finding the
        # table there, it reports the statement's own tag. (SELECT INTO is a SelectStmt in the raw tree.)
        if body.get("objtype") == "OBJECT_MATVIEW":
            return frozenset(("SELECT", "CREATE MATERIALIZED VIEW"))
        if body.get("objtype") == "OBJECT_TABLE":
            return frozenset(("SELECT", "SELECT INTO" if body.get("is_select_into") else "CREATE TABLE AS"))
        return None
    if name == "FetchStmt":
        return frozenset(("MOVE",)) if body.get("ismove") else frozenset(("FETCH",))
    if name == "ClosePortalStmt":
        return frozenset(("CLOSE CURSOR",)) if body.get("portalname") else frozenset(("CLOSE CURSOR ALL",))
    if name == "DeallocateStmt":
        return frozenset(("DEALLOCATE",)) if body.get("name") else frozenset(("DEALLOCATE ALL",))
    if name == "DiscardStmt":
        return _one(_DISCARD.get(body.get("target", "")))
    if name == "GrantStmt":
        return frozenset(("GRANT",)) if body.get("is_grant") else frozenset(("REVOKE",))
    if name == "GrantRoleStmt":
        return frozenset(("GRANT ROLE",)) if body.get("is_grant") else frozenset(("REVOKE ROLE",))
    if name == "DefineStmt":
        return _one(_DEFINE.get(body.get("kind", "")))
    if name == "CreateFunctionStmt":
        return frozenset(("CREATE PROCEDURE",)) if body.get("is_procedure") else frozenset(("CREATE FUNCTION",))
    if name == "AlterFunctionStmt":
        return _one(_FUNCTION.get(body.get("objtype", "")))
    if name == "VacuumStmt":
        return frozenset(("VACUUM",)) if body.get("is_vacuumcmd") else frozenset(("ANALYZE",))
    # ExecuteStmt answers with the tag of the statement it runs. A statement prepared with SQL PREPARE
    # is a SELECT, INSERT, UPDATE, DELETE or MERGE, but one prepared with a protocol Parse message
    # shares the same names and may be any statement at all (EXECUTE of a parsed DROP TABLE says
    # DROP TABLE), so the tree alone cannot say.
    return None


def tag_key(tag: str) -> str:
    """The tag without its trailing row counts: "INSERT 0 3" -> "INSERT", "DROP TABLE" -> "DROP TABLE"."""
    head, sep, tail = tag.rpartition(" ")
    while sep and tail.isdigit():
        tag = head
        head, sep, tail = tag.rpartition(" ")
    return tag


def matches(expected: frozenset[str] | None, tag: str) -> bool:
    """Whether the server's tag is one `expected` allows (None allows any)."""
    # most tags without a count ("SET", "DROP TABLE") hit the set as they are
    return expected is None or tag in expected or tag_key(tag) in expected


# An Execute stopped at its row limit (the rest comes with the next Execute of its portal), an empty Query
UNTAGGED = frozenset({"SUSPENDED", "EMPTY"})


def as_predicted(expected: tuple[frozenset[str] | None, ...], tags: list[str], complete: bool) -> bool:
    """Whether the tags a statement batch was answered with agree with the prediction for its statements,
    in order: no more of them, each one allowed, and as many as predicted when the batch ran to the end
    without an error (`complete`); an error stops a batch part way."""
    got = [t for t in tags if t not in UNTAGGED]
    suspended = "SUSPENDED" in tags  # its portal goes on in the next Execute, which is held to it then
    if len(got) > len(expected) or (complete and not suspended and len(got) < len(expected)):
        return False
    return all(matches(e, t) for e, t in zip(expected, got, strict=False))
