"""The standard preset against the real server, with what happened read from the database itself.

Every user of a connection shares its database role, so one user's session can signal another's, and
a function bound into an operator runs with no function call in the statement that uses it. Each test
first shows the attack working on a direct connection (so the refusal is not of something harmless),
then that the gateway refuses it and that the database, read as the superuser, shows no trace.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from tests.conftest import APP_PASSWORD, make_gateway

POLICY = """
[[guardrails]]
preset = "standard"
connections = ["shop"]
"""


@pytest.fixture(scope="module")
def sgw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("preset"), pg, tail_toml=POLICY)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def dsns(sgw) -> dict[str, str]:  # noqa: ANN001
    return {user: sgw.dsn(sgw.credential(user, ttl="1h")) for user in ("alice", "bob")}


@pytest.fixture
def direct(pg):  # noqa: ANN001, ANN201
    """The connection's own role, straight to the server: what a statement would do if it got through."""
    with psycopg.connect(pg.dsn("app", APP_PASSWORD, "shop")) as conn:
        yield conn


def refused(dsn: str, sql: str, rule: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as exc:
            conn.execute(sql)
        assert rule in str(exc.value), exc.value
        assert conn.execute("select 1").fetchone() == (1,)


def superuser(pg, sql: str) -> str:  # noqa: ANN001
    return pg.psql(sql, database="shop").strip()


class Sleeper:
    """alice's gateway session, busy with a query while bob tries to reach it."""

    def __init__(self, dsn: str, seconds: float) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.pid = self.conn.execute("select pg_backend_pid()").fetchone()[0]
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, args=(seconds,))
        self.thread.start()
        time.sleep(0.3)  # the query is running

    def _run(self, seconds: float) -> None:
        try:
            self.conn.execute(f"select pg_sleep({seconds})")
        except psycopg.Error as exc:
            self.error = exc

    def finish(self) -> Exception | None:
        self.thread.join(30)
        return self.error

    def alive(self) -> bool:
        try:
            return self.conn.execute("select 1").fetchone() == (1,)
        except psycopg.Error:
            return False

    def close(self) -> None:
        self.conn.close()


def test_another_users_query_cannot_be_cancelled(dsns, direct) -> None:
    victim = Sleeper(dsns["alice"], 30)
    try:  # the attack is real: the shared role may cancel the query
        direct.execute("select pg_cancel_backend(%s)", (victim.pid,))
        assert isinstance(victim.finish(), psycopg.errors.QueryCanceled)
    finally:
        victim.close()
    victim = Sleeper(dsns["alice"], 2)
    try:
        for sql in (f"select pg_cancel_backend({victim.pid})", f"select pg_catalog.PG_CANCEL_BACKEND({victim.pid})",
                    f"select ({victim.pid}).pg_cancel_backend", f'select U&"pg_cancel_backen\\0064"({victim.pid})',
                    "select pg_cancel_backend(pid) from pg_stat_activity where pid <> pg_backend_pid()"):
            refused(dsns["bob"], sql, "standard:dangerous-functions")
        assert victim.finish() is None  # the query ran to its end
        assert victim.alive()
    finally:
        victim.close()


def test_another_users_session_cannot_be_ended_through_an_operator(pg, dsns, direct) -> None:
    victim = Sleeper(dsns["alice"], 0)
    victim.finish()
    try:  # the attack is real: an operator over pg_terminate_backend, used with no function call
        direct.execute("create operator public.### (function = pg_terminate_backend, leftarg = int, rightarg = int8)")
        direct.execute(f"select {victim.pid} ### 0")
        direct.rollback()
        time.sleep(0.3)
        assert not victim.alive()
    finally:
        victim.close()
    victim = Sleeper(dsns["alice"], 0)
    victim.finish()
    try:
        refused(dsns["bob"], "create operator public.### (function = pg_terminate_backend, leftarg = int, rightarg = int8)",
                "standard:function-binding")
        refused(dsns["bob"], "create operator public.### (procedure = pg_cancel_backend, rightarg = int)",
                "standard:function-binding")
        refused(dsns["bob"], "create aggregate public.wg_end(int) (sfunc = int4pl, stype = int, finalfunc = pg_cancel_backend)",
                "standard:function-binding")
        refused(dsns["bob"], f"select ({victim.pid}).pg_terminate_backend", "standard:dangerous-functions")
        assert superuser(pg, "select count(*) from pg_operator where oprname = '###'") == "0"
        assert superuser(pg, "select count(*) from pg_proc where proname = 'wg_end'") == "0"
        time.sleep(0.3)
        assert victim.alive()
    finally:
        victim.close()


def test_large_objects_are_not_created(pg, dsns, direct) -> None:
    before = superuser(pg, "select count(*) from pg_largeobject_metadata")
    direct.execute("select lo_from_bytea(0, 'x')")  # the role may create them
    assert direct.execute("select count(*) from pg_largeobject_metadata").fetchone()[0] == int(before) + 1
    direct.rollback()
    for sql in ("select lo_from_bytea(0, 'x')", "select lo_create(0)", "select lowrite(lo_open(lo_creat(-1), 131072), 'x')",
                "create operator public.#># (function = lo_from_bytea, leftarg = oid, rightarg = bytea)"):
        refused(dsns["bob"], sql, "standard:")
    assert superuser(pg, "select count(*) from pg_largeobject_metadata") == before


def test_the_shared_role_and_database_keep_their_settings(pg, dsns) -> None:
    settings = "select coalesce(array_agg(array_to_string(setconfig, ',')), '{}') from pg_db_role_setting"
    before = superuser(pg, settings)
    table = "select relrowsecurity, relforcerowsecurity, relacl from pg_class where relname = 'orders'"
    acl = superuser(pg, table)
    refused(dsns["bob"], "alter role current_user set search_path = evil, public", "standard:privileges")
    refused(dsns["bob"], "alter database shop set search_path = evil, public", "standard:privileges")
    refused(dsns["bob"], "grant select on orders to public", "standard:privileges")
    refused(dsns["bob"], "alter table orders enable row level security", "standard:privileges")
    refused(dsns["bob"], "create policy wg_none on orders using (false)", "standard:privileges")
    assert superuser(pg, settings) == before
    assert superuser(pg, table) == acl and acl.startswith("f|f|")
    assert superuser(pg, "select count(*) from pg_policy") == "0"
    with psycopg.connect(dsns["alice"]) as conn:  # the next session starts as before
        assert conn.execute("show search_path").fetchone() == ('"$user", public',)


def test_columns_keep_their_data(pg, dsns) -> None:
    shape = ("select string_agg(column_name || ':' || data_type, ',' order by ordinal_position) "
             "from information_schema.columns where table_name = 'orders'")
    before, data = superuser(pg, shape), superuser(pg, "select md5(string_agg(status || total_cents, ',' order by id)) from orders")
    for sql in ("alter table orders drop column status", "alter table orders alter column status type varchar(3)",
                "alter table orders alter column total_cents type smallint using (total_cents / 1000)::smallint"):
        refused(dsns["bob"], sql, "standard:destructive-ddl")
    assert superuser(pg, shape) == before
    assert superuser(pg, "select md5(string_agg(status || total_cents, ',' order by id)) from orders") == data


def test_tautologies_change_no_row_and_conditions_still_run(pg, dsns) -> None:
    count = superuser(pg, "select count(*) from orders")
    for sql in ("delete from orders where true::bool", "delete from orders where 1 = 1", "delete from orders where not false",
                "delete from orders where id is not null", "update orders set status = 'x' where id = id",
                "merge into orders o using (select 1 as id) s on 1 = 1 when matched then delete"):
        refused(dsns["bob"], sql, "standard:unconditional-writes")
    assert superuser(pg, "select count(*) from orders") == count
    assert superuser(pg, "select count(*) from orders where status = 'x'") == "0"
    with psycopg.connect(dsns["bob"], autocommit=True) as conn:
        assert conn.execute("delete from orders where id = -1").rowcount == 0
        assert conn.execute("update orders set status = status where placed_at is not null and id = 1").rowcount == 1
        assert conn.execute("select count(*) from orders where id is not null").fetchone() == (int(count),)
