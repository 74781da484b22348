"""The gateway-wide budget of bytes held for inspection.

Each session holds at most one message at a time for inspection (a statement being framed, a row being
masked), bounded by `max_message_size`; many sessions together could still hold more memory than the
machine has. So their sum is capped too: when it goes over, the sessions holding the most are ended,
largest first, until it is back under, and every other session carries on unharmed. Ending beats
pausing: a paused session keeps what it holds, and sessions that all wait for room would wait forever.
"""

from __future__ import annotations

from typing import Generic, TypeVar

H = TypeVar("H")


class Budget(Generic[H]):
    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.total = 0
        self._held: dict[H, int] = {}

    def hold(self, holder: H, nbytes: int) -> list[H]:
        """`holder` now holds `nbytes`; the holders to end, largest first, when the total is over the cap."""
        before = self._held.get(holder, 0)
        if nbytes == before:
            return []
        if nbytes:
            self._held[holder] = nbytes
        else:
            del self._held[holder]
        self.total += nbytes - before
        if self.total <= self.cap:
            return []
        over, total = [], self.total
        for h, n in sorted(self._held.items(), key=lambda item: -item[1]):
            if total <= self.cap:
                break
            over.append(h)
            total -= n
        return over

    def release(self, holder: H) -> None:
        self.total -= self._held.pop(holder, 0)

    def held(self, holder: H) -> int:
        return self._held.get(holder, 0)
