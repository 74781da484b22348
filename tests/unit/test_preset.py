"""The standard preset: what it refuses and what it lets through, decided on PostgreSQL's own parse tree.

Writes whose condition holds for every row. Against the real server: tests/corpus/hostile.toml.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast.parser import parse_sql_json

from wardgate.policy.guardrails import StatementPolicy, standard_rules
from wardgate.sql.classify import classify, template_key
from wardgate.sql.conditions import MAX_DEPTH, chooses_no_rows, names_no_column

PRESET = StatementPolicy(standard_rules({}))


def assert_refused(sql: str, rule: str) -> None:
    decision = StatementPolicy(standard_rules({})).decide(sql)
    assert decision.action == "deny", (sql, decision.public())
    assert rule in [m.rule for m in decision.enforced], (sql, decision.public())


def assert_allowed(sql: str) -> None:
    decision = StatementPolicy(standard_rules({})).decide(sql)
    assert decision.action == "allow", (sql, decision.public())


# --- conditions that hold for every row -------------------------------------------------------------

TAUTOLOGIES = [
    "true", "true::bool", "'t'::bool", "bool 'yes'", "1::bool", "1 = 1", "'1' = 1", "'a' = 'a'", "1.0 = 1",
    "not false", "not not true", "true and true", "false or true", "id > 5 or true", "id = 1 or 1 = 1",
    "id is not null", "not (id is null)", "id is not null and 1 = 1", "id = id", "o.id = o.id", "id >= id",
    "id is not distinct from id", "id is distinct from null", "(id = null) is null", "(id = 5) is not unknown",
    "1 in (1, 2)", "1 not in (2, 3)", "2 between 1 and 3", "2 between symmetric 3 and 1", "5 not between 1 and 3",
    "null is null", "true is true", "null is not true", "coalesce(null, true)", "1::text = '1'", "true::text = 'true'",
    "'abc' < 'abd'", "id in (id, 2)", "$1", "random() < 2", "now() > '2000-01-01'", "exists (select 1)",
    "(select true)", "0.1::float8 = 0.1", "1 operator(pg_catalog.=) 1", "current_user = current_user",
]
CONDITIONS = [
    "false", "1 = 2", "null", "not true", "id = 5", "id = $1", "id in (1, 2, 3)", "id between 1 and 10", "id is null",
    "id > 5 and true", "id = 5 or false", "id <> id", "status like 'p%'", "(id = 5) is true", "'a' = 'b'",
    "placed_at is not null and placed_at < now() - interval '1 day'", "id = 5 and $1", "1 in (2, 3)",
    "exists (select 1 from customers c where c.id = o.customer_id)", "customer_id in (select id from customers)",
    "id = any('{1,2}')", "lower(status) = 'paid'",
]


@pytest.mark.parametrize("condition", TAUTOLOGIES)
def test_a_condition_that_holds_for_every_row_is_none(condition: str) -> None:
    assert_refused(f"delete from orders o where {condition}", "standard:unconditional-writes")
    assert_refused(f"update orders o set status = 'x' where {condition}", "standard:unconditional-writes")


@pytest.mark.parametrize("condition", CONDITIONS)
def test_a_condition_that_chooses_rows_passes(condition: str) -> None:
    assert_allowed(f"delete from orders o where {condition}")
    assert_allowed(f"update orders o set status = 'x' where {condition}")


def test_where_current_of_is_a_condition() -> None:
    assert_allowed("delete from orders where current of c")
    assert_allowed("update orders set status = 'x' where current of c")


def test_merge() -> None:
    on_every_row = ["1 = 1", "true", "o.id = o.id", "s.id is not null", "not false"]
    for on in on_every_row:
        assert_refused(f"merge into orders o using (select 1 as id) s on {on} when matched then delete",
                       "standard:unconditional-writes")
        assert_refused(f"merge into orders o using (select 1 as id) s on {on} when matched and 1 = 1 then "
                       "update set status = 'x'", "standard:unconditional-writes")
        # only the rows its own condition chooses; inserts change no existing row
        assert_allowed(f"merge into orders o using (select 1 as id) s on {on} when matched and o.id = 7 then delete")
        assert_allowed(f"merge into orders o using (select 1 as id) s on {on} when not matched then insert "
                       "(customer_id, total_cents) values (1, 1)")
    assert_allowed("merge into orders o using (select 1 as id) s on o.id = s.id when matched then delete")
    # NOT MATCHED BY SOURCE with a constant ON: every target row matches no source row, or all do
    assert_refused("merge into orders o using (select 1 as id) s on false when not matched by source then delete",
                   "standard:unconditional-writes")
    assert_allowed("merge into orders o using (select 1 as id) s on o.id = s.id when not matched by source "
                   "and o.id > 900 then delete")


def test_the_message_says_what_counts_as_no_condition() -> None:
    message = PRESET.decide("delete from orders where 1 = 1").error_message
    assert "DELETE without a condition" in message and "1 = 1 or id IS NOT NULL, counts as none" in message


# --- the fold: constants through the classifier's reader, linear, bounded -------------------------

def _where(condition: str) -> dict:
    tree = json.loads(parse_sql_json(f"delete from t where {condition}"))
    return tree["stmts"][0]["stmt"]["DeleteStmt"]["whereClause"]


def test_the_fold_reads_a_constant_only_when_it_decides() -> None:
    reads: list[dict] = []

    def read(node: dict) -> dict | None:
        reads.append(node)
        return node.get("A_Const")

    for condition in ("id = 5", "id in (1, 2, 3)", "x > 5 and y < 'a'", "id is not null", "id = id", "status like 'a%'"):
        reads.clear()
        chooses_no_rows(_where(condition), read)
        assert reads == [], condition
    assert chooses_no_rows(_where("1 = 1"), read) and reads
    # through the classifier: a decision that read no value is shared by the statement's template
    assert not classify("delete from t where id = 5").value_dependent
    assert not classify("delete from t where id is not null").value_dependent
    assert classify("delete from t where 1 = 1").value_dependent
    assert classify("delete from t where 1 = 2").value_dependent


def test_a_cached_decision_does_not_cross_constants() -> None:
    policy = StatementPolicy(standard_rules({}))
    assert template_key("delete from t where 1 = 2") == template_key("delete from t where 1 = 1")
    assert policy.decide("delete from t where 1 = 2").action == "allow"
    assert policy.decide("delete from t where 1 = 1").action == "deny"
    assert policy.decide("delete from t where (id = 5) is null").action == "allow"
    assert policy.decide("delete from t where (id = null) is null").action == "deny"
    assert policy.decide("update t set a = 1 where id = 5").action == "allow"
    assert policy.decide("update t set a = 1 where id = 6").classification == classify("update t set a = 1 where id = 6")


_const = st.sampled_from(["1", "2", "0", "null", "true", "false", "'t'", "'f'", "'1'", "'a'", "1.5", "'yes'", "''"])
_op = st.sampled_from(["=", "<>", "<", ">=", "is distinct from", "is not distinct from"])
_shape = st.sampled_from([
    "{0} {op} {1}", "not ({0} {op} {1})", "({0} {op} {1}) is null", "({0} {op} {1}) is not true", "{0}::bool",
    "{0} in ({1}, {0})", "{0} between {1} and {0}", "id {op} {0} or {1}::bool", "coalesce({0}, {1})::bool",
    "id is not null and {0} {op} {1}", "({0} {op} id) is unknown",
])


@given(_shape, _const, _const, _const, _const, _op)
@settings(max_examples=300, deadline=None)
def test_one_template_one_decision(shape: str, a: str, b: str, c: str, d: str, op: str) -> None:
    """Two conditions that differ only in constants: same classification unless it read a value."""
    one = f"delete from t where {shape.format(a, b, op=op)}"
    two = f"delete from t where {shape.format(c, d, op=op)}"
    if template_key(one) is None or template_key(one) != template_key(two):
        return
    first, second = classify(one), classify(two)
    if not first.value_dependent:
        assert first == second, (one, two)


def test_deep_conditions_are_no_condition() -> None:
    shallow = "not " * (MAX_DEPTH // 2) + "(id = 1)"
    assert_allowed(f"delete from t where {shallow}")
    deep = "not " * (MAX_DEPTH + 10) + "(id = 1)"
    assert_refused(f"delete from t where {deep}", "standard:unconditional-writes")
    nested = "id = 0"  # AND in OR in AND ...: the parser flattens only a run of one of them
    for i in range(MAX_DEPTH + 10):
        nested = f"id = {i} {'and' if i % 2 else 'or'} ({nested})"
    assert_refused(f"delete from t where {nested}", "standard:unconditional-writes")


def test_the_fold_is_linear() -> None:
    for n in (2000, 20000):
        start = time.perf_counter()
        assert not chooses_no_rows(_where(" or ".join(f"id = {i}" for i in range(n))), lambda node: node.get("A_Const"))
        assert not chooses_no_rows(_where(f"id in ({', '.join(str(i) for i in range(n))})"), lambda node: node["A_Const"])
        assert chooses_no_rows(_where(" and ".join(["1 = 1"] * n)), lambda node: node["A_Const"])
        assert chooses_no_rows(_where(f"1 in ({', '.join(str(i) for i in range(n))})"), lambda node: node["A_Const"])
        elapsed = time.perf_counter() - start
        if n == 2000:
            small = elapsed
    assert elapsed < max(small * 30, 0.5), (small, elapsed)


def test_names_no_column() -> None:
    assert names_no_column(_where("1 = 1 and now() > $1"))
    assert not names_no_column(_where("exists (select 1 from s where s.a = 1)"))
    assert not names_no_column(_where("current of c"))


# --- what still passes ------------------------------------------------------------------------------

@pytest.mark.parametrize("sql", [
    "select id, status from orders where id = 1",
    "select count(*) from orders",
    "insert into orders (customer_id, total_cents) values (1, 500)",
    "insert into orders (customer_id, total_cents) select id, 1 from customers where id = 1",
    "update orders set status = 'shipped' where id = 1",
    "update orders set status = 'shipped' where placed_at is not null and placed_at < now() - interval '30 days'",
    "delete from orders where id = 17",
    "delete from orders where status = 'refunded' and placed_at < '2020-01-01'",
    "merge into orders o using (select 1 as id) s on o.id = s.id when matched then update set status = 'x'",
    "create table notes (id int primary key, body text not null)",
    "create temp table t as select 1 as x",
    "alter table notes add column created_at timestamptz default now()",
    "alter table notes alter column body set default ''",
    "alter table notes rename column body to text",
    "alter table notes add constraint body_len check (length(body) < 1000)",
    "create index on orders (status)",
    "create unique index concurrently if not exists orders_x on orders (id, status)",
    "create view paid as select id from orders where status = 'paid'",
    "create or replace view paid as select id, total_cents from orders where status = 'paid'",
    "create sequence s",
    "create schema reports",
    "comment on table orders is 'orders'",
    "analyze orders",
    "begin", "commit", "set search_path = public", "show search_path", "reset role",
])
def test_ordinary_statements_pass(sql: str) -> None:
    assert_allowed(sql)

