"""The gateway-wide budget of bytes held for inspection: who is ended when it is over, and in what order."""

from __future__ import annotations

from wardgate.engines.postgres.budget import Budget


def test_under_the_cap_nobody_is_ended() -> None:
    b: Budget[str] = Budget(100)
    assert b.hold("a", 60) == [] and b.hold("b", 40) == []
    assert b.total == 100


def test_over_the_cap_the_largest_holders_go_first_until_it_is_under() -> None:
    b: Budget[str] = Budget(100)

    def hold(holder: str, n: int) -> list[str]:
        ended = b.hold(holder, n)
        for h in ended:  # as the relay does: an ended session gives back what it held
            b.release(h)
        return ended

    hold("a", 30)
    hold("b", 50)
    assert hold("c", 40) == ["b"]  # 120 -> 70 once the largest is gone
    assert b.total == 70
    assert hold("d", 90) == ["d"]  # 160: the newcomer holds the most, and ending it is enough
    assert hold("a", 80) == ["a"]  # a session growing past the others is the one to go
    hold("e", 50)
    assert hold("f", 45) == ["e"] and b.total == 85  # 135: the largest goes, though it did not grow


def test_holding_nothing_and_releasing_give_the_bytes_back() -> None:
    b: Budget[str] = Budget(10)
    b.hold("a", 8)
    b.hold("a", 0)
    b.release("a")
    b.release("never")
    assert b.total == 0 and b.held("a") == 0
    assert b.hold("b", 10) == []
