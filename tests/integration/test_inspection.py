"""What inspection costs is bounded: long statements are classified in a worker with a time budget,
values too long to search are masked whole, and the bytes held for inspection across sessions are capped.
Each refusal is checked against the database, and a bystander session keeps working throughout."""

from __future__ import annotations

import psycopg
import pytest

from tests.conftest import bystander_session, make_gateway
from tests.integration.test_masking import MASKING
from tests.pgwire import RawClient
from wardgate.engines.postgres import codec

# A budget no statement here should need even on a loaded machine; the refusal of one that is too
# costly is tested on a gateway of its own with a budget of 2 s (`tight`): a statement that loaded
# machine makes slower is refused all the more.
LIMITS = """
inspect_budget = 25165824
inspect_timeout = 120.0
max_scanned_value = 65536
"""

RULES = """
[[guardrails]]
name = "no-drop"
kinds = ["drop"]
connections = ["shop"]
"""


@pytest.fixture(scope="module")
def igw(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("inspection"), pg, extra_toml=LIMITS, tail_toml=MASKING + RULES)
    gw.cli("users", "add", "dana", "--group", "deployers")  # content detectors only: COPY out is masked
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def tight(tmp_path_factory, pg):  # noqa: ANN001, ANN201
    gw = make_gateway(tmp_path_factory.mktemp("inspection-tight"), pg,
                      extra_toml=LIMITS.replace("inspect_timeout = 120.0", "inspect_timeout = 2.0"), tail_toml=RULES)
    gw.start()
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def superuser(pg):  # noqa: ANN001, ANN201
    with psycopg.connect(pg.dsn(database="shop"), autocommit=True) as conn:
        conn.execute("create table if not exists inspection_victim (a int)")
        conn.execute("grant all on inspection_victim to app")
        yield conn


@pytest.fixture
def bystander(igw):  # noqa: ANN001, ANN201
    with bystander_session(igw) as conn:
        yield conn


def _simple(conn: psycopg.Connection, sql: str):  # noqa: ANN202
    """`sql` sent as one simple-protocol Query (libpq's PQexec)."""
    return conn.pgconn.exec_(sql.encode())


def _exists(superuser: psycopg.Connection, table: str) -> bool:
    return superuser.execute("select to_regclass(%s) is not null", (table,)).fetchone()[0]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_a_long_statement_is_decided_like_a_short_one(igw, superuser, bystander, protocol) -> None:
    """A statement over the inline limit goes to a worker, and its rules hold all the same."""
    padding = "/* " + "x" * 200_000 + " */"
    with psycopg.connect(igw.dsn(igw.credential()), autocommit=True) as conn:
        if protocol == "simple":
            res = _simple(conn, f"select 1 {padding}; drop table inspection_victim")
            assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42501"
            assert b"no-drop" in res.error_message
            assert _simple(conn, f"select length('{'y' * 300_000}') {padding}").get_value(0, 0) == b"300000"
        else:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="no-drop"):
                conn.execute(f"drop table inspection_victim {padding}")
            assert conn.execute(f"select length('{'y' * 300_000}') {padding}").fetchone() == (300_000,)
    assert _exists(superuser, "inspection_victim")


def test_a_statement_too_costly_to_classify_is_refused(tight, superuser) -> None:
    """Two million constants take a worker far past its 2 s budget: refused, and nothing runs."""
    sql = "insert into inspection_victim select 1 from (select " + ",".join(["1"] * 2_000_000) + ") t"
    before = superuser.execute("select count(*) from inspection_victim").fetchone()
    with bystander_session(tight) as other, psycopg.connect(tight.dsn(tight.credential()), autocommit=True) as conn:
        res = _simple(conn, sql)
        assert res.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"42501"
        assert b"gateway:inspection" in res.error_message and b"within 2 s" in res.error_message
        # The same session goes on, and a fresh worker answers the next long statement.
        assert conn.execute(f"select length('{'z' * 5000}')").fetchone() == (5000,)
        assert other.execute("select 1").fetchone() == (1,)
    assert superuser.execute("select count(*) from inspection_victim").fetchone() == before


def test_a_value_too_long_to_search_is_masked_whole(igw, bystander) -> None:
    with psycopg.connect(igw.dsn(igw.credential()), autocommit=True) as conn:
        short, long_ = conn.execute(
            "select 'mail bob@example.com ' || repeat('x', 1000), 'mail bob@example.com ' || repeat('x', 70000)"
        ).fetchone()
        assert short == "mail [email] " + "x" * 1000
        assert long_ == "[unscanned]"
    with psycopg.connect(igw.dsn(igw.credential("dana")), autocommit=True) as conn:
        with conn.cursor() as cur, cur.copy(
                "copy (select 'bob@example.com ' || repeat('x', 70000), 'ann@example.com') to stdout") as copy:
            copied = b"".join(bytes(b) for b in copy)
        assert copied == b"[unscanned]\t[email]\n"


def test_the_session_holding_most_is_ended_past_the_budget(igw, superuser, bystander) -> None:
    """A 32 MiB statement is over the gateway's 24 MiB budget for bytes held for inspection: its session
    is ended with 53200, read to the end of its message first so that the error reaches the client."""
    before = superuser.execute("select count(*) from inspection_victim").fetchone()
    c = RawClient(igw.port, timeout=30)
    c.login("alice", igw.credential()["credential"], "shop")
    c.send(codec.message(b"Q", codec.cstr(f"insert into inspection_victim select length('{'w' * (32 << 20)}')")))
    err = c.error()
    assert err["C"] == "53200" and "too much data for inspection" in err["M"]
    assert c.closed()
    assert superuser.execute("select count(*) from inspection_victim").fetchone() == before
    assert bystander.execute("select 1").fetchone() == (1,)
    # Under the budget, the same statement runs, and is recorded whole (in a journal file of its own).
    sql = f"select length('{'w' * (3 << 20)}')"
    with psycopg.connect(igw.dsn(igw.credential(), application_name="budget-under"), autocommit=True) as conn:
        assert _simple(conn, sql).get_value(0, 0) == str(3 << 20).encode()
    # Its session's end reaches the store some seconds later (the recorder is slow with long texts).
    session = igw.wait_for_session(lambda s: s["application_name"] == "budget-under" and s["status"] != "active",
                                   timeout=90)
    [stmt] = [st for st in igw.cli_json("sessions", "show", session["id"])["statements"] if "length" in st["text"]]
    assert stmt["text"] == sql and stmt["status"] == "ok"


def test_a_long_statement_read_off_the_hot_path_still_waits_for_settings(igw, bystander) -> None:
    """A backslash after an Execute not yet answered (no Sync since) waits for the server's report of its
    settings: refused, long as short, though the long one's text was read off the hot path."""
    c = RawClient(igw.port, timeout=30)
    c.login("alice", igw.credential()["credential"], "shop")
    padding = "/* " + "p" * 100_000 + " */"

    def parse(sql: str) -> bytes:
        return codec.message(b"P", codec.cstr("") + codec.cstr(sql) + b"\x00\x00")

    run = (parse("select 1") + codec.message(b"B", b"\x00\x00" + b"\x00\x00" * 3)
           + codec.message(b"E", b"\x00" + b"\x00" * 4))
    c.send(run + parse(f"select E'\\\\' {padding}") + codec.message(b"S", b""))
    answer = c.read_until("Z")
    assert [t for t, _ in answer][:4] == ["1", "2", "D", "C"]
    errors = [body for t, body in answer if t == "E"]
    assert errors and b"42501" in errors[0] and b"gateway:encoding" in errors[0]
    # After the Sync's answer, the same Parse is read and runs.
    c.send(parse(f"select E'\\\\' {padding}") + codec.message(b"B", b"\x00\x00" + b"\x00\x00" * 3)
           + codec.message(b"E", b"\x00" + b"\x00" * 4) + codec.message(b"S", b""))
    assert [t for t, _ in c.read_until("Z")] == ["1", "2", "D", "C", "Z"]


def test_a_binds_values_are_searched_for_the_record_within_a_budget(igw, bystander) -> None:
    """Tens of thousands of bound values would hold the event loop while each is searched for the record:
    the first 32 Ki characters are masked, the rest recorded as [unscanned]. None is recorded in clear."""
    values = [f"mail bob{i}@example.com " + "v" * 1000 for i in range(100)]
    marks = ", ".join(["%s"] * len(values))
    with psycopg.connect(igw.dsn(igw.credential(), application_name="bind-budget"), autocommit=True) as conn:
        assert conn.execute(f"select cardinality(array[{marks}])", values).fetchone() == (100,)
    session = igw.wait_for_session(lambda s: s["application_name"] == "bind-budget" and s["status"] != "active")
    [stmt] = [st for st in igw.cli_json("sessions", "show", session["id"])["statements"] if "cardinality" in st["text"]]
    recorded = stmt["params"]
    assert len(recorded) == 100 and not any("@example.com" in v for v in recorded)
    searched = [v for v in recorded if v != "[unscanned]"]
    assert 20 < len(searched) < 40 and all(v.startswith("mail [email] vvv") for v in searched)
    assert recorded[len(searched):] == ["[unscanned]"] * (100 - len(searched))



def test_a_long_statement_written_a_slice_at_a_time_arrives_whole_and_in_order(igw, bystander) -> None:
    """What goes upstream over a MiB is written a MiB a turn of the loop, what follows waiting behind it."""
    with psycopg.connect(igw.dsn(igw.credential()), autocommit=True) as conn:
        text = "y" * (3 << 20)
        assert conn.execute(f"select length('{text}'), 'after'").fetchone() == (3 << 20, "after")
        assert conn.execute("select 1").fetchone() == (1,)
    assert bystander.execute("select 1").fetchone() == (1,)
