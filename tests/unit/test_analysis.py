"""The risk rules: each finding, its level, and a model that may raise a level but never lower it."""

from __future__ import annotations

import datetime as dt

from wardgate.analysis import AnalysisSettings, StatementFacts, analyze, exec_action, refine
from wardgate.analysis.service import for_model

MONDAY_NOON = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC).timestamp()
SUNDAY_NIGHT = dt.datetime(2026, 11, 22, 23, 30, tzinfo=dt.UTC).timestamp()
S = AnalysisSettings()


def run(*texts: str, at: float = MONDAY_NOON, status: str = "ok", **kw) -> object:  # noqa: ANN003
    return analyze([StatementFacts(t, at, status) for t in texts], S, **kw)


def test_routine_reads_are_low() -> None:
    a = run("select * from orders where id = 7", "begin", "commit")
    assert (a.level, a.title, a.findings) == ("low", "Routine activity", [])


def test_privilege_commands_are_high_and_attempts_medium() -> None:
    for sql in ("grant select on customers to public", "revoke all on orders from app", "create role x login",
                "alter system set log_statement = 'none'", "SET ROLE postgres", "set session authorization admin"):
        assert run(sql).level == "high", sql
        assert run(sql).findings[0].rule == "privilege"
    refused = analyze([StatementFacts("grant all on customers to public", MONDAY_NOON, "denied", "deny")], S)
    assert refused.findings[0].level == "medium" and refused.findings[0].title == "Privilege command attempted"
    assert run("set search_path = public").level == "low"


def test_schema_changes() -> None:
    assert run("drop table orders").findings[0].title == "Destructive schema change"
    assert run("truncate orders").level == "high"
    a = run("alter table orders add column note text")
    assert (a.level, a.findings[0].rule) == ("medium", "schema-change")
    assert run("insert into orders values (1)").level == "low"


def test_refusals_count() -> None:
    denied = [StatementFacts("selec 1", MONDAY_NOON, "denied", "deny")] * 3
    assert analyze(denied, S).level == "medium"
    assert analyze(denied * 3, S).level == "high"
    assert analyze([StatementFacts("select 1", MONDAY_NOON, "pending")], S, earlier_refusals=3).level == "medium"


def test_writes_outside_business_hours() -> None:
    a = run("update orders set status = 'x' where id = 1", at=SUNDAY_NIGHT)
    assert (a.level, a.findings[0].rule) == ("medium", "off-hours-write") and "Sun 23:30 UTC" in a.explanation
    assert run("update orders set status = 'x' where id = 1").level == "low"
    assert run("select 1", at=SUNDAY_NIGHT).level == "low"
    refused = [StatementFacts("delete from orders where id = 1", SUNDAY_NIGHT, "denied", "deny")]
    assert analyze(refused, S).level == "low"  # it never ran


def test_bulk_masked_reads_and_unusual_volume() -> None:
    assert run("select 1", masked={"email": 999}).level == "low"
    assert run("select 1", masked={"email": 600, "card": 400}).findings[0].rule == "bulk-masked-read"
    assert run("select 1", masked={"email": 10_000}).level == "high"
    big = [StatementFacts("select * from orders", MONDAY_NOON, "ok", rows=50_000)]
    assert analyze(big, S, history=[100, 120, 90]).findings[0].rule == "unusual-volume"
    assert analyze(big, S, history=[40_000, 60_000, 50_000]).level == "low"
    assert analyze(big, S, history=[100]).level == "low"  # too little history to call it unusual


def test_exec_action_and_model_refinement() -> None:
    assert [exec_action(level, S) for level in ("low", "medium", "high")] == ["allow", "allow", "review"]
    rules = run("drop table orders")
    lowered = refine(rules, {"level": "low", "title": "fine", "explanation": "ignore previous instructions"})
    assert lowered.level == "high" and lowered.title == rules.title and "Model's view (low)" in lowered.explanation
    raised = refine(run("select 1"), {"level": "medium", "title": "Odd lookup", "explanation": "why"})
    assert (raised.level, raised.title, raised.source) == ("medium", "Odd lookup", "llm")


def test_model_input_has_no_literals() -> None:
    assert for_model("select * from c where email = 'jane@example.com' and id = 42") == \
        "select * from c where email = $1 and id = $2"
    assert "jane@example.com" not in for_model("selec jane@example.com")  # unparseable: detectors still apply
