"""Long statements classified in a worker process: the same classification as inline, and a statement past
the time budget refused (and its worker replaced), with the event loop free throughout."""

from __future__ import annotations

import asyncio

from wardgate.policy.guardrails import StatementPolicy, parse_rules
from wardgate.sql.classify import classify
from wardgate.sql.offload import Offload

STATEMENTS = [
    "select a.email, b.total from customers a join orders b using (id) where b.total > 10",
    "with x as (delete from orders returning *) select * from x",
    "drop table customers; select 1",
    "select 'not closed",
    "select " + ", ".join(f"'{i}'" for i in range(3000)),
]


def test_a_worker_classifies_as_the_gateway_would() -> None:
    async def run() -> list:
        offload = Offload(workers=1, timeout=30)
        try:
            return [await offload.classify(s) for s in STATEMENTS]
        finally:
            await offload.close()

    assert asyncio.run(run()) == [classify(s) for s in STATEMENTS]


def test_past_its_budget_a_statement_is_refused_and_the_loop_is_free() -> None:
    costly = "select " + ",".join(["1"] * 1_500_000)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    async def run() -> tuple:
        offload = Offload(workers=1, timeout=0.5)
        ticker = asyncio.ensure_future(tick())
        try:
            refused = await offload.classify(costly)
            seen = ticks
            after = await offload.classify("select 1")  # a fresh worker took the killed one's place
            return refused, seen, after
        finally:
            ticker.cancel()
            await offload.close()

    refused, seen, after = asyncio.run(run())
    assert refused.uninspected and "within 0.5 s" in (refused.error or "")
    assert seen > 100  # the event loop ran all along (a blocked loop would not have ticked at all)
    assert after == classify("select 1")
    decision = StatementPolicy(parse_rules([{"name": "no-drop", "kinds": ["drop"]}])).decide(costly, refused)
    assert decision.action == "deny" and decision.matches[0].rule == "gateway:inspection"


def test_statements_waiting_for_a_worker_go_on_when_the_busy_ones_are_killed() -> None:
    """Two workers, both past their budget, with two more statements waiting: the waiting ones get fresh
    workers (a killed worker gives its place back), and none waits for ever."""
    costly = "select " + ",".join(["1"] * 1_500_000)

    async def run() -> list:
        offload = Offload(workers=2, timeout=1.0)
        try:
            return await asyncio.wait_for(asyncio.gather(
                offload.classify(costly), offload.classify(costly),
                offload.classify("select 2"), offload.classify("select 3")), 60)
        finally:
            await offload.close()

    a, b, c, d = asyncio.run(run())
    assert a.uninspected and b.uninspected
    assert (c, d) == (classify("select 2"), classify("select 3"))
