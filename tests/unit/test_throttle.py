"""The brute-force lockout: free attempts, then locks that double, capped; forgotten after quiet; bounded."""

from wardgate.identity.throttle import Throttle, lockout_message


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_locks_double_up_to_the_cap_and_a_success_clears() -> None:
    clock = Clock()
    t = Throttle(free=3, first_lock=1.0, max_lock=8.0, clock=clock)
    assert [t.failed("k") for _ in range(2)] == [0.0, 0.0] and t.wait("k") == 0.0
    locks = []
    for _ in range(6):
        locks.append(t.failed("k"))
        clock.now += locks[-1]  # each attempt after the lock runs out
    assert locks == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    t.failed("k")
    assert t.wait("k") == 8.0 and t.wait("other") == 0.0
    t.succeeded("k")
    assert t.wait("k") == 0.0 and t.failed("k") == 0.0


def test_failures_are_forgotten_after_a_quiet_spell() -> None:
    clock = Clock()
    t = Throttle(free=2, forget_after=60.0, clock=clock)
    assert t.failed("k") == 0.0
    assert t.failed("k") == 1.0  # locked after `free` failures
    clock.now += 1.0 + 59.0
    assert t.failed("k") == 2.0  # not quiet long enough: the next lock is longer
    clock.now += 2.0 + 61.0
    assert t.failed("k") == 0.0  # counted afresh


def test_memory_is_bounded() -> None:
    t = Throttle(free=1, max_keys=100, clock=Clock())
    for i in range(10_000):
        t.failed(("10.0.0.1", f"user{i}"))
    assert len(t._keys) == 100 and t.wait(("10.0.0.1", "user9999")) > 0


def test_message_says_when_to_retry() -> None:
    assert lockout_message(0.2) == "too many failed sign-ins from this address; try again in 1 s"
    assert lockout_message(1.6) == "too many failed sign-ins from this address; try again in 2 s"
