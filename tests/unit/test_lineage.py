"""Column lineage resolved as PostgreSQL resolves names, checked against a catalog by column identity."""

from __future__ import annotations

import pytest

from wardgate.masking.catalog import Catalog, Shared
from wardgate.masking.plan import MaskRule
from wardgate.sql.classify import classify

# customers (oid 100): id, name, email, phone, card_number; orders (oid 200): id, customer_id, status;
# v_cards (oid 300), a view over customers.card_number; v_names (oid 400), a view over customers' names.
ROWS = [("a", "100", str(i), "public", "customers", n) for i, n in
        enumerate(["id", "name", "email", "phone", "card_number"], 1)]
ROWS += [("a", "200", str(i), "public", "orders", n) for i, n in enumerate(["id", "customer_id", "status"], 1)]
ROWS += [("a", "300", "1", "public", "v_cards", "last4"), ("v", "300", "100", "5"), ("v", "300", "100", "0")]
ROWS += [("a", "400", "1", "public", "v_names", "name"), ("v", "400", "100", "2"), ("v", "400", "100", "0")]


def _catalog(shared: Shared | None = None, rows=ROWS) -> Catalog:  # noqa: ANN001
    catalog = Catalog([MaskRule("cards", columns=("card_number",))], shared)
    catalog.load(rows)
    return catalog


def _hit(sql: str, catalog: Catalog | None = None) -> tuple[str, str] | None:
    c = classify(sql)
    assert c.error is None
    return (catalog or _catalog()).hit(c.computed, c.results, c.scope_relations)


@pytest.mark.parametrize("sql", [
    "select upper(k) from customers as c(a, b, e, p, k)",
    "select k || '' from customers as c(a, b, e, p, k)",
    "select string_agg(k, ',') from customers as c(a, b, e, p, k)",
    "select lag(k) over () from customers as c(a, b, e, p, k)",
    "select row(k)::text from customers as c(a, b, e, p, k)",
    "select c.to_jsonb from customers c",
    "select customers.to_json from customers",
    "select c from customers c",
    "select q.* from (select c from customers c) q",
    "select s from (select * from customers) s",
    "select upper(s.z) from (select * from customers) s(a, b, c, d, z)",
    "with w as (select card_number from customers) select upper(card_number) from w",
    "with q as (select * from customers) select lower(card_number) from q",
    "select card_number as x into temp t from customers",
    "create view v as select card_number from customers",
    "insert into orders (status) select card_number from customers",
    "update customers set name = name where id = 1 returning upper(card_number)",
    "with u as (update customers set name = name returning card_number) select upper(card_number) from u",
    "select (select max(card_number) from customers)",
    "select upper(j.card_number) from (customers join orders on true) j",
    "select upper(last4) from v_cards",
    "select card_number from customers union all select card_number from customers",
    # a merged USING column has no origin (COALESCE in a FULL or RIGHT join, a coercion between types)
    "select k from (select null::text k) a full join (select card_number k from customers) b using (k)",
    # VALUES rows have no origin
    "select x from customers c, lateral (values (c.card_number)) v(x)",
    "select (select k from (values (c.card_number)) v(k)) from customers c",
    # copies through the statement's own WITH queries, and through a LATERAL join's right side
    "with w as (select * from customers) insert into orders select * from w",
    "with w(a, b, e, p, k) as (select * from customers) insert into orders (status) select k from w",
    "insert into orders (status) select x from customers c cross join lateral (select c.card_number) s(x)",
    # computed in a condition or an ordering: an error, a notification or a setting could carry it out
    "select 1 from customers where case when id = 57 then current_setting(card_number) end is null",
    "select 1 from customers order by quote_ident(card_number)::regclass",
    "select 1 from customers where pg_notify('ch', card_number) is null",
    "select 1 from customers c join orders o on current_setting(c.card_number) = ''",
    "select count(*) from customers having max(card_number) > ''",
    "explain analyze select 1 from customers where current_setting(card_number) = ''",
    "delete from orders o using customers c where o.customer_id = c.id and current_setting(c.card_number) = ''",
    # DDL whose expressions the server evaluates over stored rows (its errors quote the values)
    "create index wg on customers ((card_number::tsquery)) where id = 57",
    "create index wg on customers (id) where card_number::tsquery is null",
    "create statistics s on (card_number::tsquery) from customers",
])
def test_computed_from_a_masked_column_is_found(sql: str) -> None:
    hit = _hit(sql)
    assert hit is not None and hit[0] == "derived", hit


@pytest.mark.parametrize("sql", [
    "select card_number, email from customers",
    "select k from customers as c(a, b, e, p, k)",
    "select x from (select card_number x from customers) s",
    "with w as (select card_number from customers) select card_number from w",
    "select x from (select * from customers) q(a, b, c, d, x)",
    "select * from (select * from customers) s",
    "select upper(name), status from customers c join orders o on o.customer_id = c.id",
    "select upper(total) from (select count(*)::text total from customers) s",
    "select now()",
    "create index on customers (card_number)",
    "create index on customers ((lower(name))) where id > 5",
    "select id from customers where card_number = '4111'",
    "select id from customers where card_number like '4%' and id > 3 or card_number is not null",
    "select id from customers where card_number in ('a', 'b') order by card_number",
    "select id from customers c join orders o on o.customer_id = c.id where c.card_number <> o.status",
    "update customers set name = name where id = 1 returning card_number as x",
    "with u as (update customers set name = name returning card_number) select card_number from u",
])
def test_plain_columns_and_other_columns_are_not_refused(sql: str) -> None:
    assert _hit(sql) is None


def test_a_rename_keeps_the_column_masked_by_its_identity() -> None:
    shared = Shared()
    _catalog(shared)  # masked as card_number once
    renamed = [r if r[:3] != ("a", "100", "5") else ("a", "100", "5", "public", "customers", "cn") for r in ROWS]
    later = _catalog(shared, renamed)  # a later session reads the renamed column
    assert later.rule_of(100, 5) is not None
    assert _hit("select upper(cn) from customers", later)[0] == "derived"


def test_a_name_the_catalog_does_not_know_on_a_masked_table_is_unresolved() -> None:
    assert _hit("select upper(cn) from customers") == (
        "unresolved", "reads cn, which no table of the catalog the gateway read has (next to public.customers, "
                      "which holds a masked column)")


def test_ddl_anywhere_makes_every_catalog_of_the_connection_stale() -> None:
    shared = Shared()
    one, two = _catalog(shared), _catalog(shared)
    assert not one.stale and not two.stale
    shared.changed()
    assert one.stale and two.stale


def test_alter_rename_and_drop_of_a_masked_table_are_found() -> None:
    catalog = _catalog()
    for sql in ("alter table customers rename column card_number to cn", "alter table public.customers rename to c",
                "drop table customers", "alter table customers set schema x", "drop view v_cards"):
        assert catalog.altered(classify(sql).altered), sql
    assert catalog.altered(classify("alter table orders add column x int").altered) is None


def test_create_table_as_execute_cannot_be_followed() -> None:
    assert classify("create temp table t as execute p").unresolved


def test_a_view_over_a_table_with_a_masked_column_is_masked_whole() -> None:
    # Its dependencies cannot tell a whole-row reference (`c::text`) from the dependency every view has on
    # its tables, so even a view naming only unmasked columns is masked: more than needed, never less.
    catalog = _catalog()
    assert catalog.rule_of(400, 1) is not None
    assert _hit("select upper(name) from v_names", catalog)[0] == "derived"


def test_a_partition_inherits_its_parents_masked_column_by_name() -> None:
    rows = ROWS + [("a", "500", "1", "public", "customers_2026", "card_number"),
                   ("a", "500", "2", "public", "customers_2026", "id"), ("i", "500", "100")]
    catalog = Catalog([MaskRule("cards", columns=("customers.card_number",))])
    catalog.load(rows)
    assert catalog.rule_of(100, 5) is not None and catalog.rule_of(500, 1) is not None
    assert catalog.rule_of(500, 2) is None


def test_planner_statistics_and_table_serialisers_are_refused_under_masking() -> None:
    from wardgate.config import Settings
    from wardgate.domain import Identity
    from wardgate.policy.gatekeeper import Gatekeeper

    settings = Settings()
    settings.masking = [MaskRule("pii", detectors=("email",))]
    gate = Gatekeeper(settings, b"s" * 32)
    who = Identity(user="alice", groups=("dev",))
    for sql in ("select histogram_bounds from pg_stats where attname = 'email'",
                "select * from pg_catalog.pg_stats_ext", "select table_to_xml('customers', true, false, '')",
                "select query from pg_stat_activity", "select * from pg_stat_get_activity(null)",
                "select ts_stat('select email from customers')"):
        assert gate.decide(who, "shop", sql).action == "deny", sql
    assert gate.decide(who, "shop", "select email from customers").action == "allow"
