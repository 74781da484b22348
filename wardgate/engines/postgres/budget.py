"""The gateway-wide budget of bytes held for inspection.

Each session holds at most one message at a time for inspection (a statement being framed, a row being
masked), bounded by `max_message_size`; many sessions together could still hold more memory than the
machine has. So their sum is capped too: when it goes over, the sessions holding the most are ended,
largest first, until it is back under, and every other session carries on unharmed. Ending beats
pausing: a paused session keeps what it holds, and sessions that all wait for room would wait forever.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Generic, TypeVar

H = TypeVar("H")
# A holder giving back at least this much calls `on_large_release`: what it held may sit in the C
# allocator's heap, counted in the process's RSS, until it is handed back to the system (trim_heap).
LARGE = 8 << 20


class Budget(Generic[H]):
    def __init__(self, cap: int, on_large_release: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self.total = 0
        self._held: dict[H, int] = {}
        self._on_large_release = on_large_release
        self._large: set[H] = set()  # holders that have held LARGE or more at some time

    def hold(self, holder: H, nbytes: int) -> list[H]:
        """`holder` now holds `nbytes`; the holders to end, largest first, when the total is over the cap."""
        before = self._held.get(holder, 0)
        if nbytes == before:
            return []
        if nbytes >= LARGE:
            self._large.add(holder)
        elif not nbytes and holder in self._large and self._on_large_release is not None:
            self._on_large_release()  # what it held is gone, and so may be what it made of it (copies)
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
        """`holder` is gone (a session ended): what it held, and what it made of that, is given back."""
        self.hold(holder, 0)
        if holder in self._large:
            self._large.discard(holder)
            if self._on_large_release is not None:
                self._on_large_release()

    def held(self, holder: H) -> int:
        return self._held.get(holder, 0)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc's; elsewhere there is nothing to do


def trim_heap() -> None:
    """Hand the C allocator's free memory back to the system. A spike of large messages read in many
    chunks leaves the heap fragmented, and RSS stays at the spike's height without this."""
    if _malloc_trim is not None:
        _malloc_trim(0)
