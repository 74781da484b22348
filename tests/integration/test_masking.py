"""Inline masking through the gateway: psql (text), psycopg (binary), asyncpg, JSON, arrays, COPY."""

from __future__ import annotations

import asyncio
import json
import tomllib
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import make_gateway, psql
from wardgate.masking.detectors import ALL_KINDS, find

CASES = tomllib.loads((Path(__file__).parent.parent / "corpus" / "masking.toml").read_text())["case"]
MASKING = """
[[masking]]
name = "cards"
columns = ["card_number"]
strategy = "partial"
connections = ["shop"]
except_groups = ["ops", "deployers"]

[[masking]]
name = "order-status"
columns = ["orders.status"]
connections = ["shop"]
except_groups = ["ops", "deployers"]

[[masking]]
name = "national-ids"
columns = ["national_id"]
strategy = "hash"
connections = ["shop"]
except_groups = ["ops", "deployers"]

[[masking]]
name = "pii"
detectors = ["email", "card", "ssn", "phone", "iban", "ip"]
patterns = { employee_id = "EMP-[0-9]{6}" }
connections = ["shop"]
except_groups = ["ops"]

[[guardrails]]
name = "no-inference"
masked_filters = true
connections = ["shop"]
"""


@pytest.fixture(scope="module")
def mgw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("masked"), pg, tail_toml=MASKING,
                      extra_toml='[recording]\nresults = "sample"\nsample_rows = 2\nsample_bytes = 130\n')
    gw.cli("users", "add", "dana", "--group", "deployers")  # content detectors only, no column rules
    gw.start()
    yield gw
    gw.stop()


@pytest.mark.parametrize("case", CASES, ids=[c["value"] for c in CASES])
def test_detectors(case) -> None:
    kinds = {k for _, _, k in find(case["value"], case["value"].encode(), ALL_KINDS)}
    assert kinds == (set() if case["kind"] == "none" else {case["kind"]})


def test_corpus_through_psql(mgw) -> None:
    cred = mgw.credential()
    values = [c["value"] for c in CASES]
    sql = "select v from (values " + ", ".join("('" + v.replace("'", "''") + "')" for v in values) + ") as t(v)"
    out = psql(mgw.dsn(cred), "-At", "-c", sql).stdout.splitlines()
    for case, shown in zip(CASES, out, strict=True):
        if case["kind"] == "none":
            assert shown == case["value"]
        else:
            assert f"[{case['kind']}]" in shown and shown != case["value"]


def test_columns_and_content_masked_for_some_and_clear_for_exempt(mgw) -> None:
    sql = "select id, name, email, phone, card_number, national_id from customers where id = 1"
    masked = psql(mgw.dsn(mgw.credential(), application_name="t_mask"), "-At", "-F", "|", "-c", sql).stdout.strip().split("|")
    clear = psql(mgw.dsn(mgw.credential(user="bob")), "-At", "-F", "|", "-c", sql).stdout.strip().split("|")
    assert clear[2] == "customer1@example.com" and clear[4] == "4111 1111 1111 0001"
    assert masked[0] == "1" and masked[1] == clear[1]  # integers and names untouched
    assert masked[2] == "[email]" and masked[3] == "[phone]"
    assert masked[4].endswith("0001") and "4111" not in masked[4]  # partial: last four kept
    assert masked[5].startswith("national_id:") and clear[5] not in masked[5]
    again = psql(mgw.dsn(mgw.credential()), "-At", "-F", "|", "-c", sql).stdout.strip().split("|")
    assert again[5] == masked[5]  # hashing is stable, so joins on it still work
    s = mgw.wait_for_session(lambda s: s["application_name"] == "t_mask" and s["status"] == "closed")
    assert s["masked"] == {"email": 1, "phone": 1, "card_number": 1, "national_id": 1}


def test_sampled_results_are_recorded_masked_and_capped(mgw) -> None:
    dsn = mgw.dsn(mgw.credential(), application_name="t_sample")
    psql(dsn, "-c", "select id, email, card_number from customers order by id limit 5",
         "-c", "select id, email from customers order by id limit 3", "-c", "select name from customers")
    s = mgw.wait_for_session(lambda s: s["application_name"] == "t_sample" and s["status"] == "closed")
    first, second, third = mgw.session(s["id"])["statements"]
    assert first["rows"] == 5 and first["result"]["columns"] == ["id", "email", "card_number"]
    assert [r[:2] for r in first["result"]["sample"]] == [["1", "[email]"], ["2", "[email]"]]  # two rows, masked
    assert "4111" not in json.dumps(first["result"]) and first["result"]["sample"][0][2].endswith("0001")
    assert second["result"]["columns"] == ["id", "email"]
    # the session's sample budget (130 bytes) runs out: later results keep their columns, fewer or no rows
    assert third["result"]["columns"] == ["name"] and len(third["result"]["sample"]) < 2


def test_psycopg_binary_and_prepared(mgw) -> None:
    with psycopg.connect(mgw.dsn(mgw.credential()), autocommit=True) as conn:
        cur = conn.cursor(binary=True)
        for _ in range(3):  # prepared after the first runs: the plan comes from the statement's Describe
            cur.execute("select email, card_number, id from customers where id = %s", (2,), prepare=True)
            email, card, ident = cur.fetchone()
            assert email == "[email]" and card.endswith("0002") and ident == 2
        rows = conn.execute("select json_build_object('mail', email, 'id', id), array[email, phone] "
                            "from customers where id = 3").fetchone()
        assert rows[0] == {"mail": "[email]", "id": 3}
        assert rows[1] == ["[email]", "[phone]"]


def test_asyncpg_binary_protocol(mgw) -> None:
    async def main() -> None:
        conn = await asyncpg.connect(mgw.dsn(mgw.credential()))
        try:
            stmt = await conn.prepare("select email, phone, id from customers where id = $1")
            for i in (4, 5, 6):
                row = await stmt.fetchrow(i)
                assert (row["email"], row["phone"], row["id"]) == ("[email]", "[phone]", i)
            other = await conn.prepare("select name from customers where id = $1")
            assert (await other.fetchrow(4))["name"]  # an unmasked statement in between
            assert (await stmt.fetchrow(7))["email"] == "[email]"
            arr = await conn.fetchval("select array_agg(email) from customers where id < 3")
            assert arr is None or all(v == "[email]" for v in arr)  # a binary array is masked or withheld, never leaked
        finally:
            await conn.close()

    asyncio.run(main())


def test_copy_to_stdout_is_masked_by_content(mgw) -> None:
    dsn = mgw.dsn(mgw.credential("dana"))
    out = psql(dsn, "-c", "\\copy (select id, email from customers order by id limit 3) to stdout")
    lines = out.stdout.splitlines()
    assert lines == ["1\t[email]", "2\t[email]", "3\t[email]"]
    with psycopg.connect(dsn) as conn:
        with conn.cursor().copy("copy (select email from customers order by id limit 2) to stdout") as copy:
            got = [bytes(row).decode().strip() for row in copy]
    assert got == ["[email]", "[email]"]


def test_copy_out_is_refused_where_columns_are_masked(mgw) -> None:
    """COPY output names no columns: it would carry orders.status (masked by column) unmasked."""
    out = psql(mgw.dsn(mgw.credential()), "-c", "\\copy (select status from orders) to stdout", check=False)
    assert out.returncode != 0
    assert "masking:copy-out" in out.stderr and "shipped" not in out.stdout
    with psycopg.connect(mgw.dsn(mgw.credential())) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="masking:copy-out"):
            with conn.cursor().copy("copy orders to stdout") as copy:
                list(copy)
    # and the same session goes on with SELECT, masked by column
    with psycopg.connect(mgw.dsn(mgw.credential()), autocommit=True) as conn:
        assert {r[0] for r in conn.execute("select status from orders").fetchall()} == {"[status]"}


def test_masked_non_text_column_becomes_null(mgw, pg) -> None:
    with psycopg.connect(mgw.dsn(mgw.credential()), autocommit=True) as conn:
        row = conn.execute("select 4111 as card_number, 'x' as national_id").fetchone()
        assert row[0] is None  # an integer column cannot carry a mask string
        assert row[1].startswith("national_id:")


def test_filtering_on_a_masked_column_is_refused_to_masked_identities(mgw) -> None:
    probe = "select id from customers where card_number like '4111 1111 1111 000%' order by id"
    with psycopg.connect(mgw.dsn(mgw.credential()), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="masked column card_number"):
            conn.execute(probe)
        assert conn.execute("select card_number from customers where id = 1").fetchone()[0].endswith("0001")
    with psycopg.connect(mgw.dsn(mgw.credential(user="bob")), autocommit=True) as conn:  # exempt: sees clear data
        assert conn.execute(probe).fetchall()


def test_custom_pattern(mgw) -> None:
    out = psql(mgw.dsn(mgw.credential()), "-At", "-c", "select 'badge EMP-004211 issued'").stdout.strip()
    assert out == "badge [employee_id] issued"


def _corpus_sql() -> str:
    values = [c["value"] for c in CASES]
    return "select v from (values " + ", ".join("('" + v.replace("'", "''") + "')" for v in values) + ") as t(v)"


def _check_corpus(shown: list[str]) -> None:
    for case, got in zip(CASES, shown, strict=True):
        if case["kind"] == "none":
            assert got == case["value"]
        else:
            assert f"[{case['kind']}]" in got and got != case["value"]


def test_corpus_through_psycopg_and_asyncpg(mgw) -> None:
    with psycopg.connect(mgw.dsn(mgw.credential())) as conn:
        _check_corpus([r[0] for r in conn.cursor(binary=True).execute(_corpus_sql(), prepare=True).fetchall()])

    async def main() -> list[str]:
        conn = await asyncpg.connect(mgw.dsn(mgw.credential()))
        try:
            return [r["v"] for r in await conn.fetch(_corpus_sql())]
        finally:
            await conn.close()

    _check_corpus(asyncio.run(main()))


def test_table_qualified_rules_and_aliases(mgw) -> None:
    with psycopg.connect(mgw.dsn(mgw.credential()), autocommit=True) as conn:
        assert conn.execute("select status from orders where id = 1").fetchone() == ("[status]",)
        # an alias does not hide a masked column: the gateway knows where each result column comes from
        assert conn.execute("select status as s, o.id from orders o where id = 1").fetchone() == ("[s]", 1)
        assert conn.execute("select card_number as c from customers where id = 1").fetchone()[0].endswith("0001")
        assert "4111" not in conn.execute("select card_number as c from customers where id = 1").fetchone()[0]
        # the same name elsewhere is not the masked column
        assert conn.execute("select 'paid' as status").fetchone() == ("paid",)
    with psycopg.connect(mgw.dsn(mgw.credential(user="bob")), autocommit=True) as conn:
        assert conn.execute("select status from orders where id = 1").fetchone()[0] in ("paid", "shipped", "refunded")
